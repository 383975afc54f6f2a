/**
 * Refcount table and blocks: reading, updating and allocating host clusters.
 *
 * Invariants (crash safety, as QEMU orders them):
 * - a cluster's refcount is raised on disk before any L2/L1 entry points at it;
 * - on free, callers drop the reference (L2) first and the refcount afterwards;
 * - a new refcount block is written before the table entry that points at it, and a grown
 *   table is written completely before the header switches to it.
 * So a crash leaves at worst leaked clusters (refcount > references), never a dangling reference.
 * In `lazy` mode (writeback caching, guest write path only) changed block ranges stay in memory
 * as pending until writePending(); the image then writes them before any L2 table that may
 * point at the counted clusters. Pending ranges only ever hold increments and decrements whose
 * references are gone on disk (a run counted in part and back down while a new block is made
 * was never referenced), so writing them early is always safe. New blocks and a grown table
 * are always written through.
 * Frees of the writeback guest path are drops (dropLater): counted at once for everything that
 * reads refcounts (the allocator sees the cluster free and the free cluster index moves down to
 * it, as QEMU's update_refcount), but kept out of the block buffers until applyDrops(), which
 * the image calls once the L2 tables that dropped the references are on disk (QEMU: the
 * refcount block cache depends on the L2 table cache). Counting a cluster with a drop pending
 * again first calls beforeReuse (the image writes its L2 tables back and applies the drops).
 * All mutating methods must be called under the image's metadata mutex.
 */
import type { Storage } from '../storage/storage.js';
import { Lru } from '../util/lru.js';
import { CorruptionError, ImageError } from '../image/errors.js';
import { TWO32 } from './constants.js';
import { MetaWriter } from './meta-writer.js';
import { DEFAULT_REFCOUNT_CACHE_BLOCKS } from './cache-sizes.js';

/**
 * A refcount update that would drop below zero or exceed the maximum the refcount width holds.
 * Reported as QEMU's update_refcount does (EINVAL); nothing was changed.
 */
export class RefcountRangeError extends ImageError {
  constructor(readonly cluster: number, readonly underflow: boolean) {
    super('Invalid argument', 'EINVAL');
    this.name = 'RefcountRangeError';
  }
}

/** Stand-in for a refcount block offset past 2^53 (past any real file; reads as zeros). */
export const FAR_BLOCK = 2 ** 60;

/** QCOW_MAX_CLUSTER_OFFSET + 1: a cluster allocation must end at or below 2^56. */
const MAX_CLUSTER_OFFSET = 2 ** 56;

/** Where a guest write continues in the file (QEMU's host offset in qcow2_alloc_host_offset); null: nowhere yet. */
export interface AllocChain {
  next: number | null;
}

/**
 * QEMU's qcow2_refcount_metadata_size, its refblock count: the refcount blocks needed to count
 * `clusters` clusters plus those blocks and their table (`generous`: with room for the table to
 * grow by half).
 */
export function refcountBlocksFor(clusters: number, clusterSize: number, bits: number, generous: boolean): number {
  const perTableCluster = clusterSize / 8, perBlock = (clusterSize * 8) / bits;
  let table = 0, blocks = 0, n = 0, last = 0;
  do {
    last = n;
    blocks = Math.ceil((clusters + table + blocks) / perBlock);
    table = Math.ceil(blocks / perTableCluster);
    n = clusters + blocks + table;
    if (n === last && generous) {
      clusters += Math.ceil(table / 2);
      n = 0;
      generous = false;
    }
  } while (n !== last);
  return blocks;
}

export interface RefcountGeometry {
  clusterBits: number;
  refcountOrder: number;
}

export class Refcounts {
  readonly clusterSize: number;
  readonly bits: number;
  /** refcount entries per block. */
  readonly perBlock: number;
  private readonly maxValue: number;
  /**
   * Reftable entries (block host offsets, 0 = none). All 55 offset bits are kept, as QEMU's
   * REFT_OFFSET_MASK: an offset past 2^53 is FAR_BLOCK (exact value in `farEntries`), past 2^63
   * (a negative int64 for QEMU) is -1.
   */
  table: number[];
  /** Bumped whenever a table entry changes in place (a block added or dropped). */
  generation = 0;
  /** Exact offsets of the FAR_BLOCK entries, by table index. */
  farEntries = new Map<number, bigint>();
  tableOffset: number;
  tableClusters: number;
  /**
   * QEMU's free_cluster_index: where the search for free clusters starts. A search leaves it at
   * the end of the run it found; a refcount dropping to 0 below it moves it down to that cluster.
   */
  private fci = 0;
  private readonly blocks: Lru<number, Buffer>;
  private readonly writer: MetaWriter;
  /**
   * When set, changed block ranges are not awaited but their write promises collected here (the
   * caller awaits them before anything on disk may point at the counted clusters).
   */
  deferred: Array<Promise<void>> | null = null;
  /** When set, changed block ranges are only recorded in `pending` (see the header comment). */
  lazy = false;
  /** Block ranges changed in memory and not yet written (lazy mode). */
  private readonly pending = new Map<number, { buf: Buffer; lo: number; hi: number }>();
  /**
   * Refcount drops not yet in the blocks, by cluster index (see the header comment): every read
   * of a refcount subtracts them.
   */
  private readonly drops = new Map<number, number>();
  /**
   * Called before a cluster with a drop pending is counted up again; must leave no drop pending
   * (the image writes back its L2 tables, then applyDrops). Default: apply them.
   */
  beforeReuse: () => Promise<void> = () => this.applyDrops();
  /** Hook to persist a new reftable location in the header (offset, clusters). */
  onTableMoved: (offset: number, clusters: number) => Promise<void> = async () => {};

  constructor(
    private readonly storage: Storage,
    geo: RefcountGeometry,
    tableOffset: number,
    tableClusters: number,
    table: number[],
    cacheBlocks = DEFAULT_REFCOUNT_CACHE_BLOCKS,
  ) {
    this.clusterSize = 2 ** geo.clusterBits;
    this.bits = 2 ** geo.refcountOrder;
    this.perBlock = (this.clusterSize * 8) / this.bits;
    this.maxValue = this.bits >= 53 ? Number.MAX_SAFE_INTEGER : 2 ** this.bits - 1;
    this.tableOffset = tableOffset;
    this.tableClusters = tableClusters;
    this.table = table;
    this.blocks = new Lru(cacheBlocks);
    this.writer = new MetaWriter(storage);
  }

  /** Load the refcount table from disk (entries validated lazily when blocks are used). */
  static async load(storage: Storage, geo: RefcountGeometry, offset: number, clusters: number, cacheBlocks?: number): Promise<Refcounts> {
    const cs = 2 ** geo.clusterBits;
    const raw = Buffer.alloc(clusters * cs);
    await storage.read(raw, offset);
    const table: number[] = new Array(raw.length / 8);
    const far = new Map<number, bigint>();
    for (let i = 0; i < table.length; i++) {
      const hi = raw.readUInt32BE(i * 8), lo = raw.readUInt32BE(i * 8 + 4);
      table[i] = hi * TWO32 + ((lo & 0xfffffe00) >>> 0);
      if (hi >= 0x80000000) table[i] = -1; // a negative int64 for QEMU: every access fails (EIO)
      else if (hi >= 0x200000) { // beyond exact numbers and any real file
        table[i] = FAR_BLOCK;
        far.set(i, (BigInt(hi) << 32n) | BigInt((lo & 0xfffffe00) >>> 0));
      }
    }
    const rc = new Refcounts(storage, geo, offset, clusters, table, cacheBlocks);
    rc.farEntries = far;
    return rc;
  }

  /** Re-read the table from a new location and forget cached blocks (after the image was rebuilt on disk). */
  async reload(offset: number, clusters: number): Promise<void> {
    const fresh = await Refcounts.load(this.storage, { clusterBits: Math.log2(this.clusterSize), refcountOrder: Math.log2(this.bits) }, offset, clusters);
    this.table = fresh.table;
    this.farEntries = fresh.farEntries;
    this.tableOffset = offset;
    this.tableClusters = clusters;
    this.blocks.clear();
    this.pending.clear();
    this.drops.clear();
    this.fci = 0;
  }

  private async block(blockOffset: number): Promise<Buffer> {
    let b = this.blocks.get(blockOffset);
    if (!b) {
      if (blockOffset % this.clusterSize !== 0 || blockOffset < 0) {
        throw new CorruptionError(`Refblock offset 0x${blockOffset.toString(16)} unaligned`);
      }
      // An evicted block with writes still pending is newer in memory than on disk.
      const pending = this.pending.get(blockOffset)?.buf ?? this.writer.pendingBuffer(blockOffset);
      if (pending) b = pending;
      else {
        b = Buffer.alloc(this.clusterSize);
        await this.storage.read(b, blockOffset);
        const again = this.blocks.get(blockOffset);
        if (again) return again;
      }
      this.blocks.set(blockOffset, b);
    }
    return b;
  }

  private readEntry(b: Buffer, i: number): number {
    switch (this.bits) {
      case 16: return b.readUInt16BE(i * 2);
      case 32: return b.readUInt32BE(i * 4);
      case 64: return b.readUInt32BE(i * 8) * TWO32 + b.readUInt32BE(i * 8 + 4);
      case 8: return b[i];
      default: {
        const bit = i * this.bits;
        return (b[bit >>> 3] >>> (bit & 7)) & ((1 << this.bits) - 1);
      }
    }
  }

  private writeEntry(b: Buffer, i: number, v: number): void {
    switch (this.bits) {
      case 16: b.writeUInt16BE(v, i * 2); return;
      case 32: b.writeUInt32BE(v, i * 4); return;
      case 64: b.writeUInt32BE(Math.floor(v / TWO32), i * 8); b.writeUInt32BE(v >>> 0, i * 8 + 4); return;
      case 8: b[i] = v; return;
      default: {
        const bit = i * this.bits, mask = ((1 << this.bits) - 1) << (bit & 7);
        b[bit >>> 3] = (b[bit >>> 3] & ~mask) | ((v << (bit & 7)) & mask);
      }
    }
  }

  /** Encode value `v` as entry `i` of a refcount block buffer (used by the rebuild). */
  encodeInto(b: Buffer, i: number, v: number): void {
    this.writeEntry(b, i, v);
  }

  /** get() without I/O: undefined when the covering block is not cached (or the entry is corrupt). */
  getCached(ci: number): number | undefined {
    const ti = Math.floor(ci / this.perBlock);
    if (ti >= this.table.length) return 0;
    const bo = this.table[ti];
    if (bo === 0) return 0;
    const b = bo > 0 ? this.blocks.get(bo) : undefined;
    return b && this.readEntry(b, ci % this.perBlock) - this.dropOf(ci);
  }

  /** The drop pending for cluster `ci` (0 when none). */
  private dropOf(ci: number): number {
    return this.drops.size === 0 ? 0 : (this.drops.get(ci) ?? 0);
  }

  /** The exact refcount as a BigInt (64-bit refcounts may exceed 2^53); for reports. */
  async getExact(ci: number): Promise<bigint> {
    const v = await this.get(ci);
    if (this.bits !== 64 || v <= Number.MAX_SAFE_INTEGER) return BigInt(v);
    const bo = this.table[Math.floor(ci / this.perBlock)];
    const b = await this.block(bo);
    return b.readBigUInt64BE((ci % this.perBlock) * 8) - BigInt(this.dropOf(ci));
  }

  /** Refcount of the cluster with index `ci` (0 when no block covers it). */
  async get(ci: number): Promise<number> {
    const ti = Math.floor(ci / this.perBlock);
    if (ti >= this.table.length) return 0;
    const bo = this.table[ti];
    if (bo === 0) return 0;
    if (bo < 0) throw new ImageError('Input/output error', 'EIO');
    if (bo === FAR_BLOCK) {
      // Read past the end of the file: zeros (unless the exact offset is unaligned).
      const exact = this.farEntries.get(ti) ?? 0n;
      if (exact % BigInt(this.clusterSize) !== 0n) throw new CorruptionError(`Refblock offset 0x${exact.toString(16)} unaligned`);
      return 0;
    }
    return this.readEntry(await this.block(bo), ci % this.perBlock) - this.dropOf(ci);
  }

  /**
   * Add `delta` to the refcounts of clusters [ci, ci+n). New refcount blocks (and a grown table)
   * are created as needed. Changed block bytes are written before returning.
   */
  async update(ci: number, n: number, delta: number): Promise<void> {
    await this.apply(ci, n, () => delta);
  }

  /**
   * Add deltas[k] to the refcount of cluster ci + k, for a contiguous run; each refcount block
   * range is written once. Zero deltas leave their entries alone.
   */
  async addEach(ci: number, deltas: number[]): Promise<void> {
    await this.apply(ci, deltas.length, (k) => deltas[k]);
  }

  /**
   * Add deltaAt(k) to the refcount of cluster ci + k for k in [0, n). The whole range is checked
   * first: an update that would take any refcount below 0 or past the maximum fails (QEMU:
   * EINVAL) before a block, cached or on disk, is changed or created.
   */
  private async apply(ci: number, n: number, deltaAt: (k: number) => number): Promise<void> {
    if (n <= 0) return;
    if (this.drops.size > 0) {
      for (let k = 0; k < n; k++) {
        if (deltaAt(k) > 0 && this.drops.has(ci + k)) {
          await this.beforeReuse();
          break;
        }
      }
    }
    await this.checkRange(ci, n, deltaAt);
    let i = 0;
    while (i < n) {
      const ti = Math.floor((ci + i) / this.perBlock);
      const bo = await this.ensureBlock(ti, ci + i);
      const b = await this.block(bo);
      const first = (ci + i) % this.perBlock;
      const last = Math.min(this.perBlock, first + (n - i));
      const at = (k: number): number => deltaAt(i + k - first);
      const base = ti * this.perBlock;
      // Again against the block as it is now: growing the table may just have counted clusters in it.
      this.checkEntries(ti, first, last, (k) => this.readEntry(b, k) - this.dropOf(base + k), at);
      for (let k = first; k < last; k++) {
        const d = at(k);
        if (d === 0) continue;
        const v = this.readEntry(b, k) + d;
        this.writeEntry(b, k, v);
        if (v - this.dropOf(base + k) === 0) this.zeroed(base + k);
      }
      await this.writeBlockRange(bo, b, first, last);
      i += last - first;
    }
  }

  /** Fails (RefcountRangeError, or EINVAL/EFBIG where no block exists) unless update(ci, n, delta) would succeed. Changes nothing. */
  async check(ci: number, n: number, delta: number): Promise<void> {
    if (n > 0) await this.checkRange(ci, n, () => delta);
  }

  /** Fails unless every refcount of [ci, ci+n) stays in range after its delta. Changes nothing. */
  private async checkRange(ci: number, n: number, deltaAt: (k: number) => number): Promise<void> {
    let i = 0;
    while (i < n) {
      const ti = Math.floor((ci + i) / this.perBlock);
      const first = (ci + i) % this.perBlock;
      const last = Math.min(this.perBlock, first + (n - i));
      const at = (k: number): number => deltaAt(i + k - first);
      const bo = ti < this.table.length ? this.table[ti] : 0;
      if (bo < 0) throw new ImageError('Input/output error', 'EIO');
      if (bo === FAR_BLOCK) throw new ImageError('File too large', 'EFBIG'); // a write there fails
      if (bo > 0) {
        const b = await this.block(bo);
        const base = ti * this.perBlock;
        this.checkEntries(ti, first, last, (k) => this.readEntry(b, k) - this.dropOf(base + k), at);
      } else {
        // No block: a decrement never creates one (QEMU: EINVAL, or EFBIG past the largest
        // refcount table); the entries read as 0 (checked again once the block exists).
        for (let k = first; k < last; k++) {
          if (at(k) >= 0) continue;
          if (ti >= (8 * 1024 * 1024) / 8) throw new ImageError('File too large', 'EFBIG');
          throw new ImageError('Invalid argument', 'EINVAL');
        }
        this.checkEntries(ti, first, last, () => 0, at);
      }
      i += last - first;
    }
  }

  private checkEntries(ti: number, first: number, last: number, cur: (k: number) => number, deltaAt: (k: number) => number): void {
    for (let k = first; k < last; k++) {
      const d = deltaAt(k);
      if (d === 0) continue;
      const v = cur(k) + d;
      if (v < 0 || v > this.maxValue) throw new RefcountRangeError(ti * this.perBlock + k, v < 0);
    }
  }

  /** Set a refcount to an absolute value (repair). */
  async set(ci: number, v: number): Promise<void> {
    const cur = await this.get(ci);
    if (!Number.isSafeInteger(cur)) {
      // A 64-bit refcount past 2^53 (its block exists): the difference would not be exact, so the
      // new value is written as such (QEMU subtracts the exact difference: the same result).
      const bo = this.table[Math.floor(ci / this.perBlock)];
      const b = await this.block(bo);
      const k = ci % this.perBlock;
      this.writeEntry(b, k, v);
      if (v === 0 && ci < this.fci) this.fci = ci;
      await this.writeBlockRange(bo, b, k, k + 1);
      return;
    }
    if (cur !== v) await this.update(ci, 1, v - cur);
  }

  private async writeBlockRange(bo: number, b: Buffer, first: number, last: number): Promise<void> {
    if (this.lazy) {
      this.markPending(bo, b, first, last);
      return;
    }
    const [startByte, endByte] = this.sectorRange(first, last);
    const w = this.writer.write(bo, b, startByte, endByte);
    if (this.deferred) {
      w.catch(() => {});
      this.deferred.push(w);
    } else await w;
  }

  /** The bytes of a block holding entries [first, last), widened to whole 512-byte sectors. */
  private sectorRange(first: number, last: number): [number, number] {
    return [
      Math.floor((first * this.bits) / 8 / 512) * 512,
      Math.min(this.clusterSize, Math.ceil(Math.ceil((last * this.bits) / 8) / 512) * 512),
    ];
  }

  /** Record entries [first, last) of block `bo` as changed in memory only (lazy mode). */
  private markPending(bo: number, b: Buffer, first: number, last: number): void {
    const [startByte, endByte] = this.sectorRange(first, last);
    const p = this.pending.get(bo);
    if (!p) this.pending.set(bo, { buf: b, lo: startByte, hi: endByte });
    else {
      p.buf = b;
      p.lo = Math.min(p.lo, startByte);
      p.hi = Math.max(p.hi, endByte);
    }
  }

  /**
   * A new refcount block `buf` at `bo`, cached with all of it pending and not yet in the table
   * (QEMU's qcow2_cache_get_empty for a block alloc_refcount_block creates).
   */
  installPending(bo: number, buf: Buffer): void {
    this.blocks.set(bo, buf);
    this.markPending(bo, buf, 0, this.perBlock);
  }

  /** Offsets of the blocks with pending (unwritten) changes. */
  pendingBlocks(): number[] { return [...this.pending.keys()]; }

  /** Forget the pending changes of block `bo` (its write was refused); the cached block goes too. */
  dropPending(bo: number): void {
    this.pending.delete(bo);
    this.blocks.delete(bo);
  }

  /** Number of blocks with pending (unwritten) changes. */
  get pendingCount(): number { return this.pending.size; }

  /**
   * Write every pending block range; resolves once all are on disk (in the file: the caller
   * flushes the storage where durability is needed). A failed range is pending again.
   */
  async writePending(): Promise<void> {
    if (this.pending.size === 0) return;
    const taken = [...this.pending];
    this.pending.clear();
    const results = await Promise.allSettled(taken.map(([bo, p]) => this.writer.write(bo, p.buf, p.lo, p.hi)));
    let failure: unknown = null;
    results.forEach((r, i) => {
      if (r.status === 'fulfilled') return;
      failure ??= r.reason;
      const [bo, p] = taken[i];
      const cur = this.pending.get(bo);
      if (!cur) this.pending.set(bo, p);
      else {
        cur.lo = Math.min(cur.lo, p.lo);
        cur.hi = Math.max(cur.hi, p.hi);
      }
    });
    if (failure) throw failure;
  }

  /** Runs `fn` with changes written through and awaited (structures that other metadata will point at). */
  private async eager<T>(fn: () => Promise<T>): Promise<T> {
    const was = this.lazy, deferred = this.deferred;
    this.lazy = false;
    this.deferred = null;
    try {
      return await fn();
    } finally {
      this.lazy = was;
      this.deferred = deferred;
    }
  }

  /** Whether table index `ti` names a block (QEMU: a nonzero reftable entry). */
  private hasBlock(ti: number): boolean {
    return ti < this.table.length && this.table[ti] !== 0;
  }

  /**
   * Returns the offset of the block for table index `ti`, making it first if missing (for
   * `cluster`, as QEMU's alloc_refcount_block; see allocBlock).
   */
  private async ensureBlock(ti: number, cluster: number): Promise<number> {
    while (!this.hasBlock(ti)) await this.eager(() => this.allocBlock(ti, cluster));
    if (this.table[ti] < 0) throw new ImageError('Input/output error', 'EIO');
    return this.table[ti];
  }

  /**
   * QEMU's alloc_clusters_noref: the first run of `n` clusters with refcount 0, searched from the
   * free cluster index, which is left at the end of the run (clusters skipped on the way are not
   * searched again until a refcount drops to 0 below the index). Counts nothing.
   */
  private async noref(n: number): Promise<number> {
    let i = 0;
    while (i < n) {
      const c = this.fci;
      const ti = Math.floor(c / this.perBlock);
      if (!this.hasBlock(ti)) {
        // A range without a block reads as all free.
        const k = Math.min(n - i, (ti + 1) * this.perBlock - c);
        this.fci = c + k;
        i += k;
        continue;
      }
      this.fci = c + 1;
      const v = this.getCached(c) ?? (await this.get(c));
      i = v === 0 ? i + 1 : 0;
    }
    if (this.fci - 1 > MAX_CLUSTER_OFFSET / this.clusterSize - 1) throw new ImageError('File too large', 'EFBIG');
    return this.fci - n;
  }

  /**
   * update_refcount(+1) of the free clusters [start, start + n): false when a range of them had
   * no refcount block, which is made now (QEMU: -EAGAIN; the free cluster index goes back to
   * `start` and the caller searches again). Nothing of the run is counted then.
   */
  private async countNew(start: number, n: number): Promise<boolean> {
    const pb = this.perBlock;
    for (let ti = Math.floor(start / pb); ti <= Math.floor((start + n - 1) / pb); ti++) {
      if (this.hasBlock(ti)) continue;
      // QEMU has counted the run's clusters before this range when it makes the block: they
      // are in use for the block's search (which starts below them after an allocation at a
      // given offset), and are counted back down afterwards.
      const c = Math.max(start, ti * pb);
      if (c > start) await this.update(start, c - start, 1);
      await this.eager(() => this.allocBlock(ti, c));
      if (this.fci > start) this.fci = start;
      if (c > start) await this.update(start, c - start, -1);
      return false;
    }
    await this.update(start, n, 1);
    return true;
  }

  /**
   * QEMU's alloc_refcount_block for table index `ti` without a block (`cluster`: the cluster
   * being counted): the block goes at the first free cluster from the free cluster index. It
   * counts itself when it lies in its own range; otherwise it is counted in the block of the
   * range it lies in (made first, in which case this block is not made now: the caller searches
   * again). A block whose index is past the table grows the table (refcountArea). Order on disk:
   * the block's own refcount, the block, then the table entry naming it.
   */
  private async allocBlock(ti: number, cluster: number): Promise<void> {
    const cs = this.clusterSize;
    const nb = await this.noref(1);
    if (nb === 0) throw new CorruptionError('Preventing invalid allocation of refcount block at offset 0');
    const bo = nb * cs;
    // Only a corrupt image has the table's own clusters free: never write there.
    if (bo < this.tableOffset + this.tableClusters * cs && this.tableOffset < bo + cs) {
      throw new CorruptionError('Preventing invalid write on metadata (overlaps with refcount table)');
    }
    const buf = Buffer.alloc(cs);
    if (Math.floor(nb / this.perBlock) === ti) this.writeEntry(buf, nb % this.perBlock, 1);
    else if (!(await this.countNew(nb, 1))) return;
    await this.storage.write(buf, bo);
    this.blocks.set(bo, buf);
    await this.storage.flush();
    if (ti < this.table.length) {
      // The table entry goes last, once the block and its own refcount are durable.
      this.table[ti] = bo;
      this.generation++;
      this.farEntries.delete(ti);
      const e = Buffer.alloc(8);
      e.writeUInt32BE(Math.floor(bo / TWO32), 0);
      e.writeUInt32BE(bo >>> 0, 4);
      await this.storage.write(e, this.tableOffset + ti * 8);
      await this.storage.flush();
      return;
    }
    // Past the table: a new table and the blocks that describe it, from the start of the range
    // after both the counted cluster and the new block.
    const blocksUsed = Math.ceil(Math.max(cluster + 1, nb + 1) / this.perBlock);
    await this.refcountArea(blocksUsed * this.perBlock, 0, false, ti, bo);
  }

  /**
   * qcow2_refcount_area with exact_size (preallocation=falloc/full): a new table and the blocks
   * that cover it and `additional` clusters after it, from cluster `start` (past everything in
   * use). Returns the cluster after them, where the additional clusters may go.
   */
  async preallocArea(start: number, additional: number): Promise<number> {
    return this.eager(() => this.refcountArea(start, additional, true));
  }

  /**
   * QEMU's qcow2_refcount_area: from cluster `start` (past everything in use) new refcount blocks
   * for the table indices from start's range up to the count qcow2_refcount_metadata_size gives
   * for them, their table and `additional` clusters, then the table (that count, or 1.5 times it
   * without `exact`, in whole clusters), all counted in those blocks. The blocks reach the disk
   * first, then the table, then the header names it; the old table is released last. Entry
   * `newIndex` of the new table names the block at `newOffset` (already written) when given.
   * Returns the cluster after the table.
   */
  private async refcountArea(start: number, additional: number, exact: boolean, newIndex = -1, newOffset = 0): Promise<number> {
    const cs = this.clusterSize, pb = this.perBlock;
    const maxEntries = 8 * 1024 * 1024; // QCOW_MAX_REFTABLE_SIZE, compared with entry counts as QEMU does
    const total = refcountBlocksFor(start + additional, cs, this.bits, !exact);
    if (total > maxEntries) throw new ImageError('File too large', 'EFBIG');
    const areaIndex = Math.floor(start / pb);
    const perTableCluster = cs / 8;
    const tableSize = Math.ceil((exact ? total : total + Math.ceil(total / 2)) / perTableCluster) * perTableCluster;
    const tableClusters = (tableSize * 8) / cs;
    if (tableSize > maxEntries) throw new ImageError('File too large', 'EFBIG');
    let maxIndex = this.table.length - 1;
    while (maxIndex > 0 && this.table[maxIndex] === 0) maxIndex--;
    const newTable: number[] = new Array(tableSize).fill(0);
    const copy = tableSize > maxIndex ? maxIndex + 1 : tableSize;
    for (let i = 0; i < copy && i < this.table.length; i++) newTable[i] = this.table[i];
    if (newOffset) newTable[newIndex] = newOffset;
    let newBlocks = 0;
    for (let i = areaIndex; i < total; i++) if (newTable[i] === 0) newBlocks++;
    const tableStart = start + newBlocks;
    const end = tableStart + tableClusters;
    let next = start;
    const fresh: Array<[number, Buffer]> = [];
    const existing: Array<[number, Buffer, number, number]> = [];
    for (let i = areaIndex; i < total; i++) {
      let buf: Buffer;
      let isNew = false;
      if (newTable[i] !== 0) buf = await this.block(newTable[i]);
      else {
        buf = Buffer.alloc(cs);
        newTable[i] = next++ * cs;
        isNew = true;
      }
      const first = i * pb;
      let lo = 0, hi = 0;
      if (first < end) {
        lo = first < start ? start - first : 0;
        hi = Math.min(end - first, pb);
        for (let j = lo; j < hi; j++) this.writeEntry(buf, j, this.readEntry(buf, j) + 1);
      }
      if (isNew) fresh.push([newTable[i], buf]);
      else if (hi > lo) existing.push([newTable[i], buf, lo, hi]);
    }
    for (const [bo, buf] of fresh) {
      await this.storage.write(buf, bo);
      this.blocks.set(bo, buf);
    }
    for (const [bo, buf, lo, hi] of existing) {
      const [a, b] = this.sectorRange(lo, hi);
      await this.writer.write(bo, buf, a, b);
    }
    await this.storage.flush();
    const raw = Buffer.alloc(tableClusters * cs);
    newTable.forEach((v, i) => {
      const exact = this.farEntries.get(i);
      if (v === FAR_BLOCK && exact !== undefined) raw.writeBigUInt64BE(exact, i * 8);
      else if (v < 0) raw.writeBigUInt64BE(0xffffffffffffffffn, i * 8);
      else {
        raw.writeUInt32BE(Math.floor(v / TWO32), i * 8);
        raw.writeUInt32BE(v >>> 0, i * 8 + 4);
      }
    });
    await this.storage.write(raw, tableStart * cs);
    await this.storage.flush();
    const oldOffset = this.tableOffset, oldClusters = this.tableClusters;
    this.table = newTable;
    for (const i of [...this.farEntries.keys()]) if (i >= tableSize) this.farEntries.delete(i);
    this.tableOffset = tableStart * cs;
    this.tableClusters = tableClusters;
    await this.onTableMoved(this.tableOffset, tableClusters);
    await this.storage.flush();
    // Only after the header points at the new table (durably) is the old one released.
    await this.update(oldOffset / cs, oldClusters, -1);
    return end;
  }

  /**
   * QEMU's qcow2_alloc_clusters: `n` contiguous clusters (refcount 1) at the first free run from
   * the free cluster index; when the run needs a refcount block, the block is made and the run
   * searched again. Returns the host offset of the first.
   */
  async alloc(n: number): Promise<number> {
    for (;;) {
      const start = await this.noref(n);
      if (await this.countNew(start, n)) return start * this.clusterSize;
    }
  }

  /**
   * QEMU's qcow2_alloc_clusters_at: count the clusters from host `offset` on that are free, at
   * most `n` and stopping at the first one in use; returns how many (0: none free there).
   */
  async allocAt(offset: number, n: number): Promise<number> {
    const ci = offset / this.clusterSize;
    for (;;) {
      let i = 0;
      while (i < n && (this.getCached(ci + i) ?? (await this.get(ci + i))) === 0) i++;
      if (i === 0 || (await this.countNew(ci, i))) return i;
    }
  }

  /**
   * Host clusters for one L2 table's part of a guest write, as QEMU's qcow2_alloc_host_offset
   * gathers them. `hosts` lists the part's clusters in guest order: the host of a cluster kept as
   * it is (in use, COPIED), or null for one that needs a new cluster. Kept clusters move
   * `chain.next` (the host offset the write would continue at) past them; each stretch of new
   * clusters is first taken at `chain.next` as far as the clusters there are free
   * (qcow2_alloc_clusters_at), the rest (or all, without a place to continue) as one run from
   * the free cluster index (qcow2_alloc_clusters). Returns the new clusters' hosts in order.
   * `chain` spans the L2 tables of one write request; it starts with next = null.
   */
  async allocSegment(hosts: Array<number | null>, chain: AllocChain): Promise<number[]> {
    const cs = this.clusterSize;
    const out: number[] = [];
    for (let i = 0; i < hosts.length;) {
      const h = hosts[i];
      if (h !== null) {
        chain.next = h + cs;
        i++;
        continue;
      }
      let k = 1;
      while (i + k < hosts.length && hosts[i + k] === null) k++;
      let got = 0;
      if (chain.next !== null) {
        got = await this.allocAt(chain.next, k);
        for (let j = 0; j < got; j++) out.push(chain.next + j * cs);
        chain.next = got === k ? chain.next + k * cs : null;
      }
      if (got < k) {
        const start = await this.alloc(k - got);
        for (let j = 0; j < k - got; j++) out.push(start + j * cs);
        chain.next = start + (k - got) * cs;
      }
      i += k;
    }
    return out;
  }

  /**
   * allocSegment without I/O or awaits, for the writeback guest path: the same clusters the
   * asynchronous path would pick, counted in memory only (pending, as in lazy mode). Null when
   * that is not possible (a refcount block is missing or not cached, the search gets long, or
   * `refuse` rejects a run); nothing is changed then and the caller takes the asynchronous path.
   * The caller must hold (or find free) the metadata mutex.
   */
  tryAllocSegmentSync(hosts: Array<number | null>, chain: AllocChain, refuse: (host: number, n: number) => boolean): number[] | null {
    const cs = this.clusterSize, pb = this.perBlock;
    let fci = this.fci, next = chain.next;
    const runs: Array<[number, number]> = [];
    const value = (c: number): number | undefined => {
      for (const [s, n] of runs) if (c >= s && c < s + n) return 1;
      return this.getCached(c);
    };
    // Every range of a run must have a cached block (otherwise the async path would make or read one).
    const ready = (s: number, n: number): boolean => {
      for (let ti = Math.floor(s / pb); ti <= Math.floor((s + n - 1) / pb); ti++) {
        const bo = ti < this.table.length ? this.table[ti] : 0;
        if (bo <= 0 || bo === FAR_BLOCK || !this.blocks.get(bo)) return false;
      }
      return true;
    };
    const out: number[] = [];
    for (let i = 0; i < hosts.length;) {
      const h = hosts[i];
      if (h !== null) {
        next = h + cs;
        i++;
        continue;
      }
      let k = 1;
      while (i + k < hosts.length && hosts[i + k] === null) k++;
      if (k > pb / 2) return null;
      let got = 0;
      if (next !== null) {
        const s = next / cs;
        for (; got < k; got++) {
          const v = value(s + got);
          if (v === undefined) return null;
          if (v !== 0) break;
        }
        if (got > 0) {
          if (!ready(s, got)) return null;
          runs.push([s, got]);
          for (let j = 0; j < got; j++) out.push(next + j * cs);
        }
        next = got === k ? next + k * cs : null;
      }
      if (got < k) {
        const n = k - got;
        for (let run = 0, steps = 0; run < n;) {
          if (++steps > pb) return null;
          const v = value(fci++);
          if (v === undefined) return null;
          run = v === 0 ? run + 1 : 0;
        }
        const s = fci - n;
        if (!ready(s, n)) return null;
        runs.push([s, n]);
        for (let j = 0; j < n; j++) out.push((s + j) * cs);
        next = (s + n) * cs;
      }
      i += k;
    }
    for (const [s, n] of runs) if (refuse(s * cs, n)) return null;
    // A cluster with a drop pending is counted again on the asynchronous path (beforeReuse).
    if (this.drops.size > 0) for (const [s, n] of runs) for (let c = s; c < s + n; c++) if (this.drops.has(c)) return null;
    // Every entry of the runs was just read from a cached block (nothing evicted since: no await).
    for (const [s, n] of runs) {
      for (let c = s; c < s + n;) {
        const ti = Math.floor(c / pb);
        const bo = this.table[ti];
        const b = this.blocks.get(bo) as Buffer;
        const first = c % pb;
        const last = Math.min(pb, first + (s + n - c));
        for (let k = first; k < last; k++) this.writeEntry(b, k, this.readEntry(b, k) + 1);
        this.markPending(bo, b, first, last);
        c += last - first;
      }
    }
    this.fci = fci;
    chain.next = next;
    return out;
  }

  /**
   * alloc(n) without I/O or awaits (see tryAllocSegmentSync): the run the asynchronous path
   * would pick, counted in memory only, or null with nothing changed.
   */
  tryAllocSync(n: number, refuse: (host: number, n: number) => boolean): number | null {
    const hosts = this.tryAllocSegmentSync(new Array<number | null>(n).fill(null), { next: null }, refuse);
    return hosts ? hosts[0] : null;
  }

  /** Allocate `n` clusters as one contiguous run (alloc) and return each cluster's host offset. */
  async allocMany(n: number): Promise<number[]> {
    if (n <= 0) return [];
    const base = await this.alloc(n);
    const out: number[] = [];
    for (let i = 0; i < n; i++) out.push(base + i * this.clusterSize);
    return out;
  }

  /**
   * Drop one reference from each cluster of [offset, offset + n clusters). With `discard`
   * (QEMU's QCOW2_DISCARD_ALWAYS), clusters left without references are discarded from the file
   * where the storage can punch holes, so they read as zeros as in QEMU's files.
   */
  async free(offset: number, n: number, discard = false): Promise<void> {
    await this.update(offset / this.clusterSize, n, -1);
    if (!discard || !this.storage.punchHole) return;
    // One hole per run of clusters left unused (QEMU merges its queued discards the same way).
    const ci = offset / this.clusterSize;
    let run = -1;
    for (let i = ci; i <= ci + n; i++) {
      const free = i < ci + n && (await this.get(i)) === 0;
      if (free && run < 0) run = i;
      if (!free && run >= 0) {
        await this.storage.punchHole(run * this.clusterSize, (i - run) * this.clusterSize);
        run = -1;
      }
    }
  }

  /**
   * Drop one reference from each cluster of [ci, ci + n) for the allocator now and for the blocks
   * later (see the header comment): fails as update(ci, n, -1) would, with nothing changed.
   * A refcount reaching 0 moves the free cluster index down to its cluster (QEMU's
   * update_refcount). Returns the clusters left without references, in order.
   */
  async dropLater(ci: number, n: number): Promise<number[]> {
    if (n <= 0) return [];
    await this.checkRange(ci, n, () => -1);
    const zeroed: number[] = [];
    for (let c = ci; c < ci + n; c++) {
      const left = (await this.get(c)) - 1;
      this.drops.set(c, this.dropOf(c) + 1);
      if (left === 0) {
        zeroed.push(c);
        this.zeroed(c);
      }
    }
    return zeroed;
  }

  /** A refcount reached 0: the free cluster index moves down to it (QEMU's update_refcount). */
  private zeroed(c: number): void {
    if (c < this.fci) this.fci = c;
    if (c === this.watched) this.watchedFreed = true;
  }

  /** The cluster watch() follows, and whether its refcount has reached 0 since. */
  private watched = -1;
  private watchedFreed = false;

  /** Follow cluster `ci`: freedSince(ci) tells whether its refcount reaches 0 from now on. */
  watch(ci: number): void {
    this.watched = ci;
    this.watchedFreed = false;
  }

  /** Whether the refcount of `ci` (the watched cluster) has reached 0 since watch(ci). */
  freedSince(ci: number): boolean {
    return this.watched === ci && this.watchedFreed;
  }

  /** Number of clusters with a drop pending. */
  get pendingDropCount(): number { return this.drops.size; }

  /**
   * Move the pending drops into the blocks, as pending ranges (written by writePending). Only
   * once the references they drop are gone on disk. The free cluster index moved when they were
   * made, so it is left alone.
   */
  async applyDrops(): Promise<void> {
    if (this.drops.size === 0) return;
    for (const c of [...this.drops.keys()].sort((x, y) => x - y)) {
      const bo = this.table[Math.floor(c / this.perBlock)];
      const b = await this.block(bo);
      const k = c % this.perBlock;
      // No await from reading the drop to taking it: a failed read above leaves it pending.
      this.writeEntry(b, k, this.readEntry(b, k) - this.dropOf(c));
      this.drops.delete(c);
      this.markPending(bo, b, k, k + 1);
    }
  }

  /**
   * qcow2_shrink_reftable: unhook refcount blocks that count nothing but themselves. The whole
   * table is rewritten first; a dropped block's own reference disappears with it. Blocks
   * counted by another block are kept (dropping them would leak their cluster).
   */
  async dropUnusedBlocks(): Promise<void> {
    const keep = this.table.slice();
    for (let ti = 0; ti < this.table.length; ti++) {
      const bo = this.table[ti];
      if (bo <= 0) continue;
      const ci = bo / this.clusterSize;
      if (Math.floor(ci / this.perBlock) !== ti) continue;
      const b = Buffer.from(await this.block(bo));
      this.writeEntry(b, ci % this.perBlock, 0);
      if (b.equals(Buffer.alloc(b.length))) keep[ti] = 0;
    }
    if (keep.every((v, i) => v === this.table[i])) return;
    const raw = Buffer.alloc(this.tableClusters * this.clusterSize);
    keep.forEach((v, i) => {
      if (v <= 0) return;
      raw.writeUInt32BE(Math.floor(v / TWO32), i * 8);
      raw.writeUInt32BE(v >>> 0, i * 8 + 4);
    });
    await this.storage.write(raw, this.tableOffset);
    for (let ti = 0; ti < keep.length; ti++) {
      if (keep[ti] === 0 && this.table[ti] > 0) {
        // QEMU frees the block's own cluster: the free cluster index moves down to it.
        this.fci = Math.min(this.fci, this.table[ti] / this.clusterSize);
        this.blocks.delete(this.table[ti]);
        this.table[ti] = 0;
        this.generation++;
      }
    }
  }

  /** qcow2_get_last_cluster: the highest cluster index below `clusters` with a refcount, or -1. */
  async lastUsedCluster(clusters: number): Promise<number> {
    for (let ci = clusters - 1; ci >= 0; ci--) {
      const ti = Math.floor(ci / this.perBlock);
      if (ti >= this.table.length || this.table[ti] === 0) {
        ci = ti * this.perBlock; // a block-less range is all free
        continue;
      }
      if ((await this.get(ci)) > 0) return ci;
    }
    return -1;
  }

  /** Forget cached blocks (after an external rewrite such as a rebuild). */
  dropCache(): void {
    this.blocks.clear();
    this.pending.clear();
    this.drops.clear();
    this.fci = 0;
  }
}
