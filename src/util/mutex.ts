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
  private active: Array<{ start: number; end: number; done: Promise<void> }> = [];

  async acquire(start: number, end: number): Promise<() => void> {
    const waits = this.active.filter((r) => r.start < end && start < r.end).map((r) => r.done);
    let release!: () => void;
    const entry = { start, end, done: new Promise<void>((r) => (release = r)) };
    this.active.push(entry);
    if (waits.length) await Promise.all(waits);
    return () => {
      const i = this.active.indexOf(entry);
      if (i >= 0) this.active.splice(i, 1);
      release();
    };
  }
}
