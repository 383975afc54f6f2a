/**
 * `qchain img measure` against `qemu-img measure`: the same numbers (human and JSON) over a grid
 * of output options (cluster size, refcount width, extended L2, compat, preallocation, backing)
 * and sources (sizes, sparse raw files, qcow2 chains, zero and compressed clusters, bitmaps),
 * and the same messages and exit status for bad operands.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { oracle, qchain, qemuImg, qemuImgSync, qemuIoSync, scratch } from './helpers/qemu.js';
import { qchainImgInProcess } from './helpers/inproc.js';

async function same(dir: string, args: string[], fresh = false): Promise<void> {
  const q = await qemuImg(['measure', ...args], dir);
  const c = fresh ? await qchain(['img', 'measure', ...args], dir) : await qchainImgInProcess(['measure', ...args], dir);
  assert.deepEqual({ code: c.code, stdout: c.stdout, stderr: c.stderr }, { code: q.code, stdout: q.stdout, stderr: q.stderr }, `measure ${args.join(' ')}`);
}

const OPTION_GRID = [
  '', 'cluster_size=512', 'cluster_size=4k', 'cluster_size=2M', 'refcount_bits=1', 'refcount_bits=64,cluster_size=4k',
  'extended_l2=on', 'extended_l2=on,cluster_size=16k', 'compat=0.10', 'preallocation=metadata', 'preallocation=full',
  'preallocation=falloc,cluster_size=8k', 'backing_file=whatever', 'lazy_refcounts=on,refcount_bits=8',
];

test('measure --size: qcow2 and raw over sizes and options', oracle(), async () => {
  const dir = scratch();
  for (const size of ['0', '1', '1000', '64M', '1G', '1234567890', '3T', '100P']) {
    await same(dir, ['--size', size]);
    for (const o of OPTION_GRID) {
      for (const out of ['human', 'json']) await same(dir, ['--size', size, '-O', 'qcow2', `--output=${out}`, ...(o ? ['-o', o] : [])]);
    }
  }
  await same(dir, ['--size', '2305843009213693951', '-O', 'qcow2', '-o', 'cluster_size=2M']);
});

test('measure from images: sparse raw, qcow2 chains, zero/compressed clusters, bitmaps', oracle(), async () => {
  const dir = scratch();
  const io = (fmt: string, file: string, ...cmds: string[]): void => { qemuIoSync(['-f', fmt, ...cmds.flatMap((c) => ['-c', c]), file], dir); };
  qemuImgSync(['create', '-q', '-f', 'raw', 'sparse.raw', '10M'], dir);
  io('raw', 'sparse.raw', 'write -P 1 100k 300k', 'write -P 2 5M 1', 'write -P 3 9M 70k');
  fs.writeFileSync(path.join(dir, 'trunc.raw'), '');
  fs.truncateSync(path.join(dir, 'trunc.raw'), 3 * 1024 * 1024 + 1000);
  io('raw', 'trunc.raw', 'write -P 1 64k 64k', 'write -P 1 1M 4k');
  fs.writeFileSync(path.join(dir, 'full.raw'), Buffer.alloc(2 * 1024 * 1024, 7));
  qemuImgSync(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', 'base.qcow2', '8M'], dir);
  io('qcow2', 'base.qcow2', 'write -P 1 0 3M', 'write -z 1M 512k');
  qemuImgSync(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'mid.qcow2', '12M'], dir);
  io('qcow2', 'mid.qcow2', 'write -P 2 5M 100k', 'write -z 0 64k', 'discard 2M 256k');
  qemuImgSync(['create', '-q', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', 'top.qcow2'], dir);
  io('qcow2', 'top.qcow2', 'write -P 3 11M 3k', 'write -P 4 70000 5000');
  qemuImgSync(['convert', '-c', '-O', 'qcow2', 'top.qcow2', 'comp.qcow2'], dir);
  qemuImgSync(['create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on', 'ext.qcow2', '4M'], dir);
  io('qcow2', 'ext.qcow2', 'write -P 1 3k 5k', 'write -P 1 1M 64k', 'write -z 1040k 8k');
  qemuImgSync(['create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', 'v2.qcow2', '4M'], dir);
  io('qcow2', 'v2.qcow2', 'write -P 1 0 100k');
  qemuImgSync(['create', '-q', '-f', 'qcow2', 'bm.qcow2', '100M'], dir);
  io('qcow2', 'bm.qcow2', 'write -P 1 0 1M');
  qemuImgSync(['bitmap', '--add', 'bm.qcow2', 'b1'], dir);
  qemuImgSync(['bitmap', '--add', '-g', '512', 'bm.qcow2', 'a-longer-bitmap-name'], dir);
  qemuImgSync(['bitmap', '--add', '-g', '2M', '--disable', 'bm.qcow2', 'b3'], dir);
  const sources = ['sparse.raw', 'trunc.raw', 'full.raw', 'base.qcow2', 'mid.qcow2', 'top.qcow2', 'comp.qcow2', 'ext.qcow2', 'v2.qcow2', 'bm.qcow2'];
  for (const s of sources) {
    await same(dir, [s]);
    for (const o of OPTION_GRID) {
      await same(dir, ['-O', 'qcow2', s, ...(o ? ['-o', o] : [])]);
      await same(dir, ['-O', 'qcow2', '--output=json', s, ...(o ? ['-o', o] : [])]);
    }
  }
  await same(dir, ['-f', 'raw', '-O', 'qcow2', 'top.qcow2']);
  // -l: what an internal snapshot holds (the image changed after the snapshot was taken).
  fs.copyFileSync(path.join(dir, 'base.qcow2'), path.join(dir, 'snap.qcow2'));
  qemuImgSync(['snapshot', '-c', 's1', 'snap.qcow2'], dir);
  io('qcow2', 'snap.qcow2', 'write -P 5 4M 2M', 'discard 0 1M');
  for (const l of ['s1', '1', '2', 'nope', 'snapshot.id=1', 'snapshot.name=s1', 'snapshot.id=1,snapshot.name=x', 'snapshot.foo=1', 'snapshot.name=']) {
    await same(dir, ['-O', 'qcow2', '-l', l, 'snap.qcow2']);
  }
  await same(dir, ['-O', 'qcow2', 'snap.qcow2']);
  await same(dir, ['-l', 's1', 'full.raw']);
});

test('measure: bad operands and options give qemu-img messages and status', oracle(), async () => {
  const dir = scratch();
  qemuImgSync(['create', '-q', '-f', 'qcow2', 'a.qcow2', '1M'], dir);
  const cases: string[][] = [
    [], ['a.qcow2', 'b.qcow2'], ['-f', 'qcow2', '--size', '1G'], ['-l', 's', '--size', '1G'], ['--size', '1G', 'a.qcow2'],
    ['--size', '1Q'], ['--size', '-5', '-O', 'qcow2'], ['--size', '1G', '-O', 'foo'], ['--size', '1G', '-O', 'qcow2', '-o', 'help'],
    ['--size', '1G', '-O', 'qcow2', '-o', 'cluster_size=3000'], ['--size', '1G', '-O', 'qcow2', '-o', 'bogus=1'],
    ['--size', '1G', '-O', 'qcow2', '-o', 'compat=0.10,refcount_bits=8'], ['--size', '1G', '-O', 'qcow2', '-o', 'preallocation=bogus'],
    ['--output=xml', '--size', '1G'], ['--size', '100P', '-O', 'qcow2'], ['-O', 'qcow2', '-l', 'snap', 'a.qcow2'], ['nothere'],
    ['--size', '1G', '-O', 'qcow2', '-o', 'size=5G'], ['--size', '1000', '-O', 'qcow2', '-o', 'extended_l2=on,cluster_size=4k'],
    ['--size', '1000', '-O', 'raw', '-o', 'cluster_size=4k'], ['--size', '1G', '-O', 'qcow2', '-o', 'compat=v2'],
    ['--size', '1G', '-O', 'qcow2', '-o', 'refcount_bits=abc'], ['--size', '1G', '-O', 'qcow2', '-o', 'lazy_refcounts=maybe'],
    ['--size', '1G', '-O', 'qcow2', '-o', 'cluster_size=abc'], ['--size', '1G', '-O', 'qcow2', '-o', 'refcount_bits=0'],
    ['--size', '1G', '-O', 'qcow2', '-o', 'refcount_bits=128'], ['--size', '1G', '-O', 'raw', '-o', 'nocow=on,preallocation=full'],
    ['--size', '1G', '-O', 'qcow2', '-o', 'encrypt.format=luks'], ['-f', 'qcow2', 'nothere'], ['-O', 'raw', '-o', 'size=1M'],
  ];
  for (const c of cases) await same(dir, c, true);
});
