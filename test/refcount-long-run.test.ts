/**
 * Refcount blocks made for an allocation: contiguous runs longer than half a refcount block's
 * span (the L1 table of a large image with small clusters) get theirs outside the run, and
 * blocks are made before a run is counted (1-bit refcounts cannot count a block twice).
 * qemu-img judges.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { oracle, qchain, qemuImg, qemuIo, scratch } from './helpers/qemu.js';

const cases: Array<[options: string, size: string]> = [
  ['cluster_size=512', '1G'], // L1: 512 clusters, 256 refcounts per block
  ['cluster_size=512,refcount_bits=64', '256M'], // L1: 128 clusters, 64 refcounts per block
  ['cluster_size=1024,refcount_bits=64', '2G'], // L1: 256 clusters, 128 refcounts per block
];

for (const [options, size] of cases) {
  test(`create -o ${options} ${size}, write across it, grow it: qemu-img check clean, same bytes`, oracle(), async () => {
    const dir = scratch();
    const img = path.join(dir, 'a.qcow2');
    const created = await qchain(['img', 'create', '-q', '-f', 'qcow2', '-o', options, img, size]);
    assert.equal(created.code, 0, created.stderr);
    let chk = await qemuImg(['check', img]);
    assert.equal(chk.code, 0, chk.stdout + chk.stderr);
    assert.match(chk.stdout, /No errors were found/);
    const info = JSON.parse((await qemuImg(['info', '--output=json', img])).stdout) as { 'virtual-size': number };
    const end = info['virtual-size'];
    const cmds = ['write -P 0x11 0 256k', `write -P 0x22 ${end / 2} 192k`, `write -P 0x33 ${end - 65536} 64k`];
    const w = await qchain(['io', ...cmds.flatMap((c) => ['-c', c]), img]);
    assert.equal(w.code, 0, w.stderr);
    // Growing the disk grows the L1 table: another long run.
    const r = await qchain(['img', 'resize', img, '+' + size]);
    assert.equal(r.code, 0, r.stderr);
    chk = await qemuImg(['check', img]);
    assert.equal(chk.code, 0, chk.stdout + chk.stderr);
    const reads = ['read -P 0x11 0 256k', `read -P 0x22 ${end / 2} 192k`, `read -P 0x33 ${end - 65536} 64k`, `read -P 0 ${end} 64k`];
    const q = await qemuIo([...reads.flatMap((c) => ['-c', c]), img]);
    assert.equal(q.code, 0, q.stdout + q.stderr);
    assert.doesNotMatch(q.stdout, /verification failed/i);
  });
}

test('1-bit refcounts: data runs that reach ranges without a refcount block (the block is made before counting)', oracle(), async () => {
  const dir = scratch();
  const img = path.join(dir, 'b.qcow2');
  // 512 B clusters and 1-bit refcounts: one refcount block covers 2 MiB of the file.
  const created = await qchain(['img', 'create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512,refcount_bits=1', img, '100G']);
  assert.equal(created.code, 0, created.stderr);
  const w = await qchain(['io', '-c', 'write -P 0x44 0 10M', '-c', 'write -P 0x55 5G 3M', img]);
  assert.equal(w.code, 0, w.stderr);
  const chk = await qemuImg(['check', img]);
  assert.equal(chk.code, 0, chk.stdout + chk.stderr);
  const q = await qemuIo(['-c', 'read -P 0x44 0 10M', '-c', 'read -P 0x55 5G 3M', img]);
  assert.equal(q.code, 0, q.stdout + q.stderr);
  assert.doesNotMatch(q.stdout, /verification failed/i);
});
