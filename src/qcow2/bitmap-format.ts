/**
 * On-disk structures of persistent dirty bitmaps (qcow2 spec "Bitmaps extension", "Bitmap
 * directory", "Bitmap table"): parsing with QEMU 7.2's limits and messages, and serialisation.
 * Nothing here does I/O; sizes are validated before any buffer is sized from them.
 */
import { ImageError } from '../image/errors.js';
import { TWO32 } from './constants.js';

export const MAX_BITMAPS = 65535; // QCOW2_MAX_BITMAPS
export const MAX_DIRECTORY_SIZE = 1024 * MAX_BITMAPS; // QCOW2_MAX_BITMAP_DIRECTORY_SIZE
export const MAX_TABLE_SIZE = 0x8000000; // BME_MAX_TABLE_SIZE (entries)
export const MAX_PHYS_SIZE = 0x20000000; // BME_MAX_PHYS_SIZE (bytes of bitmap data)
export const MIN_GRANULARITY_BITS = 9;
export const MAX_GRANULARITY_BITS = 31;
export const MAX_NAME_SIZE = 1023;
export const FLAG_IN_USE = 1;
export const FLAG_AUTO = 2;
export const RESERVED_FLAGS = 0xfffffffc;
const DIR_ENTRY_HEADER = 24;
const TYPE_DIRTY_TRACKING = 1;

/** The 24-byte bitmaps header extension. */
export interface BitmapsExt {
  nbBitmaps: number;
  dirSize: number;
  dirOffset: number;
}

/** One bitmap directory entry (extra data is refused, as QEMU does). */
export interface BitmapEntry {
  name: string;
  /** The name's bytes as found on disk (kept so a rewrite preserves names that are not UTF-8). */
  nameBytes?: Buffer;
  tableOffset: number;
  tableSize: number;
  flags: number;
  granularityBits: number;
}

/** Validates the extension payload (only read when the autoclear bit says it is valid). */
export function parseBitmapsExt(data: Buffer, clusterSize: number): BitmapsExt {
  if (data.readUInt32BE(4) !== 0) throw new ImageError('bitmaps_ext: Reserved field is not zero');
  const nbBitmaps = data.readUInt32BE(0);
  const dirSizeBig = data.readBigUInt64BE(8);
  const dirOffsetBig = data.readBigUInt64BE(16);
  if (nbBitmaps > MAX_BITMAPS) {
    throw new ImageError(`bitmaps_ext: Image has ${nbBitmaps} bitmaps, exceeding the QEMU supported maximum of ${MAX_BITMAPS}`);
  }
  if (nbBitmaps === 0) throw new ImageError('found bitmaps extension with zero bitmaps');
  if (dirOffsetBig % BigInt(clusterSize) !== 0n) throw new ImageError('bitmaps_ext: invalid bitmap directory offset');
  if (dirSizeBig > BigInt(MAX_DIRECTORY_SIZE)) {
    throw new ImageError(`bitmaps_ext: bitmap directory size (${dirSizeBig}) exceeds the maximum supported size (${MAX_DIRECTORY_SIZE})`);
  }
  // Offsets past 2^53 lose precision here; such a directory lies past the end of any file and reads as zeros.
  return { nbBitmaps, dirSize: Number(dirSizeBig), dirOffset: Number(dirOffsetBig) };
}

export function encodeBitmapsExt(e: BitmapsExt): Buffer {
  const b = Buffer.alloc(24);
  b.writeUInt32BE(e.nbBitmaps, 0);
  b.writeBigUInt64BE(BigInt(e.dirSize), 8);
  b.writeBigUInt64BE(BigInt(e.dirOffset), 16);
  return b;
}

/** Size of a directory entry: header, name, padded to 8 bytes. */
export function dirEntrySize(nameBytes: number, extra = 0): number {
  return Math.ceil((DIR_ENTRY_HEADER + nameBytes + extra) / 8) * 8;
}

/**
 * QEMU's check_dir_entry: table present and aligned, sizes and granularity in range, known flags
 * and type, and (unless in use) a table big enough for the image.
 */
function entryValid(e: { tableOffset: number; tableSize: number; flags: number; type: number; granularityBits: number; nameSize: number }, clusterSize: number, imageSize: number): boolean {
  if (e.tableSize === 0 || e.tableOffset === 0 || e.tableOffset % clusterSize !== 0 || e.tableSize > MAX_TABLE_SIZE ||
    e.granularityBits > MAX_GRANULARITY_BITS || e.granularityBits < MIN_GRANULARITY_BITS ||
    (e.flags & RESERVED_FLAGS) !== 0 || e.nameSize > MAX_NAME_SIZE || e.type !== TYPE_DIRTY_TRACKING) return false;
  const phys = e.tableSize * clusterSize;
  if (phys > MAX_PHYS_SIZE) return false;
  // Bits the table can hold times the granularity: exact in doubles (a power-of-two product).
  if ((e.flags & FLAG_IN_USE) === 0 && imageSize > phys * 8 * 2 ** e.granularityBits) return false;
  return true;
}

/** Parses and validates the directory (bitmap_list_load), with QEMU's messages. */
export function parseBitmapDirectory(dir: Buffer, nbBitmaps: number, clusterSize: number, imageSize: number): BitmapEntry[] {
  if (dir.length === 0) throw new ImageError('Requested bitmap directory size is zero');
  const out: BitmapEntry[] = [];
  const broken = (): ImageError => new ImageError('Broken bitmap directory');
  let off = 0;
  while (off < dir.length) {
    if (off + DIR_ENTRY_HEADER > dir.length) throw broken();
    if (out.length + 1 > nbBitmaps) throw new ImageError('More bitmaps found than specified in header extension');
    const tableOffset = (dir.readUInt32BE(off) * TWO32) + dir.readUInt32BE(off + 4);
    const tableSize = dir.readUInt32BE(off + 8);
    const flags = dir.readUInt32BE(off + 12);
    const type = dir[off + 16];
    const granularityBits = dir[off + 17];
    const nameSize = dir.readUInt16BE(off + 18);
    const extra = dir.readUInt32BE(off + 20);
    // QEMU computes the entry size in a C int: a huge extra_data_size wraps around (and a
    // negative size points backwards), so such entries fail on the extra data, not the bounds.
    const wrapped = (DIR_ENTRY_HEADER + nameSize + extra) | 0;
    if (wrapped > 0 && off + Math.ceil(wrapped / 8) * 8 > dir.length) throw broken();
    const size = dirEntrySize(nameSize, extra);
    if (extra !== 0) throw new ImageError('Bitmap extra data is not supported');
    const raw = dir.subarray(off + DIR_ENTRY_HEADER, off + DIR_ENTRY_HEADER + nameSize);
    const nul = raw.indexOf(0);
    const name = raw.toString('utf8', 0, nul < 0 ? raw.length : nul);
    if (!entryValid({ tableOffset, tableSize, flags, type, granularityBits, nameSize }, clusterSize, imageSize)) {
      throw new ImageError(`Bitmap '${name}' doesn't satisfy the constraints`);
    }
    out.push({ name, nameBytes: Buffer.from(raw), tableOffset, tableSize, flags, granularityBits });
    off += size;
  }
  if (out.length !== nbBitmaps) throw new ImageError('Less bitmaps found than specified in header extension');
  return out;
}

/** Serialises a directory (bitmap_list_store); entries must satisfy the same constraints. */
export function serializeBitmapDirectory(entries: BitmapEntry[], clusterSize: number, imageSize: number): Buffer {
  const names = entries.map((e) => e.nameBytes ?? Buffer.from(e.name, 'utf8'));
  const size = names.reduce((a, n) => a + dirEntrySize(n.length), 0);
  if (size === 0 || size > MAX_DIRECTORY_SIZE) throw new ImageError('Bitmap directory is too large');
  const dir = Buffer.alloc(size);
  let off = 0;
  entries.forEach((e, i) => {
    const n = names[i];
    if (!entryValid({ ...e, type: TYPE_DIRTY_TRACKING, nameSize: n.length }, clusterSize, imageSize)) {
      throw new ImageError(`Bitmap '${e.name}' doesn't satisfy the constraints`);
    }
    dir.writeUInt32BE(Math.floor(e.tableOffset / TWO32), off);
    dir.writeUInt32BE(e.tableOffset >>> 0, off + 4);
    dir.writeUInt32BE(e.tableSize, off + 8);
    dir.writeUInt32BE(e.flags >>> 0, off + 12);
    dir[off + 16] = TYPE_DIRTY_TRACKING;
    dir[off + 17] = e.granularityBits;
    dir.writeUInt16BE(n.length, off + 18);
    n.copy(dir, off + DIR_ENTRY_HEADER);
    off += dirEntrySize(n.length);
  });
  return dir;
}

/** Decoded table entry values without a data cluster (data entries hold the cluster-aligned offset). */
export const ENTRY_ZEROS = 0;
export const ENTRY_ONES = 1;

/**
 * Decodes a bitmap table into data-cluster offsets, ENTRY_ZEROS or ENTRY_ONES; any entry with
 * reserved bits, an unaligned offset, or the all-ones bit next to an offset makes the whole table
 * invalid (QEMU's check_table_entry: EINVAL) and yields null.
 */
export function parseBitmapTable(buf: Buffer, clusterSize: number, entries = buf.length / 8): Float64Array | null {
  // Entries past `buf` (past the end of the file) read as zero: valid, all-zero clusters.
  const n = Math.min(entries, Math.floor(buf.length / 8));
  const out = new Float64Array(entries);
  for (let i = 0; i < n; i++) {
    const hi = buf.readUInt32BE(i * 8), lo = buf.readUInt32BE(i * 8 + 4);
    // Reserved: bits 56..63 and 1..8 (mask 0xff000000000001fe).
    if ((hi & 0xff000000) !== 0 || (lo & 0x1fe) !== 0) return null;
    const offset = (hi & 0x00ffffff) * TWO32 + ((lo & 0xfffffe00) >>> 0);
    if (offset !== 0) {
      if ((lo & 1) !== 0 || offset % clusterSize !== 0) return null;
      out[i] = offset;
    } else {
      out[i] = (lo & 1) !== 0 ? ENTRY_ONES : ENTRY_ZEROS;
    }
  }
  return out;
}

/** Encodes a bitmap table from data-cluster offsets (0 = all zeros, as QEMU writes it). */
export function encodeBitmapTable(offsets: number[]): Buffer {
  const b = Buffer.alloc(offsets.length * 8);
  offsets.forEach((o, i) => {
    if (!o) return;
    b.writeUInt32BE(Math.floor(o / TWO32), i * 8);
    b.writeUInt32BE(o >>> 0, i * 8 + 4);
  });
  return b;
}

/** Table entries needed for a bitmap of `imageSize` bytes at 2^granularityBits (load_bitmap_data's tab_size). */
export function tableSizeFor(imageSize: number, granularityBits: number, clusterSize: number): number {
  const bits = Math.ceil(imageSize / 2 ** granularityBits);
  const bytes = Math.ceil(bits / 64) * 8; // serialised in 64-bit words
  return Math.ceil(bytes / clusterSize);
}
