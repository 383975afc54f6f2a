/**
 * qcow2 resize, following qcow2_co_truncate (QEMU 7.2).
 *
 * Grow: the L1 table is enlarged to exactly cover the new size (qcow2_grow_l1_table: a new
 * table is allocated and written, then the header is switched to it, then the old one is
 * freed). When the backing file is longer than the old size, the new area is zeroed (zero
 * clusters), so the backing data beyond the old end does not show through; v2 images cannot
 * do that and fail as QEMU does. Preallocation allocates the new clusters.
 *
 * Shrink: clusters from the first whole cluster past the new end are discarded (L2 entries
 * cleared first, then their clusters freed); L1 entries past the new end are zeroed on disk
 * and their L2 tables freed (the header's l1_size stays, as in QEMU); refcount blocks that
 * count only themselves are unhooked; the file is cut after the last used cluster.
 *
 * The new size goes into the header last, so a crash before leaves the old size with, at
 * worst, leaked clusters.
 */
import type { ResizeOptions } from '../image/driver.js';
import { ImageError } from '../image/errors.js';
import { ClusterType, hasClusters, readL1, readL2, writeL2, type L2Entry } from './entry.js';
import type { Qcow2Image } from './image.js';
import { growL1Table, writeVirtualSize } from './l1-table.js';
import { MAX_L1_SIZE } from './constants.js';
import { Qcow2Bitmaps } from './bitmaps.js';
import { preallocateMetadata } from './preallocate.js';

export async function resizeQcow2(img: Qcow2Image, size: number, opts: ResizeOptions = {}): Promise<void> {
  await img.flushMetadata();
  const prealloc = opts.preallocation ?? 'off';
  if (img.readOnly) throw new ImageError('Permission denied', 'EACCES');
  if (!Number.isSafeInteger(size) || size < 0) throw new ImageError('Failed to grow the L1 table: File too large', 'EFBIG');
  if (size % 512 !== 0) throw new ImageError('The new size must be a multiple of 512', 'EINVAL');
  if (img.snapshots.length > 0 && img.version < 3) {
    throw new ImageError("Can't resize a v2 image which has snapshots", 'ENOTSUP');
  }
  // qcow2_truncate_bitmaps_check: an inconsistent (in-use) bitmap cannot follow the new size.
  for (const b of img.bitmaps?.list() ?? []) Qcow2Bitmaps.usable(b, true);
  const old = img.size;
  if (size < old && !opts.shrink) throw new ImageError('Use the --shrink option to perform a shrink operation.', 'EINVAL');
  const newL1 = Math.ceil(size / img.l2Coverage);
  if (size < old) {
    if (prealloc !== 'off') throw new ImageError("Preallocation can't be used for shrinking an image", 'EINVAL');
    await shrink(img, size, newL1);
  } else {
    await growL1(img, newL1);
    // The block layer asks for zeroes when the backing file would show through the new area.
    const zeroWrite = size > old && (img.backing?.size ?? 0) > old;
    if (prealloc === 'metadata') await preallocateMetadata(img, old, size);
    else if (prealloc !== 'off') await preallocateArea(img, old, size, zeroWrite);
    // falloc/full: the new area already reads as zeroes (the file grew, BDRV_REQ_ZERO_WRITE).
    if (zeroWrite && (prealloc === 'off' || prealloc === 'metadata')) {
      if (img.version < 3) throw new ImageError('Failed to zero out new clusters: Operation not supported', 'ENOTSUP');
      img.header.size = size;
      try {
        await img.writeZeroes(old, size - old);
      } catch (e) {
        img.header.size = old;
        throw e;
      }
    }
  }
  await img.flush();
  await writeVirtualSize(img, size);
  img.bitmaps?.resized(size);
  img.lastCompressed = null;
}

/** qcow2_grow_l1_table(exact), with qcow2_co_truncate's message for a table too large. */
async function growL1(img: Qcow2Image, entries: number): Promise<void> {
  if (entries <= img.header.l1Size) return;
  if (entries * 8 > MAX_L1_SIZE) throw new ImageError('Failed to grow the L1 table: File too large', 'EFBIG');
  await img.meta.run(() => growL1Table(img, entries));
}

/** Discard everything past the new end, drop L2 tables past it, unhook empty refcount blocks, cut the file. */
async function shrink(img: Qcow2Image, size: number, newL1: number): Promise<void> {
  const cs = img.clusterSize;
  const from = Math.ceil(size / cs) * cs;
  // The L2 table holding the new end keeps its table; its entries past the end are cleared.
  // (QEMU's discard allocates that table if it was missing; we do the same, for the same layout.)
  if (from < img.size && from % img.l2Coverage !== 0) {
    const l1i = Math.floor(from / img.l2Coverage);
    if (l1i < img.header.l1Size) await clearEntries(img, l1i, from, Math.min(img.size, (l1i + 1) * img.l2Coverage));
  }
  await img.meta.run(async () => {
    const h = img.header;
    if (newL1 < h.l1Size) {
      // L1 entries first (on disk), then the references they held.
      await img.storage.write(Buffer.alloc((h.l1Size - newL1) * 8), h.l1TableOffset + newL1 * 8);
      await img.storage.flush();
    }
    for (let i = h.l1Size - 1; i >= newL1; i--) {
      const e = readL1(img.l1, i);
      img.l1.fill(0, i * 8, i * 8 + 8);
      if (!e.offset) continue;
      // Whether or not the table is shared with a snapshot, the active view held one reference
      // to it and one to each cluster it maps.
      const table = Buffer.from(await img.l2.pin(e.offset));
      img.l2.unpin(e.offset);
      img.l2.forget(e.offset);
      for (let k = 0; k < img.l2Entries; k++) {
        const x = readL2(table, k, img.geo);
        if (hasClusters(x)) await img.freeEntryClusters(x, true);
      }
      await img.refcounts.free(e.offset, 1, true);
    }
    await img.refcounts.dropUnusedBlocks();
    const fileSize = await img.storage.size();
    const last = await img.refcounts.lastUsedCluster(Math.ceil(fileSize / cs));
    if (last >= 0 && (last + 1) * cs < fileSize) await img.storage.truncate((last + 1) * cs);
  });
}

/** Full discard of [from, to) inside one L2 table: entries become 0, then their clusters are freed. */
async function clearEntries(img: Qcow2Image, l1i: number, from: number, to: number): Promise<void> {
  const cs = img.clusterSize;
  const { offset: l2Off, table } = await img.writableL2(l1i);
  try {
    await img.meta.run(async () => {
      const frees: L2Entry[] = [];
      let lo = Infinity, hi = -1;
      for (let c = from; c < to; c += cs) {
        const idx = Math.floor(c / cs) % img.l2Entries;
        const old = readL2(table, idx, img.geo);
        if (old.hi === 0 && old.lo === 0 && old.allocBits === 0 && old.zeroBits === 0) continue;
        writeL2(table, idx, img.geo, 0, { copied: false, allocBits: 0, zeroBits: 0 });
        if (hasClusters(old)) frees.push(old);
        lo = Math.min(lo, idx);
        hi = Math.max(hi, idx);
      }
      if (hi >= 0) await img.writeL2Range(l2Off, table, lo, hi);
      for (const e of frees) await img.freeEntryClusters(e, true);
    });
  } finally {
    img.l2.unpin(l2Off);
  }
}

/**
 * preallocation=falloc/full as qcow2_co_truncate: refcount structures covering everything new
 * are laid out first, past the last cluster in use (qcow2_refcount_area with exact size: a new
 * table), the data clusters (from the one holding the old end) follow them as one area (written
 * with zeros: Node has no fallocate), then the L2 entries are linked table by table; new L2
 * tables come from the free cluster index, so they go where the old refcount table was first.
 * The old end's cluster moves into the area: its head is copied on write (the old view, backing
 * data where unallocated) and whatever the entries held is released, as qcow2_alloc_cluster_link_l2
 * does. Subcluster bitmaps are left as they were (every subcluster unallocated for new clusters),
 * unless the area must read as zeroes over a longer backing file (`zeroWrite`: QEMU's
 * subclusters_need_allocation): then every subcluster is allocated.
 */
export async function preallocateArea(img: Qcow2Image, old: number, size: number, zeroWrite = false): Promise<void> {
  const cs = img.clusterSize;
  const first = Math.floor(old / cs);
  const nData = Math.ceil(size / cs) - first;
  if (nData <= 0) return;
  const fileClusters = Math.ceil((await img.storage.size()) / cs);
  const last = await img.refcounts.lastUsedCluster(fileClusters);
  const start = last >= 0 ? last + 1 : fileClusters;
  // One more L2 table for an unaligned head or tail.
  const nL2 = Math.ceil(nData / img.l2Entries) + 1;
  const dataStart = await img.meta.run(() => img.refcounts.preallocArea(start, nData + nL2));
  const got = await img.meta.run(() => img.refcounts.allocAt(dataStart * cs, nData));
  if (got !== nData) throw new ImageError('Input/output error', 'EIO');
  // The data area holds zeros before any entry points at it.
  const end = (dataStart + nData) * cs;
  const zero = Buffer.alloc(Math.min(4 * 1024 * 1024, nData * cs));
  for (let p = Math.max(dataStart * cs, Math.min(end, await img.storage.size())); p < end; p += zero.length) {
    await img.storage.write(zero.subarray(0, Math.min(zero.length, end - p)), p);
  }
  for (let guest = first, host = dataStart, left = nData; left > 0;) {
    const l1i = Math.floor(guest / img.l2Entries), idx = guest % img.l2Entries;
    const nb = Math.min(left, img.l2Entries - idx);
    const { offset: l2Off, table } = await img.writableL2(l1i);
    try {
      const olds: L2Entry[] = [];
      for (let k = 0; k < nb; k++) olds.push(readL2(table, idx + k, img.geo));
      // perform_cow: the part of the old end's cluster before the old end.
      const head = guest === first ? old - first * cs : 0;
      if (head > 0) {
        const buf = Buffer.alloc(head);
        await img.fillOld(buf, olds[0], first * cs, 0);
        await img.storage.write(buf, host * cs);
      }
      await img.meta.run(async () => {
        for (let k = 0; k < nb; k++) {
          const bits = zeroWrite ? { allocBits: 0xffffffff, zeroBits: 0 } : { allocBits: olds[k].allocBits, zeroBits: olds[k].zeroBits };
          writeL2(table, idx + k, img.geo, (host + k) * cs, { copied: true, ...bits });
        }
        await img.writeL2Range(l2Off, table, idx, idx + nb - 1);
        for (const e of olds) if (hasClusters(e)) await img.freeEntryClusters(e);
      });
    } finally {
      img.l2.unpin(l2Off);
    }
    guest += nb;
    host += nb;
    left -= nb;
  }
}

