/**
 * Group commit for metadata buffers (L2 tables, refcount blocks): while a write of one on-disk
 * buffer is in flight, further ranges of the same buffer are merged and written together once
 * it completes, so concurrent allocating writes share metadata I/O instead of queueing one
 * write each. Each caller's promise resolves once a write that started after its call (so
 * holding its bytes) has completed. The range is snapshotted when its write starts.
 */
import type { Storage } from '../storage/storage.js';

interface Waiters {
  promise: Promise<void>;
  resolve: () => void;
  reject: (e: unknown) => void;
}

interface Target {
  buf: Buffer;
  busy: boolean;
  lo: number;
  hi: number;
  next: Waiters | null;
}

function waiters(): Waiters {
  let resolve!: () => void, reject!: (e: unknown) => void;
  const promise = new Promise<void>((res, rej) => { resolve = res; reject = rej; });
  return { promise, resolve, reject };
}

export class MetaWriter {
  private readonly targets = new Map<number, Target>();

  constructor(private readonly storage: Storage) {}

  /** The buffer with writes still pending for `disk` (newer than the file), if any. */
  pendingBuffer(disk: number): Buffer | undefined {
    return this.targets.get(disk)?.buf;
  }

  /** Write bytes [a, b) of `buf`, which lives at `disk` in the file. */
  write(disk: number, buf: Buffer, a: number, b: number): Promise<void> {
    if (b <= a) return Promise.resolve();
    let t = this.targets.get(disk);
    if (!t) {
      t = { buf, busy: false, lo: a, hi: b, next: null };
      this.targets.set(disk, t);
    } else {
      if (t.buf !== buf) {
        // A different buffer for the same place (a reloaded table): its bytes are the newest.
        t.buf = buf;
      }
      t.lo = Math.min(t.lo, a);
      t.hi = Math.max(t.hi, b);
    }
    t.next ??= waiters();
    const p = t.next.promise;
    if (!t.busy) this.start(disk, t);
    return p;
  }

  private start(disk: number, t: Target): void {
    const w = t.next as Waiters;
    t.next = null;
    t.busy = true;
    const data = Buffer.from(t.buf.subarray(t.lo, t.hi));
    const at = disk + t.lo;
    t.lo = Infinity;
    t.hi = -1;
    this.storage.write(data, at).then(w.resolve, w.reject).finally(() => {
      t.busy = false;
      if (t.next) this.start(disk, t);
      else if (this.targets.get(disk) === t) this.targets.delete(disk);
    });
  }
}
