/** Shared job machinery for the chain operations: a bounded worker pool and a byte-rate limiter. */

/** Run `fn` over the items of `source` with at most `parallel` in flight; the first failure stops the rest. */
export async function runPool<T>(source: AsyncIterable<T> | Iterable<T>, parallel: number, fn: (item: T) => Promise<void>): Promise<void> {
  const it = (Symbol.asyncIterator in source ? (source as AsyncIterable<T>)[Symbol.asyncIterator]() : (source as Iterable<T>)[Symbol.iterator]()) as AsyncIterator<T> | Iterator<T>;
  let failure: { e: unknown } | null = null;
  let pulling: Promise<unknown> = Promise.resolve();
  // Pulls are chained so a shared (async) iterator is never advanced concurrently.
  const next = (): Promise<IteratorResult<T>> => {
    const p = pulling.then(() => it.next());
    pulling = p.catch(() => {});
    return p;
  };
  const worker = async (): Promise<void> => {
    while (!failure) {
      const r = await next();
      if (r.done) return;
      await fn(r.value);
    }
  };
  await Promise.all(Array.from({ length: Math.max(1, parallel) }, () => worker().catch((e: unknown) => { failure ??= { e }; })));
  if (failure) throw (failure as { e: unknown }).e;
}

/** Limits throughput to `bytesPerSecond` (0 = unlimited), as QEMU's job rate limit does for copied data. */
export class RateLimiter {
  private issued = 0;
  private readonly start = Date.now();
  constructor(private readonly bytesPerSecond: number) {}

  /** Waits until `n` more bytes may be issued. */
  async take(n: number): Promise<void> {
    if (this.bytesPerSecond <= 0) return;
    const due = this.start + (this.issued / this.bytesPerSecond) * 1000;
    this.issued += n;
    const wait = due - Date.now();
    if (wait > 0) await new Promise((r) => setTimeout(r, wait));
  }
}
