/**
 * Internal snapshots: creation, lookup, and the snapshot table write. Creating one adds a
 * reference to every L2 table and data cluster the active L1 table reaches (clearing their
 * COPIED flags, so later writes copy on write). Order (QEMU's): snapshot L1 copy → referenced
 * clusters' flags and refcounts → snapshot table → header, all with the dirty bit set (v3): a crash
 * in between leaves leaked clusters and COPIED flags cleared where a refcount is still one, which
 * the next read-write open repairs.
 */
import type { Qcow2Image } from './image.js';
import { readL1, encodeU64 } from './entry.js';
import { serializeSnapshotTable, type Snapshot } from './snapshot-table.js';
import { MAX_L1_SIZE, MAX_SNAPSHOTS } from './constants.js';
import { ImageError } from '../image/errors.js';
import { updateSnapshotRefcount } from './snapshot-refcount.js';

export interface CreateSnapshotOptions {
  name: string;
  /** Seconds and nanoseconds since the epoch (defaults to now). */
  date?: { sec: number; nsec: number };
}

/** Create an internal snapshot of the active state (qemu-img snapshot -c). */
export async function createSnapshot(img: Qcow2Image, opts: CreateSnapshotOptions): Promise<Snapshot> {
  await img.flushMetadata();
  if (img.readOnly) throw new ImageError('Permission denied', 'EACCES');
  if (img.snapshots.length >= MAX_SNAPSHOTS) throw new ImageError('File too large', 'EFBIG');
  const cs = img.clusterSize;
  return img.meta.run(() => img.whileDirty(async () => {
    const h = img.header;
    // 1. The snapshot's own copy of the L1 table (allocated first, as QEMU does).
    const l1Clusters = Math.ceil((h.l1Size * 8) / cs);
    const copy = Buffer.from(img.l1.subarray(0, h.l1Size * 8));
    for (let i = 0; i < h.l1Size; i++) encodeU64(copy, i * 8, readL1(copy, i).offset, false);
    const l1Off = h.l1Size ? await img.refcounts.alloc(l1Clusters) : 0;
    if (h.l1Size) await img.storage.write(copy, l1Off);
    try {
      // 2. References and COPIED flags of the active tables (active L1 rewritten last, synced).
      await updateSnapshotRefcount(img, img.l1, h.l1Size, h.l1TableOffset, 1);
    } finally {
      img.dropCaches();
    }
    // 3. New snapshot table, then the header, then release the old table.
    const now = Date.now();
    const date = opts.date ?? { sec: Math.floor(now / 1000), nsec: (now % 1000) * 1e6 };
    const id = String(img.snapshots.reduce((m, s) => Math.max(m, parseInt(s.id, 10) || 0), 0) + 1);
    const sn: Snapshot = {
      l1TableOffset: l1Off, l1Size: h.l1Size, id, name: opts.name, dateSec: date.sec, dateNsec: date.nsec,
      vmClockNsec: 0, vmStateSize: 0, extraUnknown: Buffer.alloc(0), diskSize: h.size, icount: 0,
    };
    await writeSnapshotTable(img, [...img.snapshots, sn]);
    return sn;
  }));
}

/** Index of a snapshot by id and/or name (QEMU's find_snapshot_by_id_and_name), or -1. */
export function findSnapshot(list: readonly Snapshot[], id: string | null, name: string | null): number {
  if (id !== null && name !== null) return list.findIndex((s) => s.id === id && s.name === name);
  if (id !== null) return list.findIndex((s) => s.id === id);
  if (name !== null) return list.findIndex((s) => s.name === name);
  return -1;
}

/** By id first, then by name (QEMU's find_snapshot_by_id_or_name, used by apply). */
export function findSnapshotByIdOrName(list: readonly Snapshot[], idOrName: string): number {
  const i = findSnapshot(list, idOrName, null);
  return i >= 0 ? i : findSnapshot(list, null, idOrName);
}

/** QEMU 7.2's qcow2_validate_table for a snapshot's L1 table (a table past EOF reads as zeros). */
export function validateSnapshotL1(img: Qcow2Image, sn: Snapshot): void {
  if (sn.l1Size * 8 > MAX_L1_SIZE) throw new ImageError('Snapshot L1 table too large', 'EFBIG');
  if (sn.l1TableOffset % img.clusterSize !== 0 || sn.l1TableOffset + sn.l1Size * 8 > Number.MAX_SAFE_INTEGER) {
    throw new ImageError('Snapshot L1 table offset invalid', 'EINVAL');
  }
}

/** Write a snapshot table in new clusters, point the header at it, free the old one. */
export async function writeSnapshotTable(img: Qcow2Image, list: Snapshot[]): Promise<void> {
  const cs = img.clusterSize;
  const h = img.header;
  const oldOff = h.snapshotsOffset;
  const oldLen = img.snapshots.length ? serializeSnapshotTable(img.snapshots).length : 0;
  const table = serializeSnapshotTable(list);
  const off = table.length ? await img.refcounts.alloc(Math.ceil(table.length / cs)) : 0;
  if (table.length) await img.storage.write(table, off);
  await img.storage.flush();
  h.snapshotsOffset = off;
  h.nbSnapshots = list.length;
  await img.writeHeader();
  await img.storage.flush();
  img.snapshots = list;
  if (oldLen) await img.refcounts.free(oldOff, Math.ceil(oldLen / cs), true);
}
