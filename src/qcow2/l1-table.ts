/**
 * Growing the active L1 table and the virtual size (QEMU's qcow2_grow_l1_table with exact size,
 * and the header part of a grow-truncate). Order: the new table is written completely, then the
 * header switches to it (size and offset in one write), then the old table's clusters are freed.
 */
import type { Qcow2Image } from './image.js';
import { ImageError } from '../image/errors.js';
import { MAX_L1_SIZE, TWO32 } from './constants.js';

/** L1 entries needed for a virtual size. */
export function l1EntriesFor(img: Qcow2Image, size: number): number {
  return Math.ceil(size / img.l2Coverage);
}

/**
 * Make the active L1 table hold at least `minEntries` entries (exactly that many when it grows).
 * Used by resize and snapshot apply; the caller holds the metadata mutex.
 */
export async function growL1Table(img: Qcow2Image, minEntries: number): Promise<void> {
  const h = img.header;
  const cs = img.clusterSize;
  if (minEntries <= h.l1Size) return;
  if (minEntries * 8 > MAX_L1_SIZE) throw new ImageError('File too large', 'EFBIG');
  const bytes = minEntries * 8;
  const clusters = Math.ceil(bytes / cs);
  const newOff = await img.refcounts.alloc(clusters);
  await img.checkOverlap(newOff, clusters);
  const table = Buffer.alloc(bytes);
  img.l1.copy(table, 0, 0, h.l1Size * 8);
  await img.storage.write(table, newOff);
  await img.storage.flush();
  const hdr = Buffer.alloc(12);
  hdr.writeUInt32BE(minEntries, 0);
  hdr.writeUInt32BE(Math.floor(newOff / TWO32), 4);
  hdr.writeUInt32BE(newOff >>> 0, 8);
  await img.storage.write(hdr, 36);
  await img.storage.flush();
  const oldOff = h.l1TableOffset, oldSize = h.l1Size;
  h.l1Size = minEntries;
  h.l1TableOffset = newOff;
  img.l1 = table;
  if (oldSize) await img.refcounts.free(oldOff, Math.ceil((oldSize * 8) / cs));
}

/** Write a new virtual size into the header (the caller has made the L1 table big enough). */
export async function writeVirtualSize(img: Qcow2Image, size: number): Promise<void> {
  const b = Buffer.alloc(8);
  b.writeUInt32BE(Math.floor(size / TWO32), 0);
  b.writeUInt32BE(size >>> 0, 4);
  await img.storage.write(b, 24);
  await img.storage.flush();
  img.header.size = size;
}
