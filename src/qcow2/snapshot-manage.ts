/**
 * Applying (reverting to) and deleting internal snapshots, in QEMU 7.2's order
 * (qcow2_snapshot_goto / qcow2_snapshot_delete):
 *
 * apply: [virtual size → snapshot's, growing the L1 table] → grow the L1 table to the snapshot's
 *   → +1 on everything the snapshot reaches → active L1 := snapshot L1 (COPIED cleared, synced)
 *   → -1 on everything the old active L1 reached → COPIED recomputed on the active tables.
 * delete: snapshot table without it (header switched) → -1 on everything it reaches → free its
 *   L1 table → COPIED recomputed on the active tables.
 *
 * Every crash point leaves refcounts >= references (leaks at worst); in between, active entries
 * may lack COPIED where the refcount is already 1 (an extra copy-on-write, never a lost update).
 * Both run with the dirty bit set (v3), so the next read-write open repairs such flags.
 */
import type { Qcow2Image } from './image.js';
import { ImageError } from '../image/errors.js';
import { HI_COPIED } from './constants.js';
import { updateSnapshotRefcount } from './snapshot-refcount.js';
import { findSnapshot, findSnapshotByIdOrName, validateSnapshotL1, writeSnapshotTable } from './snapshot.js';
import { growL1Table, l1EntriesFor, writeVirtualSize } from './l1-table.js';
import type { Snapshot } from './snapshot-table.js';

/** Revert the active state to a snapshot found by id, else by name (qemu-img snapshot -a). */
export async function applySnapshot(img: Qcow2Image, idOrName: string): Promise<Snapshot> {
  await img.flushMetadata();
  if (img.readOnly) throw new ImageError('Permission denied', 'EACCES');
  return img.meta.run(async () => {
    const idx = findSnapshotByIdOrName(img.snapshots, idOrName);
    if (idx < 0) throw new ImageError('No such file or directory', 'ENOENT');
    const sn = img.snapshots[idx];
    validateSnapshotL1(img, sn);
    if (sn.diskSize !== null && sn.diskSize !== img.header.size && img.header.version < 3) {
      throw new ImageError("Can't resize a v2 image which has snapshots", 'ENOTSUP');
    }
    return img.whileDirty(() => apply(img, sn));
  });
}

/** applySnapshot once the snapshot was found (its size change is allowed). */
async function apply(img: Qcow2Image, sn: Snapshot): Promise<Snapshot> {
  const h = img.header;
  try {
    // The virtual size becomes the snapshot's (as QEMU's truncate before the switch).
    if (sn.diskSize !== null && sn.diskSize !== h.size) {
      if (sn.diskSize > h.size) await growL1Table(img, l1EntriesFor(img, sn.diskSize));
      await writeVirtualSize(img, sn.diskSize);
    }
    await growL1Table(img, sn.l1Size);
    const cur = h.l1Size;
    // The snapshot's L1 table, padded with zeros to the active table's size.
    const snL1 = Buffer.alloc(cur * 8);
    if (sn.l1Size) await img.storage.read(snL1.subarray(0, sn.l1Size * 8), sn.l1TableOffset);
    await updateSnapshotRefcount(img, snL1, sn.l1Size, sn.l1TableOffset, 1);
    // Every table it reaches is now shared: the new active entries carry no COPIED flag.
    const next = Buffer.from(snL1);
    for (let i = 0; i < cur; i++) next.writeUInt32BE((next.readUInt32BE(i * 8) & ~HI_COPIED) >>> 0, i * 8);
    await img.storage.write(next, h.l1TableOffset);
    await img.storage.flush();
    const old = img.l1;
    img.l1 = next;
    await updateSnapshotRefcount(img, old, cur, null, -1);
    await updateSnapshotRefcount(img, img.l1, cur, h.l1TableOffset, 0);
  } finally {
    img.dropCaches();
  }
  return sn;
}

/**
 * Delete a snapshot found by id and/or name (QEMU's qcow2_snapshot_delete; qemu-img looks the
 * snapshot up by name first and passes both).
 */
export async function deleteSnapshot(img: Qcow2Image, id: string | null, name: string | null): Promise<Snapshot> {
  await img.flushMetadata();
  if (img.readOnly) throw new ImageError('Permission denied', 'EACCES');
  return img.meta.run(async () => {
    const idx = findSnapshot(img.snapshots, id, name);
    if (idx < 0) throw new ImageError("Can't find the snapshot", 'ENOENT');
    const sn = img.snapshots[idx];
    validateSnapshotL1(img, sn);
    return img.whileDirty(() => remove(img, idx, sn));
  });
}

/** deleteSnapshot once the snapshot was found. */
async function remove(img: Qcow2Image, idx: number, sn: Snapshot): Promise<Snapshot> {
  const cs = img.clusterSize;
  // Each stage fails with QEMU's words around the cause.
  const stage = async (what: string, fn: () => Promise<void>): Promise<void> => {
    try {
      await fn();
    } catch (e) {
      const errno = e instanceof ImageError ? e.errno ?? 'EIO' : 'EIO';
      throw new ImageError(`${what}: ${e instanceof ImageError && e.message === errnoText(errno) ? e.message : errnoText(errno)}`, errno);
    }
  };
  try {
    await stage('Failed to remove snapshot from snapshot list', () => writeSnapshotTable(img, img.snapshots.filter((_, i) => i !== idx)));
    // Unreachable now: from here on a failure only leaks clusters.
    await stage('Failed to free the cluster and L1 table', async () => {
      const l1 = Buffer.alloc(sn.l1Size * 8);
      if (sn.l1Size) await img.storage.read(l1, sn.l1TableOffset);
      await updateSnapshotRefcount(img, l1, sn.l1Size, null, -1);
    });
    // As qcow2_free_clusters: a failure is reported and the deletion goes on.
    if (sn.l1Size) {
      await img.refcounts.free(sn.l1TableOffset, Math.ceil((sn.l1Size * 8) / cs), true)
        .catch((e: unknown) => img.log(`qcow2_free_clusters failed: ${errnoText(e instanceof ImageError ? e.errno ?? 'EIO' : 'EIO')}`));
    }
    await stage('Failed to update snapshot status in disk', () => updateSnapshotRefcount(img, img.l1, img.header.l1Size, img.header.l1TableOffset, 0));
  } finally {
    img.dropCaches();
  }
  return sn;
}

/** strerror() of the errno names the engine uses. */
function errnoText(errno: string): string {
  switch (errno) {
    case 'EINVAL': return 'Invalid argument';
    case 'ENOSPC': return 'No space left on device';
    case 'EFBIG': return 'File too large';
    case 'EACCES': return 'Permission denied';
    default: return 'Input/output error';
  }
}
