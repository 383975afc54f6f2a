/**
 * Consistency check and refcount repair. References are counted from every structure that uses a
 * cluster (header, L1/L2 tables and data of the active state and of each snapshot, snapshot table,
 * refcount table and blocks) and compared with the stored refcounts, as `qemu-img check` does.
 */
import type { Qcow2Image } from './image.js';
import { CorruptionError, ImageError } from '../image/errors.js';
import { ClusterType, readL1, readL2 } from './entry.js';
import { TWO32, AUTOCLEAR_BITMAPS, HI_COPIED, MAX_L1_SIZE, INCOMPAT_DIRTY, INCOMPAT_CORRUPT } from './constants.js';
import { checkReadSnapshotTable, checkFixSnapshotTable, CheckFailedError } from './check-snapshots.js';
import { errnoText } from '../storage/storage.js';
import { rebuildRefcountStructure } from './check-rebuild.js';
import { metadataOverlap, type OverlapKind } from './overlap.js';
import { SparseCounts } from './sparse-counts.js';

export interface CheckResult {
  corruptions: number;
  leaks: number;
  checkErrors: number;
  corruptionsFixed: number;
  leaksFixed: number;
  totalClusters: number;
  allocatedClusters: number;
  fragmentedClusters: number;
  compressedClusters: number;
  imageEndOffset: number;
  /** Set when refcounts cannot be fixed in place (a referenced cluster has no refcount). */
  needsRebuild: boolean;
}

export type FixMode = { leaks: boolean; errors: boolean };

/**
 * Counted references per host cluster of the file. As QEMU's inc_refcounts: the last cluster may
 * be semi-allocated, so a region may reach less than one cluster past the end of the file; a
 * region reaching further is one corruption, reported once with its exact offset and size, and
 * counts nothing.
 */
class RefMap {
  readonly counts = new SparseCounts();
  /** Clusters of the file, plus a semi-allocated one past its end once counted (QEMU grows its array). */
  nbClusters: number;
  /** Clusters the array holds (QEMU's refcount_table_size): the file's, plus one. */
  private cap: number;
  constructor(nbClusters: number, private fileLen: number, private readonly cs: number,
    private readonly report: (l: string) => void, private readonly res: CheckResult,
    /** Largest count the refcount width holds (QEMU's refcount_max). */
    private readonly max: number) {
    this.nbClusters = nbClusters;
    this.cap = nbClusters + 1;
  }
  /** The file grew to `fileLen` bytes (a refcount block past its end was made part of it). */
  grow(fileLen: number): void {
    const n = Math.ceil(fileLen / this.cs);
    this.cap = Math.max(this.cap, n + 1);
    this.fileLen = fileLen;
    this.nbClusters = Math.max(this.nbClusters, n);
  }
  inc(offset: number, size: number): void {
    if (size <= 0) return;
    if (!Number.isSafeInteger(offset + size)) return this.incExact(BigInt(offset), size);
    if (offset + size - this.fileLen >= this.cs) return this.beyond(BigInt(offset), size);
    const first = Math.floor(offset / this.cs), last = Math.floor((offset + size - 1) / this.cs);
    for (let c = first; c <= last && c < this.cap; c++) {
      // QEMU counts in an array of the image's refcount width: a full count stays full.
      const v = this.counts.get(c);
      if (v >= this.max) {
        this.report(`ERROR: overflow cluster offset=0x${(c * this.cs).toString(16)}`);
        this.report('Use qemu-img amend to increase the refcount entry width or qemu-img convert to create a clean copy if the image cannot be opened for writing');
        this.res.corruptions++;
        continue;
      }
      this.counts.set(c, v + 1);
    }
    if (last >= this.nbClusters) this.nbClusters = Math.min(last + 1, this.cap);
  }
  /** The same for an offset that may be past 2^53 (reported exactly). */
  incExact(offset: bigint, size: number): void {
    if (size <= 0) return;
    if (offset + BigInt(size) - BigInt(this.fileLen) >= BigInt(this.cs)) return this.beyond(offset, size);
    this.inc(Number(offset), size);
  }
  private beyond(offset: bigint, size: number): void {
    this.report(`ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x${offset.toString(16)} size 0x${size.toString(16)}`);
    this.res.corruptions++;
  }
}

/** A 64-bit entry from its two halves as QEMU's PRIx64 (no padding). */
const hex = (hi: number, lo: number): string => ((BigInt(hi >>> 0) << 32n) | BigInt(lo >>> 0)).toString(16);

/** Bits 9-55 of an entry (QEMU's L1E_OFFSET_MASK / L2E_OFFSET_MASK), exact past 2^53. */
const offsetOf = (hi: number, lo: number): bigint => (BigInt(hi & 0x00ffffff) << 32n) | BigInt((lo & 0xfffffe00) >>> 0);

/**
 * QEMU's check_refcounts_l1 / check_refcounts_l2: every non-zero L1 entry's table is counted and
 * read where it points, even when it is unaligned (or is the header), and every allocated L2
 * entry's cluster is counted, aligned or not.
 */
async function countL1(img: Qcow2Image, refs: RefMap, res: CheckResult, l1Offset: number, l1Size: number, active: boolean, report: (l: string) => void,
  fix: FixMode | null, snapshotsSize: number): Promise<void> {
  const cs = img.clusterSize;
  if (!l1Size) return;
  refs.inc(l1Offset, l1Size * 8);
  const l1 = active ? img.l1 : await img.readL1Table(l1Offset, l1Size);
  for (let i = 0; i < l1Size; i++) {
    const l1Hi = l1.readUInt32BE(i * 8), l1Lo = l1.readUInt32BE(i * 8 + 4);
    if (l1Hi === 0 && l1Lo === 0) continue;
    // QEMU's L1E_RESERVED_MASK (0x7f000000000001ff).
    if ((l1Hi & 0x7f000000) !== 0 || (l1Lo & 0x1ff) !== 0) {
      report(`ERROR found L1 entry with reserved bits set: ${hex(l1Hi, l1Lo)}`);
      res.corruptions++;
    }
    const l2Off = offsetOf(l1Hi, l1Lo);
    refs.incExact(l2Off, cs);
    if (l2Off % BigInt(cs) !== 0n) {
      report(`ERROR l2_offset=${l2Off.toString(16)}: Table is not cluster aligned; L1 entry corrupted`);
      res.corruptions++;
    }
    // Past the end of the file (or of exact numbers) the table reads as zeros: nothing to count.
    const t = await img.readTable(Number(l2Off));
    // Fragmentation is counted within each L2 table, as QEMU's check_refcounts_l2.
    let nextContiguous = 0n;
    for (let j = 0; j < img.l2Entries; j++) {
      const e = readL2(t, j, img.geo);
      const bitmapBits = (e.allocBits | e.zeroBits) !== 0;
      // QEMU's L2E_STD_RESERVED_MASK (0x3f000000000001fe), for standard descriptors.
      if (e.type !== ClusterType.Compressed && ((e.hi & 0x3f000000) !== 0 || (e.lo & 0x1fe) !== 0)) {
        report(`ERROR found l2 entry with reserved bits set: ${hex(e.hi, e.lo)}`);
        res.corruptions++;
      }
      if (e.type === ClusterType.Compressed && bitmapBits) {
        report(`ERROR compressed cluster ${j} with non-zero subcluster allocation bitmap, entry=0x${hex(e.hi, e.lo)}`);
        res.corruptions++;
        continue;
      }
      if ((e.type === ClusterType.Normal || e.type === ClusterType.ZeroAlloc) && (e.allocBits & e.zeroBits) !== 0) {
        res.corruptions++;
        report(`ERROR offset=${offsetOf(e.hi, e.lo).toString(16)}: Allocated cluster has corrupted subcluster allocation bitmap`);
      }
      if (e.type === ClusterType.Unallocated && e.allocBits !== 0) {
        res.corruptions++;
        report('ERROR: Unallocated cluster has non-zero subcluster allocation map');
      }
      if (e.type === ClusterType.Compressed) {
        // The exact offset (a hostile entry may exceed 2^53, beyond exact JavaScript numbers).
        const hiBits = 62 - (img.clusterBits - 8) - 32;
        const coffset = (BigInt(e.hi & ((1 << hiBits) - 1)) << 32n) | BigInt(e.lo >>> 0);
        if ((e.hi & 0x80000000) !== 0) { // readL2 drops the flag for compressed entries
          report(`ERROR: coffset=0x${coffset.toString(16)}: copied flag must never be set for compressed clusters`);
          res.corruptions++;
        }
        refs.incExact(coffset, e.cLength);
        if (active) {
          res.allocatedClusters++;
          res.compressedClusters++;
          res.fragmentedClusters++;
        }
      } else if (e.type === ClusterType.Normal || e.type === ClusterType.ZeroAlloc) {
        const host = offsetOf(e.hi, e.lo);
        if (active) {
          res.allocatedClusters++;
          if (nextContiguous && host !== nextContiguous) res.fragmentedClusters++;
          nextContiguous = host + BigInt(cs);
        }
        if (host % BigInt(cs) !== 0n) {
          // Preallocated: no data in the cluster (the zero flag, v2 images too; or no allocated subcluster).
          const data = img.extL2 ? e.allocBits !== 0 : (e.lo & 1) === 0;
          const repair = !data && !!fix?.errors && !img.readOnly;
          report(`${repair ? 'Repairing' : 'ERROR'} offset=${host.toString(16)}: ${data ? 'Data' : 'Preallocated'} cluster is not properly aligned; L2 entry corrupted.`);
          res.corruptions++;
          // fix_l2_entry_by_zero: the entry becomes a zero cluster, the cluster is not counted.
          if (repair && await zeroL2Entry(img, res, t, Number(l2Off), j, active, snapshotsSize, report)) continue;
        }
        refs.incExact(host, cs);
      }
    }
  }
}

/**
 * QEMU's fix_l2_entry_by_zero: entry `j` of the L2 table `t` at `l2Off` becomes a zero cluster
 * (extended L2: its allocated subclusters read as zero) and is written synced. Returns whether
 * it was fixed; an overlap with other metadata fails the whole check, as in QEMU.
 */
async function zeroL2Entry(img: Qcow2Image, res: CheckResult, t: Buffer, l2Off: number, j: number, active: boolean,
  snapshotsSize: number, report: (l: string) => void): Promise<boolean> {
  const es = img.extL2 ? 16 : 8;
  const at = j * es;
  if (img.extL2) {
    const zero = (t.readUInt32BE(at + 8) | t.readUInt32BE(at + 12)) >>> 0;
    t.writeUInt32BE(zero, at + 8);
    t.writeUInt32BE(0, at + 12);
    t.writeUInt32BE(0, at);
    t.writeUInt32BE(0, at + 4);
  } else {
    t.writeUInt32BE(0, at);
    t.writeUInt32BE(1, at + 4); // QCOW_OFLAG_ZERO
  }
  // Inactive L2 tables are not in QEMU's default (cached) overlap check.
  const hit = metadataOverlap(img, l2Off + at, es, snapshotsSize, active ? ['active L2 table'] : []);
  if (hit) {
    await img.signalCorruption(`Preventing invalid write on metadata (overlaps with ${hit})`).catch(() => {});
    report('ERROR: Overlap check failed');
    res.checkErrors++;
    throw new CheckFailedError('EIO');
  }
  try {
    await img.storage.write(t.subarray(at, at + es), l2Off + at);
    await img.storage.flush();
  } catch (e) {
    report(`ERROR: Failed to overwrite L2 table entry: ${errnoText((e as { code?: string }).code)}`);
    res.checkErrors++;
    return false;
  }
  res.corruptions--;
  res.corruptionsFixed++;
  return true;
}

/** Walk all metadata and count references. */
async function collect(img: Qcow2Image, res: CheckResult, report: (l: string) => void, snapshotsSize: number, fix: FixMode | null): Promise<RefMap> {
  const cs = img.clusterSize;
  const fileSize = await img.storage.size();
  const bits = img.refcounts.bits;
  const refs = new RefMap(Math.ceil(fileSize / cs), fileSize, cs, report, res, bits >= 32 ? 0xffffffff : 2 ** bits - 1);
  refs.inc(0, cs);
  await countL1(img, refs, res, img.header.l1TableOffset, img.header.l1Size, true, report, fix, snapshotsSize);
  for (const sn of img.snapshots) {
    const l1Off = sn.l1TableOffsetBig ?? BigInt(sn.l1TableOffset);
    if (l1Off % BigInt(cs) !== 0n) {
      report(`ERROR snapshot ${sn.id} (${sn.name}) l1_offset=0x${l1Off.toString(16)}: L1 table is not cluster aligned; snapshot table entry corrupted`);
      res.corruptions++;
      continue;
    }
    if (sn.l1Size * 8 > MAX_L1_SIZE) {
      report(`ERROR snapshot ${sn.id} (${sn.name}) l1_size=0x${sn.l1Size.toString(16)}: L1 table is too large; snapshot table entry corrupted`);
      res.corruptions++;
      continue;
    }
    await countL1(img, refs, res, sn.l1TableOffset, sn.l1Size, false, report, fix, snapshotsSize);
  }
  refs.inc(img.header.snapshotsOffset, snapshotsSize);
  if ((img.header.autoclear & BigInt(AUTOCLEAR_BITMAPS)) !== 0n && img.header.bitmapsExt) {
    // QEMU's bitmap directory load needs the driver, gone once the image was marked corrupt.
    if (img.unusable) {
      res.corruptions++;
      throw new CheckFailedError('EINVAL');
    }
    await countBitmaps(img, refs);
  }
  const rc = img.refcounts;
  refs.inc(rc.tableOffset, rc.tableClusters * cs);
  await checkRefblocks(img, refs, res, report, fix);
  return refs;
}

/**
 * Refcount blocks, in QEMU's order of checks (check_refblocks); each failed check needs a
 * rebuild. With `-r all`, a block past the end of the file becomes part of it: the file is
 * extended to hold it (QEMU's bdrv_truncate), or the failure to do so is reported.
 */
async function checkRefblocks(img: Qcow2Image, refs: RefMap, res: CheckResult, report: (l: string) => void, fix: FixMode | null): Promise<void> {
  const cs = img.clusterSize;
  const rc = img.refcounts;
  const raw = Buffer.alloc(rc.table.length * 8);
  await img.storage.read(raw, rc.tableOffset);
  for (let i = 0; i < rc.table.length; i++) {
    const hi = raw.readUInt32BE(i * 8), lo = raw.readUInt32BE(i * 8 + 4);
    if ((lo & 0x1ff) !== 0) {
      report(`ERROR refcount table entry ${i} has reserved bits set`);
      res.corruptions++;
      res.needsRebuild = true;
      continue;
    }
    if (hi === 0 && lo === 0) continue;
    // All 55 offset bits (REFT_OFFSET_MASK); exact as a BigInt, as a number below 2^53.
    const exact = (BigInt(hi) << 32n) | BigInt(lo >>> 0);
    if (exact % BigInt(cs) !== 0n) {
      report(`ERROR refcount block ${i} is not cluster aligned; refcount table entry corrupted`);
      res.corruptions++;
      res.needsRebuild = true;
      continue;
    }
    if (exact / BigInt(cs) >= BigInt(refs.nbClusters)) {
      res.corruptions++;
      report(`${fix?.errors ? 'Repairing' : 'ERROR'} refcount block ${i} is outside image`);
      if (!fix?.errors || img.readOnly) continue;
      const err = await extendFile(img, exact + BigInt(cs), report);
      if (err === null) {
        refs.grow(await img.storage.size());
        res.corruptions--;
        res.corruptionsFixed++;
        refs.inc(Number(exact), cs);
        continue;
      }
      res.needsRebuild = true;
      report(`ERROR could not resize image: ${errnoText(err)}`);
      continue;
    }
    const bo = Number(exact);
    refs.inc(bo, cs);
    const n = refs.counts.get(bo / cs);
    if (n !== 1) {
      report(`ERROR refcount block ${i} refcount=${n}`);
      res.corruptions++;
      res.needsRebuild = true;
    }
  }
}

/**
 * Grow the file to `len` bytes (QEMU's bdrv_truncate from check_refblocks); returns the errno
 * of a failure (already reported as QEMU's file layer does) or null.
 */
async function extendFile(img: Qcow2Image, len: bigint, report: (l: string) => void): Promise<string | null> {
  if (len > (1n << 63n) - 1n) return 'EINVAL';
  // Past 2^53 no Linux file system of a real installation takes the length (ext4: 16 TiB).
  let code: string | undefined = 'EFBIG';
  if (len <= BigInt(Number.MAX_SAFE_INTEGER)) {
    try {
      await img.storage.truncate(Number(len));
      return null;
    } catch (e) {
      code = (e as { code?: string }).code ?? 'EIO';
    }
  }
  report(`qemu-img: Could not resize file: ${errnoText(code)}`);
  return code ?? 'EIO';
}

/** Persistent bitmaps: directory, tables and data clusters are referenced. */
async function countBitmaps(img: Qcow2Image, refs: RefMap): Promise<void> {
  const ext = img.header.bitmapsExt as Buffer;
  const dirSize = ext.readUInt32BE(8) * TWO32 + ext.readUInt32BE(12);
  const dirOff = ext.readUInt32BE(16) * TWO32 + ext.readUInt32BE(20);
  const nb = ext.readUInt32BE(0);
  if (dirSize > 1024 * 65535) return;
  const fileSize = await img.storage.size();
  refs.inc(dirOff, dirSize);
  const dir = Buffer.alloc(dirSize);
  await img.storage.read(dir, dirOff);
  let off = 0;
  for (let i = 0; i < nb && off + 24 <= dir.length; i++) {
    const tOff = dir.readUInt32BE(off) * TWO32 + dir.readUInt32BE(off + 4);
    const tSize = dir.readUInt32BE(off + 8);
    const nameSize = dir.readUInt16BE(off + 18), extra = dir.readUInt32BE(off + 20);
    // QEMU's directory entry constraints (BME_MAX_PHYS_SIZE, aligned non-zero table) bound the
    // table; only the part inside the file is read.
    if (tSize * img.clusterSize <= 0x20000000 && tOff !== 0 && tOff % img.clusterSize === 0) {
      refs.inc(tOff, tSize * 8);
      const n = Math.max(0, Math.min(tSize, Math.floor((fileSize - tOff) / 8)));
      const t = Buffer.alloc(n * 8);
      await img.storage.read(t, tOff);
      for (let k = 0; k < n; k++) {
        const d = (t.readUInt32BE(k * 8) & 0x00ffffff) * TWO32 + (t.readUInt32BE(k * 8 + 4) & 0xfffffe00);
        if (d) refs.inc(d, img.clusterSize);
      }
    }
    off = Math.ceil((off + 24 + extra + nameSize) / 8) * 8;
  }
}

/**
 * COPIED flags of the active tables must say "refcount is exactly one". With `fix` (errors), a
 * wrong flag is rewritten as QEMU's check_oflag_copied does (L1 entry, then the L2 table).
 */
async function checkCopied(img: Qcow2Image, res: CheckResult, report: (l: string) => void, fix: boolean, snapshotsSize: number): Promise<void> {
  const cs = img.clusterSize;
  const es = img.extL2 ? 16 : 8;
  const fileClusters = Math.ceil((await img.storage.size()) / cs);
  const withFlag = (hi: number, on: boolean): number => (on ? (hi | HI_COPIED) >>> 0 : (hi & ~HI_COPIED) >>> 0);
  for (let i = 0; i < img.header.l1Size; i++) {
    const hi = img.l1.readUInt32BE(i * 8), lo = img.l1.readUInt32BE(i * 8 + 4);
    const { offset: l2Off, copied } = readL1(img.l1, i);
    if (!l2Off) continue; // as QEMU: an unaligned table is still looked at
    // As QEMU's check_oflag_copied: a refcount that cannot be read is skipped silently.
    const rc = await img.refcounts.get(Math.floor(l2Off / cs)).catch(() => null);
    if (rc === null) continue;
    if ((rc === 1) !== copied) {
      report(`${fix ? 'Repairing' : 'ERROR'} OFLAG_COPIED L2 cluster: l1_index=${i} l1_entry=${hex(hi, lo)} refcount=${rc}`);
      if (fix) {
        img.l1.writeUInt32BE(withFlag(hi, rc === 1), i * 8);
        // qcow2_write_l1_entry: an overlap fails the check (no message of its own).
        const hit = metadataOverlap(img, img.header.l1TableOffset + i * 8, 8, snapshotsSize, ['active L1 table']);
        if (hit) {
          await img.signalCorruption(`Preventing invalid write on metadata (overlaps with ${hit})`).catch(() => {});
          res.checkErrors++;
          throw new CheckFailedError('EIO');
        }
        await img.storage.write(img.l1.subarray(i * 8, i * 8 + 8), img.header.l1TableOffset + i * 8);
        res.corruptionsFixed++;
      } else res.corruptions++;
    }
    if (l2Off / cs >= fileClusters) continue;
    const t = await img.readTable(l2Off);
    let dirty = false;
    for (let j = 0; j < img.l2Entries; j++) {
      const e = readL2(t, j, img.geo);
      if (e.type === ClusterType.Normal || e.type === ClusterType.ZeroAlloc) {
        const r = await img.refcounts.get(Math.floor(e.host / cs)).catch(() => null);
        if (r === null) continue;
        if ((r === 1) !== e.copied) {
          report(`${fix ? 'Repairing' : 'ERROR'} OFLAG_COPIED data cluster: l2_entry=${hex(e.hi, e.lo)} refcount=${r}`);
          if (fix) {
            t.writeUInt32BE(withFlag(e.hi, r === 1), j * es);
            dirty = true;
            res.corruptionsFixed++;
          } else res.corruptions++;
        }
      }
    }
    if (dirty) {
      const hit = metadataOverlap(img, l2Off, cs, snapshotsSize, ['active L2 table']);
      if (hit) {
        await img.signalCorruption(`Preventing invalid write on metadata (overlaps with ${hit})`).catch(() => {});
        report('ERROR: Could not write L2 table; metadata overlap check failed: Input/output error');
        res.checkErrors++;
        throw new CheckFailedError('EIO');
      }
      await img.storage.write(t, l2Off);
    }
  }
}

/**
 * The clusters compare_refcounts can find different, ascending: those a refcount block covers
 * and those counted. Any other cluster has no block (refcount 0) and no reference, so QEMU's walk
 * over every cluster of the file reports nothing for it.
 */
function* candidates(img: Qcow2Image, refs: RefMap): Generator<number> {
  const per = img.refcounts.perBlock;
  const ranges: Array<[number, number]> = refs.counts.ranges();
  img.refcounts.table.forEach((bo, ti) => { if (bo !== 0) ranges.push([ti * per, (ti + 1) * per]); });
  ranges.sort((a, b) => a[0] - b[0]);
  let next = 0;
  for (const [a, b] of ranges) {
    const end = Math.min(b, refs.nbClusters);
    for (let c = Math.max(a, next); c < end; c++) yield c;
    next = Math.max(next, end);
  }
}

/**
 * QEMU's compare_refcounts: stored against counted refcount of every cluster. With `fix`, the
 * mismatches it allows are reported as "Repairing" and returned as (cluster, value) to set.
 */
async function compareRefcounts(img: Qcow2Image, refs: RefMap, res: CheckResult, report: (l: string) => void,
  fix: FixMode | null): Promise<{ highest: number; fixes: Array<[number, number]> }> {
  let highest = -1;
  const fixes: Array<[number, number]> = [];
  for (const c of candidates(img, refs)) {
    let stored: number;
    try {
      stored = await img.refcounts.get(c);
    } catch (e) {
      const errno = e instanceof ImageError ? e.errno : (e as { code?: string }).code;
      if (!(e instanceof CorruptionError) && !errno) throw e;
      if (e instanceof CorruptionError) {
        // QEMU's get_refcount signals the corruption (fatal on a writable image) and fails.
        const ti = Math.floor(c / img.refcounts.perBlock);
        await img.signalCorruption(`${e.message} (reftable index: ${ti ? `0x${ti.toString(16)}` : '0'})`).catch(() => {});
      }
      report(`Can't get refcount for cluster ${c}: ${errnoText(e instanceof CorruptionError ? 'EIO' : errno)}`);
      res.checkErrors++;
      continue;
    }
    const counted = refs.counts.get(c);
    if (stored > 0 || counted > 0) highest = c;
    if (stored === counted) continue;
    let fixed = false;
    if (stored <= 0 && counted > 0) res.needsRebuild = true;
    else if (stored > counted && fix?.leaks) fixed = true;
    else if (stored < counted && fix?.errors) fixed = true;
    const shown = stored > Number.MAX_SAFE_INTEGER ? await img.refcounts.getExact(c) : Math.max(0, stored);
    report(`${fixed ? 'Repairing' : stored < counted ? 'ERROR' : 'Leaked'} cluster ${c} refcount=${shown} reference=${counted}`);
    if (fixed) {
      fixes.push([c, counted]);
      if (stored > counted) res.leaksFixed++;
      else res.corruptionsFixed++;
    } else if (stored < counted) res.corruptions++;
    else res.leaks++;
  }
  return { highest, fixes };
}

/**
 * Check the image. With `fix`, leaks (and with errors=true, wrong refcounts) are repaired: in place
 * when every referenced cluster has a refcount block, otherwise by rebuilding the structure.
 */
export async function checkImage(img: Qcow2Image, report: (l: string) => void, fix: FixMode = { leaks: false, errors: false }): Promise<CheckResult> {
  const res: CheckResult = {
    corruptions: 0, leaks: 0, checkErrors: 0, corruptionsFixed: 0, leaksFixed: 0,
    totalClusters: Math.ceil(img.size / img.clusterSize), allocatedClusters: 0, fragmentedClusters: 0, compressedClusters: 0,
    imageEndOffset: 0, needsRebuild: false,
  };
  // The snapshot table first (it may fail the whole check), as qcow2_co_check_locked.
  const repair = fix.errors && !img.readOnly;
  const snap = await checkReadSnapshotTable(img, report, repair);
  // qcow2_check_refcounts handles at most INT_MAX clusters.
  if (Math.ceil((await img.storage.size()) / img.clusterSize) > 0x7fffffff) {
    res.checkErrors++;
    throw new CheckFailedError('EFBIG');
  }
  const refs = await collect(img, res, report, snap.size, fix);
  const cs = img.clusterSize;
  // QEMU's qcow2_check_refcounts: a first comparison only reports; with a repair mode and
  // something to repair (no rebuild needed), the result is reset and a second one reports
  // again, repairing what the mode allows.
  const pre = { ...res };
  let cmp = await compareRefcounts(img, refs, res, report, null);
  const fixing = (fix.leaks || fix.errors) && !img.readOnly;
  if (fixing && !(res.needsRebuild && fix.errors)) {
    // -r leaks facing a needed rebuild: the caller fails the check here (QEMU: EIO, no more checks).
    if (res.needsRebuild) return res;
    if (res.leaks || res.corruptions) {
      Object.assign(res, pre);
      cmp = await compareRefcounts(img, refs, res, report, fix);
    }
  }
  res.imageEndOffset = (cmp.highest + 1) * cs;
  await applyFixes(img, cmp.fixes);
  if (res.needsRebuild && fix.errors && !img.readOnly) {
    report('Rebuilding refcount structure');
    await rebuildRefcountStructure(img, refs.counts, refs.nbClusters, snap.size, report);
    // As QEMU: count the references again (the walk reports its errors again), then repair the
    // leaks the rebuild left (the old structure); only leaks it could not repair remain.
    const old = { corruptions: res.corruptions, leaks: res.leaks };
    res.corruptions = 0;
    res.leaks = 0;
    res.needsRebuild = false;
    const again = await collect(img, res, report, snap.size, null);
    let freshLeaks = 0;
    if (fix.leaks) {
      const fresh = { ...res, corruptions: 0, leaks: 0, checkErrors: 0, corruptionsFixed: 0, leaksFixed: 0, needsRebuild: false };
      const c2 = await compareRefcounts(img, again, fresh, report, { leaks: true, errors: false });
      await applyFixes(img, c2.fixes);
      if (fresh.needsRebuild) report('ERROR rebuilt refcount structure is still broken');
      freshLeaks = fresh.leaks;
      res.imageEndOffset = (c2.highest + 1) * cs;
    }
    if (res.corruptions < old.corruptions) res.corruptionsFixed += old.corruptions - res.corruptions;
    if (res.leaks < old.leaks) res.leaksFixed += old.leaks - res.leaks;
    res.leaks += freshLeaks;
  }
  await checkCopied(img, res, report, repair, snap.size);
  if (repair) await checkFixSnapshotTable(img, snap, report);
  // Marked corrupt meanwhile: QEMU dropped its driver and the cached refcounts with it.
  if (img.unusable) img.refcounts.dropCache();
  else await writeRepairedRefblocks(img, snap.size);
  if (repair) img.dropCaches();
  res.corruptions += snap.corruptions;
  res.corruptionsFixed += snap.corruptionsFixed;
  if (fixing && !img.unusable && !res.checkErrors && !res.corruptions) await markCleanAndConsistent(img);
  return res;
}

/**
 * The repaired refcount blocks, as QEMU's refcount block cache writes them: each write passes the
 * metadata overlap check first. When one would fail, QEMU keeps them all cached until the image is
 * closed (the second pass sees the repaired counts); its flush there marks the image corrupt and
 * writes only the blocks that pass. The image is left to do the same on close.
 */
async function writeRepairedRefblocks(img: Qcow2Image, snapshotsSize: number): Promise<void> {
  const guard = (bo: number): OverlapKind | null => metadataOverlap(img, bo, img.clusterSize, snapshotsSize, ['refcount block']);
  if (img.refcounts.pendingBlocks().some((bo) => guard(bo) !== null)) {
    img.refblockGuard = guard;
    return;
  }
  await img.meta.run(() => img.refcounts.writePending());
}

/** qcow2_mark_clean, then qcow2_mark_consistent: a repaired image loses its dirty and corrupt bits. */
async function markCleanAndConsistent(img: Qcow2Image): Promise<void> {
  for (const bit of [BigInt(INCOMPAT_DIRTY), BigInt(INCOMPAT_CORRUPT)]) {
    if ((img.header.incompatible & bit) === 0n) continue;
    img.header.incompatible &= ~bit;
    await img.storage.flush();
    await img.writeHeader();
  }
}

/** Set the repaired refcounts; a cluster left unused is discarded (QCOW2_DISCARD_ALWAYS; the file keeps its length). */
async function applyFixes(img: Qcow2Image, fixes: Array<[number, number]>): Promise<void> {
  if (!fixes.length) return;
  const cs = img.clusterSize;
  // The new refcounts stay in memory (QEMU's refcount block cache) until the check ends; an
  // image marked corrupt meanwhile never gets them (QEMU drops its driver with the cache).
  await img.meta.run(async () => {
    const was = img.refcounts.lazy;
    img.refcounts.lazy = true;
    try {
      for (const [c, v] of fixes) {
        await img.refcounts.set(c, v);
        if (v === 0) await img.storage.punchHole?.(c * cs, cs);
      }
    } finally {
      img.refcounts.lazy = was;
    }
  });
}

/** Repair on read-write open of a dirty (lazy refcounts) image, as QEMU does automatically. */
export async function repairRefcounts(img: Qcow2Image, log: (l: string) => void): Promise<void> {
  // As qcow2_do_open: a repair that failed or met errors it could not handle fails the open.
  let res: CheckResult;
  try {
    res = await checkImage(img, log, { leaks: true, errors: true });
  } catch (e) {
    if (e instanceof CheckFailedError) throw new ImageError(`Could not repair dirty image: ${errnoText(e.errno ?? 'EIO')}`, e.errno);
    throw e;
  }
  if (res.checkErrors) throw new ImageError(`Could not repair dirty image: ${errnoText('EIO')}`, 'EIO');
}
