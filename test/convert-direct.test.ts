/**
 * `img convert` writes its bulk data with O_DIRECT unless -t says otherwise (cache=unsafe
 * semantics otherwise: no flushes), and falls back to the page cache where direct writes are
 * refused. Whatever the cache mode, the output file is byte for byte qemu-img convert's.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { FileStorage } from '../src/storage/file.js';
import { alignedBuffer } from '../src/storage/aligned.js';
import { QCHAIN, oracle, qemuImgSync, qemuIoSync, scratch, which } from './helpers/qemu.js';

const KiB = 1024, MiB = 1024 * KiB;

/** base ← top, 64 MiB virtual: data in both layers, partial clusters, zeroes, a hole. */
function chain(dir: string): void {
  qemuImgSync(['create', '-q', '-f', 'qcow2', 'base.qcow2', '64M'], dir);
  qemuIoSync(['-c', 'write -P 0x11 0 40M', '-c', 'write -P 0x12 48M 16M', 'base.qcow2'], dir);
  qemuImgSync(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'top.qcow2'], dir);
  const cmds = ['write -P 0x22 1M 5M', 'write -P 0x23 7M 4096', 'write -P 0x24 9M 100000', 'write -z 12M 3M', 'write -P 0x25 20M 8M'];
  qemuIoSync([...cmds.flatMap((c) => ['-c', c]), 'top.qcow2'], dir);
}

for (const fmt of ['qcow2', 'raw']) {
  for (const mode of [null, 'none', 'unsafe', 'writeback']) {
    test(`img convert -O ${fmt} ${mode ? `-t ${mode}` : '(default: direct data writes)'}: the same file as qemu-img convert`, oracle(), () => {
      const q = scratch(), c = scratch();
      chain(q);
      chain(c);
      const t = mode ? ['-t', mode] : [];
      qemuImgSync(['convert', ...t, '-O', fmt, 'top.qcow2', 'out'], q);
      execFileSync(QCHAIN, ['img', 'convert', ...t, '-O', fmt, 'top.qcow2', 'out'], { cwd: c });
      assert.ok(fs.readFileSync(path.join(q, 'out')).equals(fs.readFileSync(path.join(c, 'out'))), 'files differ');
      if (fmt === 'qcow2') assert.match(qemuImgSync(['check', 'out'], c), /No errors were found/);
    });
  }
}

/** Bytes of `file` in the page cache, from util-linux's fincore. */
function cachedBytes(file: string): number {
  const out = execFileSync('fincore', ['--bytes', '--noheadings', '--output', 'RES', file], { encoding: 'utf8' });
  return Number(out.trim());
}

const fincoreOk = (): { skip?: string } =>
  which('fincore') || process.env.CI ? oracle() : { skip: 'fincore (util-linux-extra) not installed (CI installs it)' };

test('img convert by default keeps its data out of the page cache; -t unsafe and -t writeback leave it there', fincoreOk(), () => {
  const d = scratch();
  chain(d);
  const data = 56 * MiB; // what the guest view holds as data (the zeroes and the hole are not written)
  execFileSync(QCHAIN, ['img', 'convert', '-O', 'qcow2', 'top.qcow2', 'direct.qcow2'], { cwd: d });
  const direct = cachedBytes(path.join(d, 'direct.qcow2'));
  assert.ok(direct < data / 8, `default: ${direct} bytes cached (only metadata expected)`);
  for (const mode of ['unsafe', 'writeback']) {
    execFileSync(QCHAIN, ['img', 'convert', '-t', mode, '-O', 'qcow2', 'top.qcow2', `${mode}.qcow2`], { cwd: d });
    const cached = cachedBytes(path.join(d, `${mode}.qcow2`));
    assert.ok(cached > (data * 3) / 4, `-t ${mode}: only ${cached} bytes cached`);
  }
});

/**
 * A descriptor whose writes fail with EINVAL, as a direct descriptor's do on a device with
 * logical blocks larger than 4 KiB: the process's own oom_score_adj refuses a non-number.
 */
function einvalFd(): number {
  return fs.openSync('/proc/self/oom_score_adj', 'w');
}

test('FileStorage direct "auto": a direct write refused with EINVAL is redone through the page cache, and direct writes stop', async () => {
  const dir = scratch();
  const file = path.join(dir, 'f');
  const s = await FileStorage.open(file, { create: true, direct: 'auto' });
  const bad = einvalFd();
  const inner = s as unknown as { directFd: number };
  const realDirect = inner.directFd;
  assert.ok(realDirect >= 0, 'ext4/xfs take O_DIRECT opens');
  inner.directFd = bad;
  try {
    const a = alignedBuffer(1 * MiB).fill(0x5a);
    const b = alignedBuffer(256 * KiB).fill(0x6b);
    await Promise.all([s.write(a, 0), s.writev([b.subarray(0, 128 * KiB), b.subarray(128 * KiB)], 2 * MiB)]);
    assert.equal(s.directBytes, 0);
    assert.equal(s.direct, false, 'direct writes are off after the refusal');
    await s.write(alignedBuffer(64 * KiB).fill(0x7c), 4 * MiB);
    const back = Buffer.alloc(4 * MiB + 64 * KiB);
    await s.read(back, 0);
    assert.ok(back.subarray(0, MiB).every((x) => x === 0x5a));
    assert.ok(back.subarray(MiB, 2 * MiB).every((x) => x === 0));
    assert.ok(back.subarray(2 * MiB, 2 * MiB + 256 * KiB).every((x) => x === 0x6b));
    assert.ok(back.subarray(4 * MiB).every((x) => x === 0x7c));
  } finally {
    await s.close(); // closes the retired descriptor (`bad`) too
    fs.closeSync(realDirect);
  }
  assert.throws(() => fs.fstatSync(bad), /EBADF/, 'close() closed the refused descriptor');
});

test('FileStorage direct "on": a refused direct write is an error, not a silent fallback', async () => {
  const dir = scratch();
  const s = await FileStorage.open(path.join(dir, 'g'), { create: true, direct: 'on' });
  const inner = s as unknown as { directFd: number };
  const realDirect = inner.directFd;
  inner.directFd = einvalFd();
  try {
    await assert.rejects(s.write(alignedBuffer(1 * MiB).fill(1), 0), /Invalid argument/);
    assert.equal(s.direct, true);
  } finally {
    await s.close();
    fs.closeSync(realDirect);
  }
});
