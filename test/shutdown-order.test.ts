/**
 * The daemon's exit path (daemon/shutdown.ts) in-process, for states a live test cannot reach
 * deterministically: a job making its graph changes when quit arrives finishes them and
 * concludes normally (QEMU makes them in one go, no command in between); jobs are drained, then
 * cancelled newest first, each waited for; concluded jobs are dismissed.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Job } from '../src/jobs/job.js';
import { BlockGraph } from '../src/daemon/graph.js';
import { quiesce } from '../src/daemon/shutdown.js';

type Ev = [string, Record<string, unknown>];

function mk(id: string, events: Ev[], opts: { autoDismiss?: boolean } = {}): Job {
  return new Job({ id, type: 'stream', nodes: [], ...opts }, { emit: (n, d) => events.push([n, d]) }, () => {});
}

const statuses = (events: Ev[], id: string): string[] =>
  events.filter(([n, d]) => n === 'JOB_STATUS_CHANGE' && d.id === id).map(([, d]) => String(d.status));

test('quit during a job\'s graph changes lets them finish: the job completes, it is not cancelled', async () => {
  const events: Ev[] = [];
  const job = mk('j', events);
  let finish!: () => void;
  job.start(async () => {}, () => new Promise<void>((r) => { finish = r; }));
  while (!job.preparing) await new Promise((r) => setImmediate(r));
  const host = { graph: new BlockGraph(), exports: () => [], deleteExport: () => {}, jobs: () => [job] };
  let quit = false;
  const q = quiesce(host).then(() => { quit = true; });
  await new Promise((r) => setTimeout(r, 20));
  assert.equal(quit, false, 'quit waits for the graph changes');
  finish();
  await q;
  assert.deepEqual(statuses(events, 'j'), ['created', 'running', 'waiting', 'pending', 'concluded', 'null']);
  assert.ok(events.some(([n]) => n === 'BLOCK_JOB_COMPLETED'));
  assert.ok(!events.some(([n]) => n === 'BLOCK_JOB_CANCELLED'));
});

test('quit drains every running job, then cancels newest first; a concluded job is dismissed', async () => {
  const events: Ev[] = [];
  const work = async (j: Job): Promise<void> => { for (;;) { await j.checkpoint(); await j.idle(50); } };
  const old = mk('old', events), young = mk('young', events), done = mk('done', events, { autoDismiss: false });
  done.start(async () => {}, async () => {});
  old.start(work, async () => {});
  young.start(work, async () => {});
  while (done.status !== 'concluded') await new Promise((r) => setImmediate(r));
  await new Promise((r) => setTimeout(r, 10));
  const from = events.length;
  await quiesce({ graph: new BlockGraph(), exports: () => [], deleteExport: () => {}, jobs: () => [done, old, young] });
  const seen = events.slice(from).filter(([n]) => n === 'JOB_STATUS_CHANGE').map(([, d]) => `${String(d.id)}:${String(d.status)}`);
  assert.deepEqual(seen, [
    'old:paused', 'young:paused',
    'young:running', 'young:aborting', 'young:concluded', 'young:null',
    'old:running', 'old:aborting', 'old:concluded', 'old:null',
    'done:null',
  ]);
});
