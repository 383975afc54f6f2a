/**
 * Job commands that name a job's filter node, as QEMU 7.2 answers them. The filters are blocked
 * like their job's nodes ("Node 'f' is busy: block device is in use by block job: mirror"),
 * except an intermediate commit's commit_top, which carries its overlay's backing blocker ("node
 * is used as backing hd of 'top'"). A mirror or commit of a filter is refused as no root node.
 *
 * One deliberate difference: QEMU 7.2 starts a blockdev-backup of a commit_top node (the
 * backing blocker lets backups through). qchain refuses it with the backing blocker's text: the
 * filter disappears when the commit ends, and the backup would then read a view that changes
 * under it (QEMU swaps the base in); nothing useful is lost (back up the overlay instead).
 */
import { QmpError, type BlockGraph, type FilterNode, type FormatNode } from '../daemon/graph.js';
import type { Job } from './job.js';

export type FilterUse = 'stream' | 'backup-source' | 'backup-target' | 'mirror-source' | 'mirror-target' | 'commit' | 'snapshot';

/** The filter node `name` is, or undefined. */
export function filterNamed(graph: BlockGraph, name: string): FilterNode | undefined {
  const n = graph.nodes.get(name);
  return n?.kind === 'filter' ? n : undefined;
}

/** Throws QEMU's refusal when `name` is a job's filter node used as `use`. */
export function refuseFilterUse(graph: BlockGraph, jobs: Iterable<Job>, name: string, use: FilterUse): void {
  const f = filterNamed(graph, name);
  if (!f) return;
  if (use === 'mirror-source' || use === 'commit') throw new QmpError('Need a root block node');
  const job = [...jobs].find((j) => j.filter === f);
  const type = job?.type ?? 'backup';
  if (f.drv !== 'commit_top') throw new QmpError(`Node '${f.name}' is busy: block device is in use by block job: ${type}`);
  // An intermediate commit's filter: the stream walks down to the commit's top, which the job holds.
  if (use === 'stream') throw new QmpError(`Node '${f.child.name}' is busy: block device is in use by block job: ${type}`);
  if (use === 'backup-target') throw new QmpError('Could not create node: Block node is read-only');
  const overlay = graph.parentsOf(f.child).find((p) => p.backing === f.child);
  throw new QmpError(overlay ? `Node '${f.name}' is busy: node is used as backing hd of '${overlay.name}'` : `Node '${f.name}' is busy: block device is in use by block job: ${type}`);
}

/** The format node a job command names, after the filter refusals. */
export function jobNode(graph: BlockGraph, jobs: Iterable<Job>, name: string, use: FilterUse): FormatNode {
  refuseFilterUse(graph, jobs, name, use);
  return graph.formatNode(name);
}
