/**
 * block-commit of an intermediate part of a chain: copy what the layers [top, base) hold into
 * the base, then make the base the backing file of the top's overlay. A read-only base is
 * reopened read-write (by the caller, before the job starts) and read-only again when the job
 * ends, whether it completed, failed or was cancelled. (Active commit, with READY and
 * pivot, builds on the same copy step.)
 */
import type { Job } from './job.js';
import { JOB_CHUNK, copyLayers } from './copy.js';
import type { BlockGraph, FormatNode } from '../daemon/graph.js';
import { setBackingLink } from './backing-link.js';

export interface CommitPlan {
  /** The node whose chain is committed (the export's active node). */
  device: FormatNode;
  /** The highest layer to commit and the node above it, whose backing link changes. */
  top: FormatNode;
  overlay: FormatNode;
  base: FormatNode;
  backingFile?: string;
  /** The base was read-only and has been reopened read-write for the job: it goes back when the job ends. */
  baseWasReadOnly: boolean;
  /** Reopen a node read-only or read-write with guest I/O drained. */
  reopen: (node: FormatNode, readOnly: boolean) => Promise<void>;
}

export function commitWork(graph: BlockGraph, p: CommitPlan): { work: (job: Job) => Promise<void>; prepare: () => Promise<void> } {
  const work = async (job: Job): Promise<void> => {
    job.len = p.top.driver.size;
    try {
      await copyAll(job);
    } catch (e) {
      // A failed or cancelled commit leaves the base as it found it (QEMU's commit_abort).
      if (p.baseWasReadOnly) await p.reopen(p.base, true).catch(() => {});
      throw e;
    }
  };
  const copyAll = async (job: Job): Promise<void> => {
    await growBase(p.base, p.top.driver.size);
    const buf = Buffer.allocUnsafe(JOB_CHUNK);
    for (let off = 0; off < job.len; off += JOB_CHUNK) {
      await job.checkpoint();
      const n = Math.min(JOB_CHUNK, job.len - off);
      let copied = 0;
      const copy = async (): Promise<void> => {
        const chain = graph.chain(p.device);
        const t = chain.layers.findIndex((l) => l.driver === p.top.driver);
        const b = chain.layers.findIndex((l) => l.driver === p.base.driver);
        copied = await copyLayers(chain, t, b, p.base.driver, off, n, buf);
      };
      // An ignored error retries the chunk, as QEMU's commit does.
      while (await job.guarded(copy, job.onWriteError)) await job.checkpoint();
      job.offset = off + n;
      await job.checkpoint(copied);
    }
    await p.base.driver.flush();
  };
  const prepare = async (): Promise<void> => {
    // A read-only overlay (the old active node of an external snapshot) is read-write only while
    // its header changes (QEMU's bdrv_child_cb_update_filename).
    const overlayWasReadOnly = p.overlay.driver.readOnly;
    const backingName = p.backingFile ?? p.base.filename;
    if (overlayWasReadOnly) await p.reopen(p.overlay, false);
    try {
      await setBackingLink(p.overlay.driver, backingName, p.base.format);
    } finally {
      if (overlayWasReadOnly) await p.reopen(p.overlay, true).catch(() => {});
    }
    graph.relink(p.overlay, p.base, backingName);
    if (p.baseWasReadOnly) await p.reopen(p.base, true);
  };
  return { work, prepare };
}

/** A base smaller than what is committed into it grows first, as QEMU's commit does. */
export async function growBase(base: FormatNode, size: number): Promise<void> {
  if (base.driver.size >= size) return;
  if (!base.driver.resize) throw new Error(`Cannot grow the base image '${base.filename}' to ${size} bytes`);
  await base.driver.resize(size);
}
