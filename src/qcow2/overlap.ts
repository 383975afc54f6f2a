/**
 * QEMU 7.2's metadata overlap check (qcow2_check_metadata_overlap with the default
 * overlap-check=cached): before metadata is written, the range must not touch other metadata.
 * The first structure hit, in QEMU's order, names the corruption.
 */
import type { Qcow2Image } from './image.js';
import { TWO32, AUTOCLEAR_BITMAPS } from './constants.js';

export type OverlapKind = 'qcow2_header' | 'active L1 table' | 'refcount table' | 'snapshot table' |
  'inactive L1 table' | 'active L2 table' | 'refcount block' | 'bitmap directory';

/**
 * The metadata structure [offset, offset+size) overlaps, or null. `snapshotsSize` is the bytes of
 * the snapshot table (QEMU's snapshots_size); `ignore` lists structures not checked.
 */
export function metadataOverlap(img: Qcow2Image, offset: number, size: number, snapshotsSize: number,
  ignore: readonly OverlapKind[] = []): OverlapKind | null {
  if (size <= 0) return null;
  const cs = img.clusterSize;
  const on = (k: OverlapKind): boolean => !ignore.includes(k);
  if (on('qcow2_header') && offset < cs) return 'qcow2_header';
  // Whole clusters, as QEMU aligns the range.
  const start = Math.floor(offset / cs) * cs;
  const end = Math.ceil((offset + size) / cs) * cs;
  const hits = (o: number, len: number): boolean => len > 0 && o < end && start < o + len;
  const h = img.header;
  if (on('active L1 table') && h.l1Size && hits(h.l1TableOffset, h.l1Size * 8)) return 'active L1 table';
  const rc = img.refcounts;
  if (on('refcount table') && rc.table.length && hits(rc.tableOffset, rc.table.length * 8)) return 'refcount table';
  if (on('snapshot table') && snapshotsSize && hits(h.snapshotsOffset, snapshotsSize)) return 'snapshot table';
  if (on('inactive L1 table')) {
    for (const sn of img.snapshots) if (sn.l1Size && hits(sn.l1TableOffset, sn.l1Size * 8)) return 'inactive L1 table';
  }
  if (on('active L2 table')) {
    for (let i = 0; i < h.l1Size; i++) {
      const o = (img.l1.readUInt32BE(i * 8) & 0x00ffffff) * TWO32 + ((img.l1.readUInt32BE(i * 8 + 4) & 0xfffffe00) >>> 0);
      if (o && hits(o, cs)) return 'active L2 table';
    }
  }
  if (on('refcount block')) {
    for (const bo of rc.table) if (bo > 0 && hits(bo, cs)) return 'refcount block';
  }
  if (on('bitmap directory') && (h.autoclear & BigInt(AUTOCLEAR_BITMAPS)) !== 0n) {
    // No extension: QEMU's directory is (0, 0), a range whose last byte wraps to 2^64 - 1, so
    // every range reaching this far overlaps it.
    if (!h.bitmapsExt) return 'bitmap directory';
    const ext = h.bitmapsExt;
    const dirSize = ext.readUInt32BE(8) * TWO32 + ext.readUInt32BE(12);
    const dirOff = ext.readUInt32BE(16) * TWO32 + ext.readUInt32BE(20);
    if (hits(dirOff, dirSize)) return 'bitmap directory';
  }
  return null;
}

/** QEMU's qcow2_pre_write_overlap_check: an overlap signals the corruption and fails (EIO). */
export async function preWriteOverlapCheck(img: Qcow2Image, offset: number, size: number, snapshotsSize: number,
  ignore: readonly OverlapKind[] = []): Promise<void> {
  const hit = metadataOverlap(img, offset, size, snapshotsSize, ignore);
  if (hit) await img.signalCorruption(`Preventing invalid write on metadata (overlaps with ${hit})`);
}
