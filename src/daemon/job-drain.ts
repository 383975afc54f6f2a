/**
 * What QEMU's drained sections do to block jobs, as their events show: a job whose node (or a
 * node below it) is drained, and not paused by the user, stops at its pause point (running →
 * paused, ready → standby) and resumes when the section ends. Our graph changes need no such
 * section; only the status changes and their events are reproduced, in job order (oldest first).
 */
import type { BlockGraph, FormatNode } from './graph.js';
import type { Job } from '../jobs/job.js';

/** Whether draining `node` reaches `job`: the job holds the node or a node above it (drains go up to parents). */
export function drains(graph: BlockGraph, node: string, job: Job): boolean {
  return job.nodes.some((n) => {
    const x = graph.nodes.get(n);
    if (!x || x.kind !== 'format') return n === node;
    for (let c: FormatNode | null = x; c; c = c.backing) if (c.name === node) return true;
    return false;
  });
}

/** One drained section over `jobs`: all that can pause do, then all resume. */
export function drainSection(jobs: Job[]): void {
  const paused = jobs.filter((j) => j.drainBegin());
  for (const j of paused) j.drainEnd();
}

/** QEMU's bdrv_drain_all() (what every transaction begins with): every job pauses and resumes once. */
export function drainAllJobs(jobs: Job[]): void {
  drainSection(jobs);
}

/** Closing an export drains its node twice (blk_remove_bs, then the export's own drain). */
export function exportCloseDrains(graph: BlockGraph, node: string, jobs: Job[]): void {
  const affected = jobs.filter((j) => drains(graph, node, j));
  for (let pass = 0; pass < 2; pass++) drainSection(affected);
}
