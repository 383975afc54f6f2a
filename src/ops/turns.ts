/**
 * In-order turns for the copy engines: requests are numbered 0, 1, 2, … as they are issued, and
 * request n's turn (its target writes or allocation) starts only once request n-1's turn ended,
 * so a fresh target is laid out in guest order, as qemu-img convert does without -W. Work outside
 * the turn (reads, compression) still overlaps. Unordered turns (-W) never wait.
 */
export class Turns {
  private readonly waiting = new Map<number, () => void>();
  private current = 0;

  constructor(private readonly unordered = false) {}

  /** Resolves when it is request `n`'s turn. */
  wait(n: number): Promise<void> {
    if (this.unordered || n === this.current) return Promise.resolve();
    return new Promise((r) => this.waiting.set(n, r));
  }

  /** Ends request `n`'s turn, waking request n+1 if it waits. */
  end(n: number): void {
    if (this.unordered) return;
    this.current = n + 1;
    const next = this.waiting.get(this.current);
    if (next) {
      this.waiting.delete(this.current);
      next();
    }
  }

  /** Runs `fn` in request `n`'s turn; the turn passes on whether `fn` succeeds or fails. */
  async run<T>(n: number, fn: () => Promise<T>): Promise<T> {
    await this.wait(n);
    try {
      return await fn();
    } finally {
      this.end(n);
    }
  }

  /** Gives up request `n`'s turn without using it (a failed request), so later ones are not stuck. */
  async skip(n: number): Promise<void> {
    await this.wait(n);
    this.end(n);
  }
}
