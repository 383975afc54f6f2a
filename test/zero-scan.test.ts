import { test } from 'node:test';
import assert from 'node:assert/strict';
import { nonZeroRuns } from '../src/ops/copy.js';
import { isZero, isZeroRange } from '../src/util/zero.js';

test('isZeroRange: first byte, a late byte, ranges past the 1 MiB compare buffer, empty ranges', () => {
  const b = Buffer.alloc(3 * 1024 * 1024 + 17);
  assert.equal(isZeroRange(b, 0, b.length), true);
  assert.equal(isZeroRange(b, 5, 5), true);
  b[b.length - 1] = 1;
  assert.equal(isZeroRange(b, 0, b.length), false, 'last byte of a range longer than the zero buffer');
  assert.equal(isZeroRange(b, 0, b.length - 1), true, 'the end bound is exclusive');
  b[2 * 1024 * 1024] = 7;
  assert.equal(isZeroRange(b, 1024 * 1024, 2 * 1024 * 1024), true);
  assert.equal(isZeroRange(b, 1024 * 1024, 2 * 1024 * 1024 + 1), false);
  assert.equal(isZeroRange(b, 2 * 1024 * 1024, 2 * 1024 * 1024 + 4096), false, 'first byte decides');
});

test('nonZeroRuns: zero blocks of the sparse size are left out, data blocks merge', () => {
  const b = Buffer.alloc(8 * 4096);
  b[0] = 1; // block 0
  b[4096 + 4095] = 1; // block 1 (non-zero only at its end)
  b[5 * 4096 + 100] = 2; // block 5
  assert.deepEqual(nonZeroRuns(b, 4096), [[0, 8192], [5 * 4096, 6 * 4096]]);
  assert.deepEqual(nonZeroRuns(b, 0), [[0, b.length]]);
  assert.deepEqual(nonZeroRuns(Buffer.alloc(4096 * 3), 4096), []);
});

test('isZero: whole buffers, including ones whose only non-zero byte is the last', () => {
  assert.equal(isZero(Buffer.alloc(0)), true);
  assert.equal(isZero(Buffer.alloc(70000)), true);
  const b = Buffer.alloc(70000);
  b[69999] = 3;
  assert.equal(isZero(b), false);
  b[69999] = 0;
  b[65536] = 1; // neither the first nor the last byte
  assert.equal(isZero(b), false);
});
