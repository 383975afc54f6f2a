/**
 * Cancel timing: a cancelled job announces its end (aborting, BLOCK_JOB_CANCELLED, concluded,
 * null) only once its work has actually stopped, after its clean-up (an intermediate commit's
 * base is read-only again before `null`); a paused job that is cancelled resumes to leave
 * (running, then aborting); the legacy block-job-cancel refuses a paused job unless forced. In
 * process, and against qemu-storage-daemon.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { Job } from '../src/jobs/job.js';
import { oracle, qemuChain, qemuImg, scratch } from './helpers/qemu.js';
import type { QmpClient, QmpMessage } from './helpers/qmp-client.js';
import { daemonArgs, jobEvent, onBoth, quit, repliesThenEvents, withDaemon, type Tool } from './helpers/live-qmp.js';

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

const ARGS = daemonArgs('top.qcow2', 'top');

async function setup(dir: string): Promise<void> {
  await qemuChain(dir, '16M', [['base.qcow2', 'write -q -P 0xaa 0 1M'], ['mid.qcow2', 'write -q -P 0xbb 1M 4M'], ['top.qcow2']]);
  await qemuImg(['create', '-q', '-f', 'qcow2', 'fleece.qcow2', '16M'], dir);
}

/** `ro` of the node opened from `file`, as query-named-block-nodes shows it. */
async function readOnly(q: QmpClient, file: string): Promise<unknown> {
  const r = await q.execute('query-named-block-nodes', { flat: true });
  return (r.return as Array<{ file: string; ro: unknown; drv: string }>).find((n) => n.drv === 'qcow2' && n.file.endsWith(file))?.ro;
}

async function session(tool: Tool, dir: string): Promise<unknown[]> {
  return withDaemon(tool, dir, ARGS, async (d) => {
    const { q } = d;
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
    await quit(d, 'q');
    const msgs = q.received.map(norm).filter((m) => !(m.id === undefined && 'return' in m))
      .filter((m) => 'event' in m || (typeof m.id === 'string' && /^c\d+b?$/.test(m.id)));
    return [seen, ...repliesThenEvents(msgs)];
  });
}

describe('cancel timing vs qemu-storage-daemon', oracle(), () => {
  test('paused commit and fleecing backup cancelled: same events, base read-only again before null', async () => {
    const root = scratch('qchain-cancel-');
    const res = await onBoth(root, async (tool, dir) => {
      await setup(dir);
      const log = await session(tool, dir);
      const c = await qemuImg(['check', path.join(dir, 'base.qcow2')]);
      assert.equal(c.code, 0, `${tool}: ${c.stdout}`);
      // The base's size depends on how much was committed before the cancel (the chunk size): not compared.
      const chain = JSON.parse((await qemuImg(['info', '--output=json', '--backing-chain', 'top.qcow2'], dir)).stdout) as Array<Record<string, unknown>>;
      return { log, info: JSON.stringify(chain.map((x) => ({ ...x, 'actual-size': undefined }))) };
    });
    assert.deepEqual(res.qchain.log, res.qemu.log);
    assert.deepEqual((res.qemu.log[0] as unknown[]), [true, false, true]);
    assert.equal(res.qchain.info, res.qemu.info);
  });
});
