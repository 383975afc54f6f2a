/**
 * Internal snapshots. Creating one copies the active L1 table and adds one reference to every
 * L2 table and data cluster it reaches (their COPIED flags are cleared, so later writes copy on
 * write). Order: referenced clusters' refcounts and flags → snapshot L1 copy → snapshot table →
 * header; a crash in between leaves leaked clusters at worst.
 */
import type { Qcow2Image } from './image.js';
import { ClusterType, readL1, readL2, encodeU64 } from './entry.js';
import { serializeSnapshotTable, type Snapshot } from './snapshot-table.js';
import { HI_COPIED } from './constants.js';
import { ImageError } from '../image/errors.js';

/** Add `delta` to the refcount of everything reachable from an L1 table, fixing active COPIED flags. */
async function updateReachable(img: Qcow2Image, l1: Buffer, l1Size: number, delta: number, active: boolean): Promise<void> {
  const cs = img.clusterSize;
  const rc = img.refcounts;
  for (let i = 0; i < l1Size; i++) {
    const { offset: l2Off } = readL1(l1, i);
    if (!l2Off) continue;
    const t = await img.readTable(l2Off);
    let runStart = -1, runLen = 0;
    const flush = async (): Promise<void> => {
      if (runLen) await rc.update(runStart, runLen, delta);
      runStart = -1;
      runLen = 0;
    };
    let changed = false;
    for (let j = 0; j < img.l2Entries; j++) {
      const e = readL2(t, j, img.geo);
      let first = -1, n = 0;
      if (e.type === ClusterType.Normal || e.type === ClusterType.ZeroAlloc) {
        first = e.host / cs;
        n = 1;
      } else if (e.type === ClusterType.Compressed) {
        first = Math.floor(e.cOffset / cs);
        n = Math.floor((e.cOffset + e.cLength - 1) / cs) - first + 1;
      }
      if (n === 0) continue;
      if (runLen && runStart + runLen === first) runLen += n;
      else {
        await flush();
        runStart = first;
        runLen = n;
      }
      if (active && e.copied && delta > 0) {
        const off = img.extL2 ? j * 16 : j * 8;
        t.writeUInt32BE((t.readUInt32BE(off) & ~HI_COPIED) >>> 0, off);
        changed = true;
      }
    }
    await flush();
    await rc.update(l2Off / cs, 1, delta);
    if (changed) await img.storage.write(t, l2Off);
    if (active && delta > 0) {
      const hi = l1.readUInt32BE(i * 8);
      if (hi & HI_COPIED) {
        l1.writeUInt32BE((hi & ~HI_COPIED) >>> 0, i * 8);
      }
    }
  }
}

export interface CreateSnapshotOptions {
  name: string;
  /** Seconds and nanoseconds since the epoch (defaults to now). */
  date?: { sec: number; nsec: number };
}

/** Create an internal snapshot of the active state (qemu-img snapshot -c). */
export async function createSnapshot(img: Qcow2Image, opts: CreateSnapshotOptions): Promise<Snapshot> {
  if (img.readOnly) throw new ImageError('Permission denied', 'EACCES');
  const cs = img.clusterSize;
  return img.meta.run(async () => {
    const h = img.header;
    // 1. References and COPIED flags of the active tables.
    await updateReachable(img, img.l1, h.l1Size, 1, true);
    if (h.l1Size) await img.storage.write(img.l1, h.l1TableOffset);
    img.dropCaches();
    // 2. The snapshot's own copy of the L1 table.
    const l1Clusters = Math.ceil((h.l1Size * 8) / cs);
    const copy = Buffer.from(img.l1);
    for (let i = 0; i < h.l1Size; i++) encodeU64(copy, i * 8, readL1(copy, i).offset, false);
    const l1Off = h.l1Size ? await img.refcounts.alloc(l1Clusters) : 0;
    if (h.l1Size) await img.storage.write(copy, l1Off);
    // 3. New snapshot table, then the header, then release the old table.
    const now = Date.now();
    const date = opts.date ?? { sec: Math.floor(now / 1000), nsec: (now % 1000) * 1e6 };
    const id = String(img.snapshots.reduce((m, s) => Math.max(m, Number(s.id) || 0), 0) + 1);
    const sn: Snapshot = {
      l1TableOffset: l1Off, l1Size: h.l1Size, id, name: opts.name, dateSec: date.sec, dateNsec: date.nsec,
      vmClockNsec: 0, vmStateSize: 0, extraUnknown: Buffer.alloc(0), diskSize: h.size, icount: 0,
    };
    const list = [...img.snapshots, sn];
    await writeSnapshotTable(img, list);
    return sn;
  });
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
  h.snapshotsOffset = off;
  h.nbSnapshots = list.length;
  await img.writeHeader();
  img.snapshots = list;
  if (oldLen) await img.refcounts.update(oldOff / cs, Math.ceil(oldLen / cs), -1);
}
