/**
 * drive-backup / blockdev-backup: a point-in-time copy of the device's guest view (sync=full), of
 * its top layer (sync=top), or of the granules a dirty bitmap marks (sync=bitmap/incremental).
 * Guest writes that reach a granule still to be copied first copy its old contents
 * (copy-before-write, under the guest's own write gate), so the target shows the disk exactly as
 * it was when the job started. The hook is armed when the job is created, in the same tick as
 * the command (or transaction) that starts it. sync=none (image fleecing) copies nothing by
 * itself: only copy-before-write fills the target (usually an overlay whose backing is the live
 * source, exported read-only), until the job is cancelled.
 *
 * compress=true (QEMU's BDRV_REQ_WRITE_COMPRESSED through block-copy's COPY_READ_WRITE_CLUSTER):
 * every granule that holds any data is read whole (the source's full view) and written to the
 * qcow2 target as compressed clusters, by the job and by copy-before-write alike; a granule that
 * is all zeroes (or skipped) is zeroed as without compression (block-copy's write-zeroes drops
 * the compressed flag). The granule (with or without compression) is QEMU's block-copy cluster
 * size, the larger of 64 KiB and the target's cluster size, so every compressed write covers
 * whole target clusters.
 */
import type { Job } from './job.js';
import { copyLayers } from './copy.js';
import { tagged } from './errors.js';
import type { BlockGraph, FormatNode } from '../daemon/graph.js';
import { beforeWrites, writeGate, type Chain } from '../chain/chain.js';
import type { DirtyBitmap } from '../qcow2/dirty-bitmap.js';
import type { BlockDriver } from '../image/driver.js';
import { ImageError } from '../image/errors.js';

export interface BackupPlan {
  source: FormatNode;
  target: FormatNode;
  depth: (chain: Chain) => number;
  /** sync=bitmap: only the granules this bitmap marks are copied (what is not data is written as zeroes). */
  bitmap?: DirtyBitmap;
  /**
   * sync=none (image fleecing): the job copies nothing by itself; only the old contents of the
   * granules the guest overwrites go to the target (as the source showed them: zeroes too, since
   * the target usually has the source as backing), until the job is cancelled.
   */
  none?: boolean;
  /** compress=true: data granules go to the (qcow2) target as compressed clusters. */
  compress?: boolean;
  /** The copy granule (default BACKUP_GRANULE). */
  granule?: number;
}

/** The job's copy granule (QEMU's default backup cluster size). */
export const BACKUP_GRANULE = 64 * 1024;

/** The target driver's compressed write (qcow2), or null when it has none. */
type CompressingDriver = BlockDriver & { writeCompressed?: (buf: Buffer, offset: number) => Promise<void>; clusterSize?: number };

/** Whether a backup target takes compressed writes (QEMU's bdrv_supports_compressed_writes). */
export function supportsCompressedWrites(target: FormatNode): boolean {
  return target.format === 'qcow2' && typeof (target.driver as CompressingDriver).writeCompressed === 'function';
}

/**
 * QEMU's block-copy cluster size (block_copy_calculate_cluster_size), the backup's copy granule
 * with or without compression: max(64 KiB, the target's cluster size); 64 KiB for a target that
 * reports none (raw, a protocol node).
 */
export function copyGranule(target: FormatNode): number {
  return Math.max(BACKUP_GRANULE, (target.driver as CompressingDriver).clusterSize ?? 0);
}

export interface Backup {
  /** The copy granule in bytes. */
  granule: number;
  work: (job: Job) => Promise<void>;
  /** Granules not copied yet (1 = still to copy), for bitmap-mode=always after a failure. */
  pending: Uint8Array;
  /** Bytes the job has to copy (its len). */
  len: number;
  /** For listings (QEMU's anonymous bitmaps): what is left to copy, the filter's access bitmap (the whole disk), the granules guest writes reached. */
  copyBytes: () => number;
  accessBytes: number;
  cbwBytes: () => number;
}

/** Granules (of G bytes) a bitmap touches, 1 = to copy. */
export function granulesOf(bm: DirtyBitmap, size: number, G = BACKUP_GRANULE): Uint8Array {
  const n = Math.ceil(size / G);
  const out = new Uint8Array(n);
  for (const [off, len] of bm.dirtyRanges()) out.fill(1, Math.floor(off / G), Math.min(n, Math.ceil((off + len) / G)));
  return out;
}

/** Copies what the chain shows (data as data; zeroes and unallocated as zeroes) for sync=bitmap. */
async function copyView(chain: Chain, target: FormatNode, offset: number, length: number, buf: Buffer): Promise<number> {
  for (const x of await tagged('read', () => chain.statusFrom(0, offset, length))) {
    if (x.kind === 'data') {
      const b = buf.subarray(0, x.length);
      await tagged('read', () => chain.readFrom(0, b, x.offset));
      await tagged('write', () => target.driver.write(b, x.offset));
    } else {
      await tagged('write', () => target.driver.writeZeroes(x.offset, x.length));
    }
  }
  return length;
}

/**
 * One granule of sync=full without compression (QEMU's block-copy over the whole chain): a granule
 * that reads as zeroes throughout (zero or unallocated) is zeroed on the target, one that holds
 * any data is read whole and written whole (its zero parts as data, as QEMU's chunks).
 */
async function copyFull(chain: Chain, target: FormatNode, offset: number, length: number, buf: Buffer): Promise<number> {
  const exts = await tagged('read', () => chain.statusFrom(0, offset, length));
  if (!exts.some((x) => x.kind === 'data')) {
    await tagged('write', () => target.driver.writeZeroes(offset, length));
    return length;
  }
  const b = buf.subarray(0, length);
  await tagged('read', () => chain.readFrom(0, b, offset));
  await tagged('write', () => target.driver.write(b, offset));
  return length;
}

/**
 * One granule of a compressing backup: if any of it is data (within the layers copied: depth
 * `toDepth`, or the whole view with `view`), the whole granule is read through the chain and
 * written compressed; otherwise it is copied as without compression (zeroes, or skipped).
 */
async function copyCompressed(chain: Chain, target: FormatNode, offset: number, length: number, buf: Buffer,
  toDepth: number, view: boolean): Promise<number> {
  const exts = await tagged('read', () => chain.statusFrom(0, offset, length));
  if (!exts.some((x) => x.kind === 'data' && (view || x.depth < toDepth))) {
    // The whole chain (sync=full, bitmap, none): what reads as zeroes is zeroed on the target,
    // unallocated areas too (QEMU's block status reports them as zero below a chain without
    // backing, and block-copy writes zeroes); sync=top skips what its top does not hold.
    return view || toDepth >= chain.layers.length ? copyView(chain, target, offset, length, buf)
      : copyLayers(chain, 0, toDepth, target.driver, offset, length, buf);
  }
  const drv = target.driver as CompressingDriver;
  const b = buf.subarray(0, length);
  await tagged('read', () => chain.readFrom(0, b, offset));
  await tagged('write', async () => {
    if (typeof drv.writeCompressed !== 'function') throw new ImageError('Operation not supported', 'ENOTSUP');
    await drv.writeCompressed(b, offset);
  });
  return length;
}

export function backupWork(graph: BlockGraph, p: BackupPlan): Backup {
  const G = p.granule ?? BACKUP_GRANULE;
  const size = p.source.driver.size;
  const n = Math.ceil(size / G);
  const pending = p.bitmap ? granulesOf(p.bitmap, size, G) : new Uint8Array(n).fill(1);
  let len = 0;
  // Whole granules, the image's last partial one too (QEMU counts its copy bitmap's granules).
  for (let i = 0; i < n; i++) if (pending[i]) len += G;
  let job: Job | null = null;
  let progress = 0;
  const copyGranule = async (i: number): Promise<number> => {
    if (!pending[i]) return 0;
    pending[i] = 0;
    const off = i * G, glen = Math.min(G, size - off);
    // Guest writes copy their granules concurrently with the job loop: one buffer per copy.
    const buf = Buffer.allocUnsafe(glen);
    let copied: number;
    try {
      // The chain is looked up per granule: below the source, a commit through another overlay may
      // reopen and relink nodes while the job runs. The view through the source stays the same
      // (only guest writes change it, and they copy first); the handles do not.
      const chain = graph.chain(p.source);
      const view = !!(p.bitmap || p.none);
      if (p.compress) copied = await copyCompressed(chain, p.target, off, glen, buf, view ? chain.layers.length : p.depth(chain), view);
      else if (view) copied = await copyView(chain, p.target, off, glen, buf);
      else if (p.depth(chain) >= chain.layers.length) copied = await copyFull(chain, p.target, off, glen, buf);
      else copied = await copyLayers(chain, 0, p.depth(chain), p.target.driver, off, glen, buf);
    } catch (e) {
      pending[i] = 1; // not copied: a retry (or bitmap-mode=always) must still see it
      throw e;
    }
    progress += G;
    if (job) job.offset = progress;
    return copied;
  };
  /** Granules guest writes have reached, copied first where still to copy (QEMU's done_bitmap, set for every write). */
  const done = new Uint8Array(n);
  let doneCount = 0;
  const cbw = beforeWrites(p.source.driver, async (offset, length) => {
    for (let i = Math.floor(offset / G); i < Math.min(n, Math.ceil((offset + length) / G)); i++) {
      if (pending[i]) await copyGranule(i);
      if (!done[i]) {
        done[i] = 1;
        doneCount++;
      }
    }
  });
  const work = async (j: Job): Promise<void> => {
    job = j;
    j.len = len;
    j.offset = progress;
    try {
      // sync=none: wait for the cancel, copy-before-write doing all the copying meanwhile.
      if (p.none) for (;;) {
        await j.checkpoint();
        await j.idle();
      }
      for (let i = 0; i < n; i++) {
        await j.checkpoint();
        if (!pending[i]) continue;
        let copied = 0;
        const copy = async (): Promise<void> => {
          // The graph's io section first, then the gate (the order every job copy keeps).
          const leave = await graph.io.enter();
          try {
            const release = await writeGate(p.source.driver).acquire(i * G, Math.min(size, (i + 1) * G));
            try {
              copied = await copyGranule(i);
            } finally {
              release();
            }
          } finally {
            leave();
          }
        };
        // An ignored error retries the granule, as QEMU's backup does.
        while (await j.guarded(copy)) await j.checkpoint();
        await j.checkpoint(copied);
      }
      await p.target.driver.flush();
    } finally {
      cbw();
    }
  };
  const count = (): number => pending.reduce((a, x) => a + x, 0) * G;
  // The access bitmap covers the whole disk (only discards through the filter would clear it).
  return { granule: G, work, pending, len, copyBytes: count, accessBytes: n * G, cbwBytes: () => doneCount * G };
}
