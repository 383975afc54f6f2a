/** SyncGate: when synchronous file calls are made, and how back-offs grow under a lasting slowdown. */
import test from 'node:test';
import assert from 'node:assert/strict';
import { BACKOFF_MS, MAX_BACKOFF_MS, SyncGate } from '../src/storage/sync-gate.js';

test('fast calls keep the gate open; a lone slow call does not close it', () => {
  const g = new SyncGate(0.05);
  let t = 1000;
  for (let i = 0; i < 1000; i++, t += 1) g.record(t, 4096, t + 0.01);
  assert.ok(g.open(t));
  g.record(t, 4096, t + 0.5); // one slow call: a strike only
  assert.ok(g.open(t + 1));
});

test('eight slow calls within a window close the gate for the back-off period', () => {
  const g = new SyncGate(0.05);
  let t = 1000;
  for (let i = 0; i < 7; i++, t += 1) g.record(t, 4096, t + 0.2);
  assert.ok(g.open(t));
  g.record(t, 4096, t + 0.2);
  assert.equal(g.open(t + 1), false);
  assert.ok(g.open(t + 0.2 + BACKOFF_MS));
});

test('larger calls are allowed proportionally more time', () => {
  const g = new SyncGate(0.25);
  let t = 1000;
  // 1 MiB in 1 ms: within 0.25 ms + 1 µs per KiB, never a strike.
  for (let i = 0; i < 100; i++, t += 2) g.record(t, 1024 * 1024, t + 1);
  assert.ok(g.open(t));
});

test('a very slow call closes the gate at once; repeated right after a back-off, the back-off doubles up to its cap', () => {
  const g = new SyncGate(0.25);
  let t = 1000;
  const periods: number[] = [];
  for (let i = 0; i < 8; i++) {
    g.record(t, 65536, t + 50); // throttled: 50 ms
    const end = g.until;
    periods.push(end - (t + 50));
    t = end + 1; // the first probe after the back-off is slow again
  }
  assert.deepEqual(periods, [BACKOFF_MS, 2 * BACKOFF_MS, 4 * BACKOFF_MS, 8 * BACKOFF_MS, 16 * BACKOFF_MS, MAX_BACKOFF_MS, MAX_BACKOFF_MS, MAX_BACKOFF_MS]);
  // Once the slowdown is over for longer than a back-off, the next one starts short again.
  t = g.until + 3 * MAX_BACKOFF_MS;
  for (let i = 0; i < 10; i++, t += 1) g.record(t, 4096, t + 0.01);
  g.record(t, 65536, t + 50);
  assert.equal(g.until - (t + 50), BACKOFF_MS);
});
