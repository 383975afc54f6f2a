/**
 * Hostile-input crafting for tests: build a small valid qcow2 with the real qemu-img, then patch
 * header fields, table entries and header extensions in place (all integers big-endian, offsets
 * from docs/interop/qcow2.txt). Also helpers for truncated, empty, garbage and unreadable files,
 * backing loops and missing backing files.
 *
 * Every function works on a file path synchronously so a test can set up a case in a few lines.
 */
import fs from 'node:fs';
import path from 'node:path';
import { qemuImgSync, qemuIoSync, rng } from './qemu.js';

/** Byte offsets of the qcow2 header fields (§1.1). */
export const HDR = {
  magic: 0,
  version: 4,
  backingFileOffset: 8, // u64
  backingFileSize: 16,
  clusterBits: 20,
  size: 24, // u64
  cryptMethod: 32,
  l1Size: 36,
  l1TableOffset: 40, // u64
  refcountTableOffset: 48, // u64
  refcountTableClusters: 56,
  nbSnapshots: 60,
  snapshotsOffset: 64, // u64
  incompatible: 72, // u64
  compatible: 80, // u64
  autoclear: 88, // u64
  refcountOrder: 96,
  headerLength: 100,
  compressionType: 104, // u8
} as const;

export type HeaderField = keyof typeof HDR;

/** Width in bytes of each header field. */
export const HDR_WIDTH: Record<HeaderField, 1 | 4 | 8> = {
  magic: 4, version: 4, backingFileOffset: 8, backingFileSize: 4, clusterBits: 4, size: 8,
  cryptMethod: 4, l1Size: 4, l1TableOffset: 8, refcountTableOffset: 8, refcountTableClusters: 4,
  nbSnapshots: 4, snapshotsOffset: 8, incompatible: 8, compatible: 8, autoclear: 8,
  refcountOrder: 4, headerLength: 4, compressionType: 1,
};

/** Header extension magics (§1.3). */
export const EXT = {
  end: 0x00000000,
  backingFormat: 0xe2792aca,
  featureTable: 0x6803f857,
  bitmaps: 0x23852875,
  crypto: 0x0537be77,
  dataFile: 0x44415441,
} as const;

export interface CreateOptions {
  /** Virtual size as given to qemu-img (default "1M"). */
  size?: string;
  /** `-o` option string, e.g. "cluster_size=4096,compat=0.10". */
  options?: string;
  /** Backing file name and format (`-b` / `-F`, created with `-u`). */
  backing?: string;
  backingFmt?: string;
  /** qemu-io commands run on the new image (e.g. "write -P 0xaa 0 64k") so L2/data clusters exist. */
  writes?: string[];
}

/** Create a valid qcow2 with qemu-img (quiet) and return its path. */
export function makeQcow2(dir: string, name: string, o: CreateOptions = {}): string {
  const file = path.join(dir, name);
  const args = ['create', '-q', '-f', 'qcow2'];
  if (o.options) args.push('-o', o.options);
  if (o.backing !== undefined) args.push('-u', '-b', o.backing, '-F', o.backingFmt ?? 'qcow2');
  args.push(file);
  args.push(o.size ?? '1M');
  qemuImgSync(args);
  for (const w of o.writes ?? []) qemuIoSync(['-f', 'qcow2', '-c', w, file]);
  return file;
}

/** Copy a file to a new name in the same folder (handy for deriving many cases from one image). */
export function copyImage(src: string, name: string): string {
  const dst = path.join(path.dirname(src), name);
  fs.copyFileSync(src, dst);
  return dst;
}

/** Overwrite `data` at `offset` (the file grows if needed). */
export function patchBytes(file: string, offset: number, data: Buffer): void {
  const fd = fs.openSync(file, 'r+');
  try {
    fs.writeSync(fd, data, 0, data.length, offset);
  } finally {
    fs.closeSync(fd);
  }
}

export function readBytes(file: string, offset: number, length: number): Buffer {
  const fd = fs.openSync(file, 'r');
  try {
    const b = Buffer.alloc(length);
    const n = fs.readSync(fd, b, 0, length, offset);
    return b.subarray(0, n);
  } finally {
    fs.closeSync(fd);
  }
}

export function beU8(v: number): Buffer {
  return Buffer.from([v & 0xff]);
}

export function beU32(v: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(v >>> 0, 0);
  return b;
}

export function beU64(v: bigint | number): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(BigInt.asUintN(64, BigInt(v)), 0);
  return b;
}

export function patchU8(file: string, offset: number, v: number): void {
  patchBytes(file, offset, beU8(v));
}

export function patchU32(file: string, offset: number, v: number): void {
  patchBytes(file, offset, beU32(v));
}

export function patchU64(file: string, offset: number, v: bigint | number): void {
  patchBytes(file, offset, beU64(v));
}

export function readU32(file: string, offset: number): number {
  return readBytes(file, offset, 4).readUInt32BE(0);
}

export function readU64(file: string, offset: number): bigint {
  return readBytes(file, offset, 8).readBigUInt64BE(0);
}

/** Set one header field to `value`, using the field's width. */
export function setHeaderField(file: string, field: HeaderField, value: bigint | number): void {
  const off = HDR[field];
  switch (HDR_WIDTH[field]) {
    case 1: patchU8(file, off, Number(value)); break;
    case 4: patchU32(file, off, Number(value)); break;
    case 8: patchU64(file, off, value); break;
  }
}

/** Set several header fields at once. */
export function patchHeader(file: string, fields: Partial<Record<HeaderField, bigint | number>>): void {
  for (const [k, v] of Object.entries(fields)) setHeaderField(file, k as HeaderField, v as bigint | number);
}

export interface HeaderInfo {
  version: number;
  clusterBits: number;
  clusterSize: number;
  size: bigint;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  nbSnapshots: number;
  snapshotsOffset: number;
  headerLength: number;
  backingFileOffset: number;
  backingFileSize: number;
}

/** The header fields the crafting helpers need (trusted: only used on images qemu-img made). */
export function readHeader(file: string): HeaderInfo {
  const b = readBytes(file, 0, 112);
  const version = b.readUInt32BE(4);
  const clusterBits = b.readUInt32BE(20);
  return {
    version,
    clusterBits,
    clusterSize: 2 ** clusterBits,
    size: b.readBigUInt64BE(24),
    l1Size: b.readUInt32BE(36),
    l1TableOffset: Number(b.readBigUInt64BE(40)),
    refcountTableOffset: Number(b.readBigUInt64BE(48)),
    refcountTableClusters: b.readUInt32BE(56),
    nbSnapshots: b.readUInt32BE(60),
    snapshotsOffset: Number(b.readBigUInt64BE(64)),
    headerLength: version >= 3 ? b.readUInt32BE(100) : 72,
    backingFileOffset: Number(b.readBigUInt64BE(8)),
    backingFileSize: b.readUInt32BE(16),
  };
}

/** Read / write L1 entry `index`. */
export function getL1Entry(file: string, index: number): bigint {
  return readU64(file, readHeader(file).l1TableOffset + index * 8);
}

export function setL1Entry(file: string, index: number, value: bigint | number): void {
  patchU64(file, readHeader(file).l1TableOffset + index * 8, value);
}

const OFFSET_MASK = 0x00fffffffffffe00n;

/** Write L2 entry `l2Index` of the L2 table that L1 entry `l1Index` points at (which must exist). */
export function setL2Entry(file: string, l1Index: number, l2Index: number, value: bigint | number, entryBytes = 8): void {
  const l2 = Number(getL1Entry(file, l1Index) & OFFSET_MASK);
  if (l2 === 0) throw new Error(`craft: L1[${l1Index}] has no L2 table`);
  patchU64(file, l2 + l2Index * entryBytes, value);
}

export function getL2Entry(file: string, l1Index: number, l2Index: number, entryBytes = 8): bigint {
  const l2 = Number(getL1Entry(file, l1Index) & OFFSET_MASK);
  if (l2 === 0) throw new Error(`craft: L1[${l1Index}] has no L2 table`);
  return readU64(file, l2 + l2Index * entryBytes);
}

/** Read / write refcount table entry `index`. */
export function getRefcountTableEntry(file: string, index: number): bigint {
  return readU64(file, readHeader(file).refcountTableOffset + index * 8);
}

export function setRefcountTableEntry(file: string, index: number, value: bigint | number): void {
  patchU64(file, readHeader(file).refcountTableOffset + index * 8, value);
}

export interface RawExtension {
  type: number;
  data: Buffer;
  /** Length written in the extension header; defaults to data.length (set larger to make it cross the area). */
  len?: number;
}

/**
 * Replace the header extension area (from header_length to the end marker) with `exts`, each padded
 * to 8 bytes, followed by an end marker unless `noEnd`. The rest of cluster 0 up to
 * `backing_file_offset` (or up to `clearTo` bytes) is zeroed first. Meant for images without a
 * backing file (the backing name would be overwritten otherwise).
 */
export function writeExtensions(file: string, exts: RawExtension[], o: { noEnd?: boolean } = {}): void {
  const h = readHeader(file);
  const areaEnd = h.backingFileOffset !== 0 ? h.backingFileOffset : h.clusterSize;
  const parts: Buffer[] = [];
  for (const e of exts) {
    const head = Buffer.alloc(8);
    head.writeUInt32BE(e.type >>> 0, 0);
    head.writeUInt32BE((e.len ?? e.data.length) >>> 0, 4);
    parts.push(head, e.data, Buffer.alloc((8 - (e.data.length % 8)) % 8));
  }
  if (!o.noEnd) parts.push(Buffer.alloc(8));
  const area = Buffer.concat(parts);
  if (h.headerLength + area.length > areaEnd) throw new Error('craft: extensions do not fit');
  patchBytes(file, h.headerLength, Buffer.alloc(areaEnd - h.headerLength));
  patchBytes(file, h.headerLength, area);
}

/** The feature-name-table extension QEMU writes (kept so the image stays as QEMU would write it). */
export function featureTableExt(file: string): RawExtension | null {
  const h = readHeader(file);
  let off = h.headerLength;
  const end = h.backingFileOffset !== 0 ? h.backingFileOffset : h.clusterSize;
  const buf = readBytes(file, 0, end);
  while (off + 8 <= end) {
    const type = buf.readUInt32BE(off);
    const len = buf.readUInt32BE(off + 4);
    if (type === 0) return null;
    if (type === EXT.featureTable) return { type, data: Buffer.from(buf.subarray(off + 8, off + 8 + len)) };
    off += 8 + Math.ceil(len / 8) * 8;
  }
  return null;
}

/** Truncate (or extend with zeros) a file to `length` bytes. */
export function truncateFile(file: string, length: number): void {
  fs.truncateSync(file, length);
}

/** An empty file. */
export function emptyFile(dir: string, name: string): string {
  const f = path.join(dir, name);
  fs.writeFileSync(f, Buffer.alloc(0));
  return f;
}

/** A file of seeded pseudo-random bytes (never starting with the qcow2 magic). */
export function garbageFile(dir: string, name: string, size: number, seed = 1): string {
  const r = rng(seed);
  const b = Buffer.alloc(size);
  for (let i = 0; i < size; i++) b[i] = Math.floor(r() * 256);
  if (b.readUInt32BE(0) === 0x514649fb) b[0] ^= 0xff;
  const f = path.join(dir, name);
  fs.writeFileSync(f, b);
  return f;
}

/** A file that starts with the qcow2 magic followed by `size - 4` pseudo-random bytes. */
export function garbageWithMagic(dir: string, name: string, size: number, seed = 2): string {
  const f = garbageFile(dir, name, size, seed);
  patchU32(f, 0, 0x514649fb);
  return f;
}

/** A directory where an image is expected. */
export function directoryInstead(dir: string, name: string): string {
  const d = path.join(dir, name);
  fs.mkdirSync(d, { recursive: true });
  return d;
}

/**
 * A qcow2 image made unreadable with chmod 000. Returns `null` when the process can still read it
 * (running as root, or a file system that ignores modes), so the caller can skip exactly that case.
 */
export function unreadableFile(dir: string, name: string): string | null {
  const f = makeQcow2(dir, name);
  fs.chmodSync(f, 0o000);
  try {
    fs.closeSync(fs.openSync(f, 'r'));
    return null; // still readable (root / CAP_DAC_OVERRIDE)
  } catch {
    return f;
  }
}

/**
 * Two overlays that name each other as backing file: a → b → a (made with `rebase -u -b`).
 * Returns [a, b].
 */
export function backingLoop(dir: string, nameA = 'loopA.qcow2', nameB = 'loopB.qcow2'): [string, string] {
  const a = makeQcow2(dir, nameA);
  const b = makeQcow2(dir, nameB, { backing: nameA });
  qemuImgSync(['rebase', '-q', '-u', '-f', 'qcow2', '-b', nameB, '-F', 'qcow2', a]);
  return [a, b];
}

/** A self loop: a → a (rebase -u onto its own name). */
export function selfLoop(dir: string, name = 'self.qcow2'): string {
  const a = makeQcow2(dir, name);
  qemuImgSync(['rebase', '-q', '-u', '-f', 'qcow2', '-b', name, '-F', 'qcow2', a]);
  return a;
}

/** An overlay whose backing file does not exist. */
export function missingBacking(dir: string, name = 'orphan.qcow2', backing = 'does-not-exist.qcow2'): string {
  return makeQcow2(dir, name, { backing });
}
