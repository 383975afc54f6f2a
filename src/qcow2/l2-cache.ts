/**
 * Cache of L2 tables keyed by host offset. Tables in use by an in-flight request are pinned and
 * never evicted, so an update made in memory cannot be lost to a concurrent reload.
 * Writes are write-through (callers persist changed entries themselves), so eviction is free.
 */
import type { Storage } from '../storage/storage.js';

interface Slot {
  buf: Buffer;
  pins: number;
}

export class L2Cache {
  private map = new Map<number, Slot>();
  private loading = new Map<number, Promise<Buffer>>();
  /** Buffers of evicted tables, reused for loads (a cache smaller than the image churns otherwise). */
  private spare: Buffer[] = [];

  constructor(private readonly storage: Storage, private readonly tableSize: number, private readonly capacity: number) {}

  /** The table at `offset` if cached (marked recently used, not pinned), else undefined. */
  peek(offset: number): Buffer | undefined {
    const slot = this.map.get(offset);
    if (!slot) return undefined;
    this.map.delete(offset);
    this.map.set(offset, slot);
    return slot.buf;
  }

  /** The table at `offset`, pinned, if cached; else undefined (use `pin`). */
  pinCached(offset: number): Buffer | undefined {
    const slot = this.map.get(offset);
    if (!slot) return undefined;
    slot.pins++;
    this.map.delete(offset);
    this.map.set(offset, slot);
    return slot.buf;
  }

  /** Returns the table at `offset`, loading it if needed, and pins it until `unpin` is called. */
  async pin(offset: number): Promise<Buffer> {
    const slot = this.map.get(offset);
    if (slot) {
      slot.pins++;
      this.map.delete(offset);
      this.map.set(offset, slot);
      return slot.buf;
    }
    let p = this.loading.get(offset);
    if (!p) {
      p = (async () => {
        const buf = this.spare.pop() ?? Buffer.allocUnsafe(this.tableSize);
        await this.storage.read(buf, offset);
        return buf;
      })();
      this.loading.set(offset, p);
    }
    let buf: Buffer;
    try {
      buf = await p;
    } finally {
      this.loading.delete(offset);
    }
    const again = this.map.get(offset);
    if (again) {
      again.pins++;
      return again.buf;
    }
    this.map.set(offset, { buf, pins: 1 });
    this.evict();
    return buf;
  }

  /** Installs a freshly built table (e.g. a new or copied L2), pinned. */
  install(offset: number, buf: Buffer): Buffer {
    this.map.delete(offset);
    this.map.set(offset, { buf, pins: 1 });
    this.evict();
    return buf;
  }

  /** A zeroed table-sized buffer for a new table (an evicted table's buffer when one is spare). */
  zeroed(): Buffer {
    const b = this.spare.pop();
    return b ? b.fill(0) : Buffer.alloc(this.tableSize);
  }

  unpin(offset: number): void {
    const slot = this.map.get(offset);
    if (slot && slot.pins > 0) slot.pins--;
  }

  /** Drop a table (after it was freed). */
  forget(offset: number): void {
    this.map.delete(offset);
  }

  clear(): void {
    this.map.clear();
  }

  private evict(): void {
    if (this.map.size <= this.capacity) return;
    for (const [k, s] of this.map) {
      if (this.map.size <= this.capacity) break;
      if (s.pins === 0) {
        this.map.delete(k);
        if (this.spare.length < 32) this.spare.push(s.buf);
      }
    }
  }
}
