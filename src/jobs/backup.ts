/**
 * drive-backup / blockdev-backup: a point-in-time copy of the device's guest view (sync=full) or
 * of its top layer (sync=top) into a target. Guest writes that reach a granule not yet copied
 * first copy its old contents (copy-before-write, under the guest's own write gate), so the
 * target shows the disk exactly as it was when the job started.
 */
import type { Job } from './job.js';
import { copyLayers } from './copy.js';
import type { BlockGraph, FormatNode } from '../daemon/graph.js';
import { beforeWrites, writeGate, type Chain } from '../chain/chain.js';

export interface BackupPlan {
  source: FormatNode;
  target: FormatNode;
  depth: (chain: Chain) => number;
}

const G = 64 * 1024;

export function backupWork(graph: BlockGraph, p: BackupPlan): (job: Job) => Promise<void> {
  return async (job: Job): Promise<void> => {
    const size = p.source.driver.size;
    const n = Math.ceil(size / G);
    const done = new Uint8Array(n);
    job.len = size;
    // The chain as it is now: the point in time the copy shows.
    const chain = graph.chain(p.source);
    const depth = p.depth(chain);
    const copyGranule = async (i: number): Promise<number> => {
      if (done[i]) return 0;
      done[i] = 1;
      const off = i * G, len = Math.min(G, size - off);
      // Guest writes copy their granules concurrently with the job loop: one buffer per copy.
      let copied: number;
      try {
        copied = await copyLayers(chain, 0, depth, p.target.driver, off, len, Buffer.allocUnsafe(len));
      } catch (e) {
        done[i] = 0;
        throw e;
      }
      job.offset += len;
      return copied;
    };
    const cbw = beforeWrites(p.source.driver, async (offset, length) => {
      for (let i = Math.floor(offset / G); i < Math.min(n, Math.ceil((offset + length) / G)); i++) await copyGranule(i);
    });
    try {
      for (let i = 0; i < n; i++) {
        await job.checkpoint();
        if (done[i]) continue;
        let copied = 0;
        const copy = async (): Promise<void> => {
          const release = await writeGate(p.source.driver).acquire(i * G, Math.min(size, (i + 1) * G));
          try {
            copied = await copyGranule(i);
          } finally {
            release();
          }
        };
        // An ignored error retries the granule, as QEMU's backup does.
        while (await job.guarded(copy)) await job.checkpoint();
        await job.checkpoint(copied);
      }
      await p.target.driver.flush();
    } finally {
      cbw();
    }
  };
}
