/**
 * Persistent dirty bitmaps of an open qcow2 image, with QEMU 7.2's life cycle:
 * - every open validates the directory and the tables of consistent bitmaps (errors fail the open);
 * - a read-write open loads the bitmaps, marks them in_use on disk (directory rewritten in place
 *   while the autoclear bit is off), and enabled ones then track guest writes;
 * - a clean close stores each loaded bitmap (new data clusters and table, then a new directory
 *   and header, then the old clusters are freed) and so clears in_use;
 * - bitmaps found in_use (left by a crash) are inconsistent: listed, removable, never stored.
 * All on-disk updates follow QEMU's order, so a crash leaves at worst leaked clusters.
 */
import { metadataOverlap, preWriteOverlapCheck } from './overlap.js';
import { serializeSnapshotTable } from './snapshot-table.js';
import type { Qcow2Image } from './image.js';
import { ImageError } from '../image/errors.js';
import * as C from './constants.js';
import {
  FLAG_AUTO, FLAG_IN_USE, MAX_BITMAPS, MAX_DIRECTORY_SIZE, MAX_GRANULARITY_BITS, MAX_NAME_SIZE, MAX_PHYS_SIZE,
  MAX_TABLE_SIZE, MIN_GRANULARITY_BITS, ENTRY_ONES, ENTRY_ZEROS, dirEntrySize, encodeBitmapTable, encodeBitmapsExt,
  parseBitmapDirectory, parseBitmapTable, parseBitmapsExt, serializeBitmapDirectory, tableSizeFor, type BitmapEntry,
} from './bitmap-format.js';
import { DirtyBitmap } from './dirty-bitmap.js';

/** What `qemu-img info` lists for a bitmap (flags as QAPI names them). */
export interface BitmapInfo {
  name: string;
  granularity: number;
  flags: Array<'in-use' | 'auto'>;
}

/** One bitmap known to the open image (QEMU's BdrvDirtyBitmap). */
export interface MemBitmap {
  name: string;
  granularityBits: number;
  enabled: boolean;
  /** Found in_use on disk: content unusable, never stored. */
  inconsistent: boolean;
  /** Loaded from a read-only image: may be read, not changed or stored. */
  readOnly: boolean;
  /** Content; null until loaded (read-only images load on demand). */
  data: DirtyBitmap | null;
}

/** Errors of bitmap operations carry QEMU's message and, like error_append_hint, an optional hint. */
export class BitmapError extends ImageError {
  constructor(message: string, readonly hint?: string) {
    super(message);
  }
}

/** Non-zero chunks loaded from disk across all bitmaps (2^22 chunks: at least 2 GiB of bitmap data). */
const MAX_LOADED_CHUNKS = 1 << 22;

const INCONSISTENT_HINT = 'Try block-dirty-bitmap-remove to delete this bitmap from disk\n';

export class Qcow2Bitmaps {
  /** The directory as it is on disk (empty when the image has no valid bitmaps extension). */
  private dir: BitmapEntry[] = [];
  private ext: { dirSize: number; dirOffset: number } | null = null;
  /** In-memory bitmaps, in QEMU's list order (newest first). */
  private mem: MemBitmap[] = [];
  /** Bitmap data clusters read so far (by file offset; ENTRY_ONES for all-ones), shared by chunks. */
  private readonly clusterCache = new Map<number, Uint8Array>();
  private loadedChunks = 0;
  /** Node name used in messages, as QEMU's generated "#blockNNN". */
  nodeName = `#block1${String(Math.floor(Math.random() * 100)).padStart(2, '0')}`;

  private constructor(private readonly img: Qcow2Image, private readonly log: (line: string) => void) {}

  get clusterSize(): number {
    return this.img.clusterSize;
  }

  /** All bitmaps, oldest first (directory order for the ones on disk). */
  list(): MemBitmap[] {
    return this.mem.slice().reverse();
  }

  /** Bitmaps as they are listed on disk (qcow2_get_bitmap_info_list). */
  info(): BitmapInfo[] {
    return this.dir.map((e) => {
      const flags: BitmapInfo['flags'] = [];
      if (e.flags & FLAG_IN_USE) flags.push('in-use');
      if (e.flags & FLAG_AUTO) flags.push('auto');
      return { name: e.name, granularity: 2 ** e.granularityBits, flags };
    });
  }

  find(name: string): MemBitmap | undefined {
    return this.mem.find((b) => b.name === name);
  }

  /**
   * Reads and validates the directory and the tables of consistent bitmaps (every open does).
   * `log` receives QEMU's warning when a program without bitmap support has touched the image.
   */
  static async open(img: Qcow2Image, log: (line: string) => void): Promise<Qcow2Bitmaps> {
    const set = new Qcow2Bitmaps(img, log);
    const h = img.header;
    if (!h.bitmapsExt) return set;
    if ((h.autoclear & BigInt(C.AUTOCLEAR_BITMAPS)) === 0n) {
      log(h.version < 3
        ? 'warning: This qcow2 v2 image contains bitmaps, but they may have been modified by a program without persistent bitmap support; so now they must all be considered inconsistent\n' +
          "Some clusters may be leaked, run 'qemu-img check -r' on the image file to fix."
        : 'warning: a program lacking bitmap support modified this file, so all bitmaps are now considered inconsistent\n' +
          "Some clusters may be leaked, run 'qemu-img check -r' on the image file to fix.");
      return set;
    }
    const ext = parseBitmapsExt(h.bitmapsExt, img.clusterSize);
    set.ext = { dirSize: ext.dirSize, dirOffset: ext.dirOffset };
    set.dir = parseBitmapDirectory(await set.readBytes(ext.dirOffset, ext.dirSize), ext.nbBitmaps, img.clusterSize, img.size);
    const checked = new Set<string>();
    const names = new Set<string>();
    for (const e of set.dir) {
      if (names.has(e.name)) throw new ImageError(`Bitmap already exists: ${e.name}`);
      names.add(e.name);
      const inUse = (e.flags & FLAG_IN_USE) !== 0;
      if (!inUse) {
        // Identical tables are validated once: a hostile directory cannot multiply the reads.
        const key = `${e.tableOffset}:${e.tableSize}`;
        if (!checked.has(key)) {
          await set.readTable(e);
          checked.add(key);
        }
        if (tableSizeFor(img.size, e.granularityBits, img.clusterSize) !== e.tableSize) {
          throw new ImageError(`Could not read bitmap '${e.name}' from image: Invalid argument`);
        }
      }
      set.mem.unshift({ name: e.name, granularityBits: e.granularityBits, enabled: (e.flags & FLAG_AUTO) !== 0, inconsistent: inUse, readOnly: img.readOnly, data: null });
    }
    return set;
  }

  /** Reads `length` bytes at `offset`; the part past the end of the file stays zero, unread. */
  private async readBytes(offset: number, length: number): Promise<Buffer> {
    const buf = Buffer.alloc(length);
    const n = await this.inFile(offset, length);
    if (n > 0) await this.img.storage.read(buf.subarray(0, n), offset);
    return buf;
  }

  /** How many of `length` bytes at `offset` lie inside the file. */
  private async inFile(offset: number, length: number): Promise<number> {
    return Math.max(0, Math.min(length, (await this.img.storage.size()) - offset));
  }

  /** Reads and checks a bitmap table; only its part inside the file is read (the rest is zeros). */
  private async readTable(e: { name: string; tableOffset: number; tableSize: number }): Promise<Float64Array> {
    const n = Math.ceil((await this.inFile(e.tableOffset, e.tableSize * 8)) / 8) * 8;
    const t = parseBitmapTable(await this.readBytes(e.tableOffset, n), this.img.clusterSize, e.tableSize);
    if (!t) throw new ImageError(`Could not read bitmap_table table from image for bitmap '${e.name}': Invalid argument`);
    return t;
  }

  /**
   * Loads a bitmap's content from its on-disk table (load_bitmap_data). Data clusters are read
   * once per image and shared (copy on write) by every chunk that names them, and the chunks held
   * by all bitmaps are capped, so memory stays bounded by the file whatever the tables claim.
   */
  private async loadData(b: MemBitmap): Promise<DirtyBitmap> {
    const e = this.dir.find((x) => x.name === b.name);
    const bm = new DirtyBitmap(this.img.size, b.granularityBits, this.img.clusterSize);
    if (!e) return bm;
    const table = await this.readTable(e);
    const fileSize = await this.img.storage.size();
    for (let i = 0; i < table.length && i < bm.nchunks; i++) {
      const v = table[i];
      if (v === ENTRY_ZEROS) continue;
      if (++this.loadedChunks > MAX_LOADED_CHUNKS) throw new ImageError(`Could not read bitmap '${b.name}' from image: Cannot allocate memory`);
      let data = this.clusterCache.get(v);
      if (!data) {
        data = new Uint8Array(this.img.clusterSize);
        if (v === ENTRY_ONES) data.fill(0xff);
        else {
          const n = Math.max(0, Math.min(data.length, fileSize - v));
          if (n > 0) await this.img.storage.read(Buffer.from(data.buffer, 0, n), v);
        }
        this.clusterCache.set(v, data);
      }
      bm.loadChunk(i, data);
    }
    return bm;
  }

  /** Content of a bitmap, loading it if needed (merge sources on read-only images). */
  async content(b: MemBitmap): Promise<DirtyBitmap> {
    if (!b.data) b.data = await this.loadData(b);
    return b.data;
  }

  /**
   * Read-write open: load every consistent bitmap and mark it in_use on disk, rewriting the
   * directory in place while the autoclear bit is off (update_ext_header_and_dir_in_place).
   */
  async activate(): Promise<void> {
    let changed = false;
    for (const b of this.mem) {
      if (b.inconsistent) continue;
      b.data = await this.loadData(b);
      b.readOnly = false;
    }
    // Loaded chunks keep the buffers they share; the lookup table is no longer needed.
    this.clusterCache.clear();
    for (const e of this.dir) {
      if (!(e.flags & FLAG_IN_USE)) {
        e.flags |= FLAG_IN_USE;
        changed = true;
      }
    }
    if (!changed || !this.ext) return;
    const h = this.img.header;
    h.autoclear &= ~BigInt(C.AUTOCLEAR_BITMAPS);
    await this.syncHeader();
    const dir = serializeBitmapDirectory(this.dir, this.img.clusterSize, this.img.size);
    if (dir.length !== this.ext.dirSize) throw new ImageError("Can't update bitmap directory: Invalid argument");
    // bitmap_list_store's overlap check (the directory itself is not metadata while the bit is off).
    const snapshotsSize = serializeSnapshotTable(this.img.snapshots).length;
    if (metadataOverlap(this.img, this.ext.dirOffset, dir.length, snapshotsSize)) {
      await preWriteOverlapCheck(this.img, this.ext.dirOffset, dir.length, snapshotsSize).catch(() => {});
      throw new ImageError("Can't update bitmap directory: Input/output error");
    }
    await this.img.storage.write(dir, this.ext.dirOffset);
    await this.syncHeader();
    h.autoclear |= BigInt(C.AUTOCLEAR_BITMAPS);
    await this.syncHeader();
  }

  private async syncHeader(): Promise<void> {
    await this.img.writeHeader();
    await this.img.storage.flush();
  }

  /** Guest write/zero/discard hook: enabled bitmaps record the range. */
  readonly track = (offset: number, length: number): void => {
    for (const b of this.mem) if (b.enabled && b.data && !b.readOnly) b.data.set(offset, length);
  };

  // ---- operations (qemu-img bitmap / QMP block-dirty-bitmap-*) ---------------------------------

  /** Default granularity: the cluster size clamped to [4 KiB, 64 KiB] (bdrv_get_default_bitmap_granularity). */
  defaultGranularity(): number {
    return Math.min(65536, Math.max(4096, this.img.clusterSize));
  }

  /** qcow2_co_can_store_new_dirty_bitmap + check_constraints_on_bitmap: the reason, or null. */
  private cannotStore(name: string, granularity: number): string | null {
    if (this.img.version < 3) return 'Cannot store dirty bitmaps in qcow2 v2 files';
    const bits = Math.log2(granularity);
    if (bits > MAX_GRANULARITY_BITS) return `Granularity exceeds maximum (${2 ** MAX_GRANULARITY_BITS} bytes)`;
    if (bits < MIN_GRANULARITY_BITS) return `Granularity is under minimum (${2 ** MIN_GRANULARITY_BITS} bytes)`;
    const bytes = Math.ceil(Math.ceil(this.img.size / granularity) / 8);
    if (bytes > MAX_PHYS_SIZE || bytes > MAX_TABLE_SIZE * this.img.clusterSize) {
      return 'Too much space will be occupied by the bitmap. Use larger granularity';
    }
    if (Buffer.byteLength(name, 'utf8') > MAX_NAME_SIZE) return `Name length exceeds maximum (${MAX_NAME_SIZE} characters)`;
    return null;
  }

  /** block-dirty-bitmap-add with persistent=on. */
  add(name: string, granularity: number | undefined, enabled = true): void {
    if (name === '') throw new BitmapError('Bitmap name cannot be empty');
    if (granularity !== undefined && (granularity < 512 || !Number.isInteger(Math.log2(granularity)))) {
      throw new BitmapError('Granularity must be power of 2 and at least 512');
    }
    const gran = granularity ?? this.defaultGranularity();
    if (this.find(name)) throw new BitmapError(`Bitmap already exists: ${name}`);
    let reason = this.cannotStore(name, gran);
    if (!reason) {
      const nb = this.mem.length + 1;
      const dirSize = this.mem.reduce((a, b) => a + dirEntrySize(Buffer.byteLength(b.name, 'utf8')), 0) + dirEntrySize(Buffer.byteLength(name, 'utf8'));
      if (nb > MAX_BITMAPS) reason = 'Maximum number of persistent bitmaps is already reached';
      else if (dirSize > MAX_DIRECTORY_SIZE) reason = 'Not enough space in the bitmap directory';
    }
    if (reason) throw new BitmapError(`Can't make bitmap '${name}' persistent in '${this.nodeName}': ${reason}`);
    this.mem.unshift({ name, granularityBits: Math.log2(gran), enabled, inconsistent: false, readOnly: false, data: new DirtyBitmap(this.img.size, Math.log2(gran), this.img.clusterSize) });
  }

  /** block_dirty_bitmap_lookup. */
  lookup(name: string): MemBitmap {
    const b = this.find(name);
    if (!b) throw new BitmapError(`Dirty bitmap '${name}' not found`);
    return b;
  }

  /** bdrv_dirty_bitmap_check: inconsistent always fails; read-only unless allowed. */
  static usable(b: MemBitmap, allowReadOnly: boolean): void {
    if (!allowReadOnly && b.readOnly) throw new BitmapError(`Bitmap '${b.name}' is readonly and cannot be modified`);
    if (b.inconsistent) throw new BitmapError(`Bitmap '${b.name}' is inconsistent and cannot be used`, INCONSISTENT_HINT);
  }

  /** block-dirty-bitmap-remove: the on-disk entry goes at once (qcow2_co_remove_persistent_dirty_bitmap). */
  async remove(name: string): Promise<void> {
    const b = this.lookup(name);
    if (b.readOnly) throw new BitmapError(`Bitmap '${b.name}' is readonly and cannot be modified`);
    const idx = this.dir.findIndex((e) => e.name === name);
    if (idx >= 0) {
      const gone = this.dir[idx];
      const list = this.dir.filter((_, i) => i !== idx);
      await this.img.meta.run(async () => {
        await this.updateDirectory(list);
        await this.freeBitmapClusters(gone);
      });
    }
    this.mem = this.mem.filter((x) => x !== b);
  }

  clear(name: string): void {
    const b = this.lookup(name);
    Qcow2Bitmaps.usable(b, false);
    b.data?.clear();
  }

  setEnabled(name: string, enabled: boolean): void {
    const b = this.lookup(name);
    Qcow2Bitmaps.usable(b, true);
    b.enabled = enabled;
  }

  /** The image was resized: loaded bitmaps follow the new size (bdrv_dirty_bitmap_truncate). */
  resized(size: number): void {
    for (const b of this.mem) if (b.data) b.data = b.data.resized(size);
  }

  /** block-dirty-bitmap-merge of `srcName` from `src` (this set or another image's) into `dstName`. */
  async merge(dstName: string, src: Qcow2Bitmaps, srcName: string): Promise<void> {
    const dst = this.lookup(dstName);
    const s = src.lookup(srcName);
    Qcow2Bitmaps.usable(s, true);
    if (src.img.size !== this.img.size) {
      throw new BitmapError(`Bitmaps are of different sizes (destination size is ${this.img.size}, source size is ${src.img.size}) and can't be merged`);
    }
    Qcow2Bitmaps.usable(dst, false);
    const sd = await src.content(s);
    (await this.content(dst)).merge(sd);
  }

  // ---- storing ---------------------------------------------------------------------------------

  /**
   * Clean close (qcow2_store_persistent_dirty_bitmaps): write every loaded, consistent bitmap to
   * new clusters, switch the directory and header to them, then free the old clusters.
   */
  async store(): Promise<void> {
    // A read-only image stores nothing (a bitmap added to it is lost, as in QEMU).
    if (this.img.readOnly) return;
    const writable = this.mem.filter((b) => !b.inconsistent && !b.readOnly && b.data);
    if (writable.length === 0) return;
    const list: Array<BitmapEntry & { data?: DirtyBitmap }> = this.dir.map((e) => ({ ...e }));
    const drop: BitmapEntry[] = [];
    for (const b of writable) {
      const reason = this.cannotStore(b.name, 2 ** b.granularityBits);
      if (reason) throw new ImageError(`Bitmap '${b.name}' doesn't satisfy the constraints: ${reason}`);
      let e = list.find((x) => x.name === b.name);
      if (!e) {
        e = { name: b.name, tableOffset: 0, tableSize: 0, flags: 0, granularityBits: b.granularityBits };
        list.push(e);
      } else {
        if (!(e.flags & FLAG_IN_USE)) throw new ImageError(`Bitmap '${b.name}' already exists in the image`);
        drop.push({ ...e });
      }
      e.flags = b.enabled ? FLAG_AUTO : 0;
      e.granularityBits = b.granularityBits;
      e.data = b.data as DirtyBitmap;
    }
    if (list.length > MAX_BITMAPS) throw new ImageError('Too many persistent bitmaps');
    await this.img.meta.run(async () => {
      for (const e of list) {
        if (!e.data) continue;
        const t = await this.storeData(e.data);
        e.tableOffset = t.offset;
        e.tableSize = t.size;
      }
      await this.updateDirectory(list.map(({ data: _d, ...e }) => e));
      for (const t of drop) await this.freeBitmapClusters(t);
    });
  }

  /** Writes a bitmap's non-zero chunks to new clusters, then its table (store_bitmap). */
  private async storeData(bm: DirtyBitmap): Promise<{ offset: number; size: number }> {
    const cs = this.img.clusterSize;
    const offsets = new Array<number>(bm.nchunks).fill(0);
    for (let i = 0; i < bm.nchunks; i++) {
      const c = bm.serializeChunk(i);
      if (!c) continue;
      const off = await this.img.refcounts.alloc(1);
      await this.img.storage.write(Buffer.from(c.buffer, c.byteOffset, cs), off);
      offsets[i] = off;
    }
    const table = encodeBitmapTable(offsets);
    const tOff = await this.img.refcounts.alloc(Math.ceil(table.length / cs));
    await this.img.storage.write(table, tOff);
    return { offset: tOff, size: offsets.length };
  }

  /**
   * Writes a new directory (or none), points the header at it, then frees the old one
   * (update_ext_header_and_dir). Caller holds the metadata mutex.
   */
  private async updateDirectory(list: BitmapEntry[]): Promise<void> {
    const h = this.img.header;
    const cs = this.img.clusterSize;
    const old = this.ext;
    let next: { dirSize: number; dirOffset: number } | null = null;
    if (list.length) {
      const dir = serializeBitmapDirectory(list, cs, this.img.size);
      const off = await this.img.refcounts.alloc(Math.ceil(dir.length / cs));
      await this.img.storage.write(dir, off);
      await this.img.storage.flush();
      next = { dirSize: dir.length, dirOffset: off };
      h.autoclear |= BigInt(C.AUTOCLEAR_BITMAPS);
      h.bitmapsExt = encodeBitmapsExt({ nbBitmaps: list.length, ...next });
    } else {
      h.autoclear &= ~BigInt(C.AUTOCLEAR_BITMAPS);
      h.bitmapsExt = null;
    }
    await this.syncHeader();
    this.ext = next;
    this.dir = list.map((e) => ({ ...e }));
    if (old && old.dirSize > 0) await this.free(old.dirOffset, Math.ceil(old.dirSize / cs));
  }

  /**
   * Drops one reference from each of `n` clusters. A range holding a cluster without a reference
   * (a hostile table pointing anywhere) is left alone and reported, as qcow2_free_clusters does.
   * `discard`: QCOW2_DISCARD_ALWAYS (bitmap data), see Refcounts.free.
   */
  private async free(offset: number, n: number, discard = false): Promise<void> {
    const rc = this.img.refcounts;
    const first = offset / this.img.clusterSize;
    for (let i = first; i < first + n; i++) {
      const ti = Math.floor(i / rc.perBlock);
      const count = await rc.get(i).catch(() => 0);
      if (count === 0) {
        // QEMU first allocates a missing refcount block (EAGAIN), else finds the count at zero (EINVAL).
        this.log(`qcow2_free_clusters failed: ${ti >= rc.table.length || rc.table[ti] === 0 ? 'Resource temporarily unavailable' : 'Invalid argument'}`);
        return;
      }
    }
    await rc.free(offset, n, discard);
  }

  /** Frees a bitmap's data clusters and then its table (free_bitmap_clusters). */
  private async freeBitmapClusters(e: BitmapEntry): Promise<void> {
    const cs = this.img.clusterSize;
    const n = Math.ceil((await this.inFile(e.tableOffset, e.tableSize * 8)) / 8) * 8;
    const table = parseBitmapTable(await this.readBytes(e.tableOffset, n), cs, e.tableSize);
    if (!table) return;
    for (const v of table) if (v !== ENTRY_ZEROS && v !== ENTRY_ONES) await this.free(v, 1, true);
    await this.free(e.tableOffset, Math.ceil((e.tableSize * 8) / cs));
  }
}
