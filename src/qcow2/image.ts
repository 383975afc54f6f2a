/**
 * The qcow2 format driver: opens and validates an image, maps guest offsets through L1/L2
 * (standard and extended entries), reads (plain, zero, compressed), and writes with
 * copy-on-write, allocation and refcounts in QEMU's crash-safe order:
 *   data and COW → L2 entry → (old cluster's refcount drop);  new cluster's refcount → L2 entry;
 *   new L2 table contents → L1 entry.
 * With the writeback cache (the default, as QEMU's), guest writes change L2 entries and
 * refcounts in memory only; flushMetadata() writes them back in that same order (refcounts,
 * sync, L2 tables, sync, then the refcount drops), on flush, close, before any structural
 * operation, and when too much is pending. A drop counts for the allocator at once (QEMU's free
 * cluster index moves down to a cluster left unused), only its block write waits.
 * Overlapping guest requests are serialised by a range lock; metadata changes by one mutex.
 */
import { metadataOverlap, type OverlapKind } from './overlap.js';
import { errnoText, type Storage } from '../storage/storage.js';
import type { BackingReader, BlockDriver, Extent, ResizeOptions, WriteOptions, WriteZeroesOptions } from '../image/driver.js';
import { hostRuns, metadataPreallocated } from './metadata-prealloc.js';
import { CorruptionError, ImageError } from '../image/errors.js';
import { Mutex, RangeLock } from '../util/mutex.js';
import * as C from './constants.js';
import { parseHeader, serializeHeader, type Qcow2Header } from './header.js';
import { Refcounts, RefcountRangeError, type AllocChain } from './refcount.js';
import { L2Cache } from './l2-cache.js';
import { ClusterType, readL1, readL2, writeL2, encodeU64, type EntryGeometry, type L2Entry } from './entry.js';
import { serializeSnapshotTable, type Snapshot } from './snapshot-table.js';
import { readSnapshotTable } from './snapshot-read.js';
import { decompressCluster, type CompressionType } from './compress.js';
import { Qcow2Bitmaps } from './bitmaps.js';
import { MetaWriter } from './meta-writer.js';
import { resolveCacheSizes } from './cache-sizes.js';

export interface Qcow2OpenOptions {
  readOnly?: boolean;
  /** L2 cache capacity in bytes (QEMU's l2-cache-size; default 32 MiB, as QEMU's default maximum). */
  l2CacheBytes?: number;
  /** QEMU's refcount-cache-size in bytes. */
  refcountCacheBytes?: number;
  /** QEMU's cache-size: the L2 and refcount caches together (see resolveCacheSizes). */
  cacheSize?: number;
  /** Called with diagnostic lines (e.g. refcount repair on a dirty image). */
  log?: (line: string) => void;
  /** Skip the automatic refcount rebuild of a dirty image (used by `check`). */
  noRepair?: boolean;
  /** Metadata only, no guest data will be read (QEMU's BDRV_O_NO_IO, used by `info`). */
  noIo?: boolean;
  /** Opened to be checked (QEMU's BDRV_O_CHECK): structural damage is left to the check to report. */
  checkMode?: boolean;
  /**
   * Metadata caching for guest writes: 'writeback' (default; L2 and refcount changes are kept
   * in memory until flush/close, as QEMU does) or 'writethrough' (written before each write
   * completes).
   */
  metadataCache?: 'writeback' | 'writethrough';
}

/** Write back pending metadata in the background beyond these amounts; wait for it at twice. */
const PENDING_REFBLOCKS = 64;
const PENDING_FREES = 4096;

/** One planned cluster write inside a segment. */
interface ClusterPlan {
  index: number; // L2 index
  guest: number; // guest offset of the cluster
  old: L2Entry;
  host: number; // target host cluster (filled after allocation when isNew)
  isNew: boolean;
  /** Byte range within the cluster to write (includes COW fill). */
  wa: number;
  wb: number;
  /** Range covered by the guest data. */
  da: number;
  db: number;
  allocBits: number;
  zeroBits: number;
}

/** Whether an entry holds a reference to host clusters (dropped when the entry is replaced). */
function ownsCluster(e: L2Entry): boolean {
  return e.type === ClusterType.Normal || e.type === ClusterType.ZeroAlloc || e.type === ClusterType.Compressed;
}

export class Qcow2Image implements BlockDriver {
  readonly format = 'qcow2' as const;
  readonly clusterSize: number;
  readonly clusterBits: number;
  readonly l2Entries: number;
  readonly extL2: boolean;
  readonly subclusterSize: number;
  readonly geo: EntryGeometry;
  backing: BackingReader | null = null;
  l1: Buffer;
  snapshots: Snapshot[] = [];
  /** Persistent dirty bitmaps (validated on every open; loaded and tracking on read-write opens). */
  bitmaps: Qcow2Bitmaps | null = null;
  /** Called with (offset, length) of every guest write, zero write and discard (dirty tracking). */
  readonly writeTrackers: Array<(offset: number, length: number) => void> = [];
  /** @internal */ readonly l2: L2Cache;
  readonly meta = new Mutex();
  /** Group-commits L2 table writes (see meta-writer.ts). */
  private readonly l2Writer: MetaWriter;
  /** Guest writes keep metadata changes in the caches (see the header comment). */
  readonly writeback: boolean;
  /**
   * References dropped in (dirty) L2 tables and not yet made refcount drops (registerFrees, as
   * soon as the metadata mutex is free).
   */
  private pendingFrees: L2Entry[] = [];
  /**
   * Guest discards and zero writes pass their freed clusters on to the file, as QEMU's
   * pass-discard-request on an image opened with BDRV_O_UNMAP (qemu-io's default): a cluster
   * they leave unused is punched, so it reads as zeros as in QEMU's files. Set by the front end.
   */
  passDiscardRequests = false;
  /** Entries dropped by guest discards / zero writes (QCOW2_DISCARD_REQUEST), freed later. */
  private readonly discardRequested = new WeakSet<L2Entry>();
  /** The write-back in progress, if any. */
  private writingBack: Promise<void> | null = null;
  /** Spare cluster-sized buffers for copy-on-write fills (allocating writes churn otherwise). */
  private readonly fillPool: Buffer[] = [];
  private readonly ranges = new RangeLock();
  private dirtySet = false;
  private dirtyWrite: Promise<void> | null = null;
  private closed = false;
  /** Last decompressed cluster (sequential reads of compressed data hit it repeatedly). */
  /** @internal */ lastCompressed: { offset: number; data: Buffer } | null = null;

  private constructor(
    readonly storage: Storage,
    readonly header: Qcow2Header,
    public refcounts: Refcounts,
    l1: Buffer,
    readonly readOnly: boolean,
    l2CacheBytes: number,
    readonly log: (line: string) => void,
    writeback = true,
  ) {
    this.clusterBits = header.clusterBits;
    this.clusterSize = 2 ** header.clusterBits;
    this.extL2 = ((header.incompatible & BigInt(C.INCOMPAT_EXTL2)) !== 0n);
    this.l2Entries = this.clusterSize / (this.extL2 ? 16 : 8);
    this.subclusterSize = this.extL2 ? this.clusterSize / 32 : this.clusterSize;
    this.geo = { clusterBits: this.clusterBits, extL2: this.extL2, zeroFlag: header.version >= 3 };
    this.l1 = l1;
    this.l2Writer = new MetaWriter(storage);
    this.l2 = new L2Cache(storage, this.clusterSize, Math.max(16, Math.floor(l2CacheBytes / this.clusterSize)),
      (offset) => this.l2Writer.pendingBuffer(offset));
    this.writeback = writeback && !readOnly;
    this.useRefcounts(refcounts);
  }

  /** Adopt a refcount structure; a table it moves is recorded in the header. (Amend swaps widths.) */
  useRefcounts(refcounts: Refcounts): void {
    this.refcounts = refcounts;
    // Counting a cluster whose drop waits for the L2 tables: they go to disk first (the caller
    // holds the metadata mutex), so no reference to it on disk outlives the drop.
    refcounts.beforeReuse = () => this.writeBackLocked();
    refcounts.onTableMoved = async (offset, clusters) => {
      this.header.refcountTableOffset = offset;
      this.header.refcountTableClusters = clusters;
      const b = Buffer.alloc(12);
      b.writeUInt32BE(Math.floor(offset / C.TWO32), 0);
      b.writeUInt32BE(offset >>> 0, 4);
      b.writeUInt32BE(clusters, 8);
      await this.storage.write(b, 48);
    };
  }

  /** Guest size: QEMU counts whole 512-byte sectors, so an unaligned header size is rounded down. */
  get size(): number { return Math.floor(this.header.size / 512) * 512; }
  get granularity(): number { return this.subclusterSize; }
  get backingFile(): string | null { return this.header.backingFile; }
  get backingFormat(): string | null { return this.header.backingFormat; }
  get version(): number { return this.header.version; }
  get compressionType(): CompressionType { return this.header.compressionType as CompressionType; }
  get l2Coverage(): number { return this.l2Entries * this.clusterSize; }
  get dirty(): boolean { return ((this.header.incompatible & BigInt(C.INCOMPAT_DIRTY)) !== 0n); }
  get corrupt(): boolean { return ((this.header.incompatible & BigInt(C.INCOMPAT_CORRUPT)) !== 0n); }
  get lazyRefcounts(): boolean { return ((this.header.compatible & BigInt(C.COMPAT_LAZY_REFCOUNTS)) !== 0n); }

  /** Check whether `buf` (the first bytes of a file) looks like qcow2. */
  static probe(buf: Buffer): boolean {
    // QEMU's probe also requires version >= 2 (version 1 is the old qcow format, 0 probes as raw).
    return buf.length >= 8 && buf.readUInt32BE(0) === C.QCOW2_MAGIC && buf.readUInt32BE(4) >= 2;
  }

  static async open(storage: Storage, opts: Qcow2OpenOptions = {}): Promise<Qcow2Image> {
    const readOnly = !!opts.readOnly || storage.readOnly;
    const fileSize = await storage.size();
    const first = Buffer.alloc(Math.min(2 * 1024 * 1024, Math.max(4096, fileSize)));
    await storage.read(first, 0);
    // Header fields first (bounded read), then the full first cluster for extensions.
    const header = parseHeader(first, fileSize, { check: opts.checkMode, writable: !readOnly, noIo: opts.noIo });
    const l1 = Buffer.alloc(header.l1Size * 8);
    if (header.l1Size) await storage.read(l1, header.l1TableOffset);
    const extL2 = (header.incompatible & BigInt(C.INCOMPAT_EXTL2)) !== 0n;
    const caches = resolveCacheSizes(opts, header.size, 2 ** header.clusterBits, extL2 ? 16 : 8);
    const refcounts = await Refcounts.load(storage, { clusterBits: header.clusterBits, refcountOrder: header.refcountOrder },
      header.refcountTableOffset, header.refcountTableClusters, caches.refcountBlocks);
    const img = new Qcow2Image(storage, header, refcounts, l1, readOnly, caches.l2Bytes, opts.log ?? (() => {}),
      opts.metadataCache !== 'writethrough');
    // Check mode (QEMU's BDRV_O_CHECK) leaves the snapshot table to the check, which reads it itself.
    if (!opts.checkMode) await img.loadSnapshots();
    // QEMU has no table pointer until the check reads it, so a header rewritten before (bitmaps
    // marked in use) gets a zero offset. Only done where no snapshot exists: QEMU would also
    // write a count of 0 over existing snapshots, which qchain does not copy.
    else if (header.nbSnapshots === 0) header.snapshotsOffset = 0;
    img.bitmaps = await Qcow2Bitmaps.open(img, img.log);
    if (!readOnly) await img.prepareForWriting(!!opts.noRepair);
    // The block layer's refresh after the driver opened (QEMU's refresh_total_sectors).
    if (header.sizeTooLarge) throw new ImageError('Could not refresh total sector count: File too large');
    return img;
  }

  private async loadSnapshots(): Promise<void> {
    this.snapshots = (await readSnapshotTable(this.storage, this.header.snapshotsOffset, this.header.nbSnapshots)).list;
  }

  /**
   * Read-write open: clear autoclear bits we don't maintain, drop a bitmaps extension that is no
   * longer valid, repair a dirty image, then load the bitmaps and mark them in use.
   */
  private async prepareForWriting(noRepair: boolean): Promise<void> {
    let rewrite = false;
    const bitmapsBit = BigInt(C.AUTOCLEAR_BITMAPS);
    if ((this.header.autoclear & ~bitmapsBit) !== 0n) {
      // Clearing a bit we do not maintain tells its owner the data is stale, as the spec requires.
      this.header.autoclear &= bitmapsBit;
      rewrite = true;
    }
    if (this.header.bitmapsExt && (this.header.autoclear & bitmapsBit) === 0n) {
      this.header.bitmapsExt = null;
      rewrite = true;
    }
    if (this.dirty && !noRepair) {
      const { repairRefcounts } = await import('./check.js');
      await repairRefcounts(this, this.log);
      this.header.incompatible &= ~BigInt(C.INCOMPAT_DIRTY);
      rewrite = true;
    }
    if (rewrite) await this.writeHeader();
    if (this.bitmaps) {
      await this.bitmaps.activate();
      this.writeTrackers.push(this.bitmaps.track);
    }
  }

  /** Reports a completed guest write/zero/discard range to the dirty trackers. */
  private tracked(offset: number, length: number): void {
    for (const t of this.writeTrackers) t(offset, length);
  }

  /** Rewrite the whole header cluster (fields, extensions, backing name). */
  async writeHeader(): Promise<void> {
    const buf = serializeHeader(this.header);
    await this.storage.write(buf, 0);
  }

  /** Update the incompatible-features word in place (dirty/corrupt bits). */
  private async writeIncompat(): Promise<void> {
    if (this.header.version < 3) return;
    const b = Buffer.alloc(8);
    b.writeBigUInt64BE(this.header.incompatible, 0);
    await this.storage.write(b, 72);
  }

  /** Record detected corruption: set the corrupt bit on a writable image, then fail the request. */
  async signalCorruption(msg: string): Promise<never> {
    // As qcow2_signal_corruption: fatal on a writable image; after the first event only a fatal
    // one on an image not yet marked is reported.
    const fatal = !this.readOnly;
    if (this.signaledCorruption && (!fatal || this.corrupt)) throw new CorruptionError(msg);
    this.signaledCorruption = true;
    if (fatal && !this.corrupt) {
      // qcow2_mark_corrupt: the bit in memory, the whole header rewritten (v2 has no field for it).
      this.log(`qcow2: Marking image as corrupt: ${msg}; further corruption events will be suppressed`);
      this.unusable = true;
      this.header.incompatible |= BigInt(C.INCOMPAT_CORRUPT);
      await this.writeHeader().catch(() => {});
    } else {
      this.log(`qcow2: Image is corrupt: ${msg}; further non-fatal corruption events will be suppressed`);
    }
    throw new CorruptionError(msg);
  }

  /**
   * Set by a check whose repaired refcount blocks could not all be written (metadata overlap):
   * they stay cached, and the flush on close writes those that pass and marks the image corrupt.
   */
  refblockGuard: ((blockOffset: number) => OverlapKind | null) | null = null;

  /**
   * Write the pending refcount blocks as QEMU's refcount block cache flush does: each passes
   * `guard` (the metadata overlap check) first; those that fail stay unwritten and the first
   * failure marks the image corrupt. Returns what was hit, or null. The caller holds `meta`.
   */
  async writeRefblocksGuarded(guard: (blockOffset: number) => OverlapKind | null): Promise<OverlapKind | null> {
    let hit: OverlapKind | null = null;
    for (const bo of this.refcounts.pendingBlocks()) {
      const h = guard(bo);
      if (!h) continue;
      hit ??= h;
      this.refcounts.dropPending(bo);
    }
    await this.refcounts.writePending();
    if (hit) await this.signalCorruption(`Preventing invalid write on metadata (overlaps with ${hit})`).catch(() => {});
    return hit;
  }

  /** A corruption event was reported (QEMU's signaled_corruption). */
  signaledCorruption = false;
  /** The image was marked corrupt by this handle (QEMU then drops the driver: bs->drv = NULL). */
  unusable = false;

  // ---- mapping -------------------------------------------------------------------------------

  l1Entry(i: number): { offset: number; copied: boolean } {
    return readL1(this.l1, i);
  }

  private async validateL2Offset(l1i: number, offset: number): Promise<void> {
    if (offset % this.clusterSize !== 0) {
      await this.signalCorruption(`L2 table offset 0x${offset.toString(16)} unaligned (L1 index: ${l1i ? `0x${l1i.toString(16)}` : '0'})`);
    }
  }

  /** Whether validateEntry has nothing to report (checked synchronously; no await per entry). */
  /** @internal */ entryValid(e: L2Entry): boolean {
    if ((e.type === ClusterType.Normal || e.type === ClusterType.ZeroAlloc) && (e.host % this.clusterSize) !== 0) return false;
    return !this.extL2 || e.type === ClusterType.Compressed || ((e.allocBits & e.zeroBits) === 0 && (e.host !== 0 || e.allocBits === 0));
  }

  /** Checks a data entry before it is used; corrupt entries mark the image and fail the I/O. */
  /** @internal */ async validateEntry(e: L2Entry, l2Offset: number, idx: number): Promise<void> {
    if (this.entryValid(e)) return;
    if ((e.type === ClusterType.Normal || e.type === ClusterType.ZeroAlloc) && (e.host % this.clusterSize) !== 0) {
      await this.signalCorruption(`Cluster allocation offset 0x${e.host.toString(16)} unaligned (L2 offset: 0x${l2Offset.toString(16)}, L2 index: ${idx ? `0x${idx.toString(16)}` : '0'})`);
    }
    if (this.extL2 && e.type !== ClusterType.Compressed) {
      if ((e.allocBits & e.zeroBits) !== 0 || (e.host === 0 && e.allocBits !== 0)) {
        await this.signalCorruption(`Invalid cluster entry found  (L2 offset: 0x${l2Offset.toString(16)}, L2 index: ${idx ? `0x${idx.toString(16)}` : '0'})`);
      }
    }
  }

  /** Status of this layer only. Runs are merged; data runs carry host offsets. */
  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    const out: Extent[] = [];
    const end = Math.min(offset + length, this.size);
    const push = (e: Extent): void => {
      const last = out[out.length - 1];
      if (last && last.kind === e.kind && !!last.compressed === !!e.compressed && last.offset + last.length === e.offset &&
        ((last.hostOffset === undefined && e.hostOffset === undefined) ||
          (last.hostOffset !== undefined && e.hostOffset !== undefined && last.hostOffset + last.length === e.hostOffset))) {
        last.length += e.length;
      } else out.push(e);
    };
    let pos = offset;
    while (pos < end) {
      const l1i = Math.floor(pos / this.l2Coverage);
      const segEnd = Math.min(end, (l1i + 1) * this.l2Coverage);
      const l1e = l1i < this.header.l1Size ? this.l1Entry(l1i) : { offset: 0, copied: false };
      if (l1e.offset === 0) {
        push({ offset: pos, length: segEnd - pos, kind: 'unallocated' });
        pos = segEnd;
        continue;
      }
      await this.validateL2Offset(l1i, l1e.offset);
      const table = await this.l2.pin(l1e.offset);
      try {
        while (pos < segEnd) {
          const ci = Math.floor(pos / this.clusterSize);
          const idx = ci % this.l2Entries;
          const cStart = ci * this.clusterSize;
          const cEnd = Math.min(segEnd, cStart + this.clusterSize);
          if (!this.extL2) {
            // Common case without an entry object or an await per cluster: a standard entry that
            // is not compressed and whose host offset is aligned (else the general path below).
            const hi = table.readUInt32BE(idx * 8), lo = table.readUInt32BE(idx * 8 + 4);
            const host = (hi & C.HI_OFFSET_MASK) * C.TWO32 + ((lo & C.LO_OFFSET_MASK) >>> 0);
            if ((hi & C.HI_COMPRESSED) === 0 && host % this.clusterSize === 0) {
              const zero = this.geo.zeroFlag && (lo & C.LO_ZERO) !== 0;
              const kind = zero ? 'zero' : host ? 'data' : 'unallocated';
              const hostOffset = host && kind !== 'unallocated' ? host + (pos - cStart) : undefined;
              const last = out[out.length - 1];
              if (last && last.kind === kind && !last.compressed && last.offset + last.length === pos &&
                (hostOffset === undefined ? last.hostOffset === undefined : last.hostOffset !== undefined && last.hostOffset + last.length === hostOffset)) {
                last.length += cEnd - pos;
              } else {
                out.push(hostOffset === undefined ? { offset: pos, length: cEnd - pos, kind } : { offset: pos, length: cEnd - pos, kind, hostOffset });
              }
              pos = cEnd;
              continue;
            }
          }
          const e = readL2(table, idx, this.geo);
          if (!this.entryValid(e)) await this.validateEntry(e, l1e.offset, idx);
          if (!this.extL2 || e.type === ClusterType.Compressed) {
            push(this.extentOf(e, pos, cEnd - pos, pos - cStart));
          } else {
            // Extended L2: one extent per subcluster run.
            let p = pos;
            while (p < cEnd) {
              const sc = Math.floor((p - cStart) / this.subclusterSize);
              const scEnd = Math.min(cEnd, cStart + (sc + 1) * this.subclusterSize);
              const alloc = (e.allocBits >>> sc) & 1;
              const zero = (e.zeroBits >>> sc) & 1;
              if (alloc) push({ offset: p, length: scEnd - p, kind: 'data', hostOffset: e.host + (p - cStart) });
              else if (zero) push({ offset: p, length: scEnd - p, kind: 'zero', ...(e.host ? { hostOffset: e.host + (p - cStart) } : {}) });
              else push({ offset: p, length: scEnd - p, kind: 'unallocated', ...(e.host ? { hostOffset: e.host + (p - cStart) } : {}) });
              p = scEnd;
            }
          }
          pos = cEnd;
        }
      } finally {
        this.l2.unpin(l1e.offset);
      }
    }
    return out;
  }

  /** Synchronous single-cluster mapping from a cached L2 table (see BlockDriver.mapSync). */
  mapSync(offset: number, length: number): Extent | undefined {
    if (this.extL2 || length <= 0 || offset + length > this.size) return undefined;
    const ci = Math.floor(offset / this.clusterSize);
    const inner = offset - ci * this.clusterSize;
    if (inner + length > this.clusterSize) return undefined;
    const l1i = Math.floor(ci / this.l2Entries);
    if (l1i >= this.header.l1Size) return undefined;
    const l1e = this.l1Entry(l1i);
    if (!l1e.offset || l1e.offset % this.clusterSize !== 0) return undefined;
    const table = this.l2.peek(l1e.offset);
    if (!table) return undefined;
    const e = readL2(table, ci % this.l2Entries, this.geo);
    // Entries that need validation (and may mark the image corrupt) take the normal path.
    if ((e.type === ClusterType.Normal || e.type === ClusterType.ZeroAlloc) && (e.host % this.clusterSize) !== 0) return undefined;
    return this.extentOf(e, offset, length, inner);
  }

  private extentOf(e: L2Entry, pos: number, len: number, inner: number): Extent {
    switch (e.type) {
      case ClusterType.Normal: return { offset: pos, length: len, kind: 'data', hostOffset: e.host + inner };
      case ClusterType.Compressed: return { offset: pos, length: len, kind: 'data', compressed: true };
      case ClusterType.ZeroAlloc: return { offset: pos, length: len, kind: 'zero', hostOffset: e.host + inner };
      case ClusterType.ZeroPlain: return { offset: pos, length: len, kind: 'zero' };
      default: return { offset: pos, length: len, kind: 'unallocated' };
    }
  }

  // ---- reads ---------------------------------------------------------------------------------

  /** Reads this layer's content; unallocated parts read as zero (the chain fills them from below). */
  async readOwn(buf: Buffer, offset: number): Promise<void> {
    const exts = await this.blockStatus(offset, buf.length);
    await Promise.all(exts.map((x) => this.readExtent(buf.subarray(x.offset - offset, x.offset - offset + x.length), x)));
    const covered = exts.reduce((a, x) => a + x.length, 0);
    if (covered < buf.length) buf.fill(0, covered);
  }

  /** Reads one extent returned by blockStatus into `dst` (which is exactly extent-sized). */
  async readExtent(dst: Buffer, x: Extent): Promise<void> {
    if (x.kind !== 'data') {
      dst.fill(0);
    } else if (x.compressed) {
      let p = x.offset;
      while (p < x.offset + x.length) {
        const cStart = Math.floor(p / this.clusterSize) * this.clusterSize;
        const n = Math.min(x.offset + x.length, cStart + this.clusterSize) - p;
        const data = await this.readCompressedCluster(cStart);
        data.copy(dst, p - x.offset, p - cStart, p - cStart + n);
        p += n;
      }
    } else {
      await this.storage.read(dst, x.hostOffset as number);
    }
  }

  private async entryFor(guest: number): Promise<{ e: L2Entry; l2Offset: number; idx: number } | null> {
    const l1i = Math.floor(guest / this.l2Coverage);
    const l1e = l1i < this.header.l1Size ? this.l1Entry(l1i) : { offset: 0, copied: false };
    if (!l1e.offset) return null;
    const idx = Math.floor(guest / this.clusterSize) % this.l2Entries;
    const t = await this.l2.pin(l1e.offset);
    try {
      return { e: readL2(t, idx, this.geo), l2Offset: l1e.offset, idx };
    } finally {
      this.l2.unpin(l1e.offset);
    }
  }

  /** Decompresses the compressed cluster at guest offset `cStart` (cached one deep). */
  async readCompressedCluster(cStart: number): Promise<Buffer> {
    const found = await this.entryFor(cStart);
    if (!found || found.e.type !== ClusterType.Compressed) throw new ImageError('Input/output error', 'EIO');
    return this.decompress(found.e);
  }

  private async decompress(e: L2Entry): Promise<Buffer> {
    if (this.lastCompressed && this.lastCompressed.offset === e.cOffset) return this.lastCompressed.data;
    const fileSize = await this.storage.size();
    if (e.cOffset + e.cLength > fileSize + 512 || e.cLength > this.clusterSize * 2 + 512) {
      return this.signalCorruption(`Compressed cluster at 0x${e.cOffset.toString(16)} exceeds the end of the file`);
    }
    const src = Buffer.alloc(e.cLength);
    await this.storage.read(src, e.cOffset);
    let data: Buffer;
    try {
      data = await decompressCluster(this.compressionType, src, this.clusterSize);
    } catch {
      throw new ImageError('Input/output error', 'EIO');
    }
    this.lastCompressed = { offset: e.cOffset, data };
    return data;
  }

  // ---- writes --------------------------------------------------------------------------------

  /** @internal */ checkRange(offset: number, length: number): void {
    if (this.readOnly) throw new ImageError('Permission denied', 'EACCES');
    if (this.closed) throw new ImageError('Image is closed');
    if (offset < 0 || length < 0 || offset + length > this.size) throw new ImageError('Input/output error', 'EIO');
  }

  /**
   * Runs `fn` (a metadata update that passes through states `qemu-img check` would flag, such as
   * COPIED flags cleared ahead of a refcount rise) with the dirty bit set on disk (v3), so a crash
   * inside is repaired on the next read-write open. The bit is cleared when `fn` succeeds, or fails
   * on a refcount range check (made before anything it covers changes), unless the image was
   * dirty already (a lazy-refcounts image keeps it until close).
   */
  /** @internal */ async whileDirty<T>(fn: () => Promise<T>): Promise<T> {
    if (this.header.version < 3 || this.dirty) return fn();
    this.header.incompatible |= BigInt(C.INCOMPAT_DIRTY);
    await this.writeIncompat();
    await this.storage.flush();
    let r: T;
    try {
      r = await fn();
    } catch (e) {
      if (e instanceof RefcountRangeError) await this.clearDirtyBit();
      throw e;
    }
    await this.clearDirtyBit();
    return r;
  }

  private async clearDirtyBit(): Promise<void> {
    await this.storage.flush();
    this.header.incompatible &= ~BigInt(C.INCOMPAT_DIRTY);
    await this.writeIncompat();
    await this.storage.flush();
  }

  /** Sets the dirty bit before the first write of a lazy-refcounts image (cleared on clean close). */
  /** @internal */ markDirty(): Promise<void> {
    if (!this.lazyRefcounts || this.header.version < 3) return Promise.resolve();
    if (!this.dirtyWrite) {
      this.dirtySet = true;
      this.header.incompatible |= BigInt(C.INCOMPAT_DIRTY);
      this.dirtyWrite = this.writeIncompat();
    }
    return this.dirtyWrite;
  }

  async write(buf: Buffer, offset: number, opts?: WriteOptions): Promise<void> {
    this.checkRange(offset, buf.length);
    if (buf.length === 0) return;
    // Take the range lock before any await, so overlapping requests keep their issue order.
    const release = await this.lockClusters(offset, buf.length);
    try {
      await this.markDirty();
      await this.writeUnlocked(buf, offset, opts?.onPlaced, opts?.beforeData);
      if (!opts?.untracked) this.tracked(offset, buf.length);
    } finally {
      release();
    }
  }

  /** Registers a cluster-rounded range lock synchronously and resolves when it is held. */
  /** @internal */ lockClusters(offset: number, length: number): Promise<() => void> {
    const cs = this.clusterSize;
    return this.ranges.acquire(Math.floor(offset / cs) * cs, Math.ceil((offset + length) / cs) * cs);
  }

  /** write() for callers holding the range lock. */
  /** @internal */ async writeUnlocked(buf: Buffer, offset: number, onPlaced?: () => void, beforeData?: () => Promise<void>): Promise<void> {
    let pos = offset;
    const end = offset + buf.length;
    // Where the write continues in the file: new clusters follow on from the previous ones where free.
    const chain: AllocChain = { next: null };
    while (pos < end) {
      const segEnd = Math.min(end, (Math.floor(pos / this.l2Coverage) + 1) * this.l2Coverage);
      // Segments run one after another, so the write is placed once its last one has allocated.
      await this.writeSegment(buf.subarray(pos - offset, segEnd - offset), pos, segEnd === end ? onPlaced : undefined, beforeData, chain);
      pos = segEnd;
    }
  }

  /**
   * Returns the L2 table for L1 index `l1i`, ready for modification: allocated if missing, and
   * copied if shared with a snapshot (L1 entry without COPIED). Pinned; caller unpins.
   */
  /** @internal */ async writableL2(l1i: number): Promise<{ offset: number; table: Buffer }> {
    // Common case without the mutex round trip: an owned, cached table and nobody in the mutex.
    if (this.meta.free && l1i < this.header.l1Size) {
      const cur = this.l1Entry(l1i);
      if (cur.offset && cur.copied && cur.offset % this.clusterSize === 0) {
        const table = this.l2.pinCached(cur.offset);
        if (table) return { offset: cur.offset, table };
      }
    }
    return this.meta.run(async () => {
      if (l1i >= this.header.l1Size) throw new ImageError('Input/output error', 'EIO');
      const cur = this.l1Entry(l1i);
      if (cur.offset && cur.copied) {
        await this.validateL2Offset(l1i, cur.offset);
        return { offset: cur.offset, table: await this.l2.pin(cur.offset) };
      }
      const newOff = await this.refcounts.alloc(1);
      let table: Buffer;
      if (cur.offset) {
        await this.validateL2Offset(l1i, cur.offset);
        const old = await this.l2.pin(cur.offset);
        table = Buffer.from(old);
        this.l2.unpin(cur.offset);
      } else {
        table = this.l2.zeroed();
      }
      await this.checkOverlap(newOff, 1);
      await this.storage.write(table, newOff);
      this.l2.install(newOff, table);
      // The L1 entry switches only after the new table and its refcount are durable, and the
      // old table's refcount drops only after the L1 entry is (QEMU writes L1 entries synced).
      await this.storage.flush();
      encodeU64(this.l1, l1i * 8, newOff, true);
      this.l1Generation++;
      await this.storage.write(this.l1.subarray(l1i * 8, l1i * 8 + 8), this.header.l1TableOffset + l1i * 8);
      if (cur.offset) {
        await this.storage.flush();
        this.l2.forget(cur.offset);
        await this.refcounts.free(cur.offset, 1);
      }
      return { offset: newOff, table };
    });
  }

  /** Refuse to hand out a cluster that overlaps the header, L1 or refcount table (metadata overlap check). */
  /** @internal */ async checkOverlap(host: number, n: number): Promise<void> {
    if (this.overlapsMetadata(host, n)) {
      await this.signalCorruption(`Preventing invalid allocation of cluster at offset 0x${host.toString(16)}`);
    }
  }

  /** Whether clusters [host, host + n clusters) overlap the header, the L1 table or the refcount table. */
  private overlapsMetadata(host: number, n: number): boolean {
    const cs = this.clusterSize;
    const end = host + n * cs;
    const hit = (a: number, len: number): boolean => a < end && host < a + len;
    return hit(0, cs) || hit(this.header.l1TableOffset, Math.max(8, this.header.l1Size * 8)) ||
      hit(this.refcounts.tableOffset, this.refcounts.tableClusters * cs);
  }

  /** Bytes of the snapshot table (QEMU's snapshots_size), recomputed when the table changes. */
  private snapshotsSizeMemo: { list: Snapshot[] | null; count: number; offset: number; size: number } = { list: null, count: -1, offset: -1, size: 0 };
  private snapshotsSize(): number {
    const m = this.snapshotsSizeMemo;
    if (m.list !== this.snapshots || m.count !== this.snapshots.length || m.offset !== this.header.snapshotsOffset) {
      m.list = this.snapshots;
      m.count = this.snapshots.length;
      m.offset = this.header.snapshotsOffset;
      m.size = m.count ? serializeSnapshotTable(this.snapshots).length : 0;
    }
    return m.size;
  }

  /**
   * QEMU's pre-write overlap check on guest data going into clusters the L2 table already maps
   * (qcow2_co_pwritev_task): a range over the header, the active L1 table, the refcount table, the
   * snapshot table, an inactive L1 table, an active L2 table, a refcount block or the bitmap
   * directory marks the image corrupt and fails the write (EIO) instead of overwriting the
   * metadata. Active L2 tables and refcount blocks are found through metaClusters (no scan per
   * write); a hit there is confirmed by QEMU's full check, which also names the structure.
   */
  private async dataOverlapCheck(host: number, len: number): Promise<void> {
    if (len <= 0) return;
    const cs = this.clusterSize;
    const first = Math.floor(host / cs), last = Math.floor((host + len - 1) / cs);
    // Quick exit for the common case: none of the cheap structures can be hit.
    const mayHit = this.overlapsMetadata(first * cs, last - first + 1) || this.snapshots.length > 0 ||
      (this.header.autoclear & BigInt(C.AUTOCLEAR_BITMAPS)) !== 0n;
    const tables = this.metaClusters();
    let inTables = false;
    for (let c = first; c <= last && !inTables; c++) inTables = tables.has(c);
    if (!mayHit && !inTables) return;
    const hit = metadataOverlap(this, host, len, this.snapshotsSize(), inTables ? [] : ['active L2 table', 'refcount block']);
    if (hit) await this.signalCorruption(`Preventing invalid write on metadata (overlaps with ${hit})`);
  }

  /** Cluster indices of the active L2 tables and the refcount blocks, with what they were built from. */
  private metaIndex: { l1: Buffer; l1Gen: number; table: number[]; rcGen: number; set: Set<number> } | null = null;
  /** Bumped when an L1 entry is pointed at a new L2 table in place. */
  private l1Generation = 0;

  /**
   * The clusters holding active L2 tables or refcount blocks, rebuilt when the L1 table or the
   * refcount table was replaced or changed since (a few thousand entries at most, and only when
   * metadata moved). Entries cleared in place (a shrink, a repair) may leave a cluster listed
   * that no longer is metadata; the full check that confirms a hit makes that harmless.
   */
  private metaClusters(): Set<number> {
    const rc = this.refcounts;
    let ix = this.metaIndex;
    if (ix && ix.l1 === this.l1 && ix.l1Gen === this.l1Generation && ix.table === rc.table && ix.rcGen === rc.generation) return ix.set;
    const cs = this.clusterSize, set = new Set<number>();
    for (let i = 0; i < this.header.l1Size && i * 8 < this.l1.length; i++) {
      const o = (this.l1.readUInt32BE(i * 8) & C.HI_OFFSET_MASK) * C.TWO32 + ((this.l1.readUInt32BE(i * 8 + 4) & C.LO_OFFSET_MASK) >>> 0);
      if (o) set.add(Math.floor(o / cs));
    }
    for (const bo of rc.table) if (bo > 0) set.add(Math.floor(bo / cs));
    ix = { l1: this.l1, l1Gen: this.l1Generation, table: rc.table, rcGen: rc.generation, set };
    this.metaIndex = ix;
    return set;
  }

  /** Whether the layer content of a cluster must be copied (COW) from old state for bytes outside the write. */
  private async writeSegment(data: Buffer, pos: number, onPlaced?: () => void, beforeData?: () => Promise<void>, chain: AllocChain = { next: null }): Promise<void> {
    const cs = this.clusterSize, sc = this.subclusterSize;
    const l1i = Math.floor(pos / this.l2Coverage);
    const { offset: l2Off, table } = await this.writableL2(l1i);
    try {
      const end = pos + data.length;
      const plans: ClusterPlan[] = [];
      for (let c = Math.floor(pos / cs) * cs; c < end; c += cs) {
        const idx = Math.floor(c / cs) % this.l2Entries;
        const old = readL2(table, idx, this.geo);
        if ((old.type === ClusterType.Normal || old.type === ClusterType.ZeroAlloc) && old.copied && old.host % cs !== 0) {
          // QEMU's handle_copied names the cluster and the guest offset the write starts at.
          const g = Math.max(pos, c);
          await this.signalCorruption(`${old.type === ClusterType.ZeroAlloc ? 'Preallocated zero' : 'Data'} cluster offset 0x${old.host.toString(16)} unaligned (guest offset: ${g ? `0x${g.toString(16)}` : '0'})`);
        }
        if (!this.entryValid(old)) await this.validateEntry(old, l2Off, idx);
        const da = Math.max(pos, c) - c, db = Math.min(end, c + cs) - c;
        const reuse = (old.type === ClusterType.Normal || old.type === ClusterType.ZeroAlloc) && old.copied;
        const p: ClusterPlan = { index: idx, guest: c, old, host: reuse ? old.host : 0, isNew: !reuse, wa: 0, wb: cs, da, db, allocBits: 0, zeroBits: 0 };
        if (!this.extL2) {
          if (reuse && old.type === ClusterType.Normal) { p.wa = da; p.wb = db; }
        } else if (old.type === ClusterType.Compressed) {
          p.allocBits = 0xffffffff;
        } else {
          const sa = Math.floor(da / sc), sb = Math.ceil(db / sc);
          let touched = 0;
          for (let s = sa; s < sb; s++) touched |= 1 << s;
          touched >>>= 0;
          p.allocBits = (old.allocBits | touched) >>> 0;
          p.zeroBits = (old.zeroBits & ~touched) >>> 0;
          if (reuse || old.host === 0) {
            // Write the touched subclusters; keep the rest of the cluster as it is.
            p.wa = sa * sc;
            p.wb = Math.min(cs, sb * sc);
            const headAlloc = (old.allocBits >>> sa) & 1, tailAlloc = (old.allocBits >>> (sb - 1)) & 1;
            if (reuse && headAlloc && da === p.wa + 0) p.wa = da;
            if (reuse && headAlloc && tailAlloc) { p.wa = da; p.wb = db; }
          } else {
            // A shared cluster (snapshot) is copied from its first to its last allocated
            // subcluster, and over the touched ones: QEMU's calculate_l2_meta skips leading and
            // trailing zero or unallocated subclusters; what is copied becomes allocated.
            const alloc = old.allocBits >>> 0;
            const first = Math.min(sa, alloc ? 31 - Math.clz32(alloc & -alloc) : 32);
            const lastEx = Math.max(sb, alloc ? 32 - Math.clz32(alloc) : 0);
            p.wa = first * sc;
            p.wb = Math.min(cs, lastEx * sc);
            let range = 0;
            for (let s = first; s < lastEx; s++) range |= 1 << s;
            range >>>= 0;
            p.allocBits = (old.allocBits | range) >>> 0;
            p.zeroBits = (old.zeroBits & ~range) >>> 0;
          }
        }
        plans.push(p);
      }
      // New clusters as QEMU's qcow2_alloc_host_offset gathers them: each stretch continues
      // where the write's previous clusters end if free there, else a run from the free index.
      const nNew = plans.filter((p) => p.isNew).length;
      const wanted = plans.map((p) => (p.isNew ? null : p.host));
      // The new clusters' refcounts reach the disk alongside the data (group-committed with
      // other writers'); both are complete before the L2 entries point at the clusters.
      let counted = null as Promise<unknown> | null;
      // Common writeback case without awaits: the runs come from cached refcount blocks.
      const quick = nNew > 0 && this.writeback && this.meta.free
        ? this.refcounts.tryAllocSegmentSync(wanted, chain, (host, n) => this.overlapsMetadata(host, n))
        : null;
      if (quick !== null) {
        let k = 0;
        for (const p of plans) if (p.isNew) p.host = quick[k++];
      } else if (nNew === 0) {
        chain.next = plans[plans.length - 1].host + this.clusterSize; // the write continues past the kept clusters
      } else {
        const hosts = await this.meta.run(async () => {
          // Writeback: counted in memory only, written back before any L2 table that points at
          // them. Otherwise the block writes are collected and awaited with the data below.
          const deferred: Array<Promise<void>> = [];
          if (this.writeback) this.refcounts.lazy = true;
          else this.refcounts.deferred = deferred;
          try {
            const list = await this.refcounts.allocSegment(wanted, chain);
            for (const h of list) await this.checkOverlap(h, 1);
            return list;
          } finally {
            this.refcounts.lazy = false;
            this.refcounts.deferred = null;
            counted = deferred.length ? Promise.all(deferred) : null;
            counted?.catch(() => {}); // awaited below; never an unhandled rejection meanwhile
          }
        });
        let k = 0;
        for (const p of plans) if (p.isNew) p.host = hosts[k++];
      }
      for (const p of plans) if (!p.isNew) await this.dataOverlapCheck(p.host + p.wa, p.wb - p.wa);
      onPlaced?.();
      if (beforeData) await beforeData();
      // Build and issue the data writes (COW fill + guest data), merging host-contiguous pieces.
      const pieces: Array<{ host: number; bufs: Buffer[]; len: number }> = [];
      // Whole-cluster COW buffers come from a small pool and return to it once written.
      const pooled: Buffer[] = [];
      for (const p of plans) {
        const needsFill = p.wa < p.da || p.wb > p.db;
        let piece: Buffer;
        if (!needsFill) {
          piece = data.subarray(p.guest + p.da - pos, p.guest + p.db - pos);
        } else {
          const whole = p.wb - p.wa === cs;
          piece = (whole ? this.fillPool.pop() : undefined) ?? Buffer.allocUnsafe(p.wb - p.wa);
          if (whole) pooled.push(piece);
          await this.fillOld(piece, p.old, p.guest, p.wa);
          data.copy(piece, p.da - p.wa, p.guest + p.da - pos, p.guest + p.db - pos);
        }
        const last = pieces[pieces.length - 1];
        const host = p.host + p.wa;
        if (last && last.host + last.len === host) {
          // Consecutive slices of the caller's buffer merge back into one slice.
          const prev = last.bufs[last.bufs.length - 1];
          if (prev.buffer === piece.buffer && prev.byteOffset + prev.length === piece.byteOffset) {
            last.bufs[last.bufs.length - 1] = Buffer.from(prev.buffer, prev.byteOffset, prev.length + piece.length);
          } else last.bufs.push(piece);
          last.len += piece.length;
        } else pieces.push({ host, bufs: [piece], len: piece.length });
      }
      const dataWritten = Promise.all(pieces.map((x) => (x.bufs.length === 1 ? this.storage.write(x.bufs[0], x.host) : this.storage.writev(x.bufs, x.host))));
      if (counted) await Promise.all([dataWritten, counted]);
      else await dataWritten;
      for (const b of pooled) if (this.fillPool.length < 32) this.fillPool.push(b);
      // Only now point the L2 entries at the data, then release what they pointed at before.
      if (this.writeback) {
        // In memory: no await from here to markDirty, so no write-back can split the update.
        const { lo, hi, frees } = this.pointEntries(table, plans);
        this.pendingFrees.push(...frees);
        if (hi >= 0) await this.writeL2Range(l2Off, table, lo, hi, true);
        // The old clusters are free for the next allocation once the request is done (QEMU
        // frees them in qcow2_alloc_cluster_link_l2).
        if (frees.length) await this.meta.run(() => this.registerFrees());
        return;
      }
      let l2Written: Promise<void> | null = null;
      const update = async (): Promise<void> => {
        const { lo, hi, frees } = this.pointEntries(table, plans);
        if (hi >= 0) {
          // Without clusters to free, the L2 write need not hold the metadata lock.
          if (frees.length) await this.writeL2Range(l2Off, table, lo, hi);
          else l2Written = this.writeL2Range(l2Off, table, lo, hi);
        }
        for (const e of frees) await this.freeEntryClusters(e);
      };
      // With nothing to free the update has no await before the L2 write starts, so it runs
      // inline when the mutex is free (as if taken and released around it).
      const mustFree = plans.some((p) => p.isNew && ownsCluster(p.old));
      if (!mustFree && this.meta.free) await update();
      else await this.meta.run(update);
      if (l2Written) await l2Written;
    } finally {
      this.l2.unpin(l2Off);
    }
  }

  /**
   * Point the table's entries at the planned clusters (in memory, no await): the changed index
   * range and the entries replaced by a new cluster, whose references must be dropped.
   */
  private pointEntries(table: Buffer, plans: ClusterPlan[]): { lo: number; hi: number; frees: L2Entry[] } {
    let lo = Infinity, hi = -1;
    const frees: L2Entry[] = [];
    for (const p of plans) {
      const unchanged = !p.isNew && p.old.type === ClusterType.Normal && (!this.extL2 || (p.old.allocBits === p.allocBits && p.old.zeroBits === p.zeroBits));
      if (unchanged) continue;
      writeL2(table, p.index, this.geo, p.host, { copied: true, allocBits: this.extL2 ? p.allocBits : 0, zeroBits: p.zeroBits });
      lo = Math.min(lo, p.index);
      hi = Math.max(hi, p.index);
      if (p.isNew && ownsCluster(p.old)) frees.push(p.old);
    }
    return { lo, hi, frees };
  }

  /**
   * Fill `dst` with this layer's old view of the cluster at guest offset `guest` whose entry is
   * `e` (from byte `from` of it), including backing data where unallocated.
   */
  /** @internal */ async fillOld(dst: Buffer, e: L2Entry, guest: number, from: number): Promise<void> {
    const g = guest + from;
    switch (e.type) {
      case ClusterType.Normal:
        if (!this.extL2) return this.storage.read(dst, e.host + from);
        break;
      case ClusterType.Compressed: {
        const full = await this.decompress(e);
        full.copy(dst, 0, from, from + dst.length);
        return;
      }
      case ClusterType.ZeroAlloc:
      case ClusterType.ZeroPlain:
        dst.fill(0);
        return;
      case ClusterType.Unallocated:
        if (!this.extL2 || e.zeroBits === 0) return this.readBacking(dst, g);
        break;
    }
    // Extended L2: per subcluster: allocated → old data, zero → zeros, unallocated → backing.
    const sc = this.subclusterSize;
    let q = 0;
    while (q < dst.length) {
      const inner = from + q;
      const s = Math.floor(inner / sc);
      const n = Math.min(dst.length - q, (s + 1) * sc - inner);
      const part = dst.subarray(q, q + n);
      if ((e.allocBits >>> s) & 1) await this.storage.read(part, e.host + inner);
      else if ((e.zeroBits >>> s) & 1) part.fill(0);
      else await this.readBacking(part, guest + inner);
      q += n;
    }
  }

  private async readBacking(dst: Buffer, guest: number): Promise<void> {
    if (!this.backing) {
      dst.fill(0);
      return;
    }
    const avail = Math.max(0, Math.min(dst.length, this.backing.size - guest));
    if (avail > 0) await this.backing.read(dst.subarray(0, avail), guest);
    if (avail < dst.length) dst.fill(0, avail);
  }

  /**
   * Persist entries [lo, hi] of the (pinned) table at `l2Off`. `lazy` (guest write paths, with
   * the writeback cache): only mark them dirty; their refcount drops must then go through
   * pendingFrees. Otherwise written now, together with any dirty range of the table, after the
   * pending refcounts its entries may depend on.
   */
  /** @internal */ async writeL2Range(l2Off: number, table: Buffer, lo: number, hi: number, lazy = false): Promise<void> {
    const es = this.extL2 ? 16 : 8;
    // Whole 512-byte sectors, as QEMU writes them.
    let a = Math.floor((lo * es) / 512) * 512;
    let b = Math.min(this.clusterSize, Math.ceil(((hi + 1) * es) / 512) * 512);
    if (this.writeback) {
      if (lazy) {
        this.markL2Dirty(l2Off, lo, hi);
        await this.writeBackIfFull();
        return;
      }
      if (this.refcounts.pendingCount > 0) await this.refcounts.writePending();
      const d = this.l2.takeDirtyOf(l2Off);
      if (d) {
        a = Math.min(a, d.lo);
        b = Math.max(b, d.hi);
      }
    }
    await this.l2Writer.write(l2Off, table, a, b);
  }

  /** Mark entries [lo, hi] of the table at `l2Off` dirty (whole 512-byte sectors, as QEMU writes them). */
  private markL2Dirty(l2Off: number, lo: number, hi: number): void {
    const es = this.extL2 ? 16 : 8;
    this.l2.markDirty(l2Off, Math.floor((lo * es) / 512) * 512, Math.min(this.clusterSize, Math.ceil(((hi + 1) * es) / 512) * 512));
  }

  private get pendingMetadata(): boolean {
    return this.l2.dirtyCount > 0 || this.refcounts.pendingCount > 0 || this.pendingFrees.length > 0 || this.refcounts.pendingDropCount > 0;
  }

  /**
   * Starts a write-back when much is pending; waits for it when far too much is. Never called
   * with the metadata mutex held (the write-back takes it).
   */
  private async writeBackIfFull(): Promise<void> {
    const cap = this.l2.capacity;
    const level = Math.max(this.l2.dirtyCount / (cap / 2), this.refcounts.pendingCount / PENDING_REFBLOCKS,
      (this.pendingFrees.length + this.refcounts.pendingDropCount) / PENDING_FREES);
    if (level < 1) return;
    const w = this.writingBack ?? this.startWriteBack();
    // Below twice the mark, writers go on (a failure is reported by the next flush).
    if (level >= 2) await w;
  }

  private startWriteBack(): Promise<void> {
    const w = this.meta.run(() => this.writeBackLocked()).finally(() => {
      if (this.writingBack === w) this.writingBack = null;
    });
    this.writingBack = w;
    w.catch((e: unknown) => this.log(`qcow2: metadata write-back failed: ${e instanceof Error ? e.message : String(e)}`));
    return w;
  }

  /**
   * Write back everything the writeback cache holds, in QEMU's order: refcount increments, sync
   * (with the data written so far), L2 tables, sync, then the refcount drops of references
   * those tables no longer hold. A crash at any point leaves at worst leaked clusters.
   */
  async flushMetadata(): Promise<void> {
    if (!this.writeback) return;
    if (this.writingBack) await this.writingBack.catch(() => {});
    if (this.pendingMetadata) await this.meta.run(() => this.writeBackLocked());
  }

  /** Caller holds the metadata mutex. */
  private async writeBackLocked(): Promise<void> {
    await this.registerFrees();
    if (!this.pendingMetadata) return;
    // Refcount blocks held back by a check (see refblockGuard) are written on close only.
    if (!this.refblockGuard) await this.refcounts.writePending();
    if (this.l2.dirtyCount > 0) await this.storage.flush();
    // Every pending drop's L2 change is in `tables` (or was written by a non-lazy write
    // already): drops are made under the mutex, after their entries were marked dirty.
    const drops = this.refcounts.pendingDropCount > 0;
    const tables = this.l2.takeDirty();
    const results = await Promise.allSettled(tables.map((t) => this.l2Writer.write(t.offset, t.buf, t.lo, t.hi)));
    for (const t of tables) this.l2.unpin(t.offset);
    const failed = results.findIndex((r) => r.status === 'rejected');
    if (failed >= 0) {
      results.forEach((r, i) => { if (r.status === 'rejected') this.l2.markDirty(tables[i].offset, tables[i].lo, tables[i].hi); });
      throw (results[failed] as PromiseRejectedResult).reason;
    }
    if (drops) {
      await this.storage.flush();
      await this.refcounts.applyDrops();
      if (!this.refblockGuard) await this.refcounts.writePending();
    }
  }

  /**
   * Make the queued frees refcount drops (caller holds the metadata mutex; their entries are
   * changed and marked dirty already): the allocator sees them at once, as QEMU's
   * qcow2_free_any_cluster; the blocks get them at the next write-back. Clusters of a guest
   * discard or unmapping zero write left unused are discarded from the file now, as
   * qcow2_process_discards does at the end of the request.
   */
  private async registerFrees(): Promise<void> {
    const punch: number[] = [];
    while (this.pendingFrees.length > 0) {
      const e = this.pendingFrees.shift() as L2Entry;
      let first: number, n: number;
      if (e.type === ClusterType.Compressed) {
        first = Math.floor(e.cOffset / this.clusterSize);
        n = Math.floor((e.cOffset + e.cLength - 1) / this.clusterSize) - first + 1;
      } else if (e.host) {
        first = e.host / this.clusterSize;
        n = 1;
      } else continue;
      let zeroed: number[];
      try {
        zeroed = await this.refcounts.dropLater(first, n);
      } catch (err) {
        // As QEMU's qcow2_free_clusters: a failed free is reported and leaks; the request goes on.
        if (!(err instanceof ImageError)) throw err;
        this.log(`qcow2_free_clusters failed: ${errnoText(err.errno ?? 'EIO')}`);
        continue;
      }
      if (this.discardRequested.has(e)) punch.push(...zeroed);
    }
    if (punch.length === 0 || !this.storage.punchHole) return;
    // Adjacent clusters in one hole, as update_refcount_discard merges them. A failed discard
    // is ignored, as qcow2_process_discards does.
    punch.sort((x, y) => x - y);
    for (let i = 0; i < punch.length;) {
      let j = i + 1;
      while (j < punch.length && punch[j] === punch[j - 1] + 1) j++;
      await this.storage.punchHole(punch[i] * this.clusterSize, (j - i) * this.clusterSize).catch(() => {});
      i = j;
    }
  }

  /**
   * Drop the references an old L2 entry held (must be called after the entry was replaced on disk).
   * `discard`: QCOW2_DISCARD_ALWAYS (shrinking), see Refcounts.free.
   */
  /** @internal */ async freeEntryClusters(e: L2Entry, discard = false): Promise<void> {
    try {
      if (!discard && this.discardRequested.has(e)) {
        if (e.type === ClusterType.Compressed) {
          await this.punchUnshared(Math.floor(e.cOffset / this.clusterSize), Math.floor((e.cOffset + e.cLength - 1) / this.clusterSize));
        } else if (e.host) {
          await this.punchUnshared(e.host / this.clusterSize, e.host / this.clusterSize);
        }
      }
      if (e.type === ClusterType.Compressed) {
        const first = Math.floor(e.cOffset / this.clusterSize);
        const last = Math.floor((e.cOffset + e.cLength - 1) / this.clusterSize);
        await this.refcounts.free(first * this.clusterSize, last - first + 1, discard);
      } else if (e.host) {
        await this.refcounts.free(e.host, 1, discard);
      }
    } catch (err) {
      // As QEMU's qcow2_free_clusters: a failed free is reported and leaks; the request goes on.
      if (!(err instanceof ImageError)) throw err;
      this.log(`qcow2_free_clusters failed: ${errnoText(err.errno ?? 'EIO')}`);
    }
  }

  /** The file's holes inside data clusters, where QEMU asks for them (see metadata-prealloc.ts). */
  async hostReadsZero(hostOffset: number, length: number): Promise<boolean> {
    if (!(await metadataPreallocated(this))) return false;
    return (await hostRuns(this, hostOffset, length)).every((r) => r.zero);
  }

  /**
   * Discard host clusters [first, last] that this reference alone holds (refcount 1), before the
   * reference is dropped, so no allocation can take them meanwhile: QEMU discards a cluster
   * whose refcount reaches 0. A failed discard is ignored, as qcow2_process_discards does.
   */
  private async punchUnshared(first: number, last: number): Promise<void> {
    if (!this.storage.punchHole) return;
    for (let ci = first; ci <= last; ci++) {
      if ((await this.refcounts.get(ci)) === 1) await this.storage.punchHole(ci * this.clusterSize, this.clusterSize).catch(() => {});
    }
  }

  /**
   * Zero a range. Whole clusters get the zero flag (v3) or subcluster zero bits (extended L2);
   * partial clusters are written with zeros. v2 without a zero flag writes zeros where needed.
   */
  async writeZeroes(offset: number, length: number, opts: WriteZeroesOptions = {}): Promise<void> {
    this.checkRange(offset, length);
    if (length === 0) return;
    const gran = this.extL2 ? this.subclusterSize : this.clusterSize;
    // The image's last, partial cluster counts as whole.
    const end = offset + length === this.size ? Math.ceil(this.size / gran) * gran : offset + length;
    const release = await this.lockClusters(offset, end - offset);
    try {
      await this.markDirty();
      // As QEMU: a partial head/tail cluster whose other bytes already read as zero is zeroed whole.
      let a = offset, b = end;
      const headStart = Math.floor(offset / gran) * gran;
      if (a > headStart && (await this.readsZero(headStart, a - headStart))) a = headStart;
      const tailEnd = Math.min(Math.ceil(end / gran) * gran, Math.ceil(this.size / gran) * gran);
      if (b < tailEnd && (await this.readsZero(b, tailEnd - b))) b = tailEnd;
      const headEnd = Math.min(b, Math.ceil(a / gran) * gran);
      const tailStart = Math.max(headEnd, Math.floor(b / gran) * gran);
      if (headEnd > a) await this.writeUnlocked(Buffer.alloc(headEnd - a), a);
      if (tailStart > headEnd) await this.zeroAligned(headEnd, tailStart - headEnd, !!opts.mayUnmap, false);
      if (b > tailStart) await this.writeUnlocked(Buffer.alloc(b - tailStart), tailStart);
      if (!opts.untracked) this.tracked(offset, length);
    } finally {
      release();
    }
  }

  /**
   * Whether the range reads as zero by metadata (QEMU's is_zero): zero here, or unallocated here
   * and zero by the metadata of the layers below (or no backing file).
   */
  private async readsZero(offset: number, length: number): Promise<boolean> {
    const exts = await this.blockStatus(offset, length);
    for (const x of exts) {
      if (x.kind === 'zero') continue;
      if (x.kind !== 'unallocated') return false;
      if (!this.backing) continue;
      if (!this.backing.readsZero || !(await this.backing.readsZero(x.offset, x.length))) return false;
    }
    return true;
  }

  /** Discard whole clusters: they become zero (v3) or unallocated (v2); partial clusters are ignored. */
  async discard(offset: number, length: number): Promise<void> {
    this.checkRange(offset, length);
    // The whole request counts as written, even the partial clusters left alone (as QEMU).
    this.tracked(offset, length);
    const cs = this.clusterSize;
    const a = Math.ceil(offset / cs) * cs;
    let b = Math.floor((offset + length) / cs) * cs;
    if (offset + length === this.size) b = Math.ceil(this.size / cs) * cs;
    if (b <= a) return;
    const release = await this.lockClusters(a, b - a);
    try {
      await this.markDirty();
      await this.zeroAligned(a, b - a, true, true);
    } finally {
      release();
    }
  }

  /** Zero or discard a granularity-aligned range by changing entries only (caller holds the range lock). */
  private async zeroAligned(offset: number, length: number, unmap: boolean, isDiscard: boolean): Promise<void> {
    const cs = this.clusterSize, sc = this.subclusterSize;
    {
      let pos = offset;
      const end = offset + length;
      while (pos < end) {
        const segEnd = Math.min(end, (Math.floor(pos / this.l2Coverage) + 1) * this.l2Coverage);
        const l1i = Math.floor(pos / this.l2Coverage);
        if (this.header.version < 3) {
          // v2: no zero flag. Discard deallocates; zeroing deallocates only if nothing shows through.
          await this.zeroSegmentV2(pos, segEnd, isDiscard);
          pos = segEnd;
          continue;
        }
        const { offset: l2Off, table } = await this.writableL2(l1i);
        const fallback: Array<[number, number]> = [];
        try {
          await this.meta.run(async () => {
            let lo = Infinity, hi = -1;
            const frees: L2Entry[] = [];
            for (let c = Math.floor(pos / cs) * cs; c < segEnd; c += cs) {
              const idx = Math.floor(c / cs) % this.l2Entries;
              const old = readL2(table, idx, this.geo);
              const a = Math.max(pos, c) - c, b = Math.min(segEnd, c + cs) - c;
              // As QEMU: discarding an unallocated cluster without a backing file leaves its entry alone.
              if (isDiscard && !this.backing && old.type !== ClusterType.Compressed && old.type !== ClusterType.Normal && old.type !== ClusterType.ZeroAlloc) continue;
              if (this.extL2) {
                // A range from a cluster's start to the image's end zeroes that last, partial
                // cluster whole (qcow2_subcluster_zeroize: no tail at the end of the image).
                if (a === 0 && (b === cs || c + b >= this.size)) {
                  // As QEMU's zero_in_l2_slice: without unmap an allocated cluster keeps its host
                  // cluster (and its COPIED flag: a snapshot's shared cluster stays shared).
                  const keep = !unmap && old.host !== 0 && old.type !== ClusterType.Compressed;
                  if (isDiscard) writeL2(table, idx, this.geo, 0, { copied: false, allocBits: 0, zeroBits: 0xffffffff });
                  else writeL2(table, idx, this.geo, keep ? old.host : 0, { copied: keep && old.copied, allocBits: 0, zeroBits: 0xffffffff });
                  if (!keep && (old.host || old.type === ClusterType.Compressed)) frees.push(old);
                } else {
                  // Subcluster-aligned part of a cluster: set zero bits for those subclusters.
                  if (old.type === ClusterType.Compressed || (old.host && !old.copied)) {
                    fallback.push([c + a, b - a]); // shared or compressed: write real zeros instead
                    continue;
                  }
                  let bits = 0;
                  for (let s = a / sc; s < b / sc; s++) bits |= 1 << s;
                  bits >>>= 0;
                  writeL2(table, idx, this.geo, old.host, { copied: old.host ? old.copied : false, allocBits: (old.allocBits & ~bits) >>> 0, zeroBits: (old.zeroBits | bits) >>> 0 });
                }
              } else {
                // As QEMU's zero_in_l2_slice: without unmap an allocated cluster keeps its host
                // cluster (and its COPIED flag: a snapshot's shared cluster stays shared).
                const keep = !unmap && (old.type === ClusterType.Normal || old.type === ClusterType.ZeroAlloc);
                if (keep) writeL2(table, idx, this.geo, old.host, { copied: old.copied, zero: true });
                else writeL2(table, idx, this.geo, 0, { copied: false, zero: true });
                if (!keep && ownsCluster(old)) frees.push(old);
              }
              lo = Math.min(lo, idx);
              hi = Math.max(hi, idx);
            }
            await this.commitEntries(l2Off, table, lo, hi, frees);
          });
        } finally {
          this.l2.unpin(l2Off);
        }
        if (this.writeback) await this.writeBackIfFull();
        for (const [o, n] of fallback) await this.writeSegment(Buffer.alloc(n), o);
        pos = segEnd;
      }
    }
  }

  private async zeroSegmentV2(pos: number, segEnd: number, isDiscard: boolean): Promise<void> {
    const cs = this.clusterSize;
    if (!isDiscard && this.backing) {
      // No zero flag in v2: zeros must hide the backing data, so they are written out.
      for (let c = pos; c < segEnd; c += cs) await this.writeSegment(Buffer.alloc(Math.min(segEnd, c + cs) - c), c);
      return;
    }
    // Without a backing file an unallocated cluster reads as zero: deallocate (as QEMU does).
    const l1i = Math.floor(pos / this.l2Coverage);
    const l1e = this.l1Entry(l1i);
    if (!l1e.offset) return;
    const { offset: l2Off, table } = await this.writableL2(l1i);
    try {
      await this.meta.run(async () => {
        let lo = Infinity, hi = -1;
        const frees: L2Entry[] = [];
        for (let c = pos; c < segEnd; c += cs) {
          const idx = Math.floor(c / cs) % this.l2Entries;
          const old = readL2(table, idx, this.geo);
          if (old.type === ClusterType.Unallocated) continue;
          writeL2(table, idx, this.geo, 0, { copied: false });
          frees.push(old);
          lo = Math.min(lo, idx);
          hi = Math.max(hi, idx);
        }
        await this.commitEntries(l2Off, table, lo, hi, frees);
      });
    } finally {
      this.l2.unpin(l2Off);
    }
    if (this.writeback) await this.writeBackIfFull();
  }

  /** Guest zero/discard: persist changed entries [lo, hi], then drop the references they held. */
  private async commitEntries(l2Off: number, table: Buffer, lo: number, hi: number, frees: L2Entry[]): Promise<void> {
    if (this.passDiscardRequests) for (const e of frees) this.discardRequested.add(e);
    if (this.writeback) {
      // Under the mutex: no write-back can come between the entries and their drops.
      if (hi >= 0) this.markL2Dirty(l2Off, lo, hi);
      this.pendingFrees.push(...frees);
      await this.registerFrees();
      return;
    }
    if (hi >= 0) await this.writeL2Range(l2Off, table, lo, hi);
    for (const e of frees) await this.freeEntryClusters(e);
  }

  /**
   * Preallocate the whole image (qcow2_co_create's truncate): metadata as preallocate_co
   * (`preallocate.ts`), falloc/full as qcow2_co_truncate (`resize.ts` preallocateArea).
   */
  async preallocate(mode: 'metadata' | 'falloc' | 'full'): Promise<void> {
    if (mode === 'metadata') await (await import('./preallocate.js')).preallocateMetadata(this, 0, this.size);
    else await (await import('./resize.js')).preallocateArea(this, 0, this.size);
  }

  /** Change the virtual size (qemu-img resize, qemu-io truncate); see resize.ts. */
  async resize(size: number, opts: ResizeOptions = {}): Promise<void> {
    await (await import('./resize.js')).resizeQcow2(this, size, opts);
  }

  /** Compressed write of whole clusters (qemu-io `write -c`, convert -c); see compressed-write.ts. */
  async writeCompressed(buf: Buffer, offset: number): Promise<void> {
    const cw = await import('./compressed-write.js');
    await cw.writeCompressed(this, buf, offset);
    this.tracked(offset, buf.length);
  }

  async flush(): Promise<void> {
    await this.flushMetadata();
    await this.storage.flush();
  }

  /** Flush, clear the dirty bit we set, and close the file. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await (await import('./compressed-write.js')).closeCompressedWriter(this);
    let failed: unknown = null;
    const guard = this.refblockGuard;
    if (!this.readOnly && !this.unusable && guard) await this.meta.run(() => this.writeRefblocksGuarded(guard)).catch(() => {});
    // Marked corrupt by this handle: QEMU has dropped the driver, nothing more is written.
    if (!this.readOnly && !this.unusable) {
      // Metadata that cannot be written back leaves a leak at worst; the bitmaps still try.
      await this.flushMetadata().catch((e: unknown) => { failed = e; });
      // A bitmap that cannot be stored stays in use on disk; the image is still closed cleanly.
      if (this.bitmaps) await this.bitmaps.store().catch((e: unknown) => { failed = e; });
      // As qcow2_inactivate: a clean close clears the dirty bit, also one found on open (check mode).
      if (this.dirtySet) {
        await this.storage.flush();
        this.header.incompatible &= ~BigInt(C.INCOMPAT_DIRTY);
        await this.writeIncompat();
      } else if (!failed && (this.header.incompatible & BigInt(C.INCOMPAT_DIRTY)) !== 0n) {
        // qcow2_mark_clean rewrites the whole header cluster.
        await this.storage.flush();
        this.header.incompatible &= ~BigInt(C.INCOMPAT_DIRTY);
        await this.writeHeader();
      }
      await this.storage.flush();
    }
    await this.storage.close();
    if (failed) throw failed;
  }

  /** Clusters referenced by the L1 table at `offset` (used by snapshot and check code). */
  async readL1Table(offset: number, size: number): Promise<Buffer> {
    const b = Buffer.alloc(size * 8);
    if (size) await this.storage.read(b, offset);
    return b;
  }

  /** The table at `offset` as the image sees it (a dirty or in-flight cached copy is newer than the file). */
  async readTable(offset: number): Promise<Buffer> {
    const b = Buffer.alloc(this.clusterSize);
    const newer = this.l2.dirtyRange(offset)?.buf ?? this.l2Writer.pendingBuffer(offset);
    if (newer) newer.copy(b);
    else await this.storage.read(b, offset);
    return b;
  }

  /**
   * Point the image at another backing file (null = standalone), as qcow2_change_backing_file:
   * the header cluster is rewritten with the new name and backing-format extension. Data
   * written before is flushed first, so the new pointer never reaches the disk ahead of it.
   */
  async changeBackingFile(name: string | null, format: string | null): Promise<void> {
    if (this.readOnly) throw new ImageError('Permission denied', 'EACCES');
    if (name !== null && Buffer.byteLength(name, 'utf8') > 1023) throw new ImageError('Invalid argument', 'EINVAL');
    await this.flushMetadata();
    const before = { file: this.header.backingFile, fmt: this.header.backingFormat };
    this.header.backingFile = name;
    this.header.backingFormat = name === null ? null : format;
    let buf: Buffer;
    try {
      buf = serializeHeader(this.header);
    } catch {
      this.header.backingFile = before.file;
      this.header.backingFormat = before.fmt;
      serializeHeader(this.header);
      throw new ImageError('No space left on device', 'ENOSPC');
    }
    await this.storage.flush();
    await this.storage.write(buf, 0);
    await this.storage.flush();
  }

  /**
   * Drop every cluster of the active layer, as QEMU's qcow2_make_empty. v3 images without
   * snapshots or bitmaps are rebuilt from scratch (make_completely_empty: header, reftable,
   * one refblock, zeroed L1, file truncated), with the dirty bit set meanwhile so a crash is
   * repaired on the next read-write open. Otherwise every cluster is fully discarded
   * (entries become unallocated; L2 entry written before the refcount drop).
   */
  async makeEmpty(): Promise<void> {
    if (this.readOnly) throw new ImageError('Permission denied', 'EACCES');
    await this.flushMetadata();
    const cs = this.clusterSize;
    const l1Clusters = Math.ceil(this.header.l1Size / (cs / 8));
    if (this.header.version >= 3 && this.snapshots.length === 0 && !this.header.bitmapsExt &&
      3 + l1Clusters <= this.refcounts.perBlock) {
      await this.meta.run(async () => {
        this.header.incompatible |= BigInt(C.INCOMPAT_DIRTY);
        await this.writeIncompat();
        await this.storage.flush();
        const zeros = Buffer.alloc(cs);
        for (let i = 0; i < l1Clusters; i++) await this.storage.write(zeros, this.header.l1TableOffset + i * cs);
        for (let i = 0; i < 2 + l1Clusters; i++) await this.storage.write(zeros, (1 + i) * cs);
        const ptrs = Buffer.alloc(20);
        ptrs.writeBigUInt64BE(BigInt(3 * cs), 0);
        ptrs.writeBigUInt64BE(BigInt(cs), 8);
        ptrs.writeUInt32BE(1, 16);
        await this.storage.write(ptrs, 40);
        await this.storage.flush();
        this.header.l1TableOffset = 3 * cs;
        this.header.refcountTableOffset = cs;
        this.header.refcountTableClusters = 1;
        this.l1 = Buffer.alloc(this.header.l1Size * 8);
        this.l2.clear();
        this.lastCompressed = null;
        const entry = Buffer.alloc(8);
        entry.writeBigUInt64BE(BigInt(2 * cs), 0);
        await this.storage.write(entry, cs);
        await this.storage.flush();
        await this.refcounts.reload(cs, 1);
        await this.refcounts.update(0, 3 + l1Clusters, 1);
        await this.storage.flush();
        this.header.incompatible &= ~BigInt(C.INCOMPAT_DIRTY);
        this.dirtySet = false;
        this.dirtyWrite = null;
        await this.writeHeader();
        await this.storage.truncate((3 + l1Clusters) * cs);
      });
      return;
    }
    await this.markDirty();
    for (let l1i = 0; l1i < this.header.l1Size; l1i++) {
      if (!this.l1Entry(l1i).offset) continue;
      const { offset: l2Off, table } = await this.writableL2(l1i);
      try {
        await this.meta.run(async () => {
          const frees: L2Entry[] = [];
          for (let idx = 0; idx < this.l2Entries; idx++) {
            const old = readL2(table, idx, this.geo);
            if (old.hi === 0 && old.lo === 0 && old.zeroBits === 0 && old.allocBits === 0) continue;
            writeL2(table, idx, this.geo, 0, { copied: false, allocBits: 0, zeroBits: 0 });
            if (old.host || old.type === ClusterType.Compressed) frees.push(old);
          }
          await this.writeL2Range(l2Off, table, 0, this.l2Entries - 1);
          for (const e of frees) await this.freeEntryClusters(e);
        });
      } finally {
        this.l2.unpin(l2Off);
      }
    }
  }

  /** Forget cached L2 tables (after a rewrite behind the cache, e.g. snapshot apply; flushMetadata first). */
  dropCaches(): void {
    if (this.l2.dirtyCount > 0 || this.pendingFrees.length > 0 || this.refcounts.pendingDropCount > 0) throw new Error('internal error: L2 cache dropped with metadata not written back');
    this.l2.clear();
    this.lastCompressed = null;
  }
}
