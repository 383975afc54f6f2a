/** Which nodes the running block jobs hold, and how (QEMU's block backends and op blockers). */
import type { BlockGraph } from '../daemon/graph.js';
import type { Job } from './job.js';

/**
 * What blockdev-del of a node runs into from the block jobs (see BlockGraph.remove), as QEMU 7.2
 * answers: 'in use' where a job holds a block backend on it (a mirror's target, an active
 * commit's base, an intermediate commit's top and base, a stream's filter), the op blocker's
 * reason where the job blocked it (a job's main and intermediate nodes, a backup's target, the
 * mirror_top and copy-before-write filters; a commit_top filter carries its overlay's backing
 * blocker), 'referenced' where only a backup's filter sits on it (QEMU: "Block device X is in
 * use"); the strongest across jobs, in QEMU's order of checks.
 */
export function delRefusal(graph: BlockGraph, jobs: Iterable<Job>, name: string): string | null {
  let busy: string | null = null, referenced = false;
  for (const j of jobs) {
    if (j.status === 'concluded' || j.status === 'null' || j.type === 'create') continue;
    const why = `block device is in use by block job: ${j.type}`;
    if (j.filter?.name === name) {
      // block-stream reads through its filter with a block backend of its own.
      if (j.filter.drv === 'copy-on-read') return 'in use';
      if (j.filter.drv !== 'commit_top') busy ??= why;
      else {
        const overlay = graph.parentsOf(j.filter.child).find((p) => p.backing === j.filter?.child);
        busy ??= overlay ? `node is used as backing hd of '${overlay.name}'` : why;
      }
      continue;
    }
    const i = j.nodes.indexOf(name);
    if (j.filterOn === name) referenced = true;
    if (i < 0) continue;
    const last = j.nodes.length - 1;
    const backend = j.type === 'mirror' ? i === 1
      : j.type === 'commit' ? (j.filter?.drv === 'mirror_top' ? i === last : i === 1 || i === last)
        : false;
    if (backend) return 'in use';
    if (!(j.type === 'backup' && i === 0)) busy ??= why;
  }
  return busy ?? (referenced ? 'referenced' : null);
}
