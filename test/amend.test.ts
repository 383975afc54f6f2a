/**
 * `qchain img amend` against `qemu-img amend` on copies of the same images: same messages and
 * exit status, amended files byte-identical to QEMU's (so `qemu-img info` is equal too; it is
 * compared explicitly should the bytes ever differ), `qemu-img check` clean, guest view unchanged. A kill -9 test interrupts refcount width changes and
 * downgrades many times: the image must still open, check without corruption and read the same.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { QCHAIN, oracle, qchain, qemuImg, qemuImgSync, qemuIoSync, rng, scratch } from './helpers/qemu.js';
import { qchainImgInProcess } from './helpers/inproc.js';

/** Source images covering the cases amend treats differently. */
function makeSources(dir: string): string[] {
  const img = (name: string, create: string[], size: string, ...io: string[]): string => {
    qemuImgSync(['create', '-q', '-f', 'qcow2', ...create, name, size], dir);
    if (io.length) qemuIoSync(io.flatMap((c) => ['-c', c]).concat(name), dir);
    return name;
  };
  const out = [
    img('empty.qcow2', [], '4M'),
    img('data.qcow2', [], '8M', 'write -P 1 0 1M', 'write -z 256k 128k', 'write -P 0 2M 64k', 'write -z 2M 64k', 'write -z 5M 1M', 'discard 7M 64k'),
    img('c512.qcow2', ['-o', 'cluster_size=512'], '8M', 'write -P 1 0 3M', 'write -z 1M 1M'),
    img('v2.qcow2', ['-o', 'compat=0.10'], '8M', 'write -P 1 0 1M'),
    img('ext.qcow2', ['-o', 'extended_l2=on'], '8M', 'write -P 1 0 1M'),
    img('r8.qcow2', ['-o', 'refcount_bits=8,lazy_refcounts=on'], '8M', 'write -P 1 0 1M'),
    img('zstd.qcow2', ['-o', 'compression_type=zstd'], '8M', 'write -P 1 0 1M'),
    img('base.qcow2', [], '8M', 'write -P 1 0 8M'),
  ];
  qemuImgSync(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'ov.qcow2'], dir);
  qemuIoSync(['-c', 'write -P 2 0 512k', '-c', 'write -z 1M 512k', '-c', 'write -P 3 3M 64k', '-c', 'write -z 3M 64k', '-c', 'discard 6M 1M', 'ov.qcow2'], dir);
  fs.copyFileSync(path.join(dir, 'data.qcow2'), path.join(dir, 'snap.qcow2'));
  qemuImgSync(['snapshot', '-c', 'sn1', 'snap.qcow2'], dir);
  qemuIoSync(['-c', 'write -P 9 0 64k', '-c', 'write -z 4M 64k', 'snap.qcow2'], dir);
  fs.copyFileSync(path.join(dir, 'v2.qcow2'), path.join(dir, 'v2snap.qcow2'));
  qemuImgSync(['snapshot', '-c', 'a', 'v2snap.qcow2'], dir);
  qemuImgSync(['convert', '-c', '-O', 'qcow2', 'data.qcow2', 'comp.qcow2'], dir);
  qemuImgSync(['convert', '-c', '-O', 'qcow2', '-o', 'compression_type=zstd', 'data.qcow2', 'zstdc.qcow2'], dir);
  out.splice(out.indexOf('base.qcow2'), 1);
  return [...out, 'ov.qcow2', 'snap.qcow2', 'v2snap.qcow2', 'comp.qcow2', 'zstdc.qcow2'];
}

const infoJson = async (dir: string, f: string): Promise<unknown> => {
  const r = await qemuImg(['info', '--output=json', '-U', f], dir);
  const v = JSON.parse(r.stdout) as Record<string, unknown>;
  delete v['actual-size'];
  v.filename = 'X';
  return v;
};

/** Amend copies of `src` with both tools; compare everything. */
async function sideBySide(dir: string, src: string, args: string[], fresh = false): Promise<void> {
  fs.copyFileSync(path.join(dir, src), path.join(dir, 'q.qcow2'));
  fs.copyFileSync(path.join(dir, src), path.join(dir, 'c.qcow2'));
  const q = await qemuImg(['amend', ...args, 'q.qcow2'], dir);
  const c = fresh ? await qchain(['img', 'amend', ...args, 'c.qcow2'], dir) : await qchainImgInProcess(['amend', ...args, 'c.qcow2'], dir);
  const what = `amend ${args.join(' ')} ${src}`;
  assert.deepEqual({ code: c.code, stdout: c.stdout, stderr: c.stderr.replaceAll('c.qcow2', 'q.qcow2') }, { code: q.code, stdout: q.stdout, stderr: q.stderr }, what);
  const same = fs.readFileSync(path.join(dir, 'c.qcow2')).equals(fs.readFileSync(path.join(dir, 'q.qcow2')));
  if (!same) {
    // Not expected (every case so far is byte-identical), but report what differs.
    assert.deepEqual(await infoJson(dir, 'c.qcow2'), await infoJson(dir, 'q.qcow2'), `info after ${what}`);
  }
  // Clean, except where QEMU's own result is not: QEMU 7.2's downgrade marks expanded zero
  // clusters COPIED from the L2 table's refcount, wrong for clusters shared with a snapshot.
  const chk = await qemuImg(['check', 'c.qcow2'], dir);
  if (src === 'snap.qcow2' && args.join(' ').includes('compat=0.10')) {
    const qchk = await qemuImg(['check', 'q.qcow2'], dir);
    assert.deepEqual({ code: chk.code, out: chk.stdout + chk.stderr }, { code: qchk.code, out: qchk.stdout + qchk.stderr }, `check after ${what}`);
  } else {
    assert.equal(chk.code, 0, `check after ${what}: ${chk.stdout}${chk.stderr}`);
  }
  // A size change changes the guest view: QEMU's result is the reference then.
  const ref = args.some((a) => /(^|,)size=/.test(a)) ? 'q.qcow2' : src;
  const cmp = await qemuImg(['compare', '-f', 'qcow2', '-F', 'qcow2', ref, 'c.qcow2'], dir);
  assert.equal(cmp.code, 0, `guest view after ${what}: ${cmp.stdout}`);
  assert.ok(same, `file bytes after ${what}`);
}

test('amend: compat, refcount_bits, lazy_refcounts over a set of images, same result as qemu-img amend', oracle(), async () => {
  const dir = scratch();
  const sources = makeSources(dir);
  const grid = [
    'compat=0.10', 'compat=1.1', 'refcount_bits=1', 'refcount_bits=2', 'refcount_bits=8', 'refcount_bits=64', 'lazy_refcounts=on',
    'lazy_refcounts=off', 'compat=0.10,refcount_bits=16', 'refcount_bits=8,backing_file=zz', 'compat=1.1,refcount_bits=4', 'compat=0.10,lazy_refcounts=on',
  ];
  // Every option on a few images; the images with special cases with the options that matter to them.
  const pairs: Array<[string, string]> = [];
  for (const o of grid) pairs.push(['data.qcow2', o]);
  for (const src of ['ov.qcow2', 'snap.qcow2']) for (const o of ['compat=0.10', 'refcount_bits=1', 'refcount_bits=64', 'lazy_refcounts=on', 'compat=1.1,refcount_bits=4']) pairs.push([src, o]);
  for (const o of ['compat=0.10', 'refcount_bits=2']) for (const src of sources) if (!pairs.some(([a, b]) => a === src && b === o)) pairs.push([src, o]);
  pairs.push(['v2.qcow2', 'compat=v3'], ['v2snap.qcow2', 'compat=1.1,refcount_bits=4'], ['v2.qcow2', 'lazy_refcounts=on'], ['r8.qcow2', 'compat=0.10,refcount_bits=16'],
    ['r8.qcow2', 'lazy_refcounts=off'], ['zstd.qcow2', 'compat=0.10'], ['empty.qcow2', 'refcount_bits=16'], ['c512.qcow2', 'refcount_bits=64']);
  for (const [src, o] of pairs) await sideBySide(dir, src, ['-o', o]);
  // Progress output, including operations that go backwards (upgrade then refcount change).
  for (const [s, o] of [['v2snap.qcow2', 'compat=1.1,refcount_bits=4'], ['snap.qcow2', 'refcount_bits=2,compat=0.10'], ['r8.qcow2', 'refcount_bits=16,compat=0.10'],
    ['c512.qcow2', 'refcount_bits=2'], ['ov.qcow2', 'compat=0.10'], ['data.qcow2', 'lazy_refcounts=on']]) {
    await sideBySide(dir, s, ['-p', '-o', o]);
  }
  await sideBySide(dir, 'data.qcow2', ['-q', '-p', '-o', 'refcount_bits=8']);
});

test('amend: help, refused options and bad operands give qemu-img messages and status', oracle(), async () => {
  const dir = scratch();
  qemuImgSync(['create', '-q', '-f', 'qcow2', 'am.qcow2', '4M'], dir);
  const cases: string[][] = [
    ['-o', 'help'], ['-o', 'cluster_size=4k'], ['-o', 'extended_l2=on'], ['-o', 'compression_type=zstd'], ['-o', 'backing_file=x'],
    ['-o', 'backing_fmt=raw'], ['-o', 'bogus=1'], ['-o', 'compat=0.9'], ['-o', 'refcount_bits=3'], ['-o', 'refcount_bits=abc'],
    ['-o', 'lazy_refcounts=maybe'], ['-o', 'compat=0.10,refcount_bits=8'], ['-o', 'preallocation=full'], ['-o', 'data_file=x'],
    ['-o', 'data_file_raw=on'], ['-o', 'encrypt.format=luks'], ['-o', 'encrypt.keyslot=1'], ['-t', 'bogus', '-o', 'compat=v2'],
    ['-o', 'size=abc'], ['-o', 'cluster_size=abc'], ['-o', 'nocow=on'], ['-o', ','], ['-o', 'compat=v2', '-f', 'raw'], ['-o', 'size=4M'],
    // Several bad options: the one QEMU checks first is reported.
    ['-o', 'refcount_bits=3,encrypt.keyslot=1'], ['-o', 'compat=bad,data_file=x'], ['-o', 'data_file=x,refcount_bits=3'], ['-o', 'refcount_bits=3,compat=bad'],
    ['-o', 'data_file_raw=off,lazy_refcounts=on'],
  ];
  for (const c of cases) await sideBySide(dir, 'am.qcow2', c, true);
  for (const c of [['-f', 'qcow2', '-o', 'help'], ['-f', 'raw', '-o', 'help'], ['-f', 'foo', '-o', 'help'], [], ['am.qcow2'], ['-o', 'compat=v2'],
    ['-o', 'compat=v2', 'am.qcow2', 'am.qcow2'], ['-o', 'compat=v2', 'nothere'], ['-x', 'am.qcow2']]) {
    const q = await qemuImg(['amend', ...c], dir);
    const r = await qchain(['img', 'amend', ...c], dir);
    assert.deepEqual({ code: r.code, stdout: r.stdout, stderr: r.stderr }, { code: q.code, stdout: q.stdout, stderr: q.stderr }, `amend ${c.join(' ')}`);
  }
});

/** Run qchain amend and kill it with SIGKILL after `ms` milliseconds (or let it finish). */
function amendKilled(dir: string, file: string, opt: string, ms: number): Promise<boolean> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [QCHAIN, 'img', 'amend', '-o', opt, file], { cwd: dir, stdio: 'ignore' });
    let killed = false;
    const t = setTimeout(() => { killed = child.kill('SIGKILL'); }, ms);
    child.on('exit', (code, sig) => {
      clearTimeout(t);
      resolve(killed && sig === 'SIGKILL' ? true : (assert.equal(code, 0, `amend ${opt} failed`), false));
    });
  });
}

test('amend: kill -9 during refcount width changes and downgrades leaves a consistent image', { ...oracle(), timeout: 600_000 }, async () => {
  const dir = scratch();
  // Small clusters: many refcount blocks to walk and rewrite; zero clusters to expand.
  qemuImgSync(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512', 'orig.qcow2', '16M'], dir);
  const ops: string[] = [];
  const r = rng(42);
  for (let i = 0; i < 60; i++) {
    const off = Math.floor(r() * 16 * 1024) * 1024, len = Math.min(16 * 1024 * 1024 - off, (1 + Math.floor(r() * 200)) * 1024);
    ops.push(r() < 0.3 ? `write -z ${off} ${len}` : `write -P ${1 + Math.floor(r() * 250)} ${off} ${len}`);
  }
  qemuIoSync([...ops.flatMap((c) => ['-c', c]), 'orig.qcow2'], dir);
  qemuImgSync(['create', '-q', '-f', 'raw', 'base.raw', '16M'], dir);
  qemuIoSync(['-f', 'raw', '-c', 'write -P 7 0 16M', 'base.raw'], dir);
  qemuImgSync(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512', '-b', 'base.raw', '-F', 'raw', 'ov.qcow2', '16M'], dir);
  qemuIoSync([...ops.flatMap((c) => ['-c', c]), 'ov.qcow2'], dir);
  const view = (f: string): Promise<{ code: number }> => qemuImg(['compare', '-f', 'qcow2', '-F', 'qcow2', f, 't.qcow2'], dir);
  // Calibrate: how long one full change takes.
  fs.copyFileSync(path.join(dir, 'orig.qcow2'), path.join(dir, 't.qcow2'));
  const t0 = Date.now();
  await amendKilled(dir, 't.qcow2', 'refcount_bits=4', 1e9);
  const full = Math.max(200, Date.now() - t0);
  let kills = 0;
  const plan: Array<[string, string, string]> = [];
  for (const bits of ['4', '64', '1', '32']) plan.push(['orig.qcow2', `refcount_bits=${bits}`, 'orig.qcow2']);
  plan.push(['orig.qcow2', 'compat=0.10', 'orig.qcow2'], ['ov.qcow2', 'compat=0.10', 'ov.qcow2'], ['ov.qcow2', 'refcount_bits=8', 'ov.qcow2']);
  for (let round = 0; round < 3; round++) {
    for (const [src, opt] of plan) {
      fs.copyFileSync(path.join(dir, src), path.join(dir, 't.qcow2'));
      const wasKilled = await amendKilled(dir, 't.qcow2', opt, Math.floor(r() * full * 1.1));
      if (wasKilled) kills++;
      const chk = await qemuImg(['check', '--output=json', 't.qcow2'], dir);
      const res = JSON.parse(chk.stdout) as { corruptions?: number; 'check-errors': number };
      assert.ok(!res.corruptions && !res['check-errors'], `corruption after kill during ${opt}: ${chk.stdout}`);
      assert.ok(chk.code === 0 || chk.code === 3, `check status ${chk.code} after kill during ${opt}`);
      assert.equal((await view(src)).code, 0, `guest view changed after kill during ${opt}`);
      // The interrupted amend can be run again to completion.
      await amendKilled(dir, 't.qcow2', opt, 1e9);
      assert.ok([0, 3].includes((await qemuImg(['check', 't.qcow2'], dir)).code), `check after re-running ${opt}`);
      assert.equal((await view(src)).code, 0, `guest view after re-running ${opt}`);
    }
  }
  assert.ok(kills >= 5, `only ${kills} runs were interrupted (calibrated ${full} ms)`);
});

test('amend: L2 entries for expanded zero clusters encode host offsets above 2 GiB and 4 GiB', async () => {
  const { dataEntry } = await import('../src/qcow2/amend.js');
  assert.deepEqual(dataEntry(0x80010000, true), [0x80000000, 0x80010000]);
  assert.deepEqual(dataEntry(5 * 2 ** 32 + 0xfffe0000, false), [5, 0xfffe0000]);
  assert.deepEqual(dataEntry(0x10000, false), [0, 0x10000]);
});

test('amend -o size: grows and shrinks (no --shrink needed) as qemu-img amend does, alone and with other options', oracle(), async () => {
  const dir = scratch();
  makeSources(dir);
  fs.copyFileSync(path.join(dir, 'data.qcow2'), path.join(dir, 'bm.qcow2'));
  qemuImgSync(['bitmap', '--add', 'bm.qcow2', 'b0'], dir);
  qemuIoSync(['-c', 'write -P 5 1M 64k', 'bm.qcow2'], dir);
  const pairs: Array<[string, string]> = [];
  for (const src of ['data.qcow2', 'c512.qcow2', 'snap.qcow2', 'ov.qcow2', 'v2.qcow2', 'v2snap.qcow2', 'ext.qcow2', 'bm.qcow2']) {
    for (const o of ['size=16M', 'size=2M']) pairs.push([src, o]);
  }
  pairs.push(['data.qcow2', 'size=0'], ['data.qcow2', 'size=8M'], ['data.qcow2', 'size=1000000'], ['data.qcow2', 'size=1G'],
    ['data.qcow2', 'refcount_bits=8,size=12M'], ['data.qcow2', 'compat=0.10,size=4M'], ['snap.qcow2', 'compat=0.10,size=4M'],
    ['v2.qcow2', 'compat=1.1,size=3M'], ['r8.qcow2', 'lazy_refcounts=off,size=6M'], ['ov.qcow2', 'size=12M,compat=0.10']);
  for (const [src, o] of pairs) await sideBySide(dir, src, ['-o', o]);
});
