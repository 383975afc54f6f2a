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
 * point at the counted clusters. Pending ranges only ever hold increments (the image defers
 * frees until the L2 tables that dropped the references are on disk), so writing them early
 * is always safe. New blocks and a grown table are always written through.
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
  /** Exact offsets of the FAR_BLOCK entries, by table index. */
  farEntries = new Map<number, bigint>();
  tableOffset: number;
  tableClusters: number;
  /** Lowest cluster index that might be free (QEMU's free_cluster_index). */
  private freeHint = 0;
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
    this.freeHint = 0;
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
  private getCached(ci: number): number | undefined {
    const ti = Math.floor(ci / this.perBlock);
    if (ti >= this.table.length) return 0;
    const bo = this.table[ti];
    if (bo === 0) return 0;
    const b = bo > 0 ? this.blocks.get(bo) : undefined;
    return b && this.readEntry(b, ci % this.perBlock);
  }

  /** The exact refcount as a BigInt (64-bit refcounts may exceed 2^53); for reports. */
  async getExact(ci: number): Promise<bigint> {
    const v = await this.get(ci);
    if (this.bits !== 64 || v <= Number.MAX_SAFE_INTEGER) return BigInt(v);
    const bo = this.table[Math.floor(ci / this.perBlock)];
    const b = await this.block(bo);
    return b.readBigUInt64BE((ci % this.perBlock) * 8);
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
    return this.readEntry(await this.block(bo), ci % this.perBlock);
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
    await this.checkRange(ci, n, deltaAt);
    let i = 0;
    while (i < n) {
      const ti = Math.floor((ci + i) / this.perBlock);
      const bo = await this.ensureBlock(ti);
      const b = await this.block(bo);
      const first = (ci + i) % this.perBlock;
      const last = Math.min(this.perBlock, first + (n - i));
      const at = (k: number): number => deltaAt(i + k - first);
      // Again against the block as it is now: growing the table may just have counted clusters in it.
      this.checkEntries(ti, first, last, (k) => this.readEntry(b, k), at);
      for (let k = first; k < last; k++) {
        const d = at(k);
        if (d === 0) continue;
        const v = this.readEntry(b, k) + d;
        this.writeEntry(b, k, v);
        if (v === 0 && ti * this.perBlock + k < this.freeHint) this.freeHint = ti * this.perBlock + k;
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
        this.checkEntries(ti, first, last, (k) => this.readEntry(b, k), at);
      } else {
        // No block: a decrement never creates one (QEMU: EINVAL, or EFBIG past the largest
        // refcount table); a new block counts only itself, at the first entry of its range.
        for (let k = first; k < last; k++) {
          if (at(k) >= 0) continue;
          if (ti >= (8 * 1024 * 1024) / 8) throw new ImageError('File too large', 'EFBIG');
          throw new ImageError('Invalid argument', 'EINVAL');
        }
        this.checkEntries(ti, first, last, (k) => (k === 0 ? 1 : 0), at);
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
      if (v === 0 && ci < this.freeHint) this.freeHint = ci;
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

  /** Runs `fn` with changes written through (structures that other metadata will point at). */
  private async eager<T>(fn: () => Promise<T>): Promise<T> {
    const was = this.lazy;
    this.lazy = false;
    try {
      return await fn();
    } finally {
      this.lazy = was;
    }
  }

  /** Returns the offset of the block for table index `ti`, creating it (self-describing) if missing. */
  private async ensureBlock(ti: number): Promise<number> {
    if (ti < this.table.length && this.table[ti] > 0) return this.table[ti];
    return this.eager(() => this.createBlock(ti));
  }

  private async createBlock(ti: number): Promise<number> {
    if (ti < this.table.length && this.table[ti] < 0) throw new ImageError('Input/output error', 'EIO');
    if (ti >= this.table.length) {
      // Grown table: its own clusters' refcounts reach the disk before the header names it.
      await this.growTable(ti + 1);
      if (this.table[ti] > 0) return this.table[ti];
    }
    // With no block, every cluster of this block's range has refcount 0: put the block at the
    // first cluster of its own range, so it describes itself (no recursion into other blocks).
    const bi = ti * this.perBlock;
    const bo = bi * this.clusterSize;
    // Only a corrupt table lacks the block covering the header or the table itself: never write there.
    const hitsTable = bo < this.tableOffset + this.tableClusters * this.clusterSize && this.tableOffset < bo + this.clusterSize;
    if (bo === 0 || hitsTable) {
      throw new CorruptionError(`Preventing invalid write on metadata (overlaps with ${bo === 0 ? 'qcow2_header' : 'refcount table'})`);
    }
    await this.placeBlock(ti, bo, 0);
    return bo;
  }

  /**
   * Write a new, zeroed refcount block for table index `ti` at `bo` and make it reachable.
   * `ownIndex` is the entry counting the block itself when it lies in its own range; otherwise
   * the block's cluster is counted in the (existing) block of its range first.
   */
  private async placeBlock(ti: number, bo: number, ownIndex: number | null): Promise<void> {
    const nb = Buffer.alloc(this.clusterSize);
    if (ownIndex !== null) this.writeEntry(nb, ownIndex, 1);
    await this.storage.write(nb, bo);
    this.blocks.set(bo, nb);
    if (ownIndex === null) await this.update(bo / this.clusterSize, 1, 1);
    // The table entry goes last, once the block and its own refcount are durable: only now is
    // it reachable.
    await this.storage.flush();
    this.table[ti] = bo;
    const e = Buffer.alloc(8);
    e.writeUInt32BE(Math.floor(bo / TWO32), 0);
    e.writeUInt32BE(bo >>> 0, 4);
    await this.storage.write(e, this.tableOffset + ti * 8);
  }

  /**
   * Grow the reftable to hold at least `minEntries`, placing the new table (and the refcount
   * blocks that describe it) past the end of everything allocated, then switch the header to it.
   */
  private async growTable(minEntries: number): Promise<void> {
    const cs = this.clusterSize;
    const fileClusters = Math.ceil((await this.storage.size()) / cs);
    const start = Math.max(fileClusters, this.coveredClusters());
    // The new area: [new blocks for uncovered table indices][new table]. Iterate to a fixed point.
    if (minEntries * 8 > 8 * 1024 * 1024) throw new ImageError('Reference count table too large');
    let entries = Math.max(minEntries, Math.ceil(this.table.length * 1.5));
    let tableClusters = 0, newBlocks = 0, areaEnd = 0;
    for (;;) {
      tableClusters = Math.ceil((entries * 8) / cs);
      areaEnd = start + newBlocks + tableClusters;
      const firstTi = Math.floor(start / this.perBlock), lastTi = Math.floor((areaEnd - 1) / this.perBlock);
      let need = 0;
      for (let ti = firstTi; ti <= lastTi; ti++) if (ti >= this.table.length || this.table[ti] === 0) need++;
      const needEntries = Math.max(entries, lastTi + 1);
      if (need === newBlocks && needEntries === entries) break;
      newBlocks = need;
      entries = needEntries;
    }
    if (tableClusters * cs > 8 * 1024 * 1024) throw new ImageError('Reference count table too large');
    const newTable = this.table.slice();
    while (newTable.length < (tableClusters * cs) / 8) newTable.push(0);
    // Lay out the new blocks at the start of the area, in table-index order.
    const blockBufs = new Map<number, Buffer>();
    let next = start;
    const firstTi = Math.floor(start / this.perBlock), lastTi = Math.floor((areaEnd - 1) / this.perBlock);
    for (let ti = firstTi; ti <= lastTi; ti++) {
      if (ti < this.table.length && this.table[ti] !== 0) continue;
      newTable[ti] = next * cs;
      blockBufs.set(ti, Buffer.alloc(cs));
      next++;
    }
    const tableStart = next;
    // Count every area cluster: in a new block directly, or in an existing block (written now).
    for (let c = start; c < areaEnd; c++) {
      const ti = Math.floor(c / this.perBlock);
      const nb = blockBufs.get(ti);
      if (nb) this.writeEntry(nb, c % this.perBlock, 1);
      else await this.update(c, 1, 1);
    }
    for (const [ti, nb] of blockBufs) {
      await this.storage.write(nb, newTable[ti]);
      this.blocks.set(newTable[ti], nb);
    }
    const raw = Buffer.alloc(tableClusters * cs);
    newTable.forEach((v, i) => {
      raw.writeUInt32BE(Math.floor(v / TWO32), i * 8);
      raw.writeUInt32BE(v >>> 0, i * 8 + 4);
    });
    await this.storage.write(raw, tableStart * cs);
    await this.storage.flush();
    const oldOffset = this.tableOffset, oldClusters = this.tableClusters;
    this.table = newTable;
    this.tableOffset = tableStart * cs;
    this.tableClusters = tableClusters;
    await this.onTableMoved(this.tableOffset, tableClusters);
    await this.storage.flush();
    // Only after the header points at the new table (durably) is the old one released.
    await this.update(oldOffset / cs, oldClusters, -1);
  }

  /** Number of clusters the current table's blocks can describe. */
  private coveredClusters(): number {
    return this.table.length * this.perBlock;
  }

  /** Index of the first run of `n` free clusters at or after the hint. Does not change refcounts. */
  async findFree(n: number): Promise<number> {
    let ci = this.freeHint;
    let runStart = ci;
    for (;;) {
      const ti = Math.floor(ci / this.perBlock);
      if (ti >= this.table.length) return runStart; // nothing past the table's coverage is in use
      if (this.table[ti] === 0) {
        ci = (ti + 1) * this.perBlock; // a missing block: its whole range is free
      } else if ((this.getCached(ci) ?? (await this.get(ci))) === 0) {
        ci++;
      } else {
        if (ci === this.freeHint) this.freeHint = ci + 1;
        runStart = ++ci;
        continue;
      }
      if (ci - runStart >= n) return runStart;
    }
  }

  /**
   * alloc(n) without I/O or awaits, for the writeback guest path: a run of `n` free clusters
   * inside existing, cached refcount blocks, counted in memory only (pending, as in lazy mode).
   * Null when that is not possible (a block is missing or not cached, the run would reach past
   * the table, the search gets long, or `refuse` rejects the run); nothing is changed then and
   * the caller takes the asynchronous path. The caller must hold (or find free) the metadata mutex.
   */
  tryAllocSync(n: number, refuse: (host: number, n: number) => boolean): number | null {
    if (n > this.perBlock / 2) return null;
    let ci = this.freeHint, runStart = ci;
    for (let steps = 0; ci - runStart < n; steps++) {
      if (steps > this.perBlock) return null;
      const v = this.getCached(ci);
      if (v === undefined || this.table[Math.floor(ci / this.perBlock)] <= 0) return null;
      if (v === 0) ci++;
      else {
        if (ci === this.freeHint) this.freeHint = ci + 1;
        runStart = ++ci;
      }
    }
    if (refuse(runStart * this.clusterSize, n)) return null;
    // Every entry of the run was just read from a cached block (nothing evicted since: no await).
    for (let c = runStart; c < runStart + n;) {
      const ti = Math.floor(c / this.perBlock);
      const bo = this.table[ti];
      const b = this.blocks.get(bo) as Buffer;
      const first = c % this.perBlock;
      const last = Math.min(this.perBlock, first + (runStart + n - c));
      for (let k = first; k < last; k++) this.writeEntry(b, k, 1);
      this.markPending(bo, b, first, last);
      c += last - first;
    }
    if (runStart === this.freeHint) this.freeHint = runStart + n;
    return runStart * this.clusterSize;
  }

  /** Allocate `n` contiguous clusters (refcount 1, on disk) and return the host offset of the first. */
  async alloc(n: number): Promise<number> {
    // The refcount blocks a run needs are created before it is counted, then the run is searched
    // again (a new block may sit inside it). A short run's blocks go at the start of their own
    // ranges (self-describing); a run longer than half a block's span would never fit around
    // those, so its blocks go at free clusters outside it, as QEMU's alloc_refcount_block places
    // them. Counting only into existing blocks also keeps 1-bit refcounts from overflowing.
    const long = n > this.perBlock / 2;
    for (let attempt = 0; attempt < 64; attempt++) {
      const ci = await this.findFree(n);
      const missing: number[] = [];
      for (let ti = Math.floor(ci / this.perBlock); ti <= Math.floor((ci + n - 1) / this.perBlock); ti++) {
        if (ti >= this.table.length || this.table[ti] === 0) missing.push(ti);
      }
      if (missing.length) {
        // Long runs: the last range first; its block goes right after the run and describes
        // itself, the blocks of earlier ranges are then counted in it (or at a free cluster).
        if (long) for (const ti of missing.reverse()) await this.eager(() => this.createBlockOutside(ti, ci, ci + n));
        else for (const ti of missing) await this.ensureBlock(ti);
        continue;
      }
      await this.update(ci, n, 1);
      let ok = true;
      for (let k = 0; k < n && ok; k++) ok = (this.getCached(ci + k) ?? (await this.get(ci + k))) === 1;
      if (ok) {
        // The run is in use now: the next search need not walk it again.
        if (ci === this.freeHint) this.freeHint = ci + n;
        return ci * this.clusterSize;
      }
      await this.update(ci, n, -1);
    }
    throw new CorruptionError('Cannot allocate clusters: inconsistent refcounts');
  }

  /** Create the block for table index `ti` at the first free cluster outside clusters [lo, hi). */
  private async createBlockOutside(ti: number, lo: number, hi: number): Promise<void> {
    if (ti < this.table.length && this.table[ti] < 0) throw new ImageError('Input/output error', 'EIO');
    // Growing the table (for this or an earlier index) may have created the block already.
    if (ti >= this.table.length) await this.growTable(ti + 1);
    if (this.table[ti] > 0) return;
    let c = this.freeHint;
    for (;;) {
      if (c >= lo && c < hi) {
        c = hi;
        continue;
      }
      const r = Math.floor(c / this.perBlock);
      if (r === ti) break; // ti's range has no block: every cluster of it is free
      if (r >= this.table.length || this.table[r] === 0) {
        // Another range without a block: a start of it outside the run gets its own block
        // (self-describing, as createBlock); otherwise skip the range.
        if (c === r * this.perBlock) await this.createBlock(r);
        else c = (r + 1) * this.perBlock;
        continue;
      }
      if ((this.getCached(c) ?? (await this.get(c))) === 0) break;
      c++;
    }
    await this.placeBlock(ti, c * this.clusterSize, Math.floor(c / this.perBlock) === ti ? c % this.perBlock : null);
  }

  /**
   * Allocate `n` clusters as a few contiguous runs and return each cluster's host offset.
   * Runs are capped at half a refcount block's span: new blocks sit at the start of the range
   * they describe, so a longer contiguous run could never be found.
   */
  async allocMany(n: number): Promise<number[]> {
    const maxRun = Math.max(1, Math.floor(this.perBlock / 2));
    const out: number[] = [];
    while (out.length < n) {
      const k = Math.min(maxRun, n - out.length);
      const base = await this.alloc(k);
      for (let i = 0; i < k; i++) out.push(base + i * this.clusterSize);
    }
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
        this.blocks.delete(this.table[ti]);
        this.table[ti] = 0;
      }
    }
    this.freeHint = 0;
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
    this.freeHint = 0;
  }
}
