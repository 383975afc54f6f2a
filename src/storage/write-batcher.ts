/**
 * Coalesces the positional writes issued to one file within one event-loop turn: at the end of
 * the turn they are sorted, host-contiguous ones joined into one vector write, and each run is
 * issued once. A daemon's clients write many small requests at once (random guest writes land
 * on consecutive newly allocated clusters), so one thread-pool call then carries many of them
 * while the main thread goes on parsing and allocating. A write resolves only once its own bytes
 * are in the file; callers must not touch a buffer before its write resolved (as with any write).
 * Overlapping writes keep their issue order: a run that overlaps one still in flight (or issued
 * earlier in the same turn) starts only after it.
 */
export interface BatchSink {
  /** One vector write of `bufs` at `offset` (all of it, or a rejection). */
  writev(bufs: Buffer[], offset: number): Promise<void>;
  /** A lone write (no neighbour to join). */
  write(buf: Buffer, offset: number): Promise<void>;
}

interface Pending {
  buf: Buffer;
  offset: number;
  resolve: () => void;
  reject: (e: unknown) => void;
}

/**
 * A turn with this many writes issues them at once instead of at its end: the first replies
 * then go out (and their clients send more) while the rest of the turn is still being parsed.
 */
const BATCH_MAX = 16;
/** Largest joined run: bounded so one call never holds the pool thread for long. */
const MAX_RUN = 4 * 1024 * 1024;

interface InFlight {
  lo: number;
  hi: number;
  done: Promise<unknown>;
}

export class WriteBatcher {
  private queue: Pending[] = [];
  private scheduled = false;
  private inFlight: InFlight[] = [];

  constructor(private readonly sink: BatchSink) {}

  write(buf: Buffer, offset: number): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      this.queue.push({ buf, offset, resolve, reject });
      if (this.queue.length >= BATCH_MAX) {
        this.flush();
        return;
      }
      if (!this.scheduled) {
        this.scheduled = true;
        setImmediate(() => {
          this.scheduled = false;
          this.flush();
        });
      }
    });
  }

  private flush(): void {
    const q = this.queue;
    if (q.length === 0) return;
    this.queue = [];
    if (q.length > 1) q.sort((a, b) => a.offset - b.offset);
    let i = 0;
    while (i < q.length) {
      let j = i + 1;
      let end = q[i].offset + q[i].buf.length;
      while (j < q.length && q[j].offset === end && end - q[i].offset + q[j].buf.length <= MAX_RUN) {
        end += q[j].buf.length;
        j++;
      }
      this.issue(q.slice(i, j), q[i].offset, end);
      i = j;
    }
  }

  private issue(run: Pending[], lo: number, hi: number): void {
    const go = (): Promise<void> => run.length === 1
      ? this.sink.write(run[0].buf, run[0].offset)
      : this.sink.writev(run.map((p) => p.buf), run[0].offset);
    // Overlaps are rare (callers serialise overlapping requests themselves); when one happens
    // the later run waits for the earlier, whatever their outcome.
    const before = this.inFlight.filter((f) => f.lo < hi && lo < f.hi).map((f) => f.done);
    const done = before.length ? Promise.allSettled(before).then(go) : go();
    const entry: InFlight = { lo, hi, done: done.catch(() => {}) };
    this.inFlight.push(entry);
    done.then(() => { for (const p of run) p.resolve(); }, (e: unknown) => { for (const p of run) p.reject(e); })
      .finally(() => { this.inFlight.splice(this.inFlight.indexOf(entry), 1); });
  }
}
