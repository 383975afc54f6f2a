/**
 * The job verbs over QMP (job-*, block-job-*, block-job-set-speed) and their lookups, with
 * QEMU's texts. A verb arriving while a job makes its final graph changes (QEMU makes them with
 * no monitor command in between) is applied once they are over, to the job as it is then.
 */
import type { Job } from './job.js';
import { QmpError } from '../daemon/graph.js';
import { onlyArgs, optBool, optInt, str, type Handler } from '../qmp/server.js';
import { verbAllowed, type JobVerb } from './state.js';

function byId(jobs: Map<string, Job>, id: string): Job {
  const j = jobs.get(id);
  if (!j) throw new QmpError('Job not found');
  return j;
}

function byDevice(jobs: Map<string, Job>, device: string): Job {
  const j = jobs.get(device);
  if (!j) throw new QmpError(`Block job '${device}' not found`, 'DeviceNotActive');
  return j;
}

/** The job a verb applies to, once graph changes under way are over (concluded, or gone and not found). */
async function settled(lookup: () => Job): Promise<Job> {
  let j = lookup();
  while (j.settling) {
    await j.graphChanged();
    j = lookup();
  }
  return j;
}

function verb(j: Job, v: JobVerb, force = true, legacy = false): void | Promise<void> {
  switch (v) {
    case 'cancel':
      // Legacy block-job-cancel refuses a paused job unless forced.
      if (legacy && !force && j.userPaused && verbAllowed(j.status, 'cancel')) throw new QmpError(`The block job for device '${j.id}' is currently paused`);
      return j.cancel(force);
    case 'pause': return j.pause();
    case 'resume': return j.resume();
    case 'finalize': return j.finalize();
    case 'dismiss': return j.dismiss();
    case 'complete': return j.complete();
    case 'set-speed': return;
  }
}

export function verbCommands(jobs: Map<string, Job>): Array<[string, Handler]> {
  const out: Array<[string, Handler]> = [
    ['block-job-set-speed', async (a) => (await settled(() => byDevice(jobs, str(a, 'device')))).setSpeed(optInt(a, 'speed') ?? 0)],
  ];
  for (const v of ['cancel', 'pause', 'resume', 'complete', 'finalize', 'dismiss'] as const) {
    out.push([`job-${v}`, async (a) => verb(await settled(() => byId(jobs, str(onlyArgs(a, ['id']), 'id'))), v)]);
  }
  for (const v of ['cancel', 'pause', 'resume', 'complete'] as const) {
    out.push([`block-job-${v}`, async (a) => {
      const device = str(onlyArgs(a, v === 'cancel' ? ['device', 'force'] : ['device']), 'device');
      const force = v === 'cancel' ? optBool(a, 'force', false) : true;
      return verb(await settled(() => byDevice(jobs, device)), v, force, true);
    }]);
  }
  out.push(['block-job-finalize', async (a) => verb(await settled(() => byId(jobs, str(a, 'id'))), 'finalize')]);
  out.push(['block-job-dismiss', async (a) => verb(await settled(() => byId(jobs, str(a, 'id'))), 'dismiss')]);
  return out;
}
