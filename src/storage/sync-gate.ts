/**
 * When synchronous file calls stop paying off. Small reads and writes that hit the page cache
 * cost a few microseconds made directly on the event loop, far less than a trip through libuv's
 * thread pool; calls that turn slow (data from the device, writeback throttling) would stall
 * every client, so they send the file's calls back to the thread pool for a while: after
 * SLOW_STRIKES slow calls within WINDOW calls (a lone slow call is usually the scheduler, not
 * the disk), or at once after one slower than VERY_SLOW_MS. A back-off that starts again soon
 * after the previous one ended doubles (up to MAX_BACKOFF_MS): under sustained throttling the
 * event loop is probed rarely instead of stalling every quarter second.
 */
const VERY_SLOW_MS = 5;
const SLOW_STRIKES = 8;
const WINDOW = 64;
export const BACKOFF_MS = 250;
export const MAX_BACKOFF_MS = 8000;
/**
 * Larger calls get more time before they count as slow: a page-cache copy of 64 KiB takes tens
 * of microseconds on a busy machine, while a device read of it takes hundreds.
 */
const SLOW_MS_PER_KIB = 0.001;

export class SyncGate {
  /** performance.now() until which calls go through the thread pool. */
  until = 0;
  private calls = 0;
  private strikes = 0;
  private backoff = BACKOFF_MS;

  /** @param slowMs a call of a few bytes taking longer counts as slow */
  constructor(private readonly slowMs: number) {}

  /** Whether a call starting at `now` may be made synchronously. */
  open(now: number): boolean {
    return now >= this.until;
  }

  /** Records a synchronous call of `bytes` that started at t0 (and ended at `now`). */
  record(t0: number, bytes: number, now = performance.now()): void {
    const took = now - t0 - (bytes >> 10) * SLOW_MS_PER_KIB;
    if (++this.calls >= WINDOW) {
      this.calls = 0;
      this.strikes = 0;
    }
    if (took <= this.slowMs) return;
    if (took > VERY_SLOW_MS || ++this.strikes >= SLOW_STRIKES) {
      // Slow again within one back-off period of the last one's end: the cause persists.
      this.backoff = t0 - this.until < this.backoff ? Math.min(MAX_BACKOFF_MS, this.backoff * 2) : BACKOFF_MS;
      this.until = now + this.backoff;
      this.calls = 0;
      this.strikes = 0;
    }
  }
}
