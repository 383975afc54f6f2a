/**
 * Cancel timing: a cancelled job announces its end (aborting, BLOCK_JOB_CANCELLED, concluded,
 * null) only once its work has actually stopped, after its clean-up (an intermediate commit's
 * base is read-only again before `null`); a paused job that is cancelled resumes to leave
 * (running, then aborting); the legacy block-job-cancel refuses a paused job unless forced. In
 * process, and against qemu-storage-daemon.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { Job } from '../src/jobs/job.js';
import { QCHAIN, oracle, qemuImg, qemuIo, scratch } from './helpers/qemu.js';
import { QmpClient, type QmpMessage, waitForSocket } from './helpers/qmp-client.js';

const QSD = '/usr/bin/qemu-storage-daemon';

describe('Job.cancel in process', () => {
  const make = (): { job: Job; events: string[]; gone: Promise<void> } => {
    const events: string[] = [];
    let gone!: () => void;
    const p = new Promise<void>((r) => { gone = r; });
    const job = new Job({ id: 'j', type: 'stream', nodes: [] }, {
      emit: (name, data) => events.push(name === 'JOB_STATUS_CHANGE' ? String(data.status) : name),
    }, () => gone());
    return { job, events, gone: p };
  };

  test('the events follow the work\'s return, and its clean-up', async () => {
    const { job, events, gone } = make();
    let stopped = false;
    let atCancel: string[] = [];
    job.start(async (j) => {
      try {
        for (;;) {
          await j.checkpoint();
          await j.idle();
        }
      } finally {
        await new Promise((r) => setImmediate(r));
        assert.deepEqual(events.slice(-1), ['running'], 'no ending announced while cleaning up');
        stopped = true;
      }
    }, async () => {});
    await new Promise((r) => setImmediate(r));
    job.cancel(true);
    atCancel = [...events];
    await gone;
    assert.ok(stopped);
    assert.deepEqual(atCancel, ['created', 'running']);
    assert.deepEqual(events, ['created', 'running', 'aborting', 'BLOCK_JOB_CANCELLED', 'concluded', 'null']);
  });

  test('a paused job that is cancelled stops (running, then aborting)', async () => {
    const { job, events, gone } = make();
    let checkpoints = 0;
    job.start(async (j) => {
      for (;;) {
        await j.checkpoint();
        checkpoints++;
        await new Promise((r) => setImmediate(r));
      }
    }, async () => {});
    await new Promise((r) => setImmediate(r));
    job.pause();
    await new Promise((r) => setTimeout(r, 5));
    const before = checkpoints;
    job.cancel(true);
    await gone;
    assert.equal(checkpoints, before, 'no work after the cancel');
    assert.deepEqual(events, ['created', 'running', 'paused', 'running', 'aborting', 'BLOCK_JOB_CANCELLED', 'concluded', 'null']);
  });
});


/** Timestamps dropped; a commit's progress depends on the copy chunk (512 KiB in QEMU): dropped too. */
function norm(m: QmpMessage): Record<string, unknown> {
  const c = JSON.parse(JSON.stringify(m)) as Record<string, unknown>;
  delete c.timestamp;
  if ('QMP' in c) return { QMP: 'greeting' };
  const d = c.data as Record<string, unknown> | undefined;
  if (d && d.type === 'commit') delete d.offset;
  return c;
}

function jobEvent(id: string, status: string): (m: QmpMessage) => boolean {
  return (m) => m.event === 'JOB_STATUS_CHANGE' && (m.data as { id: string }).id === id && (m.data as { status: string }).status === status;
}

const ARGS = [
  '--blockdev', 'driver=file,node-name=top-file,filename=top.qcow2',
  '--blockdev', 'driver=qcow2,node-name=top,file=top-file',
  '--nbd-server', 'addr.type=unix,addr.path=nbd.sock',
  '--export', 'type=nbd,id=exp0,node-name=top,name=vda,writable=on',
  '--chardev', 'socket,id=qmp0,path=qmp.sock,server=on,wait=off',
  '--monitor', 'chardev=qmp0',
];

async function setup(dir: string): Promise<void> {
  fs.mkdirSync(dir, { recursive: true });
  await qemuImg(['create', '-q', '-f', 'qcow2', 'base.qcow2', '16M'], dir);
  await qemuIo(['-c', 'write -q -P 0xaa 0 1M', 'base.qcow2'], dir);
  await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'mid.qcow2'], dir);
  await qemuIo(['-c', 'write -q -P 0xbb 1M 4M', 'mid.qcow2'], dir);
  await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', 'top.qcow2'], dir);
  await qemuImg(['create', '-q', '-f', 'qcow2', 'fleece.qcow2', '16M'], dir);
}

/** `ro` of the node opened from `file`, as query-named-block-nodes shows it. */
async function readOnly(q: QmpClient, file: string): Promise<unknown> {
  const r = await q.execute('query-named-block-nodes', { flat: true });
  return (r.return as Array<{ file: string; ro: unknown; drv: string }>).find((n) => n.drv === 'qcow2' && n.file.endsWith(file))?.ro;
}

async function session(tool: 'qemu' | 'qchain', dir: string): Promise<unknown[]> {
  const child = tool === 'qemu' ? spawn(QSD, ARGS, { cwd: dir, stdio: 'ignore' })
    : spawn(process.execPath, [QCHAIN, 'daemon', ...ARGS], { cwd: dir, stdio: 'ignore' });
  try {
    await waitForSocket(path.join(dir, 'qmp.sock'), child);
    await waitForSocket(path.join(dir, 'nbd.sock'), child);
    const q = await QmpClient.connect(path.join(dir, 'qmp.sock'));
    await q.waitFor((m) => 'QMP' in m);
    await q.execute('qmp_capabilities', undefined, 'c0');
    const seen: unknown[] = [await readOnly(q, 'base.qcow2')];
    // An intermediate commit held back by a speed limit, paused, then cancelled.
    await q.execute('block-commit', { 'job-id': 'cm', device: 'top', top: 'mid.qcow2', base: 'base.qcow2', speed: 1 }, 'c1');
    seen.push(await readOnly(q, 'base.qcow2'));
    await q.execute('job-pause', { id: 'cm' }, 'c2');
    await q.waitFor(jobEvent('cm', 'paused'));
    await q.execute('job-cancel', { id: 'cm' }, 'c3');
    await q.waitFor(jobEvent('cm', 'null'));
    // The base went back to read-only before the job was gone.
    seen.push(await readOnly(q, 'base.qcow2'));
    // A fleecing backup (it only waits for its cancel), paused, then cancelled.
    await q.execute('blockdev-add', { driver: 'file', 'node-name': 'fl-file', filename: path.join(dir, 'fleece.qcow2') }, 'c4');
    await q.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'fleece', file: 'fl-file', backing: 'top' }, 'c5');
    await q.execute('blockdev-backup', { 'job-id': 'fl', device: 'top', target: 'fleece', sync: 'none' }, 'c6');
    await q.execute('block-job-pause', { device: 'fl' }, 'c7');
    await q.waitFor(jobEvent('fl', 'paused'));
    await q.execute('query-block-jobs', undefined, 'c8');
    // The legacy verb refuses a paused job unless forced.
    await q.execute('block-job-cancel', { device: 'fl' }, 'c9');
    await q.execute('block-job-cancel', { device: 'fl', force: true }, 'c9b');
    await q.waitFor(jobEvent('fl', 'null'));
    await q.execute('query-block-jobs', undefined, 'c10');
    await q.execute('quit', undefined, 'q');
    await new Promise((r) => child.once('exit', r));
    const msgs = q.received.map(norm).filter((m) => !(m.id === undefined && 'return' in m));
    return [seen, ...msgs.filter((m) => !('event' in m) && typeof m.id === 'string' && /^c\d+b?$/.test(m.id)), ...msgs.filter((m) => 'event' in m)];
  } finally {
    if (child.exitCode === null) child.kill('SIGKILL');
  }
}

describe('cancel timing vs qemu-storage-daemon', oracle(), () => {
  test('paused commit and fleecing backup cancelled: same events, base read-only again before null', async () => {
    const root = scratch('qchain-cancel-');
    const logs: Record<string, unknown[]> = {};
    const info: Record<string, string> = {};
    for (const tool of ['qemu', 'qchain'] as const) {
      const dir = path.join(root, tool);
      await setup(dir);
      logs[tool] = await session(tool, dir);
      const c = await qemuImg(['check', path.join(dir, 'base.qcow2')]);
      assert.equal(c.code, 0, `${tool}: ${c.stdout}`);
      // The base's size depends on how much was committed before the cancel (the chunk size): not compared.
      const chain = JSON.parse((await qemuImg(['info', '--output=json', '--backing-chain', 'top.qcow2'], dir)).stdout) as Array<Record<string, unknown>>;
      info[tool] = JSON.stringify(chain.map((x) => ({ ...x, 'actual-size': undefined })));
    }
    assert.deepEqual(logs.qchain, logs.qemu);
    assert.deepEqual((logs.qemu[0] as unknown[]), [true, false, true]);
    assert.equal(info.qchain, info.qemu);
  });
});
