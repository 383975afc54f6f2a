/** A small LRU map bounded by entry count (Map keeps insertion order; re-insert on hit). */
export class Lru<K, V> {
  private map = new Map<K, V>();
  constructor(private readonly capacity: number, private readonly onEvict?: (k: K, v: V) => void) {}

  /** The most recently used key (the map's last): hits on it need no reordering. */
  private mru: K | undefined;

  get(k: K): V | undefined {
    const v = this.map.get(k);
    if (v !== undefined && k !== this.mru) {
      this.map.delete(k);
      this.map.set(k, v);
      this.mru = k;
    }
    return v;
  }

  set(k: K, v: V): void {
    this.map.delete(k);
    this.map.set(k, v);
    this.mru = k;
    while (this.map.size > this.capacity) {
      const first = this.map.keys().next().value as K;
      const fv = this.map.get(first) as V;
      this.map.delete(first);
      this.onEvict?.(first, fv);
    }
  }

  delete(k: K): void {
    this.map.delete(k);
    if (k === this.mru) this.mru = undefined;
  }
  clear(): void {
    this.map.clear();
    this.mru = undefined;
  }
  get size(): number { return this.map.size; }
}
