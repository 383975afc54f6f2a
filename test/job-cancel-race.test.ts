/**
 * job-cancel racing a job's completion. QEMU makes a job's final graph changes (job_exit, the
 * mirror pivot) with no monitor command in between, so a cancel either comes first (the job
 * ends cancelled, the graph untouched) or finds the job gone ("Job not found"); never both. The
 * same rounds (job-cancel, and block-job-cancel for a stream) run against qemu-storage-daemon
 * (which must land in the allowed outcomes too) and, many more times and at varied delays,
 * against qchain: every job ends exactly once.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { oracle, qemuChain, qemuImg, scratch } from './helpers/qemu.js';
import { chainArgs, jobEvent, quit, withDaemon, type Tool } from './helpers/live-qmp.js';
import type { QmpMessage } from './helpers/qmp-client.js';
import { Job } from '../src/jobs/job.js';
import { JobIoError } from '../src/jobs/errors.js';

type Scenario = 'stream' | 'commit' | 'mirror' | 'legacy';

const CREATED = ['created', 'running'];
const CANCELLED = ['aborting', 'BLOCK_JOB_CANCELLED', 'concluded', 'null'];
const COMPLETED = ['waiting', 'pending', 'BLOCK_JOB_COMPLETED', 'concluded', 'null'];
const READY = ['ready', 'BLOCK_JOB_READY'];

/** Each outcome: the cancel's reply, the job's events, the node the export serves afterwards. */
const ALLOWED: Record<Scenario, string[]> = {
  stream: [
    JSON.stringify({ cancel: 'ok', events: [...CREATED, ...CANCELLED], exported: 'top' }),
    JSON.stringify({ cancel: 'Job not found', events: [...CREATED, ...COMPLETED], exported: 'top' }),
  ],
  commit: [
    JSON.stringify({ cancel: 'ok', events: [...CREATED, ...CANCELLED], exported: 'top' }),
    JSON.stringify({ cancel: 'Job not found', events: [...CREATED, ...COMPLETED], exported: 'top' }),
  ],
  // block-stream cancelled with block-job-cancel.
  legacy: [
    JSON.stringify({ cancel: 'ok', events: [...CREATED, ...CANCELLED], exported: 'top' }),
    JSON.stringify({ cancel: "Block job 'j' not found", events: [...CREATED, ...COMPLETED], exported: 'top' }),
  ],
  // job-complete then job-cancel back to back: QSD converges and pivots first.
  mirror: [
    JSON.stringify({ cancel: 'Job not found', events: [...CREATED, ...READY, ...COMPLETED], exported: 'tgt' }),
  ],
};

async function images(dir: string): Promise<void> {
  fs.rmSync(dir, { recursive: true, force: true });
  await qemuChain(dir, '4M', [['base.qcow2', 'write -q -P 1 0 1M'], ['mid.qcow2', 'write -q -P 2 1M 1M'], ['top.qcow2']]);
  await qemuImg(['create', '-q', '-f', 'qcow2', 'tgt.qcow2', '4M'], dir);
}

/** One round on a fresh chain: start the job, cancel it `delay` ms later or on its pending event (mirror: right after job-complete). */
async function round(tool: Tool, dir: string, scen: Scenario, delay: number | 'pending'): Promise<string> {
  await images(dir);
  const args = [...chainArgs(), '--blockdev', 'driver=file,node-name=tgt-file,filename=tgt.qcow2', '--blockdev', 'driver=qcow2,node-name=tgt,file=tgt-file'];
  return withDaemon(tool, dir, args, async (d) => {
    await d.q.execute('qmp_capabilities');
    const id = 'j';
    let cancel: QmpMessage;
    if (scen === 'mirror') {
      assert.ok('return' in await d.q.execute('blockdev-mirror', { 'job-id': id, device: 'top', target: 'tgt', sync: 'full' }));
      await d.q.waitFor(jobEvent(id, 'ready'));
      const [complete, c] = await Promise.all([d.q.execute('job-complete', { id }), d.q.execute('job-cancel', { id })]);
      assert.ok('return' in complete);
      cancel = c;
    } else {
      const cmd = scen !== 'commit' ? d.q.execute('block-stream', { 'job-id': id, device: 'top', 'base-node': 'base' })
        : d.q.execute('block-commit', { 'job-id': id, device: 'top', 'top-node': 'mid', 'base-node': 'base' });
      // 'pending': the cancel follows the job's pending event, while its graph changes are made.
      if (delay === 'pending') await d.q.waitFor(jobEvent(id, 'pending'));
      else if (delay > 0) await new Promise((r) => setTimeout(r, delay));
      const [r, c] = await Promise.all([cmd, scen === 'legacy' ? d.q.execute('block-job-cancel', { device: id }) : d.q.execute('job-cancel', { id })]);
      assert.ok('return' in r, JSON.stringify(r));
      cancel = c;
    }
    await d.q.waitFor(jobEvent(id, 'null'));
    const exported = ((await d.q.execute('query-block-exports')).return as Array<{ 'node-name': string }>)[0]['node-name'];
    await quit(d);
    const events = d.q.received.filter((m) => m.event && ['JOB_STATUS_CHANGE', 'BLOCK_JOB_CANCELLED', 'BLOCK_JOB_COMPLETED', 'BLOCK_JOB_READY'].includes(m.event as string))
      .map((m) => (m.event === 'JOB_STATUS_CHANGE' ? (m.data as { status: string }).status : m.event));
    return JSON.stringify({ cancel: 'error' in cancel ? (cancel.error as { desc: string }).desc : 'ok', events, exported });
  });
}

for (const scen of ['stream', 'commit', 'mirror', 'legacy'] as const) {
  test(`job-cancel racing ${scen} completion: one ending per job, as qemu-storage-daemon`, oracle(), async () => {
    const root = scratch();
    const delays = [0, 2, 'pending'] as const;
    for (const delay of delays) {
      const got = await round('qemu', path.join(root, 'qemu'), scen, delay);
      assert.ok(ALLOWED[scen].includes(got), `qemu-storage-daemon: ${got}`);
    }
    for (let i = 0; i < 15; i++) {
      const got = await round('qchain', path.join(root, 'qchain'), scen, delays[i % 3]);
      assert.ok(ALLOWED[scen].includes(got), `qchain round ${i}: ${got}`);
    }
  });
}

test('graphChanged: a verb waiting on a job making its graph changes sees it concluded, once', async () => {
  const events: string[] = [];
  const job = new Job({ id: 'j', type: 'stream', nodes: [] }, { emit: (name, data) => events.push(name === 'JOB_STATUS_CHANGE' ? String(data.status) : name) }, () => {});
  let open!: () => void;
  const gate = new Promise<void>((r) => { open = r; });
  job.start(async () => {}, () => gate);
  while (!job.preparing) await new Promise((r) => setImmediate(r));
  let waited = false;
  const after = job.graphChanged().then(() => { waited = true; });
  await new Promise((r) => setTimeout(r, 20));
  assert.equal(waited, false, 'still making its graph changes');
  assert.equal(job.status, 'pending');
  open();
  await after;
  assert.equal(job.status, 'null');
  assert.deepEqual(events, ['created', 'running', 'waiting', 'pending', 'BLOCK_JOB_COMPLETED', 'concluded', 'null']);
});

test('a completing job paused by an error policy lets verbs through: the resume it waits for', async () => {
  const job = new Job({ id: 'j', type: 'mirror', nodes: [] }, { emit: () => {} }, () => {});
  let fail!: () => void;
  const failing = new Promise<void>((r) => { fail = r; });
  job.start(async (j) => {
    j.markReady();
    while (!j.finishing) await j.idle(20);
    // The last copy fails on the target; on-target-error=stop pauses the job until resumed.
    await failing;
    j.errorAction(new JobIoError('write', Object.assign(new Error('Input/output error'), { code: 'EIO' })), 'stop');
    await j.checkpoint();
    await j.graphChange(async () => {});
  }, async () => {});
  while (job.status !== 'ready') await new Promise((r) => setImmediate(r));
  job.complete();
  assert.equal(job.settling, true, 'converging: verbs wait');
  fail();
  await job.graphChanged();
  assert.equal(job.status, 'standby');
  assert.equal(job.settling, false, 'paused: a resume can get through');
  job.resume();
  assert.equal(job.settling, true);
  await job.graphChanged();
  assert.equal(job.status, 'null');
});
