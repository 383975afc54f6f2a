/**
 * block-stream: copy into the top what the layers between it and the base hold, then make the
 * base the top's backing file. Guest writes to the top may run concurrently: each chunk is
 * copied under the top's write gate and only where the top still holds nothing.
 */
import type { Job } from './job.js';
import { JOB_CHUNK } from './copy.js';
import type { BlockGraph, FormatNode } from '../daemon/graph.js';
import { setBackingLink } from './backing-link.js';
import { writeGate } from '../chain/chain.js';
import { tagged, type JobIoError } from './errors.js';
import { copyOnReadWrite, copyOnReadZeroes } from '../daemon/node-io.js';

export interface StreamPlan {
  top: FormatNode;
  /** The new backing node (null: stream everything, the top becomes standalone). */
  base: FormatNode | null;
  backingFile?: string;
  /** Reopen the top read-only again if the job made it read-write (idempotent). */
  sealTop?: () => Promise<void>;
}

export function streamWork(graph: BlockGraph, p: StreamPlan): { work: (job: Job) => Promise<void>; prepare: () => Promise<void> } {
  const work = async (job: Job): Promise<void> => {
    try {
      await copyAll(job);
    } catch (e) {
      // Failed or cancelled: the top goes back to read-only before the job's events.
      await p.sealTop?.();
      throw e;
    }
  };
  const copyAll = async (job: Job): Promise<void> => {
    // Nothing between the top and the base: nothing to stream, the job's length stays 0 (QEMU's stream_run).
    if ((p.top.backing ?? null) === p.base) return;
    const top = p.top.driver;
    job.len = top.size;
    const buf = Buffer.allocUnsafe(JOB_CHUNK);
    /** An error the policy ignored: the copy goes on, the job fails at the end (QEMU's stream). */
    let ignored: JobIoError | null = null;
    for (let off = 0; off < top.size; off += JOB_CHUNK) {
      await job.checkpoint();
      const n = Math.min(JOB_CHUNK, top.size - off);
      let copied = 0;
      // QEMU's stream copies by copy-on-read: every failure is reported as a read error.
      const failed = await job.guarded(() => tagged('read', async () => { copied = await streamChunk(graph, p, off, n, buf); }), job.onReadError);
      ignored ??= failed;
      job.offset = off + n;
      await job.checkpoint(copied);
    }
    if (ignored) throw ignored;
  };
  const prepare = async (): Promise<void> => {
    const name = p.base ? (p.backingFile ?? p.base.filename) : null;
    await setBackingLink(p.top.driver, name, p.base ? p.base.format : null);
    graph.relink(p.top, p.base, name);
  };
  return { work, prepare };
}

/** Copy into the top what the layers above the base hold in one chunk, where the top holds nothing. */
async function streamChunk(graph: BlockGraph, p: StreamPlan, off: number, n: number, buf: Buffer): Promise<number> {
  const top = p.top.driver;
  const chain = graph.chain(p.top);
  const baseDepth = p.base ? chain.layers.findIndex((l) => l.driver === p.base?.driver) : chain.layers.length;
  const release = await writeGate(top).acquire(off, off + n);
  let copied = 0;
  try {
    for (const own of await top.blockStatus(off, n)) {
      if (own.kind !== 'unallocated') continue;
      for (const x of await chain.statusFrom(1, own.offset, own.length)) {
        if (x.depth >= baseDepth || x.kind === 'unallocated') continue;
        // QEMU's copy-on-read: below the top's request checks, zero buffers written as zeroes.
        if (x.kind === 'zero') await copyOnReadZeroes(top, x.offset, x.length);
        else {
          const b = buf.subarray(0, x.length);
          await chain.readFrom(1, b, x.offset);
          await copyOnReadWrite(top, b, x.offset);
        }
        copied += x.length;
      }
    }
  } finally {
    release();
  }
  return copied;
}
