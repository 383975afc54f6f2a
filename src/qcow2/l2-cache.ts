/**
 * Cache of L2 tables keyed by host offset. Tables in use by an in-flight request are pinned and
 * never evicted, so an update made in memory cannot be lost to a concurrent reload.
 * A table may be dirty (writeback mode: entries changed in memory, byte range [lo, hi) not yet
 * written); dirty tables are never evicted either, until the image writes them back (see
 * Qcow2Image.flushMetadata for the order that makes this crash safe).
 */
import type { Storage } from '../storage/storage.js';

/**
 * Buffers of evicted tables kept for the next loads. As many as one connection has requests in flight (64),
 * so a cache that churns (random reads over a huge image) allocates nothing: dropped 64 KiB
 * buffers are collected only by full GCs, and thousands per second of them raised a daemon's
 * peak memory by tens of MiB.
 */
const SPARE_TABLES = 64;

interface Slot {
  buf: Buffer;
  pins: number;
  /** Dirty byte range [lo, hi); hi = 0 when clean. */
  lo: number;
  hi: number;
  /** Hit since eviction last passed it (second-chance eviction; hits do not reorder the Map). */
  used: boolean;
}

/** A dirty range taken for writing back. */
export interface DirtyTable {
  offset: number;
  buf: Buffer;
  lo: number;
  hi: number;
}

export class L2Cache {
  private map = new Map<number, Slot>();
  private loading = new Map<number, Promise<Buffer>>();
  /** Buffers of evicted tables, reused for loads (a cache smaller than the image churns otherwise). */
  private spare: Buffer[] = [];
  /** Number of dirty tables. */
  dirtyCount = 0;

  /**
   * @param pending bytes of a table whose write-back is still in flight (newer than the file):
   *   a table evicted meanwhile is reloaded from them, never from the file.
   */
  constructor(private readonly storage: Storage, private readonly tableSize: number, readonly capacity: number,
    private readonly pending: (offset: number) => Buffer | undefined = () => undefined) {}

  /** The table at `offset` if cached (marked recently used, not pinned), else undefined. */
  peek(offset: number): Buffer | undefined {
    const slot = this.map.get(offset);
    if (!slot) return undefined;
    slot.used = true;
    return slot.buf;
  }

  /** The table at `offset`, pinned, if cached; else undefined (use `pin`). */
  pinCached(offset: number): Buffer | undefined {
    const slot = this.map.get(offset);
    if (!slot) return undefined;
    slot.pins++;
    slot.used = true;
    return slot.buf;
  }

  /** Returns the table at `offset`, loading it if needed, and pins it until `unpin` is called. */
  async pin(offset: number): Promise<Buffer> {
    const slot = this.map.get(offset);
    if (slot) {
      slot.pins++;
      slot.used = true;
      return slot.buf;
    }
    let p = this.loading.get(offset);
    if (!p) {
      p = (async () => {
        const buf = this.spare.pop() ?? Buffer.allocUnsafe(this.tableSize);
        const newer = this.pending(offset);
        if (newer) newer.copy(buf);
        else await this.storage.read(buf, offset);
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
    this.map.set(offset, { buf, pins: 1, lo: 0, hi: 0, used: false });
    this.evict();
    return buf;
  }

  /** Installs a freshly built table (e.g. a new or copied L2), pinned. */
  install(offset: number, buf: Buffer): Buffer {
    this.forget(offset);
    this.map.set(offset, { buf, pins: 1, lo: 0, hi: 0, used: false });
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
    const slot = this.map.get(offset);
    if (slot && slot.hi > 0) this.dirtyCount--;
    this.map.delete(offset);
  }

  clear(): void {
    this.map.clear();
    this.dirtyCount = 0;
  }

  /** Record that bytes [a, b) of the cached table at `offset` changed in memory only. */
  markDirty(offset: number, a: number, b: number): void {
    const slot = this.map.get(offset);
    if (!slot) throw new Error(`L2 table 0x${offset.toString(16)} marked dirty while not cached`);
    if (slot.hi === 0) {
      this.dirtyCount++;
      slot.lo = a;
      slot.hi = b;
    } else {
      slot.lo = Math.min(slot.lo, a);
      slot.hi = Math.max(slot.hi, b);
    }
  }

  /** The dirty range of the table at `offset`, if any (left dirty). */
  dirtyRange(offset: number): { buf: Buffer; lo: number; hi: number } | undefined {
    const slot = this.map.get(offset);
    return slot && slot.hi > 0 ? { buf: slot.buf, lo: slot.lo, hi: slot.hi } : undefined;
  }

  /**
   * Takes every dirty range. The tables become clean and are pinned (their buffers cannot be
   * evicted and reused while written): the caller unpins each one when its write is done, and
   * gives a failed one back with markDirty.
   */
  takeDirty(): DirtyTable[] {
    const out: DirtyTable[] = [];
    if (this.dirtyCount === 0) return out;
    for (const [offset, slot] of this.map) {
      if (slot.hi === 0) continue;
      out.push({ offset, buf: slot.buf, lo: slot.lo, hi: slot.hi });
      slot.pins++;
      slot.lo = 0;
      slot.hi = 0;
    }
    this.dirtyCount = 0;
    return out;
  }

  /** Takes the dirty range of one table (it becomes clean). */
  takeDirtyOf(offset: number): { lo: number; hi: number } | undefined {
    const slot = this.map.get(offset);
    if (!slot || slot.hi === 0) return undefined;
    const r = { lo: slot.lo, hi: slot.hi };
    slot.lo = 0;
    slot.hi = 0;
    this.dirtyCount--;
    return r;
  }

  private evict(): void {
    if (this.map.size <= this.capacity) return;
    // Oldest first; a used table goes to the back with its bit cleared (visited again at most
    // once more, so the walk ends). Pinned and dirty tables stay.
    for (const [k, s] of this.map) {
      if (this.map.size <= this.capacity) break;
      if (s.used) {
        s.used = false;
        this.map.delete(k);
        this.map.set(k, s);
      } else if (s.pins === 0 && s.hi === 0) {
        this.map.delete(k);
        if (this.spare.length < SPARE_TABLES) this.spare.push(s.buf);
      }
    }
  }
}
