/**
 * qemu-storage-daemon's exit path (quit, SIGTERM), in its order: every export is closed (closing
 * one drains its node twice: the jobs on that node or above it pause and resume each time), all
 * nodes are drained (every running or ready job pauses), then the jobs are cancelled newest first,
 * each waited for until it has concluded (its work stopped, its graph undone, its events sent),
 * and concluded jobs are dismissed. The images are then closed by the caller.
 */
import type { BlockGraph } from './graph.js';
import { exportCloseDrains } from './job-drain.js';
import type { Job } from '../jobs/job.js';
import { verbAllowed } from '../jobs/state.js';

export interface ShutdownHost {
  graph: BlockGraph;
  /** Export ids with the node each serves, in creation order. */
  exports(): Array<{ id: string; nodeName: string }>;
  deleteExport(id: string): void;
  /** The jobs, oldest first. */
  jobs(): Job[];
}

/** Cancel one job and wait until it is gone (QEMU's job_cancel_sync, then the dismissal of a concluded job). */
async function cancelSync(job: Job): Promise<void> {
  // A job making its graph changes finishes them (and concludes) first, as it would in QEMU.
  await job.graphChanged();
  if (job.status !== 'concluded' && verbAllowed(job.status, 'cancel')) {
    job.cancel(true);
    await job.whenConcluded();
  }
  if (job.status === 'concluded') job.dismiss();
}

export async function quiesce(h: ShutdownHost): Promise<void> {
  for (const e of h.exports()) {
    exportCloseDrains(h.graph, e.nodeName, h.jobs());
    h.deleteExport(e.id);
  }
  for (const j of h.jobs()) j.drainBegin();
  for (const j of h.jobs().reverse()) await cancelSync(j);
}
