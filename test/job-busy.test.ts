/**
 * query-block-jobs' `busy` is QEMU's job->busy: true while the job's work runs (I/O in flight
 * included), false while it sleeps (rate limit, pause point, a ready mirror waiting for writes)
 * and once its work has returned. The unit test drives a job through those states; the live
 * test compares query-block-jobs with qemu-storage-daemon's in the states where busy is
 * deterministic (progress fields, which depend on chunk sizes, normalised).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { Job } from '../src/jobs/job.js';
import { oracle, qemuImg, qemuIo, scratch } from './helpers/qemu.js';
import { start, jobEvent, onBoth, type Tool } from './helpers/live-qmp.js';
import type { QmpMessage } from './helpers/qmp-client.js';

const tick = (): Promise<void> => new Promise((r) => setImmediate(r));
const busyOf = (j: Job): unknown => j.blockJobInfo().busy;

test('busy: true while the work runs, false asleep, paused and after the work returned', async () => {
  const job = new Job({ id: 'j', type: 'stream', nodes: [], autoFinalize: false, autoDismiss: false }, { emit: () => {} }, () => {});
  let io!: () => void;
  let phase = 0;
  job.start(async (j) => {
    // One "request" in flight: the job stays busy while it waits for it.
    await new Promise<void>((r) => { io = r; });
    phase = 1;
    await j.checkpoint(); // pauses here once paused
    phase = 2;
    await j.idle(60_000); // a ready mirror's wait for new writes
    phase = 3;
  }, async () => {});
  assert.equal(busyOf(job), true, 'started: the work is about to run');
  await tick();
  assert.equal(busyOf(job), true, 'waiting for its own I/O is busy');
  job.pause();
  io();
  await tick();
  assert.equal(phase, 1);
  assert.equal(job.status, 'paused');
  assert.equal(busyOf(job), false, 'paused at the pause point');
  job.resume();
  await tick();
  assert.equal(phase, 2);
  assert.equal(busyOf(job), false, 'sleeping');
  job.kick();
  await new Promise((r) => setTimeout(r, 10));
  assert.equal(phase, 3);
  assert.equal(job.status, 'pending');
  assert.equal(busyOf(job), false, 'pending: the work has returned');
  await job.finalize();
  assert.equal(job.status, 'concluded');
  assert.equal(busyOf(job), false);
});

const ARGS = [
  '--blockdev', 'driver=file,node-name=base-file,filename=base.qcow2',
  '--blockdev', 'driver=qcow2,node-name=base,file=base-file,read-only=on',
  '--blockdev', 'driver=file,node-name=top-file,filename=top.qcow2',
  '--blockdev', 'driver=qcow2,node-name=top,file=top-file,backing=base',
  '--blockdev', 'driver=file,node-name=src-file,filename=src.qcow2',
  '--blockdev', 'driver=qcow2,node-name=src,file=src-file',
  '--blockdev', 'driver=file,node-name=tgt-file,filename=tgt.qcow2',
  '--blockdev', 'driver=qcow2,node-name=tgt,file=tgt-file',
  '--nbd-server', 'addr.type=unix,addr.path=nbd.sock',
  '--chardev', 'socket,id=qmp0,path=qmp.sock,server=on,wait=off',
  '--monitor', 'chardev=qmp0',
];

/** query-block-jobs replies with the progress fields (chunk-size dependent) dropped; busy kept. */
function jobsOf(m: QmpMessage): unknown {
  return (m.return as Array<Record<string, unknown>>).map((j) => {
    const { offset: _o, len: _l, ...rest } = j;
    return rest;
  });
}

async function session(tool: Tool, dir: string): Promise<unknown[]> {
  fs.mkdirSync(dir, { recursive: true });
  await qemuImg(['create', '-q', '-f', 'qcow2', 'base.qcow2', '16M'], dir);
  await qemuIo(['-c', 'write -P 1 0 8M', 'base.qcow2'], dir);
  await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'top.qcow2'], dir);
  await qemuImg(['create', '-q', '-f', 'qcow2', 'src.qcow2', '4M'], dir);
  await qemuIo(['-c', 'write -P 2 0 1M', 'src.qcow2'], dir);
  await qemuImg(['create', '-q', '-f', 'qcow2', 'tgt.qcow2', '4M'], dir);
  const { child, q } = await start(tool, dir, ARGS);
  const out: unknown[] = [];
  const query = async (): Promise<void> => { out.push(jobsOf(await q.execute('query-block-jobs'))); };
  const ok = async (cmd: string, args: Record<string, unknown>): Promise<void> => {
    const r = await q.execute(cmd, args);
    assert.ok('return' in r, `${tool} ${cmd}: ${JSON.stringify(r)}`);
  };
  try {
    await ok('qmp_capabilities', {});
    // Rate limited to 1 byte/s: after its first chunk the job sleeps (running, not busy).
    await ok('block-stream', { 'job-id': 'j1', device: 'top', speed: 1 });
    await new Promise((r) => setTimeout(r, 500));
    await query();
    await ok('job-pause', { id: 'j1' });
    await q.waitFor(jobEvent('j1', 'paused'));
    await query();
    await ok('job-cancel', { id: 'j1' });
    await q.waitFor(jobEvent('j1', 'null'));
    await ok('block-stream', { 'job-id': 'j2', device: 'top', 'auto-finalize': false, 'auto-dismiss': false });
    await q.waitFor(jobEvent('j2', 'pending'));
    await query();
    await ok('job-finalize', { id: 'j2' });
    await q.waitFor(jobEvent('j2', 'concluded'));
    await query();
    await ok('job-dismiss', { id: 'j2' });
    await ok('blockdev-mirror', { 'job-id': 'm', device: 'src', target: 'tgt', sync: 'full' });
    await q.waitFor(jobEvent('m', 'ready'));
    await new Promise((r) => setTimeout(r, 200));
    await query();
    await ok('job-pause', { id: 'm' });
    await q.waitFor(jobEvent('m', 'standby'));
    await query();
    await ok('job-cancel', { id: 'm' });
    await q.waitFor(jobEvent('m', 'null'));
    await ok('quit', {});
    await new Promise((r) => (child.exitCode !== null ? r(null) : child.on('exit', r)));
  } finally {
    q.close();
    child.kill();
  }
  return out;
}

test('query-block-jobs busy matches qemu-storage-daemon (sleeping, paused, pending, concluded, ready, standby)', oracle(), async () => {
  const { qemu: want, qchain: got } = await onBoth(scratch(), session);
  const states = want.map((r) => (r as Array<{ status: string; busy: boolean }>).map((j) => `${j.status}:${j.busy}`).join());
  assert.deepEqual(states, ['running:false', 'paused:false', 'pending:false', 'concluded:false', 'ready:false', 'standby:false']);
  assert.deepEqual(got, want);
});
