/** A FIFO async mutex: awaits inside a critical section cannot interleave with another holder. */
export class Mutex {
  private tail: Promise<void> = Promise.resolve();
  /** Holders plus waiters. */
  private users = 0;

  /**
   * True when nobody holds or waits for the mutex: a caller may then do a critical section that
   * has no await inline, exactly as if it had taken the mutex (nothing can interleave with it).
   */
  get free(): boolean { return this.users === 0; }

  async lock(): Promise<() => void> {
    let release!: () => void;
    const next = new Promise<void>((r) => (release = r));
    const prev = this.tail;
    this.tail = prev.then(() => next);
    this.users++;
    await prev;
    let done = false;
    return () => {
      if (done) return;
      done = true;
      this.users--;
      release();
    };
  }

  async run<T>(fn: () => Promise<T>): Promise<T> {
    const release = await this.lock();
    try {
      return await fn();
    } finally {
      release();
    }
  }
}

/** A FIFO counting semaphore: at most `slots` holders at once. */
export class Semaphore {
  private readonly waiters: Array<() => void> = [];
  constructor(private slots: number) {}

  /** Resolves once a slot is held; call the returned function to give it back. */
  async acquire(): Promise<() => void> {
    if (this.slots > 0) this.slots--;
    else await new Promise<void>((r) => this.waiters.push(r));
    let done = false;
    return () => {
      if (done) return;
      done = true;
      const next = this.waiters.shift();
      if (next) next(); // the slot passes straight to the next waiter
      else this.slots++;
    };
  }
}

/**
 * Serialises overlapping byte ranges: a request waits for every earlier request whose range
 * overlaps its own. Non-overlapping requests proceed in parallel.
 */
export class RangeLock {
  /** Held and waiting ranges in issue order; `waiters` is made only when someone waits. */
  private active: Array<{ start: number; end: number; waiters: Array<() => void> | null }> = [];

  /** Registers the range at once (later overlapping requests queue behind it); resolves when held. */
  acquire(start: number, end: number): Promise<() => void> {
    let waits: Array<Promise<void>> | null = null;
    for (const r of this.active) {
      if (r.start < end && start < r.end) (waits ??= []).push(new Promise<void>((res) => (r.waiters ??= []).push(res)));
    }
    const entry = { start, end, waiters: null as Array<() => void> | null };
    this.active.push(entry);
    const release = (): void => {
      const i = this.active.indexOf(entry);
      if (i >= 0) this.active.splice(i, 1);
      const w = entry.waiters;
      entry.waiters = null;
      if (w) for (const f of w) f();
    };
    if (!waits) return Promise.resolve(release);
    return Promise.all(waits).then(() => release);
  }
}
