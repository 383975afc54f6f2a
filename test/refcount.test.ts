/**
 * Refcounts.update/addEach: an update that would take a refcount below zero or past the maximum
 * of the refcount width fails with QEMU's EINVAL before anything changes — neither the cached
 * refcount blocks, nor the file, nor the refcount table (no block is created for it).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { MemoryStorage } from '../src/storage/memory.js';
import { Refcounts, RefcountRangeError } from '../src/qcow2/refcount.js';

const CLUSTER_BITS = 9;
const CS = 2 ** CLUSTER_BITS;

/**
 * Cluster 0: header (unused here), 1: reftable, 2 and 3: refcount blocks for table entries 0 and
 * 1; clusters 0..3 have refcount 1.
 */
async function layout(refcountOrder: number): Promise<{ storage: MemoryStorage; rc: Refcounts }> {
  const storage = new MemoryStorage();
  const table = Buffer.alloc(CS);
  table.writeUInt32BE(2 * CS, 4);
  table.writeUInt32BE(3 * CS, 12);
  await storage.write(table, CS);
  await storage.write(Buffer.alloc(2 * CS), 2 * CS);
  const geo = { clusterBits: CLUSTER_BITS, refcountOrder };
  const rc = await Refcounts.load(storage, geo, CS, 1);
  await rc.update(0, 4, 1);
  // A fresh instance: the tests see only what is on disk plus what they do themselves.
  return { storage, rc: await Refcounts.load(storage, geo, CS, 1) };
}

/** Runs `fn`, which must fail with a range error, and checks that nothing changed. */
async function assertUnchanged(storage: MemoryStorage, rc: Refcounts, clusters: number[], fn: () => Promise<void>): Promise<void> {
  const before = await Promise.all(clusters.map((c) => rc.get(c)));
  const disk = storage.contents();
  const table = rc.table.slice();
  await assert.rejects(fn, (e: unknown) => {
    assert.ok(e instanceof RefcountRangeError, String(e));
    assert.equal(e.errno, 'EINVAL');
    assert.equal(e.message, 'Invalid argument');
    return true;
  });
  assert.deepEqual(await Promise.all(clusters.map((c) => rc.get(c))), before, 'cached refcounts');
  assert.ok(storage.contents().equals(disk), 'file contents');
  assert.deepEqual(rc.table, table, 'refcount table');
}

test('overflow in the middle of a run changes no entry of the run (16-bit)', async () => {
  const { storage, rc } = await layout(4);
  await rc.update(10, 1, 0xffff);
  await assertUnchanged(storage, rc, [8, 9, 10, 11], () => rc.update(8, 4, 1));
  assert.equal(await rc.get(10), 0xffff);
});

test('underflow after a decrementable cluster changes nothing (16-bit)', async () => {
  const { storage, rc } = await layout(4);
  await rc.update(20, 1, 2);
  await assertUnchanged(storage, rc, [20, 21], () => rc.update(20, 2, -1));
  await rc.update(20, 1, -1);
  assert.equal(await rc.get(20), 1);
});

test('an overflow in the second refcount block leaves the first block alone', async () => {
  const { storage, rc } = await layout(4);
  const perBlock = rc.perBlock;
  await rc.update(perBlock + 2, 1, 0xffff);
  const run = Array.from({ length: 10 }, (_, k) => perBlock - 5 + k);
  await assertUnchanged(storage, rc, run, () => rc.update(perBlock - 5, 10, 1));
});

test('addEach: one bad delta leaves the other entries alone', async () => {
  const { storage, rc } = await layout(4);
  await rc.update(30, 2, 1);
  await assertUnchanged(storage, rc, [30, 31, 32], () => rc.addEach(30, [1, -2, 1]));
  await rc.addEach(30, [1, -1, 1]);
  assert.deepEqual([await rc.get(30), await rc.get(31), await rc.get(32)], [2, 0, 1]);
});

test('1-bit refcounts: a second reference is an overflow, not a wrap to zero', async () => {
  const { storage, rc } = await layout(0);
  const off = await rc.alloc(2);
  const ci = off / CS;
  await assertUnchanged(storage, rc, [ci, ci + 1], () => rc.update(ci, 2, 1));
  await assertUnchanged(storage, rc, [ci - 1, ci], () => rc.addEach(ci - 1, [1, 1]));
});

test('no refcount block is created for an update that cannot fit', async () => {
  const { storage, rc } = await layout(0);
  // Table entry 2 has no block: a 1-bit refcount cannot take +2.
  const base = 2 * rc.perBlock;
  await assertUnchanged(storage, rc, [base + 1], () => rc.update(base + 1, 1, 2));
  assert.equal(rc.table[2], 0);
  // +1 fits: the block goes at the first free cluster (QEMU's alloc_refcount_block), here in
  // the first range, and is counted there; it does not count itself in range 2.
  await rc.update(base, 1, 1);
  assert.equal(rc.table[2], 4 * CS);
  assert.equal(await rc.get(4), 1);
  assert.equal(await rc.get(base), 1);
});

test('a decrement where no block exists is EINVAL and creates nothing', async () => {
  const { storage, rc } = await layout(4);
  const disk = storage.contents();
  await assert.rejects(() => rc.update(2 * rc.perBlock + 3, 1, -1), { message: 'Invalid argument', errno: 'EINVAL' });
  assert.ok(storage.contents().equals(disk));
});
