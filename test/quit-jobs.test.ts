/**
 * quit and SIGTERM with jobs in every state, against qemu-storage-daemon: QSD closes its
 * exports (each close drains the exported node twice: jobs on it pause and resume), drains all
 * nodes (running and ready jobs pause), cancels every job newest first and waits for each,
 * dismisses concluded ones, and only then replies to quit. The same command lines and QMP
 * sequences go to both daemons; the transcripts (progress fields normalised where a rate limit
 * makes them timing-dependent) and the images left behind (qemu-img check clean, same chain,
 * same guest view) must match.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { oracle, qemuChain, qemuImg, qemuIo, scratch } from './helpers/qemu.js';
import { start, norm, jobEvent, type Tool } from './helpers/live-qmp.js';
import type { QmpClient } from './helpers/qmp-client.js';

const ARGS = [
  '--blockdev', 'driver=file,node-name=base-file,filename=base.qcow2',
  '--blockdev', 'driver=qcow2,node-name=base,file=base-file,read-only=on',
  '--blockdev', 'driver=file,node-name=mid-file,filename=mid.qcow2',
  '--blockdev', 'driver=qcow2,node-name=mid,file=mid-file,backing=base,read-only=on',
  '--blockdev', 'driver=file,node-name=top-file,filename=top.qcow2',
  '--blockdev', 'driver=qcow2,node-name=top,file=top-file,backing=mid',
  '--blockdev', 'driver=file,node-name=src-file,filename=src.qcow2',
  '--blockdev', 'driver=qcow2,node-name=src,file=src-file',
  '--blockdev', 'driver=file,node-name=tgt-file,filename=tgt.qcow2',
  '--blockdev', 'driver=qcow2,node-name=tgt,file=tgt-file',
  '--nbd-server', 'addr.type=unix,addr.path=nbd.sock',
  '--export', 'type=nbd,id=exp0,node-name=top,name=vda,writable=on',
  '--chardev', 'socket,id=qmp0,path=qmp.sock,server=on,wait=off',
  '--monitor', 'chardev=qmp0',
];

const IMAGES = ['base.qcow2', 'mid.qcow2', 'top.qcow2', 'src.qcow2', 'tgt.qcow2'];

async function images(dir: string): Promise<void> {
  await qemuChain(dir, '16M', [['base.qcow2', 'write -P 1 0 12M'], ['mid.qcow2', 'write -P 2 4M 6M'], ['top.qcow2', 'write -P 3 8M 1M']]);
  await qemuImg(['create', '-q', '-f', 'qcow2', 'src.qcow2', '16M'], dir);
  await qemuIo(['-c', 'write -P 4 0 2M', 'src.qcow2'], dir);
  await qemuImg(['create', '-q', '-f', 'qcow2', 'tgt.qcow2', '16M'], dir);
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

interface Case {
  /** Start the jobs and bring them to the state the daemon is stopped in. */
  setup: (q: QmpClient) => Promise<void>;
  /** Stop with SIGTERM instead of quit. */
  signal?: boolean;
  /**
   * Compare without the pause/resume and READY churn: QEMU's rate-limited mirror copies its first
   * batch whole and may turn ready when a drain wakes it, qchain's copies a chunk at a time.
   */
  settledOnly?: boolean;
}

const CHURN = new Set(['paused', 'running', 'ready', 'standby']);
const settled = (log: Array<Record<string, unknown>>): Array<Record<string, unknown>> =>
  log.filter((m) => m.event !== 'BLOCK_JOB_READY' && !(m.event === 'JOB_STATUS_CHANGE' && CHURN.has((m.data as { status: string }).status)));

async function ok(q: QmpClient, cmd: string, args: Record<string, unknown>): Promise<void> {
  const r = await q.execute(cmd, args, cmd);
  assert.ok('return' in r, `${cmd}: ${JSON.stringify(r)}`);
}

const CASES: Record<string, Case> = {
  // Rate limited to 1 byte/s: the job sleeps after its first chunk, so every drain finds it at a pause point.
  'stream running': { setup: async (q) => { await ok(q, 'block-stream', { 'job-id': 'j', device: 'top', speed: 1 }); await sleep(300); } },
  'stream paused by the user': {
    setup: async (q) => {
      await ok(q, 'block-stream', { 'job-id': 'j', device: 'top', speed: 1 });
      await sleep(300);
      await ok(q, 'job-pause', { id: 'j' });
      await q.waitFor(jobEvent('j', 'paused'));
    },
  },
  'stream pending (auto-finalize off)': {
    setup: async (q) => {
      await ok(q, 'block-stream', { 'job-id': 'j', device: 'top', 'auto-finalize': false });
      // The legacy event follows the status change: wait for the last of the two.
      await q.waitFor((m) => m.event === 'BLOCK_JOB_PENDING');
    },
  },
  'stream concluded (auto-dismiss off)': {
    setup: async (q) => {
      await ok(q, 'block-stream', { 'job-id': 'j', device: 'top', 'auto-dismiss': false });
      await q.waitFor(jobEvent('j', 'concluded'));
    },
  },
  'intermediate commit running': {
    setup: async (q) => { await ok(q, 'block-commit', { 'job-id': 'j', device: 'top', 'top-node': 'mid', 'base-node': 'base', speed: 1 }); await sleep(300); },
  },
  'active commit running': {
    settledOnly: true,
    setup: async (q) => { await ok(q, 'block-commit', { 'job-id': 'j', device: 'top', speed: 1 }); await sleep(300); },
  },
  'active commit paused by the user': {
    setup: async (q) => {
      await ok(q, 'block-commit', { 'job-id': 'j', device: 'top', speed: 1 });
      await sleep(300);
      await ok(q, 'job-pause', { id: 'j' });
      await q.waitFor(jobEvent('j', 'paused'));
    },
  },
  'mirror of the exported node, ready': {
    setup: async (q) => {
      await ok(q, 'blockdev-mirror', { 'job-id': 'j', device: 'top', target: 'tgt', sync: 'full' });
      await q.waitFor(jobEvent('j', 'ready'));
      await sleep(100);
    },
  },
  // The export's node is above the mirror's source: closing the export does not drain the job.
  'backup of a backing node below the export, running': {
    setup: async (q) => { await ok(q, 'blockdev-backup', { 'job-id': 'j', device: 'mid', target: 'tgt', sync: 'full', speed: 1 }); await sleep(300); },
  },
  // A paused job used to keep the process alive after SIGTERM.
  'stream paused by the user, SIGTERM': {
    signal: true,
    setup: async (q) => {
      await ok(q, 'block-stream', { 'job-id': 'j', device: 'top', speed: 1 });
      await sleep(300);
      await ok(q, 'job-pause', { id: 'j' });
      await q.waitFor(jobEvent('j', 'paused'));
    },
  },
  'mirror ready, SIGTERM': {
    signal: true,
    setup: async (q) => {
      await ok(q, 'blockdev-mirror', { 'job-id': 'j', device: 'top', target: 'tgt', sync: 'full' });
      await q.waitFor(jobEvent('j', 'ready'));
      await sleep(100);
    },
  },
  'backup running': {
    setup: async (q) => { await ok(q, 'blockdev-backup', { 'job-id': 'j', device: 'top', target: 'tgt', sync: 'full', speed: 1 }); await sleep(300); },
  },
};

/** Run one case: the transcript after the setup's last message, and what the images look like afterwards. */
async function session(tool: Tool, dir: string, c: Case): Promise<{ log: Array<Record<string, unknown>>; after: string[] }> {
  await images(dir);
  const { child, q } = await start(tool, dir, ARGS);
  const exited = new Promise((r) => (child.exitCode !== null ? r(null) : child.on('exit', r)));
  let from = 0;
  try {
    await ok(q, 'qmp_capabilities', {});
    await c.setup(q);
    from = q.received.length;
    if (c.signal) child.kill('SIGTERM');
    else await ok(q, 'quit', {});
    await exited;
    await q.waitFor(() => false, 300).catch(() => {}); // whatever was sent before the socket closed
  } finally {
    q.close();
    child.kill();
  }
  assert.equal(child.exitCode, 0, `${tool} exit status`);
  const log = q.received.slice(from).map((m) => norm(m, true));
  const after: string[] = [];
  for (const f of IMAGES) {
    const r = await qemuImg(['check', f], dir);
    assert.equal(r.code, 0, `${tool}: ${f} is clean: ${r.stdout}${r.stderr}`);
    const info = await qemuImg(['info', '-U', '--output=json', f], dir);
    const j = JSON.parse(info.stdout) as Record<string, unknown>;
    after.push(JSON.stringify({ f, backing: j['backing-filename'], size: j['virtual-size'], dirty: j['dirty-flag'] }));
  }
  return { log, after };
}

describe('quit and SIGTERM cancel every job as qemu-storage-daemon does', oracle(), () => {
  for (const [name, c] of Object.entries(CASES)) {
    test(name, async () => {
      const root = scratch();
      const want = await session('qemu', path.join(root, 'qemu'), c);
      const got = await session('qchain', path.join(root, 'qchain'), c);
      // The job really was cancelled (or dismissed) by the exit, and quit replied last.
      const events = want.log.filter((m) => m.event === 'JOB_STATUS_CHANGE').map((m) => (m.data as { status: string }).status);
      assert.equal(events.at(-1), 'null');
      if (!c.signal) assert.deepEqual(want.log.at(-1), { return: {}, id: 'quit' });
      if (c.settledOnly) assert.deepEqual(settled(got.log), settled(want.log));
      else assert.deepEqual(got.log, want.log);
      assert.deepEqual(got.after, want.after);
      // Cancelled jobs leave the guest view as it was.
      const cmp = await qemuImg(['compare', path.join(root, 'qemu', 'top.qcow2'), path.join(root, 'qchain', 'top.qcow2')]);
      assert.equal(cmp.code, 0, cmp.stdout);
    });
  }

  test('two jobs: drained together, cancelled newest first', async () => {
    const two: Case = {
      setup: async (q) => {
        await ok(q, 'block-stream', { 'job-id': 'j', device: 'top', speed: 1 });
        await ok(q, 'blockdev-mirror', { 'job-id': 'k', device: 'src', target: 'tgt', sync: 'full' });
        await q.waitFor(jobEvent('k', 'ready'));
        await sleep(300);
      },
    };
    const root = scratch();
    const want = await session('qemu', path.join(root, 'qemu'), two);
    const got = await session('qchain', path.join(root, 'qchain'), two);
    // Which job reaches its pause point first in the final drain is QEMU's timing: compare per job.
    const of = (log: Array<Record<string, unknown>>, id: string): unknown[] =>
      log.filter((m) => { const d = m.data as { id?: string; device?: string } | undefined; return d?.id === id || d?.device === id || m.event === 'BLOCK_EXPORT_DELETED'; });
    for (const id of ['j', 'k']) assert.deepEqual(of(got.log, id), of(want.log, id), id);
    const order = (log: Array<Record<string, unknown>>): string[] =>
      log.filter((m) => m.event === 'BLOCK_JOB_CANCELLED').map((m) => (m.data as { device: string }).device);
    assert.deepEqual(order(want.log), ['k', 'j']);
    assert.deepEqual(order(got.log), order(want.log));
    assert.deepEqual(got.log.at(-1), want.log.at(-1));
    assert.deepEqual(got.after, want.after);
  });
});
