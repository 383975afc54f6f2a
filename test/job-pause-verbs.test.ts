/**
 * Job verbs around a user pause, on the Job itself: a job whose work fails while it is paused
 * (its I/O was in flight when the pause came) goes back to running and then ends with its error
 * (aborting, BLOCK_JOB_COMPLETED with the error, concluded), where it used to throw an invalid
 * transition that took the daemon down; a second pause is refused ("Job is already paused"), and
 * so is a resume of a job not paused ("Can't resume a job that was not paused"), as QEMU's
 * job_user_pause/job_user_resume.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Job } from '../src/jobs/job.js';

function recorder(): { log: string[]; events: { emit: (name: string, data?: Record<string, unknown>) => void } } {
  const log: string[] = [];
  return {
    log,
    events: {
      emit: (name, data) => log.push(name === 'JOB_STATUS_CHANGE' ? String(data?.status) : `${name}${data?.error ? `: ${String(data.error)}` : ''}`),
    },
  };
}

test('work failing while the job is paused ends the job with its error, no invalid transition', async () => {
  const { log, events } = recorder();
  const job = new Job({ id: 'j', type: 'backup', nodes: [] }, events, () => {});
  let fail!: (e: Error) => void;
  const io = new Promise<void>((_, rej) => { fail = rej; });
  io.catch(() => {});
  let working = false;
  job.start(async () => { working = true; await io; }, async () => {});
  while (!working) await new Promise((r) => setImmediate(r));
  job.pause();
  assert.equal(job.status, 'paused');
  assert.throws(() => job.pause(), /Job is already paused/);
  fail(new Error('Input/output error'));
  for (let i = 0; i < 100 && (job.status as string) !== 'null'; i++) await new Promise((r) => setImmediate(r));
  // (A backup starts with a pause/resume pair of its own, as QSD's.) The user's pause, then the end.
  assert.deepEqual(log.slice(-6), ['paused', 'running', 'aborting', 'BLOCK_JOB_COMPLETED: Input/output error', 'concluded', 'null']);
});

test('resume of a job that is not paused is refused before the verb table', async () => {
  const job = new Job({ id: 'k', type: 'stream', nodes: [] }, { emit: () => {} }, () => {});
  let done: (() => void) | null = null;
  job.start(async () => { await new Promise<void>((r) => { done = r; }); }, async () => {});
  while (!done) await new Promise((r) => setImmediate(r));
  assert.throws(() => job.resume(), /Can't resume a job that was not paused/);
  job.pause();
  job.resume();
  assert.equal(job.status, 'running');
  (done as () => void)();
  for (let i = 0; i < 100 && (job.status as string) !== 'null'; i++) await new Promise((r) => setImmediate(r));
  assert.equal(job.status as string, 'null');
});
