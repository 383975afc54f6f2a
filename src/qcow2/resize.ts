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
import { ClusterType, readL1, readL2, writeL2, type L2Entry } from './entry.js';
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
    if (prealloc === 'metadata') await preallocateMetadata(img, old, size);
    else if (prealloc !== 'off' && !(await preallocateArea(img, old, size, prealloc))) await preallocateRange(img, old, size, prealloc);
    const backingLen = img.backing?.size ?? 0;
    if (size > old && backingLen > old) {
      // The block layer asks for zeroes when the backing file would show through the new area.
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

function hasClusters(e: L2Entry): boolean {
  return e.type === ClusterType.Compressed || e.host !== 0;
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
 * table), the data clusters follow them as one area (written with zeros: Node has no
 * fallocate), then the L2 entries are linked table by table; new L2 tables come from the free
 * cluster index, so they go where the old refcount table was first. With extended L2 the
 * entries are allocated with every subcluster unallocated, as QEMU links them. Only with every
 * cluster from the one holding the old end on unallocated; false (nothing done) otherwise.
 */
export async function preallocateArea(img: Qcow2Image, old: number, size: number, mode: 'falloc' | 'full'): Promise<boolean> {
  const cs = img.clusterSize;
  const first = Math.floor(old / cs);
  const nData = Math.ceil(size / cs) - first;
  if (nData <= 0) return false;
  for (let l1i = Math.floor(first / img.l2Entries); l1i * img.l2Entries < first + nData; l1i++) {
    const l2 = l1i < img.header.l1Size ? readL1(img.l1, l1i).offset : 0;
    if (!l2) continue;
    const table = await img.l2.pin(l2);
    try {
      for (let ci = Math.max(first, l1i * img.l2Entries); ci < Math.min(first + nData, (l1i + 1) * img.l2Entries); ci++) {
        const e = readL2(table, ci % img.l2Entries, img.geo);
        if (e.type !== ClusterType.Unallocated || e.host !== 0 || e.zeroBits !== 0) return false;
      }
    } finally {
      img.l2.unpin(l2);
    }
  }
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
      await img.meta.run(async () => {
        for (let k = 0; k < nb; k++) writeL2(table, idx + k, img.geo, (host + k) * cs, { copied: true, allocBits: 0, zeroBits: 0 });
        await img.writeL2Range(l2Off, table, idx, idx + nb - 1);
      });
    } finally {
      img.l2.unpin(l2Off);
    }
    guest += nb;
    host += nb;
    left -= nb;
  }
  return true;
}

/**
 * falloc/full where preallocateArea does not apply (a cluster from the old end on is allocated):
 * the clusters of [old, size) that have none are allocated as one area after everything in use
 * and written with zeros first (Node has no fallocate); entries become normal allocated clusters
 * (with extended L2 the subclusters stay unallocated).
 */
async function preallocateRange(img: Qcow2Image, old: number, size: number, mode: 'falloc' | 'full'): Promise<void> {
  const cs = img.clusterSize;
  let end = 0;
  const first = Math.floor(old / cs), last = Math.ceil(size / cs);
  // The data clusters first, as one area after everything in use (QEMU's allocation_start).
  const dataHosts = await img.meta.run(() => img.refcounts.allocMany(last - first));
  for (let c = first; c < last;) {
    const l1i = Math.floor((c * cs) / img.l2Coverage);
    const stop = Math.min(last, (l1i + 1) * img.l2Entries);
    const { offset: l2Off, table } = await img.writableL2(l1i);
    try {
      await img.meta.run(async () => {
        const todo: number[] = [];
        for (let ci = c; ci < stop; ci++) {
          const e = readL2(table, ci % img.l2Entries, img.geo);
          if (e.type === ClusterType.Unallocated && e.host === 0 && e.zeroBits === 0) todo.push(ci);
          else await img.refcounts.free(dataHosts[ci - first], 1); // already has a cluster
        }
        const hosts = todo.map((ci) => dataHosts[ci - first]);
        let lo = Infinity, hi = -1;
        todo.forEach((ci, j) => {
          const idx = ci % img.l2Entries;
          writeL2(table, idx, img.geo, hosts[j], { copied: true, allocBits: 0, zeroBits: 0 });
          end = Math.max(end, hosts[j] + cs);
          lo = Math.min(lo, idx);
          hi = Math.max(hi, idx);
        });
        // The clusters hold zeros before an entry points at them.
        await zeroClusters(img, hosts);
        if (hi >= 0) await img.writeL2Range(l2Off, table, lo, hi);
      });
    } finally {
      img.l2.unpin(l2Off);
    }
    c = stop;
  }
  const fileSize = await img.storage.size();
  if (fileSize < end) await img.storage.truncate(end);
}

/** Write zeros over the given clusters, one write per contiguous run (at most 4 MiB each). */
async function zeroClusters(img: Qcow2Image, hosts: number[]): Promise<void> {
  const cs = img.clusterSize;
  const sorted = [...hosts].sort((a, b) => a - b);
  const zero = Buffer.alloc(Math.min(4 * 1024 * 1024, Math.max(cs, sorted.length * cs)));
  let i = 0;
  while (i < sorted.length) {
    let j = i + 1;
    while (j < sorted.length && sorted[j] === sorted[j - 1] + cs) j++;
    const start = sorted[i], len = (j - i) * cs;
    for (let p = 0; p < len; p += zero.length) await img.storage.write(zero.subarray(0, Math.min(zero.length, len - p)), start + p);
    i = j;
  }
}
