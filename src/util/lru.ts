/**
 * A small cache bounded by entry count, evicting by second chance (CLOCK): a hit only sets the
 * entry's used bit; eviction walks from the oldest entry, moving used ones to the back with the
 * bit cleared and evicting the first unused one. Hits therefore never mutate the Map (re-inserting
 * on every hit made V8 rebuild the Map's table every few hundred hits, garbage that outlived
 * young-generation collections and cost full collections on deep-chain reads).
 */
interface Entry<V> {
  v: V;
  used: boolean;
}

export class Lru<K, V> {
  private map = new Map<K, Entry<V>>();
  constructor(private readonly capacity: number, private readonly onEvict?: (k: K, v: V) => void) {}

  get(k: K): V | undefined {
    const e = this.map.get(k);
    if (e === undefined) return undefined;
    e.used = true;
    return e.v;
  }

  set(k: K, v: V): void {
    const e = this.map.get(k);
    if (e) {
      e.v = v;
      e.used = true;
      return;
    }
    this.map.set(k, { v, used: false });
    while (this.map.size > this.capacity) {
      const first = this.map.keys().next().value as K;
      const fe = this.map.get(first) as Entry<V>;
      this.map.delete(first);
      if (fe.used) {
        fe.used = false;
        this.map.set(first, fe);
      } else this.onEvict?.(first, fe.v);
    }
  }

  delete(k: K): void {
    this.map.delete(k);
  }
  clear(): void {
    this.map.clear();
  }
  get size(): number { return this.map.size; }
}
