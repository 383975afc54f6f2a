/**
 * Per-cluster counts for the check and the rebuild (QEMU's in-memory refcount array), stored in
 * pages of 64 Ki clusters created on first write: a file grown far past its data (a refcount
 * block at hundreds of GiB) costs memory only where something is counted.
 */
const PAGE = 1 << 16;

export class SparseCounts {
  private readonly pages = new Map<number, Uint32Array>();

  get(c: number): number {
    return this.pages.get(Math.floor(c / PAGE))?.[c % PAGE] ?? 0;
  }

  set(c: number, v: number): void {
    const k = Math.floor(c / PAGE);
    let p = this.pages.get(k);
    if (!p) {
      if (v === 0) return;
      p = new Uint32Array(PAGE);
      this.pages.set(k, p);
    }
    p[c % PAGE] = v;
  }

  clone(): SparseCounts {
    const n = new SparseCounts();
    for (const [k, p] of this.pages) n.pages.set(k, Uint32Array.from(p));
    return n;
  }

  /** The first cluster in [from, end) with a non-zero count, or `end`. */
  nextNonZero(from: number, end: number): number {
    let c = from;
    while (c < end) {
      const k = Math.floor(c / PAGE);
      const p = this.pages.get(k);
      if (!p) {
        // Jump to the next page that exists.
        let next = Infinity;
        for (const key of this.pages.keys()) if (key > k && key < next) next = key;
        if (next === Infinity) return end;
        c = Math.max(c, next * PAGE);
        continue;
      }
      const stop = Math.min(end, (k + 1) * PAGE);
      for (; c < stop; c++) if (p[c % PAGE] !== 0) return c;
    }
    return end;
  }

  /** Page ranges [start, end) holding counts, in ascending order. */
  ranges(): Array<[number, number]> {
    return [...this.pages.keys()].sort((a, b) => a - b).map((k) => [k * PAGE, (k + 1) * PAGE]);
  }
}
