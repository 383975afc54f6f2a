/**
 * The snapshot table part of `check` (QEMU 7.2's qcow2_check_read_snapshot_table and
 * qcow2_check_fix_snapshot_table). The image is opened in check mode without its snapshot table;
 * the check reads it here, reports what QEMU reports, and with `-r all` drops what exceeds QEMU's
 * limits and rewrites the table once the refcounts are sound.
 */
import type { Qcow2Image } from './image.js';
import { ImageError } from '../image/errors.js';
import { errnoText } from '../storage/storage.js';
import { readSnapshotTable } from './snapshot-read.js';
import { serializeSnapshotTable } from './snapshot-table.js';
import { MAX_SNAPSHOTS } from './constants.js';
import { metadataOverlap } from './overlap.js';

/**
 * The snapshot table could not be read: the check fails (QEMU: check error, no report). The
 * message is QEMU's report as printed after the program name ("ERROR ...", hint lines after).
 */
export class SnapshotTableReadError extends ImageError {
  constructor(message: string, errno: string) {
    super(message, errno);
    this.name = 'SnapshotTableReadError';
  }
}

const INT64_MAX = (1n << 63n) - 1n;
const ENTRY_HEADER = 40;

/** Snapshot table pointer from the header on disk (check mode opens without validating it). */
async function tablePointer(img: Qcow2Image, repair: boolean, report: (l: string) => void): Promise<{ count: number; offset: number; reduced: number }> {
  const ptr = Buffer.alloc(12);
  await img.storage.read(ptr, 60);
  const raw = ptr.readUInt32BE(0);
  const offset = ptr.readBigUInt64BE(4);
  let count = raw, reduced = 0;
  if (count > MAX_SNAPSHOTS && repair) {
    report(`Discarding ${count - MAX_SNAPSHOTS} overhanging snapshots`);
    reduced = count - MAX_SNAPSHOTS;
    count = MAX_SNAPSHOTS;
  }
  // qcow2_validate_table(offset, count, 40, 40 * QCOW_MAX_SNAPSHOTS, "snapshot table")
  const hint = count > MAX_SNAPSHOTS ? `\nYou can force-remove all ${count - MAX_SNAPSHOTS} overhanging snapshots with qemu-img check -r all` : '';
  if (count > MAX_SNAPSHOTS) throw new SnapshotTableReadError(`ERROR snapshot table too large${hint}`, 'EFBIG');
  if (INT64_MAX - BigInt(count * ENTRY_HEADER) < offset || offset % BigInt(img.clusterSize) !== 0n) {
    throw new SnapshotTableReadError(`ERROR snapshot table offset invalid${hint}`, 'EINVAL');
  }
  return { count, offset: Number(offset), reduced };
}

/** A repair step failed: the check ends without a report ("Check failed: <strerror>"). */
export class CheckFailedError extends ImageError {
  constructor(errno: string) {
    super('Check failed', errno);
    this.name = 'CheckFailedError';
  }
}

export interface SnapshotTableCheck {
  /** Bytes the table occupies (QEMU's snapshots_size), to count its references. */
  size: number;
  /** Problems in the table itself (fixable by rewriting it). */
  corruptions: number;
  corruptionsFixed: number;
}

/** Read the table into `img.snapshots`, reporting QEMU's lines; `repair` is `-r all`. */
export async function checkReadSnapshotTable(img: Qcow2Image, report: (l: string) => void, repair: boolean): Promise<SnapshotTableCheck> {
  const h = img.header;
  img.snapshots = [];
  const ptr = await tablePointer(img, repair, report);
  let r;
  try {
    r = await readSnapshotTable(img.storage, ptr.offset, ptr.count, { repair, log: report });
  } catch (e) {
    if (!(e instanceof ImageError)) throw e;
    throw new SnapshotTableReadError(`ERROR failed to read the snapshot table: ${e.message}`, e.errno ?? 'EFBIG'); // QEMU's limits: EFBIG
  }
  img.snapshots = r.list;
  h.nbSnapshots = ptr.count;
  h.snapshotsOffset = ptr.offset;
  const reduced = ptr.reduced + r.reduced;
  const res: SnapshotTableCheck = { size: r.size, corruptions: r.extraDropped + reduced, corruptionsFixed: 0 };
  if (reduced) {
    // The count in the header goes first: the reference count below relies on it (leaks the rest).
    h.nbSnapshots = r.list.length;
    const b = Buffer.alloc(4);
    b.writeUInt32BE(h.nbSnapshots, 0);
    await img.storage.write(b, 60);
    await img.storage.flush();
    res.corruptionsFixed += reduced;
    res.corruptions -= reduced;
  }
  // Every v3 entry needs at least vm_state_size_large and disk_size in its extra data.
  if (img.header.version >= 3) {
    r.list.forEach((sn, i) => {
      if (sn.diskSize !== null) return;
      res.corruptions++;
      report(`${repair ? 'Repairing' : 'ERROR'} snapshot table entry ${i} is incomplete`);
    });
  }
  return res;
}

/**
 * qcow2_alloc_clusters as QEMU 7.2 runs it, where the run needs refcount blocks that do not exist
 * yet (qchain's own allocator places those differently): first fit from the start of the file
 * (alloc_clusters_noref), counting the run; a missing block is allocated at the first free
 * cluster after the run (itself counted by a block allocated after it, unless it describes
 * itself), every cached block is flushed through the overlap check, the block is hooked into the
 * table and the search restarts (EAGAIN, the counts made so far undone). Returns the offset, or
 * null (nothing changed) when the run needs no new block or would grow the refcount table: then
 * qchain's allocator does it. A failed flush marks the image corrupt and fails the check.
 */
async function qemuAlloc(img: Qcow2Image, n: number, snapshotsSize: number, report: (l: string) => void): Promise<number | null> {
  const rc = img.refcounts;
  const per = rc.perBlock;
  const cs = img.clusterSize;
  let free = 0;
  const noref = async (k: number): Promise<number> => {
    for (let i = 0; i < k;) {
      const c = free++;
      if ((await rc.get(c)) !== 0) i = 0;
      else i++;
    }
    return free - k;
  };
  const missing = (c: number): boolean => rc.table[Math.floor(c / per)] === 0;
  // Where the first attempt lands; QEMU's path is taken only when it needs new blocks, all
  // within the current table (with room for the blocks themselves after the run).
  const first = await noref(n);
  free = 0;
  let needs = false;
  for (let ti = Math.floor(first / per); ti <= Math.floor((first + n - 1) / per); ti++) if (rc.table[ti] === 0) needs = true;
  if (!needs) return null;
  if ((first + n + 2 * (Math.ceil(n / per) + 2)) > rc.table.length * per) return null;
  const guard = (bo: number) => metadataOverlap(img, bo, cs, snapshotsSize, ['refcount block']);
  const flush = async (): Promise<void> => {
    if (await img.writeRefblocksGuarded(guard)) {
      report('ERROR failed to update snapshot table: Input/output error');
      throw new CheckFailedError('EIO');
    }
  };
  /** alloc_refcount_block for cluster `c` (no block): always EAGAIN ('again') once hooked. */
  const allocBlock = async (c: number): Promise<'again'> => {
    const ti = Math.floor(c / per);
    const nb = await noref(1);
    const buf = Buffer.alloc(cs);
    if (Math.floor(nb / per) === ti) rc.encodeInto(buf, nb % per, 1);
    else {
      if (nb >= rc.table.length * per) throw new CheckFailedError('EFBIG'); // not reached (bounded above)
      // Counted by another block, which may have to be allocated first (then: EAGAIN).
      if ((await update(nb, 1)) === 'again') return 'again';
      await flush();
    }
    rc.installPending(nb * cs, buf);
    await flush();
    const e = Buffer.alloc(8);
    e.writeBigUInt64BE(BigInt(nb * cs), 0);
    await img.storage.write(e, rc.tableOffset + ti * 8);
    await img.storage.flush();
    rc.table[ti] = nb * cs;
    return 'again';
  };
  /** update_refcount(+1) over [start, start+count): 'again' after undoing what it counted. */
  const update = async (start: number, count: number): Promise<'again' | 'ok'> => {
    for (let c = start; c < start + count; c++) {
      if (missing(c)) {
        await allocBlock(c);
        if (c > start) await rc.update(start, c - start, -1);
        free = Math.min(free, start);
        return 'again';
      }
      await rc.update(c, 1, 1);
    }
    return 'ok';
  };
  for (;;) {
    const at = await noref(n);
    if ((await update(at, n)) === 'ok') return at * cs;
  }
}

/** `-r all` with table problems: write the table anew (complete entries), free the old one. */
export async function checkFixSnapshotTable(img: Qcow2Image, check: SnapshotTableCheck, report: (l: string) => void): Promise<void> {
  if (!check.corruptions) return;
  const cs = img.clusterSize;
  const h = img.header;
  const list = img.snapshots.map((s) => ({ ...s, diskSize: s.diskSize ?? img.size }));
  const table = serializeSnapshotTable(list);
  const oldOff = h.snapshotsOffset;
  await img.meta.run(async () => {
    let off = 0;
    if (table.length) {
      // The new refcounts stay cached (QEMU's refcount block cache) ...
      const was = img.refcounts.lazy;
      img.refcounts.lazy = true;
      try {
        const n = Math.ceil(table.length / cs);
        const q = await qemuAlloc(img, n, check.size, report);
        off = q ?? await img.refcounts.alloc(n);
      } finally {
        img.refcounts.lazy = was;
      }
      // ... until qcow2_write_snapshots flushes: every cached refcount block, each through the
      // overlap check (a block inside the old table fails it: image marked corrupt, check failed).
      const hit = await img.writeRefblocksGuarded((bo) => metadataOverlap(img, bo, cs, check.size, ['refcount block']));
      if (hit) {
        report('ERROR failed to update snapshot table: Input/output error');
        throw new CheckFailedError('EIO');
      }
      await img.storage.flush();
    }
    // QEMU's overlap check: the old table's clusters may be free by the refcounts (a table
    // reaching past EOF is not counted) but must not be overwritten.
    if (table.length && off < oldOff + check.size && oldOff < off + table.length) {
      // The allocation stays (written above; QEMU's driver is unusable after a fatal corruption:
      // its free of the new clusters never reaches the disk).
      await img.signalCorruption('Preventing invalid write on metadata (overlaps with snapshot table)').catch(() => {});
      report('ERROR failed to update snapshot table: Input/output error');
      throw new CheckFailedError('EIO');
    }
    if (table.length) await img.storage.write(table, off);
    await img.storage.flush();
    const ptr = Buffer.alloc(12);
    ptr.writeUInt32BE(list.length, 0);
    ptr.writeUInt32BE(Math.floor(off / 0x100000000), 4);
    ptr.writeUInt32BE(off >>> 0, 8);
    await img.storage.write(ptr, 60);
    await img.storage.flush();
    h.nbSnapshots = list.length;
    h.snapshotsOffset = off;
    img.snapshots = list;
    if (check.size) {
      const first = Math.floor(oldOff / cs);
      const n = Math.floor((oldOff + check.size - 1) / cs) - first + 1;
      // As qcow2_free_clusters: a failure is reported and the old clusters leak. Freed clusters
      // are discarded (QEMU's pass-discard-snapshot), so the old table reads as zeros.
      await img.refcounts.free(first * cs, n, true).catch((e: unknown) => {
        if (!(e instanceof ImageError)) throw e;
        report(`qcow2_free_clusters failed: ${errnoText(e.errno)}`);
      });
    }
  });
  check.corruptionsFixed += check.corruptions;
  check.corruptions = 0;
}
