/**
 * The allocator's synchronous path (writeback guest writes): a run from cached, existing refcount
 * blocks, counted in memory as pending; otherwise null with nothing changed, so the caller takes
 * the asynchronous path (new block, uncached block, refused run). Pending counts reach the file
 * only with writePending(). The asynchronous allocator's free-cluster hint is checked too.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { MemoryStorage } from '../src/storage/memory.js';
import { Refcounts } from '../src/qcow2/refcount.js';

const CS = 512;

/** Cluster 0 header, 1 reftable, 2 the only refcount block (covers 256 clusters at 16 bits). */
async function setup(): Promise<{ st: MemoryStorage; rc: Refcounts }> {
  const st = new MemoryStorage();
  const table = Buffer.alloc(CS);
  table.writeUInt32BE(2 * CS, 4);
  await st.write(table, CS);
  await st.write(Buffer.alloc(CS), 2 * CS);
  const rc = await Refcounts.load(st, { clusterBits: 9, refcountOrder: 4 }, CS, 1);
  await rc.update(0, 3, 1);
  return { st, rc };
}

test('tryAllocSync: counts a run in memory only; writePending puts it in the file', async () => {
  const { st, rc } = await setup();
  const never = (): boolean => false;
  assert.equal(rc.tryAllocSync(4, never), 3 * CS);
  assert.equal(rc.tryAllocSync(2, never), 7 * CS, 'the next run follows');
  for (let c = 3; c < 9; c++) assert.equal(await rc.get(c), 1);
  assert.equal(rc.pendingCount, 1);
  const onDisk = await Refcounts.load(st, { clusterBits: 9, refcountOrder: 4 }, CS, 1);
  assert.equal(await onDisk.get(3), 0, 'not written yet');
  await rc.writePending();
  const after = await Refcounts.load(st, { clusterBits: 9, refcountOrder: 4 }, CS, 1);
  for (let c = 3; c < 9; c++) assert.equal(await after.get(c), 1, `cluster ${c} on disk`);
  assert.equal(await after.get(9), 0);
});

test('tryAllocSync: null without change when a new block is needed, the block is not cached, or the run is refused', async () => {
  const { st, rc } = await setup();
  // Refused: nothing counted, and the async path still finds the same run.
  let asked = -1;
  assert.equal(rc.tryAllocSync(2, (host) => { asked = host; return true; }), null);
  assert.equal(asked, 3 * CS);
  assert.equal(await rc.get(3), 0);
  // Past the only block (256 clusters at 16 bits per entry): a new block is needed.
  assert.equal(rc.tryAllocSync(200, () => false), null, 'longer than half a block');
  await rc.update(3, 250, 1);
  assert.equal(rc.tryAllocSync(8, () => false), null, 'needs a block beyond the table coverage');
  assert.equal(rc.pendingCount, 0);
  // A fresh instance has no block cached yet.
  const cold = await Refcounts.load(st, { clusterBits: 9, refcountOrder: 4 }, CS, 1);
  assert.equal(cold.tryAllocSync(1, () => false), null, 'uncached block');
  assert.equal(await cold.alloc(1), 253 * CS, 'the async path works and caches the block');
  assert.equal(cold.tryAllocSync(1, () => false), 254 * CS, 'then the sync path can');
});

test('alloc: consecutive allocations take consecutive runs; a freed cluster below the hint is reused', async () => {
  const { rc } = await setup();
  assert.equal(await rc.alloc(4), 3 * CS);
  assert.equal(await rc.alloc(2), 7 * CS);
  await rc.free(4 * CS, 1);
  assert.equal(await rc.alloc(1), 4 * CS, 'the hole is found again');
  assert.equal(await rc.alloc(1), 9 * CS);
  for (let c = 0; c < 10; c++) assert.equal(await rc.get(c), 1, `cluster ${c}`);
  assert.equal(await rc.get(10), 0);
});
