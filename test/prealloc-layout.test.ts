/**
 * Metadata preallocation (`img create -o preallocation=metadata`, `img resize
 * --preallocation=metadata`) lays the file out as qemu-img 7.2's preallocate_co does: the same
 * bytes (`cmp`), the same file length (the last cluster's copy-on-write ends at a subcluster with
 * extended L2 entries), the same written zeros where a partly covered cluster is copied on write
 * (so `qemu-img map` reports the same zero/data runs) and a clean `qemu-img check`. falloc/full
 * resizes move the old end's cluster into the new area as qcow2_co_truncate does, and over a longer
 * backing file they leave no zero clusters (the grown file reads as zeroes).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { oracle, qchain, qemuImg, qemuIo, scratch } from './helpers/qemu.js';

/** Whole-file comparison in chunks (files of several GiB, mostly holes). */
function assertSameFile(q: string, c: string, what: string): void {
  const size = fs.statSync(q).size;
  assert.equal(fs.statSync(c).size, size, `${what}: file size`);
  const fq = fs.openSync(q, 'r'), fc = fs.openSync(c, 'r');
  try {
    const chunk = 16 * 1024 * 1024;
    const a = Buffer.alloc(chunk), b = Buffer.alloc(chunk);
    for (let off = 0; off < size; off += chunk) {
      const n = Math.min(chunk, size - off);
      fs.readSync(fq, a, 0, n, off);
      fs.readSync(fc, b, 0, n, off);
      if (!a.subarray(0, n).equals(b.subarray(0, n))) {
        let i = 0;
        while (a[i] === b[i]) i++;
        assert.fail(`${what}: files differ at byte ${off + i}`);
      }
    }
  } finally {
    fs.closeSync(fq);
    fs.closeSync(fc);
  }
}

async function sameMapAndCheck(dir: string, q: string, c: string, what: string): Promise<void> {
  const mq = await qemuImg(['map', '--output=json', q], dir);
  const mc = await qemuImg(['map', '--output=json', c], dir);
  assert.equal(mq.code, 0, mq.stderr);
  assert.equal(mc.stdout, mq.stdout, `${what}: map`);
  const chk = await qemuImg(['check', c], dir);
  assert.equal(chk.code, 0, `${what}: check\n${chk.stdout}${chk.stderr}`);
}

async function createBoth(dir: string, opts: string, size: string, name: string): Promise<[string, string]> {
  const q = path.join(dir, `${name}-q.qcow2`), c = path.join(dir, `${name}-c.qcow2`);
  const rq = await qemuImg(['create', '-f', 'qcow2', '-o', opts, q, size], dir);
  const rc = await qchain(['img', 'create', '-f', 'qcow2', '-o', opts, c, size], dir);
  assert.equal(rq.code, 0, `${opts} ${size}: qemu-img create\n${rq.stderr}`);
  assert.equal(rc.code, rq.code, `${opts} ${size}: exit code\n${rc.stderr}`);
  assert.equal(rc.stdout.replace(c, 'X'), rq.stdout.replace(q, 'X'), `${opts} ${size}: output`);
  return [q, c];
}

const CREATE_CASES: Array<[opts: string, size: string]> = [
  // The last cluster is half inside the image: its copy-on-write tail ends at the subcluster (2 KiB).
  ['extended_l2=on,preallocation=metadata', '1049088'],
  ['cluster_size=32k,extended_l2=on,preallocation=metadata', '1049600'],
  // Without subclusters the tail ends at the cluster; written zeros past the image end.
  ['cluster_size=2M,preallocation=metadata', '5M'],
  // Refcount blocks every 128 KiB and a refcount table that grows several times.
  ['cluster_size=512,preallocation=metadata', '64M'],
  ['cluster_size=64k,refcount_bits=1,preallocation=metadata', '300M'],
  // The second refcount block (at 2 GiB) lands right after the run that needs it.
  ['cluster_size=64k,preallocation=metadata', '3G'],
  ['cluster_size=512,preallocation=falloc', '8M'],
  ['cluster_size=2M,preallocation=full', '5M'],
];

test('create -o preallocation: the same file as qemu-img', oracle(), async (t) => {
  const dir = scratch('qchain-prealloc-layout-');
  for (const [i, [opts, size]] of CREATE_CASES.entries()) {
    const what = `create ${opts} ${size}`;
    await t.test(what, async () => {
      const [q, c] = await createBoth(dir, opts, size, `c${i}`);
      try {
        assertSameFile(q, c, what);
        await sameMapAndCheck(dir, q, c, what);
      } finally {
        fs.rmSync(q);
        fs.rmSync(c);
      }
    });
  }
});

const RESIZE_CASES: Array<[opts: string, size: string, grow: string, mode: string, io: string | null]> = [
  // 2 MiB clusters from 1 MiB: the head of the old last cluster and the tails at each request of
  // preallocate_co (INT_MAX rounded down to clusters: one ends inside a cluster) are written zeros.
  ['cluster_size=2M', '1M', '+3G', 'metadata', 'write -P 5 0 64k'],
  ['cluster_size=2M', '1M', '+3G', 'metadata', null],
  // Extended L2 from unaligned old sizes: head and tail copied on write per subcluster.
  ['extended_l2=on', '1049088', '+10M', 'metadata', 'write -P 5 0 64k'],
  ['extended_l2=on', '1049088', '+10M', 'metadata', null],
  ['extended_l2=on,preallocation=metadata', '1049088', '+8M', 'metadata', null],
  ['cluster_size=16k,extended_l2=on', '1049088', '+10M', 'metadata', 'write -P 5 0 64k'],
  ['extended_l2=on', '3M', '5244416', 'metadata', 'write -P 1 0 100k'],
  // The old last cluster is allocated: kept, nothing copied (standard), or from its first
  // unallocated subcluster (extended L2).
  ['extended_l2=on', '1051136', '+1M', 'metadata', 'write -P 7 1M 512'],
  ['cluster_size=64k', '1049088', '+10M', 'metadata', 'write -P 5 0 64k'],
  ['cluster_size=64k', '1049088', '+10M', 'metadata', 'write -P 6 1M 512'],
  ['cluster_size=512', '1M', '+16M', 'metadata', 'write -P 5 0 64k'],
  ['cluster_size=64k,preallocation=metadata', '1G', '+2G', 'metadata', 'write -P 5 0 64k'],
  ['cluster_size=64k', '1M', '+63M', 'falloc', 'write -P 5 0 64k'],
  // falloc/full move the old end's cluster into the new data area (its head copied on write).
  ['cluster_size=64k', '1049088', '+10M', 'falloc', 'write -P 6 1M 512'],
  ['extended_l2=on', '1049088', '+10M', 'falloc', 'write -P 6 1M 512'],
  ['cluster_size=64k,preallocation=metadata', '1049088', '+10M', 'full', null],
  ['cluster_size=4k,preallocation=metadata', '8M', '+8M', 'full', 'write -P 5 0 64k'],
];

test('resize --preallocation: the same file as qemu-img', oracle(), async (t) => {
  const dir = scratch('qchain-prealloc-layout-');
  for (const [i, [opts, size, grow, mode, io]] of RESIZE_CASES.entries()) {
    const what = `${opts} ${size}${io ? ` (${io})` : ''} resize ${grow} ${mode}`;
    await t.test(what, async () => {
      const [q, c] = await createBoth(dir, opts, size, `r${i}`);
      try {
        if (io) for (const f of [q, c]) assert.equal((await qemuIo(['-c', io, f], dir)).code, 0, `${what}: qemu-io`);
        const rq = await qemuImg(['resize', `--preallocation=${mode}`, q, grow], dir);
        const rc = await qchain(['img', 'resize', `--preallocation=${mode}`, c, grow], dir);
        assert.equal(rq.code, 0, `${what}: qemu-img resize\n${rq.stderr}`);
        assert.equal(rc.code, rq.code, `${what}: exit code\n${rc.stderr}`);
        assert.equal(rc.stdout, rq.stdout, `${what}: output`);
        assertSameFile(q, c, what);
        await sameMapAndCheck(dir, q, c, what);
      } finally {
        fs.rmSync(q);
        fs.rmSync(c);
      }
    });
  }
});

test('resize --preallocation over a longer backing file: the same file as qemu-img', oracle(), async (t) => {
  const dir = scratch('qchain-prealloc-layout-');
  const base = path.join(dir, 'base.qcow2');
  assert.equal((await qemuImg(['create', '-q', '-f', 'qcow2', base, '20M'], dir)).code, 0);
  assert.equal((await qemuIo(['-c', 'write -P 9 0 20M', base], dir)).code, 0);
  // falloc/full: the new area reads as zeroes already (no zero clusters; v2 images can do it too);
  // metadata: preallocated, then zeroed. The head of the old end's cluster comes from the backing file.
  for (const [i, [opts, mode]] of ([
    ['cluster_size=64k', 'falloc'], ['cluster_size=64k,compat=0.10', 'full'], ['extended_l2=on', 'falloc'],
    ['cluster_size=64k', 'metadata'], ['cluster_size=4k', 'metadata'],
  ] as Array<[string, string]>).entries()) {
    const what = `${opts} over a backing file, resize +10M ${mode}`;
    await t.test(what, async () => {
      const q = path.join(dir, `b${i}-q.qcow2`), c = path.join(dir, `b${i}-c.qcow2`);
      try {
        for (const f of [q, c]) {
          assert.equal((await qemuImg(['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', '-o', opts, f, '1049088'], dir)).code, 0);
          assert.equal((await qemuIo(['-c', 'write -P 5 0 64k', f], dir)).code, 0);
        }
        const rq = await qemuImg(['resize', `--preallocation=${mode}`, q, '+10M'], dir);
        const rc = await qchain(['img', 'resize', `--preallocation=${mode}`, c, '+10M'], dir);
        assert.equal(rq.code, 0, `${what}: qemu-img resize\n${rq.stderr}`);
        assert.equal(rc.code, rq.code, `${what}: exit code\n${rc.stderr}`);
        assertSameFile(q, c, what);
        await sameMapAndCheck(dir, q, c, what);
      } finally {
        fs.rmSync(q, { force: true });
        fs.rmSync(c, { force: true });
      }
    });
  }
});
