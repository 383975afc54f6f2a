/**
 * Changing the options of an existing qcow2 image, as QEMU's qcow2_amend_options(): upgrade to v3
 * first, then the refcount width, lazy refcounts, the virtual size (the resize path), and the
 * downgrade to v2 last. Checks and
 * messages are QEMU's, in QEMU's order (some failures happen after earlier steps took effect).
 *
 * Crash safety: every new structure is written completely before the header points at it, and
 * what the old header referenced is released only afterwards (a crash leaks, never corrupts):
 * - refcount width: new refblocks and reftable are allocated in the old structure, written, then
 *   one header write switches width and table; the old blocks/table are freed in the new one;
 * - downgrade: zero clusters become data clusters of zeros (allocation, zeros, then the L2 entry),
 *   and only then does the header say v2.
 */
import type { Qcow2Image } from './image.js';
import { Refcounts } from './refcount.js';
import { ClusterType, readL1, readL2 } from './entry.js';
import { ImageError } from '../image/errors.js';
import * as C from './constants.js';
import { validateSnapshotL1, writeSnapshotTable } from './snapshot.js';

export interface AmendOptions {
  /** 2 (compat=0.10) or 3 (compat=1.1). */
  version?: number;
  refcountBits?: number;
  lazyRefcounts?: boolean;
  size?: number;
  backingFile?: string;
  backingFormat?: string;
  dataFile?: string;
  dataFileRaw?: boolean;
  /** Any encrypt.* option was given. */
  encryption?: boolean;
}

export type AmendOperation = 'upgrade' | 'refcount' | 'downgrade';

/** Progress of one operation: `offset` of `total` work units (QEMU's status callback). */
export type AmendStatus = (op: AmendOperation, offset: number, total: number) => void;

/** How many operations will report progress (QEMU's total_operations), for the progress projection. */
export function amendOperationCount(img: Qcow2Image, o: AmendOptions): number {
  const v = o.version ?? img.version;
  const rb = o.refcountBits ?? img.refcounts.bits;
  return (v !== img.version ? 1 : 0) + (rb !== img.refcounts.bits ? 1 : 0) + (o.encryption ? 1 : 0);
}

/** Apply the options to an image opened read-write. Throws ImageError with QEMU's message. */
export async function amendQcow2(img: Qcow2Image, o: AmendOptions, status: AmendStatus = () => {}): Promise<void> {
  await img.flushMetadata();
  const h = img.header;
  const oldVersion = img.version;
  const newVersion = o.version ?? oldVersion;
  const refcountBits = o.refcountBits ?? img.refcounts.bits;
  if (o.dataFile !== undefined) throw new ImageError('data-file can only be set for images that use an external data file');
  if (o.dataFileRaw) throw new ImageError('data-file-raw cannot be set on existing images');
  if (o.encryption) throw new ImageError("Can't amend encryption options - encryption not present");

  if (newVersion > oldVersion) await upgrade(img, status);
  if (refcountBits !== img.refcounts.bits) {
    if (newVersion < 3 && refcountBits !== 16) {
      throw new ImageError('Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)');
    }
    await changeRefcountOrder(img, Math.log2(refcountBits), status);
  }
  h.autoclear &= ~BigInt(C.AUTOCLEAR_DATA_FILE_RAW);
  await img.writeHeader();
  if (o.backingFile !== undefined || o.backingFormat !== undefined) {
    if ((o.backingFile ?? null) !== h.backingFile || (o.backingFormat ?? null) !== h.backingFormat) {
      throw new ImageError("Cannot amend the backing file\nYou can use 'qemu-img rebase' instead.");
    }
  }
  if (o.lazyRefcounts !== undefined && o.lazyRefcounts !== img.lazyRefcounts) {
    if (o.lazyRefcounts) {
      if (newVersion < 3) throw new ImageError('Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)');
      h.compatible |= BigInt(C.COMPAT_LAZY_REFCOUNTS);
    } else {
      await markClean(img);
      h.compatible &= ~BigInt(C.COMPAT_LAZY_REFCOUNTS);
    }
    await img.writeHeader();
  }
  // size=0 means "unchanged"; any other size truncates exactly, shrinking without --shrink.
  if (o.size) await img.resize(o.size, { shrink: true });
  if (newVersion < oldVersion) await downgrade(img, status);
  await img.flush();
}

async function markClean(img: Qcow2Image): Promise<void> {
  if (!img.dirty) return;
  await img.flush();
  img.header.incompatible &= ~BigInt(C.INCOMPAT_DIRTY);
  await img.writeHeader();
}

/** v2 → v3: snapshot entries get the v3 extra data, then the header is rewritten as v3. */
async function upgrade(img: Qcow2Image, status: AmendStatus): Promise<void> {
  status('upgrade', 0, 2);
  // v2 tables may lack the 16 bytes of extra data v3 requires; the rewrite always has them.
  if (img.snapshots.some((s) => s.diskSize === null)) {
    await writeSnapshotTable(img, img.snapshots.map((s) => ({ ...s, diskSize: s.diskSize ?? img.size })));
  }
  status('upgrade', 1, 2);
  img.header.version = 3;
  img.header.refcountOrder = 4;
  await img.writeHeader();
  status('upgrade', 2, 2);
}

/** v3 → v2 (qcow2_downgrade): refusals first, then zero clusters expanded, then the v2 header. */
async function downgrade(img: Qcow2Image, status: AmendStatus): Promise<void> {
  const h = img.header;
  if (h.refcountOrder !== 4) throw new ImageError('compat=0.10 requires refcount_bits=16');
  for (const s of img.snapshots) {
    if (s.vmStateSize > 0xffffffff || (s.diskSize ?? img.size) !== img.size) throw new ImageError('Internal snapshots prevent downgrade of image');
  }
  await markClean(img);
  const incompat = h.incompatible & ~BigInt(C.INCOMPAT_COMPRESSION);
  if (incompat !== 0n) throw new ImageError(`Cannot downgrade an image with incompatible features 0x${incompat.toString(16)} set`);
  h.compatible = 0n;
  h.autoclear = 0n;
  await expandZeroClusters(img, status);
  if (h.compressionType !== 0) {
    if (await hasCompressedClusters(img)) throw new ImageError('Cannot downgrade an image with zstd compression type and existing compressed clusters');
    h.incompatible &= ~BigInt(C.INCOMPAT_COMPRESSION);
    h.compressionType = 0;
  }
  await img.flush();
  h.version = 2;
  await img.writeHeader();
}

const COPIED_HI = C.HI_COPIED;

/** Host L2 entry words for a plain data cluster at `host`. */
export function dataEntry(host: number, copied: boolean): [number, number] {
  // `>>> 0` after each bitwise step: JS bit operations yield signed 32-bit values.
  return [((Math.floor(host / C.TWO32) & C.HI_OFFSET_MASK) | (copied ? COPIED_HI : 0)) >>> 0, ((host >>> 0) & C.LO_OFFSET_MASK) >>> 0];
}

/**
 * qcow2_expand_zero_clusters(): in the active and every snapshot L1, zero clusters become
 * unallocated (no backing file: they read as zero anyway) or data clusters full of zeros.
 * An L2 table is rewritten after its new clusters hold their zeros.
 */
async function expandZeroClusters(img: Qcow2Image, status: AmendStatus): Promise<void> {
  const cs = img.clusterSize;
  const tables: Buffer[] = [img.l1];
  for (const s of img.snapshots) {
    validateSnapshotL1(img, s);
    tables.push(await img.readL1Table(s.l1TableOffset, s.l1Size));
  }
  const total = tables.reduce((a, t) => a + t.length / 8, 0);
  const backed = img.backingFile !== null;
  const zeros = Buffer.alloc(cs);
  const geo = { clusterBits: img.clusterBits, extL2: false, zeroFlag: true };
  let visited = 0;
  img.dropCaches();
  for (const l1 of tables) {
    for (let i = 0; i < l1.length / 8; i++) {
      const { offset: l2Off } = readL1(l1, i);
      if (l2Off) {
        if (l2Off % cs !== 0) {
          await img.signalCorruption(`L2 table offset 0x${l2Off.toString(16)} unaligned (L1 index: ${i ? `0x${i.toString(16)}` : '0'})`);
        }
        const l2rc = await img.meta.run(() => img.refcounts.get(l2Off / cs));
        const t = await img.readTable(l2Off);
        let dirty = false;
        for (let j = 0; j < img.l2Entries; j++) {
          const e = readL2(t, j, geo);
          if (e.type !== ClusterType.ZeroPlain && e.type !== ClusterType.ZeroAlloc) continue;
          let host = e.host;
          if (e.type === ClusterType.ZeroPlain) {
            if (!backed) {
              t.writeUInt32BE(0, j * 8);
              t.writeUInt32BE(0, j * 8 + 4);
              dirty = true;
              continue;
            }
            host = await img.meta.run(async () => {
              const at = await img.refcounts.alloc(1);
              // A shared L2 table: the new cluster is referenced as often as the table.
              if (l2rc > 1) await img.refcounts.update(at / cs, 1, l2rc - 1);
              return at;
            });
          }
          await img.storage.write(zeros, host);
          const [hi, lo] = dataEntry(host, l2rc === 1);
          t.writeUInt32BE(hi, j * 8);
          t.writeUInt32BE(lo, j * 8 + 4);
          dirty = true;
        }
        if (dirty) {
          await img.flush(); // data and refcounts before the entries that use them
          await img.storage.write(t, l2Off);
        }
      }
      visited++;
      status('downgrade', visited, total);
    }
  }
  img.dropCaches();
}

async function hasCompressedClusters(img: Qcow2Image): Promise<boolean> {
  const tables: Buffer[] = [img.l1];
  for (const s of img.snapshots) {
    validateSnapshotL1(img, s);
    tables.push(await img.readL1Table(s.l1TableOffset, s.l1Size));
  }
  for (const l1 of tables) {
    for (let i = 0; i < l1.length / 8; i++) {
      const { offset } = readL1(l1, i);
      if (!offset) continue;
      const t = await img.readTable(offset);
      for (let j = 0; j < img.l2Entries; j++) if (readL2(t, j, img.geo).type === ClusterType.Compressed) return true;
    }
  }
  return false;
}

/**
 * qcow2_change_refcount_order(): walk the old refcounts in blocks of the new width, allocating
 * (in the old structure) a block for every new block that is not empty, and a new reftable;
 * repeat until a walk allocates nothing. Then write the new blocks and table, switch the header
 * in one write, adopt the new structure and free the old blocks and table in it.
 */
async function changeRefcountOrder(img: Qcow2Image, order: number, status: AmendStatus): Promise<void> {
  const cs = img.clusterSize;
  const newBits = 2 ** order;
  const newPerBlock = (cs * 8) / newBits;
  const maxNew = newBits >= 53 ? Infinity : 2 ** newBits;
  let reftable: number[] = [];
  let reftableOffset = 0, reftableAllocated = 0;
  let walkIndex = 0;

  const enc = new Refcounts(img.storage, { clusterBits: img.clusterBits, refcountOrder: order }, 0, 0, []);

  /** A new block is complete: allocate it (phase 1) or write it (phase 2). Returns "allocated". */
  const finish = async (nb: number, buf: Buffer | null, empty: boolean): Promise<boolean> => {
    if (buf) {
      if (nb < reftable.length && reftable[nb]) await img.storage.write(buf, reftable[nb]);
      else if (!empty) throw new ImageError('Refcount structure changed while it was being rewritten');
      return false;
    }
    if (!empty && nb >= reftable.length) {
      const size = Math.ceil((nb + 1) / (cs / 8)) * (cs / 8);
      if (size * 8 > C.MAX_REFTABLE_SIZE) {
        throw new ImageError('This operation would make the refcount table grow beyond the maximum size supported by QEMU, aborting');
      }
      while (reftable.length < size) reftable.push(0);
    }
    if (!empty && !reftable[nb]) {
      reftable[nb] = await img.meta.run(() => img.refcounts.alloc(1));
      return true;
    }
    return false;
  };

  /** walk_over_reftable(): the old refcounts, live, in new-block units; `fill` writes the blocks. */
  const walk = async (index: number, totalWalks: number, fill: boolean): Promise<boolean> => {
    let allocated = false;
    let nb = 0, k = 0, empty = true;
    const buf: Buffer | null = fill ? Buffer.alloc(cs) : null;
    for (let ti = 0; ti < img.refcounts.table.length; ti++) {
      const old = img.refcounts;
      status('refcount', index * old.table.length + ti, totalWalks * old.table.length);
      const bo = old.table[ti];
      if (bo !== 0 && (bo < 0 || bo % cs !== 0)) throw new ImageError('Image is corrupt (unaligned refblock offset)');
      for (let r = 0; r < old.perBlock; r++) {
        if (k >= newPerBlock) {
          if (await finish(nb, buf, empty)) allocated = true;
          nb++;
          k = 0;
          // Reuse the block buffer; only one that received values needs clearing.
          if (buf && !empty) buf.fill(0);
          empty = true;
        }
        if (bo === 0) {
          // No refblock: every refcount in its range is 0.
          const skip = Math.min(old.perBlock - r, newPerBlock - k);
          k += skip;
          r += skip - 1;
          continue;
        }
        const c = ti * old.perBlock + r;
        const v = await old.get(c);
        if (v >= maxNew) {
          throw new ImageError(`Cannot decrease refcount entry width to ${newBits} bits: Cluster at offset 0x${(c * cs).toString(16)} has a refcount of ${v}`);
        }
        if (v !== 0) {
          empty = false;
          if (buf) enc.encodeInto(buf, k, v);
        }
        k++;
      }
    }
    if (k > 0 && (await finish(nb, buf, empty))) allocated = true;
    status('refcount', (index + 1) * img.refcounts.table.length, totalWalks * img.refcounts.table.length);
    return allocated;
  };

  for (;;) {
    const totalWalks = Math.max(walkIndex + 2, 3);
    const allocated = await walk(walkIndex, totalWalks, false);
    walkIndex++;
    if (!allocated) break;
    await img.meta.run(async () => {
      if (reftableOffset) await img.refcounts.free(reftableOffset, Math.ceil((reftableAllocated * 8) / cs));
      reftableOffset = await img.refcounts.alloc(Math.ceil((reftable.length * 8) / cs));
    });
    reftableAllocated = reftable.length;
  }
  if (!reftableOffset) {
    // Nothing was ever allocated (cannot happen: the header cluster is always in use).
    throw new ImageError('Failed to allocate the new reftable');
  }
  await walk(walkIndex, walkIndex + 1, true);
  const raw = Buffer.alloc(reftable.length * 8);
  reftable.forEach((v, i) => {
    raw.writeUInt32BE(Math.floor(v / C.TWO32), i * 8);
    raw.writeUInt32BE(v >>> 0, i * 8 + 4);
  });
  await img.storage.write(raw, reftableOffset);
  await img.flush();
  // The switch: width, table offset and size change in one header write.
  const h = img.header;
  const oldTable = img.refcounts.table.slice();
  const oldTableOffset = img.refcounts.tableOffset, oldTableClusters = img.refcounts.tableClusters;
  h.refcountOrder = order;
  h.refcountTableOffset = reftableOffset;
  h.refcountTableClusters = (reftable.length * 8) / cs;
  await img.writeHeader();
  await img.flush();
  const fresh = await Refcounts.load(img.storage, { clusterBits: img.clusterBits, refcountOrder: order }, reftableOffset, h.refcountTableClusters);
  img.useRefcounts(fresh);
  // Release the old structure (now only leaks if interrupted).
  await img.meta.run(async () => {
    for (const bo of oldTable) if (bo > 0) await fresh.free(bo, 1);
    await fresh.free(oldTableOffset, oldTableClusters);
  });
}
