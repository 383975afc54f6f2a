/**
 * Whether a buffer holds only zero bytes (QEMU's buffer_is_zero), compared with memcmp against a
 * shared zero page: no allocation, no per-byte loop in JavaScript.
 */
const ZERO = Buffer.alloc(64 * 1024);

export function isZero(buf: Buffer): boolean {
  const n = buf.length;
  // Most data buffers are told apart by their first or last byte.
  if (n === 0) return true;
  if (buf[0] !== 0 || buf[n - 1] !== 0) return false;
  for (let pos = 0; pos < n; pos += ZERO.length) {
    const len = Math.min(ZERO.length, n - pos);
    if (buf.compare(ZERO, 0, len, pos, pos + len) !== 0) return false;
  }
  return true;
}
