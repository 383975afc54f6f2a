/**
 * The mirror loop, shared by active commit and drive/blockdev-mirror: copy what the source
 * chain's layers [0, toDepth) hold into a target, then keep copying what guests write (a dirty
 * bitmap fed by the source's write watcher) until the job is completed. READY is announced
 * whenever the target has caught up. Completion drains the source's exports, copies the last
 * dirty granules and pivots inside the drained section, so no guest write is lost or split.
 */
import type { Job } from './job.js';
import { copyLayers } from './copy.js';
import type { BlockGraph, FormatNode } from '../daemon/graph.js';
import { watchWrites, writeGate, type Chain } from '../chain/chain.js';
import { JobIoError } from './errors.js';

export interface MirrorPlan {
  source: FormatNode;
  target: FormatNode;
  /** How many layers of the source chain to copy (active commit: down to the base, exclusive). */
  depth: (chain: Chain) => number;
  /** Initial work: 'allocated' (what the copied layers hold), 'all' (the whole disk), 'none' (sync=none). */
  initial: 'allocated' | 'all' | 'none';
  /** Zero the whole target (unmapping) before the copy, uncounted (see mirror-init.ts). */
  zeroTarget?: boolean;
  /** Zeroing the target is free for the rate limit (it can write zeros by unmapping). */
  zeroesFree?: boolean;
  granularity?: number;
  /** Graph change at completion (inside the drained section). */
  pivot: () => Promise<void>;
  /** Hold and release guest I/O on the source's exports. */
  drain: () => Promise<() => void>;
}

/** One copy request at most (QEMU's MAX_IO_BYTES). */
const MAX_RUN = 1024 * 1024;
/** A batch at most (QEMU's default buf-size, DEFAULT_MIRROR_BUF_SIZE). */
const BUF_SIZE = 16 * 1024 * 1024;

/**
 * The mirror's work and prepare stage. With auto-finalize the pivot ends the work, in the drained
 * section of the last copy. Without it the work ends with the last copy and the pivot waits for
 * job-finalize (prepare), as QEMU's mirror_prepare: meanwhile guest writes reach the source only,
 * and a cancel leaves the graph as it was.
 */
/**
 * The mirror's work and pivot. Guest writes to the source are tracked from this call on;
 * `release` stops that (the work does when it ends; the caller hands it to the job's end too,
 * for a job that fails before its work starts).
 */
export function mirrorWork(graph: BlockGraph, p: MirrorPlan): { work: (job: Job) => Promise<void>; prepare: () => Promise<void>; dirtyBytes: () => number; granularity: number; release: () => void } {
  let pivotAtPrepare = false;
  const g = p.granularity ?? 64 * 1024;
  /** Dirty granules not yet taken for copying (QEMU's dirty bitmap count: bits clear as a copy is issued). */
  let dirtyCount = 0;
  const prepare = async (): Promise<void> => {
    if (!pivotAtPrepare) return;
    const undrain = await p.drain();
    try {
      await p.pivot();
    } finally {
      undrain();
    }
  };
  const size = p.source.driver.size;
  const n = Math.ceil(size / g);
  const dirty = new Uint8Array(n);
  /** The job once it runs (progress and wake-ups); guest writes are tracked from creation on. */
  let running: Job | null = null;
  const mark = (offset: number, length: number): void => {
    for (let i = Math.floor(offset / g); i < Math.min(n, Math.ceil((offset + length) / g)); i++) {
      if (!dirty[i]) {
        dirty[i] = 1;
        dirtyCount++;
        if (running) running.len += g;
      }
    }
    running?.kick();
  };
  // As QEMU's mirror_start_job creates its dirty bitmap: the source's writes are tracked from
  // before the command returns, not from when the work first runs (sync=none copies only those).
  const unwatch = watchWrites(p.source.driver, mark);
  const work = async (job: Job): Promise<void> => {
    running = job;
    const buf = Buffer.allocUnsafe(MAX_RUN);
    try {
      job.len = dirtyCount * g;
      if (p.zeroTarget) {
        const leave = await graph.io.enter();
        try {
          await p.target.driver.writeZeroes(0, size, { mayUnmap: true });
        } finally {
          leave();
        }
      }
      if (p.initial === 'all') mark(0, size);
      else if (p.initial === 'allocated') {
        // What the copied layers hold is the initial work.
        const chain = graph.chain(p.source);
        const d = p.depth(chain);
        for (let off = 0; off < size; off += 64 * MAX_RUN) {
          for (const x of await chain.statusFrom(0, off, Math.min(64 * MAX_RUN, size - off))) {
            if (x.depth < d && x.kind !== 'unallocated') mark(x.offset, x.length);
          }
        }
      }
      let cursor = 0;
      /**
       * Take the first dirty granule at or after the cursor and the dirty ones right after it,
       * at most `limit` bytes (one granule at least): [i, j), cleared; null when none is dirty.
       */
      const takeRun = (limit: number): [number, number] | null => {
        if (dirtyCount === 0) return null;
        let i = cursor;
        for (let k = 0; k < n && !dirty[i]; k++) i = (i + 1) % n;
        let j = i + 1;
        while (j < n && dirty[j] && (j - i + 1) * g <= limit) j++;
        for (let k = i; k < j; k++) dirty[k] = 0;
        dirtyCount -= j - i;
        cursor = j % n;
        return [i, j];
      };
      /**
       * Copy granules [i, j); the bytes the rate limit charges (QEMU: the whole run, or only the
       * data copied when the target writes zeros by unmapping), 0 after a handled error.
       */
      const copyRun = async (i: number, j: number, final: boolean): Promise<number> => {
        const off = i * g, len = Math.min(size, j * g) - off;
        const stats = { data: 0 };
        // The graph's io section (a reopen below waits for this copy), then the source's gate.
        const leave = await graph.io.enter();
        let failed: JobIoError | null = null;
        try {
          const chain = graph.chain(p.source);
          const release = await writeGate(p.source.driver).acquire(off, off + len);
          try {
            const d = p.depth(chain);
            await copyLayers(chain, 0, d, p.target.driver, off, len, buf, { zeroUnallocated: d === chain.layers.length, mayUnmap: true, stats });
          } finally {
            release();
          }
        } catch (e) {
          if (!(e instanceof JobIoError) || final) throw e;
          failed = e;
        } finally {
          leave();
        }
        if (failed) {
          // The range is dirty again; the policy decides whether the job fails, pauses or goes on.
          job.len -= (j - i) * g;
          mark(off, len);
          if (job.errorAction(failed) === 'report') throw failed;
          return 0;
        }
        job.offset += (j - i) * g;
        return p.zeroesFree ? stats.data : len;
      };
      /**
       * QEMU 7.2's mirror_iteration: one batch of up to BUF_SIZE consecutive dirty bytes, copied
       * in runs of MAX_RUN; the rate limit counts the data copied and yields the delay to sleep.
       */
      const iteration = async (): Promise<number> => {
        const batch = takeRun(BUF_SIZE);
        if (!batch) return 0;
        const step = Math.max(1, Math.floor(MAX_RUN / g));
        let delay = 0;
        for (let i = batch[0]; i < batch[1]; i += step) {
          job.stopIfCancelled();
          delay = job.rate.delay(await copyRun(i, Math.min(batch[1], i + step), false));
        }
        return delay;
      };
      let flushedForReady = false;
      for (;;) {
        await job.checkpoint();
        if (dirtyCount > 0) {
          await job.rateSleep(await iteration());
          continue;
        }
        if (job.status === 'running' && !flushedForReady) {
          // As QEMU's mirror: the target is flushed once before READY (what was copied is then
          // on disk), so completing later only flushes what was copied since.
          await p.target.driver.flush();
          flushedForReady = true;
          continue;
        }
        if (job.status === 'running') job.markReady();
        if (job.finishing) break;
        await job.idle();
      }
      if (job.softCancelled) return;
      job.stopIfCancelled();
      // Completion: no guest I/O from here to the pivot, and no verb (QEMU's job_exit is one step).
      await job.graphChange(async () => {
        const undrain = await p.drain();
        try {
          // The last dirty granules.
          for (let r = takeRun(MAX_RUN); r; r = takeRun(MAX_RUN)) await copyRun(r[0], r[1], true);
          await p.target.driver.flush();
          if (job.autoFinalize) await p.pivot();
          else pivotAtPrepare = true;
        } finally {
          undrain();
        }
      });
    } finally {
      unwatch();
    }
  };
  return { work, prepare, dirtyBytes: () => dirtyCount * g, granularity: g, release: () => { unwatch(); } };
}
