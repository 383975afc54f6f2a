/**
 * A backup's copy-before-write and its reads while the graph below or above its source changes,
 * against qemu-storage-daemon:
 * - a commit below the source, started through a second overlay of the source, reopens the base
 *   read-write, copies into it and drops the intermediate node while the backup runs. QSD allows
 *   it and the backup still produces the point-in-time view; qchain's backup must too (it reads
 *   through the chain as it is now, and the reopen waits for its copies in flight); with implicit
 *   backing nodes the dropped intermediate node is closed once no copy is reading it;
 * - an external snapshot of the source puts the overlay under QEMU's copy-before-write filter,
 *   so block-commit refuses the overlay as its device ("Need a root block node").
 * Guest writes after the graph change must still copy before they write (the target never
 * sees them). Transcripts (progress normalised) and images must match.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { oracle, qemuChain, qemuImg, scratch } from './helpers/qemu.js';
import { start, norm, jobEvent, guest, put, type Tool } from './helpers/live-qmp.js';
import type { QmpClient } from './helpers/qmp-client.js';

/** Target, second overlay's file, NBD export of top, monitor. */
const TAIL = [
  '--blockdev', 'driver=file,node-name=tgt-file,filename=tgt.qcow2',
  '--blockdev', 'driver=qcow2,node-name=tgt,file=tgt-file',
  '--blockdev', 'driver=file,node-name=z-file,filename=z.qcow2',
  '--nbd-server', 'addr.type=unix,addr.path=nbd.sock',
  '--export', 'type=nbd,id=exp0,node-name=top,name=vda,writable=on',
  '--chardev', 'socket,id=qmp0,path=qmp.sock,server=on,wait=off',
  '--monitor', 'chardev=qmp0',
];

const ARGS = [
  '--blockdev', 'driver=file,node-name=base-file,filename=base.qcow2',
  '--blockdev', 'driver=qcow2,node-name=base,file=base-file,read-only=on',
  '--blockdev', 'driver=file,node-name=mid-file,filename=mid.qcow2',
  '--blockdev', 'driver=qcow2,node-name=mid,file=mid-file,backing=base,read-only=on',
  '--blockdev', 'driver=file,node-name=top-file,filename=top.qcow2',
  '--blockdev', 'driver=qcow2,node-name=top,file=top-file,backing=mid',
  ...TAIL,
];

/** The chain below top opened from the image headers (implicit '#blockNNN' nodes). */
const ARGS_IMPLICIT = [
  '--blockdev', 'driver=file,node-name=top-file,filename=top.qcow2',
  '--blockdev', 'driver=qcow2,node-name=top,file=top-file',
  ...TAIL,
];

async function images(dir: string): Promise<void> {
  await qemuChain(dir, '16M', [['base.qcow2', 'write -P 1 0 12M'], ['mid.qcow2', 'write -P 2 4M 6M'], ['top.qcow2', 'write -P 3 8M 1M']]);
  await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'top.qcow2', '-F', 'qcow2', 'z.qcow2'], dir);
  await qemuImg(['create', '-q', '-f', 'qcow2', 'tgt.qcow2', '16M'], dir);
  // The point in time the backup must show.
  await qemuImg(['convert', '-O', 'raw', 'top.qcow2', 'want.raw'], dir);
}

async function ok(q: QmpClient, cmd: string, args: Record<string, unknown>): Promise<void> {
  const r = await q.execute(cmd, args, cmd);
  assert.ok('return' in r, `${cmd}: ${JSON.stringify(r)}`);
}

/** The graph change; resolves with what it observed (compared between the daemons). */
type Script = (q: QmpClient) => Promise<unknown>;

/**
 * Replies in order, then events in order (a job finishing as block-job-set-speed wakes it may
 * announce it before or after the reply), without the query listing (QSD's shows its filter
 * node) and without pause/resume pairs: QSD pauses running jobs in every drained section of a
 * graph change (reopen, commit completion, snapshot), which qchain does not model.
 */
function comparable(log: Array<Record<string, unknown>>): unknown[] {
  const churn = (m: Record<string, unknown>): boolean =>
    m.event === 'JOB_STATUS_CHANGE' && ['paused', 'running'].includes((m.data as { status: string }).status) && (m.data as { id: string }).id === 'b';
  const kept = log.filter((m) => m.id !== 'nodes' && !churn(m));
  return [...kept.filter((m) => !('event' in m)), ...kept.filter((m) => 'event' in m)];
}

async function session(tool: Tool, dir: string, script: Script, args = ARGS): Promise<{ log: unknown[]; chain: string; seen: unknown }> {
  await images(dir);
  const { child, q } = await start(tool, dir, args);
  const exited = new Promise((r) => (child.exitCode !== null ? r(null) : child.on('exit', r)));
  let seen: unknown;
  try {
    await ok(q, 'qmp_capabilities', {});
    await ok(q, 'blockdev-backup', { 'job-id': 'b', device: 'top', target: 'tgt', sync: 'full', speed: 1 });
    await new Promise((r) => setTimeout(r, 300));
    seen = await script(q);
    // Guest writes over the whole disk after the graph change: each copies its granule first.
    await guest(dir, [put('x', 0, 16)]);
    await ok(q, 'block-job-set-speed', { device: 'b', speed: 0 });
    await q.waitFor(jobEvent('b', 'null'));
    await ok(q, 'quit', {});
    await exited;
  } finally {
    q.close();
    child.kill();
  }
  for (const f of ['base.qcow2', 'mid.qcow2', 'top.qcow2', 'tgt.qcow2', 'z.qcow2']) {
    const r = await qemuImg(['check', f], dir);
    assert.equal(r.code, 0, `${tool}: ${f} is clean: ${r.stdout}${r.stderr}`);
  }
  const cmp = await qemuImg(['compare', '-f', 'qcow2', '-F', 'raw', 'tgt.qcow2', 'want.raw'], dir);
  assert.equal(cmp.code, 0, `${tool}: the backup shows the disk as it was when it started: ${cmp.stdout}`);
  const info = await qemuImg(['info', '--backing-chain', 'z.qcow2'], dir);
  const chain = info.stdout.split('\n').filter((l) => /^(image|backing file):/.test(l)).join('\n');
  return { log: comparable(q.received.map((m) => norm(m, true))), chain, seen };
}

describe('backup while the graph around its source changes, as qemu-storage-daemon', oracle(), () => {
  test('a commit below the source (through another overlay) reopens the base: the backup reads on', async () => {
    const script: Script = async (q) => {
      await ok(q, 'blockdev-add', { driver: 'qcow2', 'node-name': 'z', file: 'z-file', backing: 'top' });
      await ok(q, 'block-commit', { 'job-id': 'c', device: 'z', 'top-node': 'mid', 'base-node': 'base' });
      await q.waitFor(jobEvent('c', 'null'));
      // Whether the base went back to read-only after the commit.
      const nodes = (await q.execute('query-named-block-nodes', { flat: true }, 'nodes')).return as Array<{ 'node-name': string; ro: boolean }>;
      return nodes.find((n) => n['node-name'] === 'base')?.ro;
    };
    const root = scratch();
    const want = await session('qemu', path.join(root, 'qemu'), script);
    const got = await session('qchain', path.join(root, 'qchain'), script);
    assert.deepEqual(got.log, want.log);
    assert.equal(got.seen, want.seen);
    assert.equal(got.chain, want.chain);
    assert.match(want.chain, /image: top.qcow2\nbacking file: base.qcow2/, 'the commit dropped mid from the chain');
  });

  test('the same with implicit backing nodes: the dropped intermediate node is closed under the backup', async () => {
    const script: Script = async (q) => {
      const nodes = (await q.execute('query-named-block-nodes', { flat: true }, 'nodes')).return as Array<{ 'node-name': string; drv: string; image: { filename: string } }>;
      const named = (f: string): string | undefined => nodes.find((n) => n.drv === 'qcow2' && n.image.filename.endsWith(f))?.['node-name'];
      await ok(q, 'blockdev-add', { driver: 'qcow2', 'node-name': 'z', file: 'z-file', backing: 'top' });
      await ok(q, 'block-commit', { 'job-id': 'c', device: 'z', 'top-node': named('mid.qcow2'), 'base-node': named('base.qcow2') });
      await q.waitFor(jobEvent('c', 'null'));
      return null;
    };
    const root = scratch();
    const want = await session('qemu', path.join(root, 'qemu'), script, ARGS_IMPLICIT);
    const got = await session('qchain', path.join(root, 'qchain'), script, ARGS_IMPLICIT);
    assert.deepEqual(got.log, want.log);
    assert.equal(got.chain, want.chain);
    assert.match(want.chain, /image: top.qcow2\nbacking file: base.qcow2/);
  });

  test('a snapshot of the source puts the overlay under the filter: block-commit refuses it', async () => {
    const script: Script = async (q) => {
      await ok(q, 'blockdev-snapshot-sync', { 'node-name': 'top', 'snapshot-file': 'o.qcow2', 'snapshot-node-name': 'o', format: 'qcow2' });
      const r = await q.execute('block-commit', { 'job-id': 'c', device: 'o', 'top-node': 'mid', 'base-node': 'base' }, 'commit');
      assert.deepEqual(r.error, { class: 'GenericError', desc: 'Need a root block node' });
      return null;
    };
    const root = scratch();
    const want = await session('qemu', path.join(root, 'qemu'), script);
    const got = await session('qchain', path.join(root, 'qchain'), script);
    assert.deepEqual(got.log, want.log);
    assert.equal(got.chain, want.chain);
  });
});
