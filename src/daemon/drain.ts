/**
 * A drained section: users `enter()` around each request; `drain()` holds new entries and
 * resolves once the running ones have left, returning the function that lets users in again.
 * Graph changes under a live export (pivot) happen inside a drained section, so no request
 * is split between the old and the new node.
 */
export class Drain {
  private active = 0;
  private held: Promise<void> | null = null;
  private idle: (() => void) | null = null;

  async enter(): Promise<() => void> {
    while (this.held) await this.held;
    return this.entered();
  }

  /** Enter at once when no drain holds entries, else null (then await `enter`). */
  tryEnter(): (() => void) | null {
    return this.held ? null : this.entered();
  }

  private entered(): () => void {
    this.active++;
    return () => {
      this.active--;
      if (this.active === 0) this.idle?.();
    };
  }

  async drain(): Promise<() => void> {
    while (this.held) await this.held;
    let open!: () => void;
    this.held = new Promise<void>((r) => { open = r; });
    if (this.active > 0) await new Promise<void>((r) => { this.idle = r; });
    this.idle = null;
    return () => {
      this.held = null;
      open();
    };
  }
}
