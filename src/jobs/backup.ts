/**
 * drive-backup / blockdev-backup: a point-in-time copy of the device's guest view (sync=full), of
 * its top layer (sync=top), or of the granules a dirty bitmap marks (sync=bitmap/incremental).
 * Guest writes that reach a granule still to be copied first copy its old contents
 * (copy-before-write, under the guest's own write gate), so the target shows the disk exactly as
 * it was when the job started. The hook is armed when the job is created, in the same tick as
 * the command (or transaction) that starts it. sync=none (image fleecing) copies nothing by
 * itself: only copy-before-write fills the target (usually an overlay whose backing is the live
 * source, exported read-only), until the job is cancelled.
 */
import type { Job } from './job.js';
import { copyLayers } from './copy.js';
import { tagged } from './errors.js';
import type { BlockGraph, FormatNode } from '../daemon/graph.js';
import { beforeWrites, writeGate, type Chain } from '../chain/chain.js';
import type { DirtyBitmap } from '../qcow2/dirty-bitmap.js';

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
}

/** The job's copy granule (QEMU's default backup cluster size). */
export const BACKUP_GRANULE = 64 * 1024;
const G = BACKUP_GRANULE;

export interface Backup {
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
export function granulesOf(bm: DirtyBitmap, size: number): Uint8Array {
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

export function backupWork(graph: BlockGraph, p: BackupPlan): Backup {
  const size = p.source.driver.size;
  const n = Math.ceil(size / G);
  const pending = p.bitmap ? granulesOf(p.bitmap, size) : new Uint8Array(n).fill(1);
  let len = 0;
  for (let i = 0; i < n; i++) if (pending[i]) len += Math.min(G, size - i * G);
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
      copied = p.bitmap || p.none ? await copyView(chain, p.target, off, glen, buf) : await copyLayers(chain, 0, p.depth(chain), p.target.driver, off, glen, buf);
    } catch (e) {
      pending[i] = 1; // not copied: a retry (or bitmap-mode=always) must still see it
      throw e;
    }
    progress += glen;
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
  return { work, pending, len, copyBytes: count, accessBytes: n * G, cbwBytes: () => doneCount * G };
}
