/**
 * QEMU 7.2's RateLimit (include/qemu/ratelimit.h) as its block jobs use it, with 100 ms slices:
 * bytes are accounted as they are dispatched; the delay before the next request grows once a
 * slice's quota is used up, so a whole batch goes out at once and the job then sleeps for as
 * long as the batch costs at the set speed. A new speed changes the quota only.
 */
export const SLICE_MS = 100;

export class RateLimit {
  /** Bytes per slice; 0 = no limit. */
  private quota = 0;
  private sliceStart = 0;
  private sliceEnd = 0;
  private dispatched = 0;

  setSpeed(speed: number): void {
    this.quota = speed === 0 ? 0 : Math.max((speed * SLICE_MS) / 1000, 1);
  }

  /** ratelimit_calculate_delay: account `n` bytes; the milliseconds to wait before the next request. */
  delay(n: number, now = performance.now()): number {
    if (this.quota === 0) return 0;
    if (this.sliceEnd < now) {
      // The previous (possibly extended) slice is over: accounting starts again.
      this.sliceStart = now;
      this.sliceEnd = now + SLICE_MS;
      this.dispatched = 0;
    }
    this.dispatched += n;
    if (this.dispatched < this.quota) return 0;
    this.sliceEnd = this.sliceStart + (this.dispatched / this.quota) * SLICE_MS;
    return this.sliceEnd - now;
  }
}
