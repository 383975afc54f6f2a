/**
 * `qchain img create -o preallocation=falloc|full,extended_l2=on` (with and without a backing
 * file) and `img resize --preallocation=falloc|full` of an extended-L2 image: byte-identical to
 * qemu-img 7.2 (qcow2_co_truncate's layout: refcount area, data area, then the L2 tables, every
 * subcluster left unallocated).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { oracle, qchain, qemuImg, qemuImgSync, qemuIoSync, scratch } from './helpers/qemu.js';

function same(dir: string, what: string): void {
  assert.ok(fs.readFileSync(path.join(dir, 'c', 'x.qcow2')).equals(fs.readFileSync(path.join(dir, 'q', 'x.qcow2'))), `byte-identical: ${what}`);
}

/** `args` with qemu-img in q/ and qchain in c/: both succeed with the same output and the same file. */
async function runBoth(dir: string, args: string[]): Promise<void> {
  const rq = await qemuImg(args, path.join(dir, 'q'));
  const rc = await qchain(['img', ...args], path.join(dir, 'c'));
  assert.equal(rq.code, 0, rq.stderr);
  assert.equal(rc.code, 0, rc.stderr);
  assert.equal(rc.stdout, rq.stdout);
  same(dir, args.join(' '));
}

test('create: falloc/full preallocation with extended L2 lays the file out as qemu-img', oracle(), async () => {
  const dir = scratch();
  for (const [opts, size, backing] of [
    ['preallocation=falloc,extended_l2=on', '1M', false], ['preallocation=full,extended_l2=on', '10M', false],
    ['preallocation=falloc,extended_l2=on,cluster_size=16k', '3000k', false],
    ['preallocation=falloc,extended_l2=on,cluster_size=32k,refcount_bits=1', '100M', false],
    ['preallocation=falloc,extended_l2=on', '2M', true], ['preallocation=full,extended_l2=on,cluster_size=16k', '20M', true],
  ] as Array<[string, string, boolean]>) {
    for (const side of ['q', 'c']) {
      fs.rmSync(path.join(dir, side), { recursive: true, force: true });
      fs.mkdirSync(path.join(dir, side));
      if (backing) qemuImgSync(['create', '-q', '-f', 'qcow2', 'b.qcow2', '10M'], path.join(dir, side));
    }
    const args = ['create', '-f', 'qcow2', ...(backing ? ['-b', 'b.qcow2', '-F', 'qcow2'] : []), '-o', opts, 'x.qcow2', size];
    await runBoth(dir, args);
  }
});

test('resize: falloc/full growth of an extended-L2 image lays the file out as qemu-img', oracle(), async () => {
  const dir = scratch();
  for (const [mode, grow] of [['falloc', '5M'], ['full', '1G'], ['falloc', '+7M']]) {
    for (const side of ['q', 'c']) {
      fs.rmSync(path.join(dir, side), { recursive: true, force: true });
      fs.mkdirSync(path.join(dir, side));
      qemuImgSync(['create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on', 'x.qcow2', '3M'], path.join(dir, side));
      qemuIoSync(['-c', 'write -P 1 0 100k', '-c', 'write -P 2 2900k 100k', 'x.qcow2'], path.join(dir, side));
    }
    const args = ['resize', `--preallocation=${mode}`, 'x.qcow2', grow];
    await runBoth(dir, args);
  }
});
