/**
 * The walk shared by snapshot create/apply/delete (QEMU's qcow2_update_snapshot_refcount): add
 * `addend` (+1, 0 or -1) to the refcount of every L2 table and data cluster an L1 table reaches,
 * and recompute COPIED (set exactly when the refcount is 1) on its L2 and L1 entries.
 *
 * Refcounts count paths: a data cluster reached through an L2 table shared by two L1 tables has
 * refcount 2. Callers drop the image's caches afterwards (tables are read and written here directly).
 */
import type { Qcow2Image } from './image.js';
import { ClusterType, readL1, readL2 } from './entry.js';
import { HI_COPIED } from './constants.js';

/**
 * Where the L1 table lives on disk (its flags are written back there when they change), or null.
 *
 * Crash order: a COPIED flag may claim "refcount is one" only while it is. So with addend +1 the
 * flags are cleared (L2 table, then its L1 entry) before the refcounts rise; with -1 or 0 the
 * refcounts change first and the flags are recomputed from them afterwards. A crash in between
 * leaves flags cleared where the refcount is still one (an extra copy-on-write, never an
 * in-place write to a shared cluster) and leaked clusters; callers keep the dirty bit set meanwhile.
 */
export async function updateSnapshotRefcount(img: Qcow2Image, l1: Buffer, l1Size: number, l1Offset: number | null, addend: -1 | 0 | 1): Promise<void> {
  const cs = img.clusterSize;
  const rc = img.refcounts;
  const es = img.extL2 ? 16 : 8;
  // Refcounts are read before (+1) or after (-1, 0) the update: `pending` is what is still to come.
  const pending = addend > 0 ? addend : 0;
  let l1Changed = false;
  for (let i = 0; i < l1Size; i++) {
    const { offset: l2Off } = readL1(l1, i);
    if (!l2Off) continue;
    if (l2Off % cs !== 0) {
      await img.signalCorruption(`L2 table offset 0x${l2Off.toString(16)} unaligned (L1 index: ${i ? `0x${i.toString(16)}` : '0'})`);
    }
    const t = await img.readTable(l2Off);
    // The table's data clusters, merged into runs of contiguous clusters.
    const dataRuns = async (fn: (start: number, n: number) => Promise<void>): Promise<void> => {
      let runStart = -1, runLen = 0;
      for (let j = 0; j < img.l2Entries; j++) {
        const e = readL2(t, j, img.geo);
        let first = -1, n = 0;
        if (e.type === ClusterType.Normal || e.type === ClusterType.ZeroAlloc) {
          if (e.host % cs !== 0) {
            await img.signalCorruption(`Cluster allocation offset 0x${e.host.toString(16)} unaligned (L2 offset: 0x${l2Off.toString(16)}, L2 index: ${j ? `0x${j.toString(16)}` : '0'})`);
          }
          first = e.host / cs;
          n = 1;
        } else if (e.type === ClusterType.Compressed) {
          first = Math.floor(e.cOffset / cs);
          n = Math.floor((e.cOffset + e.cLength - 1) / cs) - first + 1;
        }
        if (n === 0) continue;
        if (runLen && runStart + runLen === first) {
          runLen += n;
          continue;
        }
        if (runLen) await fn(runStart, runLen);
        runStart = first;
        runLen = n;
      }
      if (runLen) await fn(runStart, runLen);
    };
    // Clusters a drop leaves unused are discarded from the file (QEMU's pass-discard-snapshot, on by default).
    const bumpData = (): Promise<void> => dataRuns((a, n) => (addend < 0 ? rc.free(a * cs, n, true) : rc.update(a, n, addend)));
    // COPIED flags of the table's entries, from the refcounts they have once the update is done.
    const setDataFlags = async (): Promise<void> => {
      let changed = false;
      for (let j = 0; j < img.l2Entries; j++) {
        const e = readL2(t, j, img.geo);
        let copied = false;
        if (e.type === ClusterType.Normal || e.type === ClusterType.ZeroAlloc) copied = (await rc.get(e.host / cs)) + pending === 1;
        const hi = t.readUInt32BE(j * es);
        const want = copied ? (hi | HI_COPIED) >>> 0 : (hi & ~HI_COPIED) >>> 0;
        if (want !== hi) {
          t.writeUInt32BE(want, j * es);
          changed = true;
        }
      }
      if (changed) await img.storage.write(t, l2Off);
    };
    // The L1 entry's flag, from the table's refcount once the update is done.
    const setL1Flag = async (): Promise<void> => {
      const copied = (await rc.get(l2Off / cs)) + pending === 1;
      const hi = l1.readUInt32BE(i * 8);
      const want = copied ? (hi | HI_COPIED) >>> 0 : (hi & ~HI_COPIED) >>> 0;
      if (want === hi) return;
      l1.writeUInt32BE(want, i * 8);
      // Written at once (QEMU writes the table at the end), never for addend -1 (that table is
      // being dropped): at a crash, at most this one L2 table's entries disagree with their refcounts.
      if (addend >= 0 && l1Offset !== null) await img.storage.write(l1.subarray(i * 8, i * 8 + 8), l1Offset + i * 8);
      l1Changed = true;
    };
    if (addend > 0) {
      // An overflow (e.g. 1-bit refcounts) must fail before this table's flags change.
      await dataRuns((a, n) => rc.check(a, n, addend));
      await rc.check(l2Off / cs, 1, addend);
      await setDataFlags();
      await setL1Flag();
      await bumpData();
      await rc.update(l2Off / cs, 1, addend);
    } else {
      if (addend !== 0) await bumpData();
      await setDataFlags();
      if (addend < 0) await rc.free(l2Off, 1, true);
      await setL1Flag();
    }
  }
  if (l1Changed && addend >= 0 && l1Offset !== null) await img.storage.flush();
}
