/**
 * Whether bytes are all zero (QEMU's buffer_is_zero), compared with memcmp against a shared zero
 * buffer: no allocation, no per-byte loop in JavaScript.
 */
const ZERO = Buffer.alloc(1024 * 1024);

/** Whether b[from, to) is all zero. Data is almost always told apart by its first or last byte. */
export function isZeroRange(b: Buffer, from: number, to: number): boolean {
  if (from >= to) return true;
  if (b[from] !== 0 || b[to - 1] !== 0) return false;
  for (let p = from; p < to; p += ZERO.length) {
    const n = Math.min(ZERO.length, to - p);
    if (b.compare(ZERO, 0, n, p, p + n) !== 0) return false;
  }
  return true;
}

/** Whether the whole buffer is zero. */
export function isZero(buf: Buffer): boolean {
  return isZeroRange(buf, 0, buf.length);
}
