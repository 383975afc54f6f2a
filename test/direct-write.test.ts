/**
 * Direct (O_DIRECT) data writes: FileStorage sends large aligned writes from aligned buffers to
 * the device and everything else through the page cache, and the two stay coherent; `img commit`
 * (direct by default, as with -t none) gives the same guest views as qemu-img commit, with clean
 * checks, whatever the cache mode.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { FileStorage } from '../src/storage/file.js';
import { openChain } from '../src/chain/open.js';
import { commit } from '../src/ops/commit.js';
import { alignedBuffer, isDirectBuffer } from '../src/storage/aligned.js';
import { QCHAIN, oracle, qemuImgSync, qemuIoSync, scratch } from './helpers/qemu.js';

const KiB = 1024, MiB = 1024 * KiB;

test('aligned buffers: page-aligned storage, cut at 4 KiB multiples only', () => {
  const b = alignedBuffer(3 * MiB);
  assert.equal(b.length, 3 * MiB);
  assert.ok(isDirectBuffer(b));
  assert.ok(isDirectBuffer(b.subarray(64 * KiB, 128 * KiB)));
  assert.ok(!isDirectBuffer(b.subarray(512, 512 + 64 * KiB)), 'misaligned start');
  assert.ok(!isDirectBuffer(b.subarray(0, 64 * KiB + 100)), 'length not a multiple of 4 KiB');
  assert.ok(!isDirectBuffer(Buffer.alloc(64 * KiB)), 'malloc memory is never taken as aligned');
});

test('FileStorage direct: large aligned writes go direct, others buffered; reads see every write in order', async () => {
  const dir = scratch();
  const file = path.join(dir, 'f');
  const s = await FileStorage.open(file, { create: true, direct: 'on' });
  try {
    assert.equal(s.direct, true);
    const model = Buffer.alloc(8 * MiB);
    const put = async (buf: Buffer, off: number, vec = false): Promise<void> => {
      if (vec) await s.writev([buf.subarray(0, buf.length / 2), buf.subarray(buf.length / 2)], off);
      else await s.write(buf, off);
      buf.copy(model, off);
    };
    const aligned = (n: number, seed: number): Buffer => {
      const b = alignedBuffer(n);
      b.fill(seed);
      b.writeUInt32BE(seed * 7919, 0);
      return b;
    };
    // Buffered first (dirty page cache), then direct over it and around it.
    await put(crypto.randomBytes(3 * MiB), 0);
    assert.equal(s.directBytes, 0, 'a malloc buffer is written through the page cache');
    await put(aligned(1 * MiB, 0x11), 1 * MiB);
    assert.equal(s.directBytes, 1 * MiB);
    await put(aligned(256 * KiB, 0x22), 4 * MiB, true);
    assert.equal(s.directBytes, 1 * MiB + 256 * KiB, 'a vector of aligned pieces goes direct');
    // Direct, then a small buffered write inside it, then direct next to it.
    await put(aligned(2 * MiB, 0x33), 5 * MiB);
    await put(Buffer.from('inside a direct range'), 5 * MiB + 1000);
    await put(aligned(64 * KiB, 0x44), 7 * MiB);
    // Aligned memory but a misaligned offset, and a small aligned write: both buffered.
    const before = s.directBytes;
    await put(aligned(128 * KiB, 0x55), 6 * MiB + 512);
    await put(aligned(4 * KiB, 0x66), 7 * MiB + 128 * KiB);
    assert.equal(s.directBytes, before);
    const back = Buffer.alloc(model.length);
    await s.read(back, 0);
    assert.ok(back.equals(model), 'the file reads back as written, in write order');
    await s.flush();
  } finally {
    await s.close();
  }
  // A fresh descriptor (no page cache of ours) reads the same.
  const disk = fs.readFileSync(file);
  assert.equal(disk.length, 7 * MiB + 132 * KiB);
});

test('FileStorage direct off: no O_DIRECT descriptor, nothing written direct', async () => {
  const dir = scratch();
  const s = await FileStorage.open(path.join(dir, 'g'), { create: true, direct: 'off' });
  try {
    assert.equal(s.direct, false);
    await s.write(alignedBuffer(1 * MiB).fill(9), 0);
    assert.equal(s.directBytes, 0);
  } finally {
    await s.close();
  }
});

/** base ← top with data in both, partial clusters and zeroes in the top, 24 MiB virtual. */
function chain(dir: string): void {
  qemuImgSync(['create', '-q', '-f', 'qcow2', 'base.qcow2', '24M'], dir);
  qemuIoSync(['-c', 'write -P 0x11 0 24M', 'base.qcow2'], dir);
  qemuImgSync(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'top.qcow2'], dir);
  const cmds = ['write -P 0x22 1M 5M', 'write -P 0x23 7M 4096', 'write -P 0x24 9M 100000', 'write -z 12M 3M', 'write -P 0x25 16M 8M'];
  qemuIoSync([...cmds.flatMap((c) => ['-c', c]), 'top.qcow2'], dir);
}

for (const mode of [null, 'none', 'writeback', 'directsync', 'unsafe']) {
  test(`img commit ${mode ? `-t ${mode}` : '(default: direct)'}: same base as qemu-img commit, checks clean`, oracle(), () => {
    const q = scratch(), c = scratch();
    chain(q);
    chain(c);
    const t = mode ? ['-t', mode] : [];
    qemuImgSync(['commit', '-q', ...t, 'top.qcow2'], q);
    execFileSync(QCHAIN, ['img', 'commit', '-q', ...t, 'top.qcow2'], { cwd: c });
    assert.match(qemuImgSync(['compare', path.join(q, 'base.qcow2'), path.join(c, 'base.qcow2')]), /Images are identical/);
    assert.match(qemuImgSync(['compare', path.join(q, 'top.qcow2'), path.join(c, 'top.qcow2')]), /Images are identical/);
    for (const f of ['base.qcow2', 'top.qcow2']) assert.match(qemuImgSync(['check', f], c), /No errors were found/);
  });
}

test('commit through the library with direct writes: the data goes direct, the result matches qemu-img', oracle(), async () => {
  const q = scratch(), c = scratch();
  chain(q);
  chain(c);
  qemuImgSync(['commit', '-q', 'top.qcow2'], q);
  const ch = await openChain(path.join(c, 'top.qcow2'), { readOnly: false, writableDepths: new Set([1]), direct: 'on' });
  try {
    await commit(ch, 1);
    const storage = ch.layers[1].driver.storage as FileStorage;
    assert.ok(storage.directBytes >= 8 * MiB, `direct bytes: ${storage.directBytes}`);
  } finally {
    await ch.close();
  }
  assert.match(qemuImgSync(['compare', path.join(q, 'base.qcow2'), path.join(c, 'base.qcow2')]), /Images are identical/);
  assert.match(qemuImgSync(['check', 'base.qcow2'], c), /No errors were found/);
});

test('img convert -t none: direct writes overlap, yet the host layout is qemu-img convert -t none\'s', oracle(), () => {
  const q = scratch(), c = scratch();
  chain(q);
  chain(c);
  qemuImgSync(['convert', '-t', 'none', '-O', 'qcow2', 'top.qcow2', 'out.qcow2'], q);
  execFileSync(QCHAIN, ['img', 'convert', '-t', 'none', '-O', 'qcow2', 'top.qcow2', 'out.qcow2'], { cwd: c });
  assert.match(qemuImgSync(['compare', path.join(q, 'out.qcow2'), path.join(c, 'out.qcow2')]), /Images are identical/);
  assert.equal(qemuImgSync(['map', '--output=json', 'out.qcow2'], c), qemuImgSync(['map', '--output=json', 'out.qcow2'], q));
  assert.match(qemuImgSync(['check', 'out.qcow2'], c), /No errors were found/);
});

test('img rebase (direct by default) drops the base as qemu-img rebase does: same views, clean check', oracle(), () => {
  const q = scratch(), c = scratch();
  for (const d of [q, c]) {
    chain(d);
    // top gets a new layer above it, then the middle one (top) is dropped by a safe rebase.
    qemuImgSync(['create', '-q', '-f', 'qcow2', '-b', 'top.qcow2', '-F', 'qcow2', 'over.qcow2'], d);
    qemuIoSync(['-c', 'write -P 0x66 3M 2M', 'over.qcow2'], d);
  }
  qemuImgSync(['rebase', '-b', 'base.qcow2', '-F', 'qcow2', 'over.qcow2'], q);
  execFileSync(QCHAIN, ['img', 'rebase', '-b', 'base.qcow2', '-F', 'qcow2', 'over.qcow2'], { cwd: c });
  assert.match(qemuImgSync(['compare', path.join(q, 'over.qcow2'), path.join(c, 'over.qcow2')]), /Images are identical/);
  assert.match(qemuImgSync(['check', 'over.qcow2'], c), /No errors were found/);
  assert.equal(qemuImgSync(['info', '--output=json', 'over.qcow2'], c).match(/"backing-filename": "([^"]*)"/)?.[1], 'base.qcow2');
});

test('FileStorage buffered writes go to the kernel in pieces, whatever their shape, and read back whole', async () => {
  const dir = scratch();
  const s = await FileStorage.open(path.join(dir, 'p'), { create: true });
  try {
    const data = crypto.randomBytes(3 * MiB + 12345);
    await s.write(data.subarray(0, 2 * MiB + 777), 0);
    // A vector of odd-sized buffers crossing the piece size several times.
    const rest = data.subarray(2 * MiB + 777);
    const bufs: Buffer[] = [];
    for (let p = 0, k = 1; p < rest.length; k++) {
      const n = Math.min(rest.length - p, k * 99_991);
      bufs.push(rest.subarray(p, p + n));
      p += n;
    }
    await s.writev(bufs, 2 * MiB + 777);
    const back = Buffer.alloc(data.length);
    await s.read(back, 0);
    assert.ok(back.equals(data));
    assert.equal(await s.size(), data.length);
  } finally {
    await s.close();
  }
});
