import { test } from 'node:test';
import assert from 'node:assert/strict';
import { isZero, nonZeroRuns } from '../src/ops/copy.js';

test('isZero: first byte, a late byte, ranges past the 1 MiB compare buffer, empty ranges', () => {
  const b = Buffer.alloc(3 * 1024 * 1024 + 17);
  assert.equal(isZero(b, 0, b.length), true);
  assert.equal(isZero(b, 5, 5), true);
  b[b.length - 1] = 1;
  assert.equal(isZero(b, 0, b.length), false, 'last byte of a range longer than the zero buffer');
  assert.equal(isZero(b, 0, b.length - 1), true, 'the end bound is exclusive');
  b[2 * 1024 * 1024] = 7;
  assert.equal(isZero(b, 1024 * 1024, 2 * 1024 * 1024), true);
  assert.equal(isZero(b, 1024 * 1024, 2 * 1024 * 1024 + 1), false);
  assert.equal(isZero(b, 2 * 1024 * 1024, 2 * 1024 * 1024 + 4096), false, 'first byte decides');
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
