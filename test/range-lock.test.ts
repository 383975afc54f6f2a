/** RangeLock: overlapping ranges are held one after another in issue order; disjoint ones at once. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { RangeLock } from '../src/util/mutex.js';

const tick = (): Promise<void> => new Promise((r) => setImmediate(r));

test('RangeLock: disjoint ranges are held together, overlapping ones wait for every earlier overlap', async () => {
  const lock = new RangeLock();
  const log: string[] = [];
  const take = (name: string, a: number, b: number): Promise<() => void> =>
    lock.acquire(a, b).then((release) => { log.push(name); return release; });
  const pa = take('a', 0, 10);
  const pb = take('b', 10, 20); // touches a's end: disjoint
  const pc = take('c', 5, 15); // overlaps a and b
  const pd = take('d', 12, 13); // overlaps b and c (queued behind c)
  const pe = take('e', 30, 40); // disjoint from all
  await tick();
  assert.deepEqual(log, ['a', 'b', 'e']);
  const ra = await pa, rb = await pb;
  ra();
  await tick();
  assert.deepEqual(log, ['a', 'b', 'e'], 'c still waits for b');
  rb();
  await tick();
  assert.deepEqual(log, ['a', 'b', 'e', 'c'], 'd waits for c, issued before it');
  (await pc)();
  (await pd)();
  (await pe)();
  assert.deepEqual(log, ['a', 'b', 'e', 'c', 'd']);
  // All released: a new request is held at once; a second release is harmless.
  const rf = await lock.acquire(0, 100);
  rf();
  rf();
  const rg = await lock.acquire(0, 100);
  rg();
});

test('RangeLock: many waiters on one range are served in issue order', async () => {
  const lock = new RangeLock();
  const order: number[] = [];
  const all = Array.from({ length: 20 }, (_, i) => lock.acquire(0, 4096).then(async (release) => {
    order.push(i);
    await tick();
    release();
  }));
  await Promise.all(all);
  assert.deepEqual(order, Array.from({ length: 20 }, (_, i) => i));
});
