/**
 * The filter node a block job puts above its top for its lifetime, as QEMU 7.2 does: mirror and
 * active commit "mirror_top", an intermediate commit "commit_top" (between the top and its
 * overlay), block-stream "copy-on-read", backup "copy-before-write". Named by the job's
 * `filter-node-name`, else implicitly ("#blockNNN"). The node is for listings and the graph's
 * refusals only: its I/O is the job's existing write interception on the filtered node.
 */
import { QmpError, checkUserNodeName, nextGraphSeq, type BlockGraph, type FilterDriver, type FilterNode, type FormatNode } from '../daemon/graph.js';
import type { Job } from './job.js';
import { nextBitmapSeq } from '../daemon/bitmaps.js';

/**
 * The filter a job puts over `child`. `late`: its name is checked once the job
 * exists (an intermediate commit's; the job then ends at once), else before the job ID;
 * `prefixed`: the error reads "Could not create node: ..." (block-stream, backup).
 */
export interface FilterPlan {
  drv: FilterDriver;
  child: FormatNode;
  late?: boolean;
  prefixed?: boolean;
  readOnly?: boolean;
}

/**
 * Refuse a `filter-node-name` the graph cannot take, with QEMU's text: block-stream and backup
 * create their filter with bdrv_insert_node, whose error is prefixed "Could not create node: ".
 */
export function checkFilterName(graph: BlockGraph, name: string | undefined, prefixed: boolean): void {
  if (name === undefined) return;
  try {
    checkUserNodeName(graph.nodes, name);
  } catch (e) {
    if (prefixed && e instanceof QmpError) throw new QmpError(`Could not create node: ${e.message}`);
    throw e;
  }
}

/** Put the job's filter over `child`; it leaves the graph when the job concludes. */
export function attachFilter(graph: BlockGraph, job: Job, drv: FilterDriver, child: FormatNode, name: string | undefined,
  opts: { readOnly?: boolean; bitmaps?: () => Array<Record<string, unknown>> } = {}): FilterNode {
  const f: FilterNode = { kind: 'filter', name: name ?? graph.implicitName(), drv, child, implicit: name === undefined, readOnly: !!opts.readOnly, bitmaps: opts.bitmaps,
    seq: nextGraphSeq(), detectZeroes: 'off', noFlush: false, writeThreshold: 0 };
  graph.addFilter(f);
  job.filter = f;
  job.ended.push(() => {
    graph.removeFilter(f);
    job.filter = null;
  });
  return f;
}

/**
 * An anonymous dirty bitmap the job keeps on `node` (QEMU's BdrvDirtyInfo without a name), listed
 * until the job concludes: `recording` as QEMU's (a mirror's records writes, a backup's copy
 * bitmap is disabled), `count` the dirty bytes it holds. Its place among the node's bitmaps.
 */
export function attachJobBitmap(graph: BlockGraph, job: Job, node: FormatNode, recording: boolean, granularity: number, count: () => number): number {
  const b = { node, seq: nextBitmapSeq(), info: () => anonymousBitmap(recording, granularity, count()) };
  graph.jobBitmaps.push(b);
  job.ended.push(() => {
    const i = graph.jobBitmaps.indexOf(b);
    if (i >= 0) graph.jobBitmaps.splice(i, 1);
  });
  return b.seq;
}

/** A BlockDirtyInfo without a name, members in QEMU's order. */
export function anonymousBitmap(recording: boolean, granularity: number, count: number): Record<string, unknown> {
  return { recording, persistent: false, busy: false, granularity, count };
}

/** The job's filter leaves the graph now (the job is dropped before it started). */
export function dropFilter(job: Job): void {
  for (const f of job.ended.splice(0)) f();
}
