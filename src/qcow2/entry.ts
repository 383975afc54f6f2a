/**
 * Decoding and encoding of L1/L2 entries without BigInt: each u64 is handled as a high and a low
 * 32-bit word. Extended L2 entries carry a second u64 (the subcluster bitmap): low word = allocated
 * bits, high word = reads-as-zero bits.
 */
import { HI_COMPRESSED, HI_COPIED, HI_OFFSET_MASK, LO_OFFSET_MASK, LO_ZERO, TWO32 } from './constants.js';

export const enum ClusterType {
  Unallocated = 0,
  ZeroPlain = 1,
  ZeroAlloc = 2,
  Normal = 3,
  Compressed = 4,
}

export interface L2Entry {
  type: ClusterType;
  /** Cluster-aligned host offset (Normal/ZeroAlloc), or 0. */
  host: number;
  copied: boolean;
  /** Extended L2 bitmap words (0 for standard entries). */
  allocBits: number;
  zeroBits: number;
  /** Compressed: byte offset of the compressed data and its sector-rounded byte length. */
  cOffset: number;
  cLength: number;
  /** Raw words (for diagnostics). */
  hi: number;
  lo: number;
}

export interface EntryGeometry {
  clusterBits: number;
  extL2: boolean;
  /** v3 images have the zero flag; v2 do not. */
  zeroFlag: boolean;
}

/** Decode entry `i` of an L2 table. */
export function readL2(l2: Buffer, i: number, g: EntryGeometry): L2Entry {
  const off = g.extL2 ? i * 16 : i * 8;
  const hi = l2.readUInt32BE(off), lo = l2.readUInt32BE(off + 4);
  const allocBits = g.extL2 ? l2.readUInt32BE(off + 12) : 0;
  const zeroBits = g.extL2 ? l2.readUInt32BE(off + 8) : 0;
  const e: L2Entry = { type: ClusterType.Unallocated, host: 0, copied: (hi & HI_COPIED) !== 0, allocBits, zeroBits, cOffset: 0, cLength: 0, hi, lo };
  if (hi & HI_COMPRESSED) {
    // Descriptor: x = 62 - (cluster_bits - 8) offset bits, then the count of additional sectors.
    const x = 62 - (g.clusterBits - 8);
    const hiBits = x - 32;
    const offHi = hi & ((1 << hiBits) - 1);
    e.cOffset = offHi * TWO32 + (lo >>> 0);
    const sectors = ((hi & 0x3fffffff) >>> hiBits) + 1;
    e.cLength = sectors * 512 - (lo & 511); // the low bits of lo are the offset's (exact even past 2^53)
    e.type = ClusterType.Compressed;
    e.copied = false;
    return e;
  }
  e.host = (hi & HI_OFFSET_MASK) * TWO32 + ((lo & LO_OFFSET_MASK) >>> 0);
  if (!g.extL2 && g.zeroFlag && (lo & LO_ZERO)) e.type = e.host ? ClusterType.ZeroAlloc : ClusterType.ZeroPlain;
  else if (e.host) e.type = ClusterType.Normal;
  else if (g.extL2 && e.copied) e.type = ClusterType.Unallocated; // offset 0 without data file: unallocated
  return e;
}

/** Encode a standard/extended L2 entry for a plain host cluster (COPIED set). */
export function writeL2(l2: Buffer, i: number, g: EntryGeometry, host: number, flags: { copied: boolean; zero?: boolean; allocBits?: number; zeroBits?: number }): void {
  const off = g.extL2 ? i * 16 : i * 8;
  let hi = Math.floor(host / TWO32) & HI_OFFSET_MASK;
  if (flags.copied) hi |= HI_COPIED;
  let lo = (host >>> 0) & LO_OFFSET_MASK;
  if (flags.zero && !g.extL2) lo |= LO_ZERO;
  l2.writeUInt32BE(hi >>> 0, off);
  l2.writeUInt32BE(lo >>> 0, off + 4);
  if (g.extL2) {
    l2.writeUInt32BE((flags.zeroBits ?? 0) >>> 0, off + 8);
    l2.writeUInt32BE((flags.allocBits ?? 0) >>> 0, off + 12);
  }
}

/** Encode a compressed-cluster descriptor. */
export function writeCompressedL2(l2: Buffer, i: number, g: EntryGeometry, offset: number, byteLength: number): void {
  const off = g.extL2 ? i * 16 : i * 8;
  const x = 62 - (g.clusterBits - 8);
  const hiBits = x - 32;
  const sectors = Math.floor(((offset & 511) + byteLength - 1) / 512); // additional sectors
  const hi = (HI_COMPRESSED | (sectors << hiBits) | Math.floor(offset / TWO32)) >>> 0;
  l2.writeUInt32BE(hi, off);
  l2.writeUInt32BE(offset >>> 0, off + 4);
  if (g.extL2) l2.fill(0, off + 8, off + 16);
}

/** L1 entry: L2 table offset and COPIED flag. Reserved bits are masked off as QEMU does. */
export function readL1(l1raw: Buffer, i: number): { offset: number; copied: boolean; bad: boolean } {
  const hi = l1raw.readUInt32BE(i * 8), lo = l1raw.readUInt32BE(i * 8 + 4);
  return { offset: (hi & HI_OFFSET_MASK) * TWO32 + ((lo & LO_OFFSET_MASK) >>> 0), copied: (hi & HI_COPIED) !== 0, bad: false };
}

export function encodeU64(buf: Buffer, at: number, value: number, copied = false): void {
  buf.writeUInt32BE(((Math.floor(value / TWO32) & 0x7fffffff) | (copied ? HI_COPIED : 0)) >>> 0, at);
  buf.writeUInt32BE(value >>> 0, at + 4);
}

/** Whether the entry holds host clusters to release (a data, preallocated-zero or compressed one). */
export function hasClusters(e: L2Entry): boolean {
  return e.type === ClusterType.Compressed || e.host !== 0;
}
