/**
 * QMP against qemu-storage-daemon: both daemons are started with the same command line and
 * driven by the same command sequence; replies and events must match (timestamps and the
 * version's package string aside), and the NBD export must follow external snapshots.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { QCHAIN, oracle, qemuImg, qemuIo, qemuRawView, run, scratch } from './helpers/qemu.js';
import { QmpClient, type QmpMessage, waitForSocket } from './helpers/qmp-client.js';

const QSD = '/usr/bin/qemu-storage-daemon';


/** Drop what legitimately differs: timestamps and the version's package string. */
function norm(m: QmpMessage): unknown {
  const c = JSON.parse(JSON.stringify(m)) as Record<string, unknown>;
  delete c.timestamp;
  if (c.QMP) (c.QMP as { version: unknown }).version = 'V';
  const r = c.return as Record<string, unknown> | undefined;
  if (r && typeof r === 'object' && 'package' in r) return { return: 'V', id: c.id };
  return c;
}

async function setup(dir: string): Promise<void> {
  fs.mkdirSync(dir, { recursive: true });
  await qemuImg(['create', '-q', '-f', 'qcow2', 'base.qcow2', '64M'], dir);
  await qemuIo(['-c', 'write -P 0xaa 0 1M', 'base.qcow2'], dir);
  await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'mid.qcow2'], dir);
  await qemuIo(['-c', 'write -P 0xbb 1M 1M', 'mid.qcow2'], dir);
  await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', 'top.qcow2'], dir);
  await qemuIo(['-c', 'write -P 0xcc 2M 1M', 'top.qcow2'], dir);
}

const ARGS = [
  '--blockdev', 'driver=file,node-name=base-file,filename=base.qcow2',
  '--blockdev', 'driver=qcow2,node-name=base,file=base-file',
  '--blockdev', 'driver=file,node-name=mid-file,filename=mid.qcow2',
  '--blockdev', 'driver=qcow2,node-name=mid,file=mid-file,backing=base',
  '--blockdev', 'driver=file,node-name=top-file,filename=top.qcow2',
  '--blockdev', 'driver=qcow2,node-name=top,file=top-file,backing=mid',
  '--nbd-server', 'addr.type=unix,addr.path=nbd.sock',
  '--export', 'type=nbd,id=exp0,node-name=top,name=vda,writable=on,allocation-depth=on',
  '--chardev', 'socket,id=qmp0,path=qmp.sock,server=on,wait=off',
  '--monitor', 'chardev=qmp0',
];

async function session(tool: 'qemu' | 'qchain', dir: string): Promise<{ log: unknown[]; depthMap: string; chain: string }> {
  const child = tool === 'qemu' ? spawn(QSD, ARGS, { cwd: dir, stdio: 'ignore' })
    : spawn(process.execPath, [QCHAIN, 'daemon', ...ARGS], { cwd: dir, stdio: 'ignore' });
  try {
    await waitForSocket(path.join(dir, 'qmp.sock'), child);
    await waitForSocket(path.join(dir, 'nbd.sock'), child);
    const q = await QmpClient.connect(path.join(dir, 'qmp.sock'));
    await q.waitFor((m) => 'QMP' in m);
    await q.execute('query-block-jobs', undefined, 'c1');
    await q.execute('qmp_capabilities', undefined, 'c2');
    await q.execute('qmp_capabilities', undefined, 'c3');
    await q.execute('query-version', undefined, 'c4');
    await q.execute('query-block-jobs', undefined, 'c5');
    await q.execute('query-jobs', undefined, 'c6');
    await q.execute('query-block-exports', undefined, 'c7');
    await q.execute('query-block', undefined, { any: ['json', 1] });
    q.sendRaw('{"execute": "no-such-command"}\r\n');
    q.sendRaw('{"execute": "query-jobs", "id": 1}{"execute": "query-block", "id": 2}\r\n');
    await q.waitFor((m) => m.id === 2);
    await q.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'top', file: 'top-file' }, 'dup');
    await q.execute('blockdev-del', { 'node-name': 'mid' }, 'busy');
    await q.execute('blockdev-del', { 'node-name': 'nosuch' }, 'nosuch');
    await q.execute('block-export-del', { id: 'nosuch' }, 'noexp');
    await q.execute('nbd-server-start', { addr: { type: 'unix', data: { path: 'nbd2.sock' } } }, 'again');
    await q.execute('blockdev-snapshot-sync', { 'node-name': 'top', 'snapshot-file': 'snap1.qcow2', 'snapshot-node-name': 'snap1', format: 'qcow2' }, 'c9');
    await q.execute('query-block-exports', undefined, 'c10');
    const w = await qemuIo(['-f', 'raw', '-c', 'write -q -P 0xd1 4M 64k', `nbd+unix:///vda?socket=${path.join(dir, 'nbd.sock')}`]);
    assert.equal(w.code, 0, w.stderr);
    const depth = await run('nbdinfo', ['--map=qemu:allocation-depth', `nbd+unix:///vda?socket=${path.join(dir, 'nbd.sock')}`]);
    // The libvirt way: create the overlay file with qemu-img, add it with backing null, snapshot.
    await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'snap1.qcow2', '-F', 'qcow2', 'snap2.qcow2'], dir);
    await q.execute('blockdev-add', { driver: 'file', 'node-name': 'snap2-file', filename: 'snap2.qcow2' }, 'c13');
    await q.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'snap2', file: 'snap2-file', backing: null }, 'c16');
    await q.execute('blockdev-snapshot', { node: 'snap1', overlay: 'snap2' }, 'c17');
    await q.execute('blockdev-snapshot', { node: 'snap1', overlay: 'snap2' }, 'c17b');
    await q.execute('query-block-exports', undefined, 'c18');
    await q.execute('block-export-add', { type: 'nbd', id: 'exp1', 'node-name': 'mid', name: 'old' }, 'c19');
    await q.execute('block-export-del', { id: 'exp1' }, 'c20');
    await q.execute('quit', undefined, 'q');
    await new Promise((r) => child.once('exit', r));
    const chain = await qemuImg(['info', '--backing-chain', 'snap2.qcow2'], dir);
    return { log: q.received.map(norm), depthMap: depth.stdout, chain: chain.stdout.split('\n').filter((l) => /^(image|backing file):/.test(l)).join('\n') };
  } finally {
    if (child.exitCode === null) child.kill('SIGKILL');
  }
}

describe('QMP monitor vs qemu-storage-daemon', oracle(), () => {
  test('greeting, negotiation, errors, exports, external snapshots: same replies and events', async () => {
    const root = scratch('qchain-qmp-');
    const res: Record<string, Awaited<ReturnType<typeof session>>> = {};
    for (const tool of ['qemu', 'qchain'] as const) {
      const dir = path.join(root, tool);
      await setup(dir);
      res[tool] = await session(tool, dir);
    }
    assert.deepEqual(res.qchain.log, res.qemu.log);
    assert.equal(res.qchain.depthMap, res.qemu.depthMap);
    assert.equal(res.qchain.chain, res.qemu.chain);
  });
});

/** Jobs: intermediate commit and stream with the verbs around them, as QSD runs them. */
async function jobSession(tool: 'qemu' | 'qchain', dir: string): Promise<{ log: unknown[]; chain: string }> {
  const child = tool === 'qemu' ? spawn(QSD, ARGS, { cwd: dir, stdio: 'ignore' })
    : spawn(process.execPath, [QCHAIN, 'daemon', ...ARGS], { cwd: dir, stdio: 'ignore' });
  try {
    await waitForSocket(path.join(dir, 'qmp.sock'), child);
    await waitForSocket(path.join(dir, 'nbd.sock'), child);
    const q = await QmpClient.connect(path.join(dir, 'qmp.sock'));
    await q.waitFor((m) => 'QMP' in m);
    await q.execute('qmp_capabilities', undefined, 'c0');
    await q.execute('block-job-cancel', { device: 'nosuch' }, 'e1');
    await q.execute('job-cancel', { id: 'nosuch' }, 'e2');
    await q.execute('blockdev-snapshot-sync', { 'node-name': 'top', 'snapshot-file': 'snap1.qcow2', 'snapshot-node-name': 'snap1', format: 'qcow2' }, 'c1');
    const w = await qemuIo(['-f', 'raw', '-c', 'write -q -P 0xd1 4M 64k', `nbd+unix:///vda?socket=${path.join(dir, 'nbd.sock')}`]);
    assert.equal(w.code, 0, w.stderr);
    // Intermediate commit of mid into base, under the active snap1 (auto-dismiss).
    await q.execute('block-commit', { 'job-id': 'commit0', device: 'snap1', 'top-node': 'mid', 'base-node': 'base' }, 'c2');
    await q.waitFor((m) => m.event === 'JOB_STATUS_CHANGE' && (m.data as { status: string; id: string }).id === 'commit0' && (m.data as { status: string }).status === 'null');
    // Stream with a rate limit, refused verbs, pause/resume, manual dismiss.
    await q.execute('block-stream', { 'job-id': 'stream0', device: 'snap1', 'base-node': 'base', speed: 1024, 'auto-dismiss': false }, 'c3');
    await q.execute('job-complete', { id: 'stream0' }, 'c4');
    await q.execute('job-dismiss', { id: 'stream0' }, 'c5');
    await q.execute('block-stream', { 'job-id': 'stream0', device: 'snap1' }, 'c5b');
    await q.execute('job-pause', { id: 'stream0' }, 'c6');
    // QEMU's job enters 'paused' at its next pause point (at once when it sleeps, later when busy
    // under load); a resume before then would emit no paused/running pair. Wait for it.
    await q.waitFor(jobEvent('stream0', 'paused'));
    await q.execute('job-resume', { id: 'stream0' }, 'c7');
    await q.execute('block-job-set-speed', { device: 'stream0', speed: 0 }, 'c8');
    await q.waitFor((m) => m.event === 'JOB_STATUS_CHANGE' && (m.data as { status: string; id: string }).id === 'stream0' && (m.data as { status: string }).status === 'concluded');
    await q.execute('job-dismiss', { id: 'stream0' }, 'c9');
    await q.execute('query-jobs', undefined, 'c10');
    await q.execute('quit', undefined, 'q');
    await new Promise((r) => child.once('exit', r));
    const chain = await qemuImg(['info', '--backing-chain', 'snap1.qcow2'], dir);
    // Events may interleave with replies differently; compare each stream on its own.
    const msgs = q.received.map(norm) as Array<Record<string, unknown>>;
    const log = [...msgs.filter((m) => !('event' in m)), ...msgs.filter((m) => 'event' in m)];
    return { log, chain: chain.stdout.split('\n').filter((l) => /^(image|backing file):/.test(l)).join('\n') };
  } finally {
    if (child.exitCode === null) child.kill('SIGKILL');
  }
}

describe('QMP block jobs vs qemu-storage-daemon', oracle(), () => {
  test('intermediate commit and stream: same events, replies, refusals and resulting chain', async () => {
    const root = scratch('qchain-qmp-jobs-');
    const res: Record<string, Awaited<ReturnType<typeof jobSession>>> = {};
    const views: Record<string, Buffer> = {};
    for (const tool of ['qemu', 'qchain'] as const) {
      const dir = path.join(root, tool);
      await setup(dir);
      res[tool] = await jobSession(tool, dir);
      views[tool] = await qemuRawView(path.join(dir, 'snap1.qcow2'));
      const c = await qemuImg(['check', path.join(dir, 'snap1.qcow2')]);
      assert.equal(c.code, 0, `${tool}: ${c.stdout}`);
    }
    assert.deepEqual(res.qchain.log, res.qemu.log);
    assert.equal(res.qchain.chain, res.qemu.chain);
    assert.ok(views.qchain.equals(views.qemu));
  });
});

function jobEvent(id: string, status: string): (m: QmpMessage) => boolean {
  return (m) => m.event === 'JOB_STATUS_CHANGE' && (m.data as { id: string }).id === id && (m.data as { status: string }).status === status;
}

/** Active commit with pivot, blockdev-mirror with a write while READY, drive-mirror soft and forced cancel. */
async function mirrorSession(tool: 'qemu' | 'qchain', dir: string): Promise<{ log: unknown[] }> {
  const child = tool === 'qemu' ? spawn(QSD, ARGS, { cwd: dir, stdio: 'ignore' })
    : spawn(process.execPath, [QCHAIN, 'daemon', ...ARGS], { cwd: dir, stdio: 'ignore' });
  const nbd = `nbd+unix:///vda?socket=${path.join(dir, 'nbd.sock')}`;
  try {
    await waitForSocket(path.join(dir, 'qmp.sock'), child);
    await waitForSocket(path.join(dir, 'nbd.sock'), child);
    const q = await QmpClient.connect(path.join(dir, 'qmp.sock'));
    await q.waitFor((m) => 'QMP' in m);
    await q.execute('qmp_capabilities', undefined, 'c0');
    await q.execute('blockdev-snapshot-sync', { 'node-name': 'top', 'snapshot-file': 'snap3.qcow2', 'snapshot-node-name': 'snap3', format: 'qcow2' }, 'c31');
    assert.equal((await qemuIo(['-f', 'raw', '-c', 'write -q -P 0xd3 6M 128k', nbd])).code, 0);
    await q.execute('block-commit', { 'job-id': 'commit1', device: 'snap3', 'base-node': 'top', 'auto-dismiss': false }, 'c32');
    await q.waitFor(jobEvent('commit1', 'ready'));
    await q.execute('query-block-jobs', undefined, 'c33');
    await q.execute('job-finalize', { id: 'commit1' }, 'c34');
    await q.execute('job-complete', { id: 'commit1' }, 'c35');
    await q.waitFor(jobEvent('commit1', 'concluded'));
    await q.execute('job-dismiss', { id: 'commit1' }, 'c36');
    await q.execute('query-block-exports', undefined, 'c37');
    // blockdev-mirror into a pre-created target.
    await qemuImg(['create', '-q', '-f', 'qcow2', 'tgt.qcow2', '64M'], dir);
    await q.execute('blockdev-add', { driver: 'file', 'node-name': 'tgt-file', filename: 'tgt.qcow2' }, 'c6');
    await q.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'tgt', file: 'tgt-file', backing: null }, 'c7');
    await q.execute('blockdev-mirror', { 'job-id': 'mirror0', device: 'top', target: 'tgt', sync: 'full', 'auto-dismiss': false }, 'c8');
    await q.waitFor(jobEvent('mirror0', 'ready'));
    await q.execute('query-block-jobs', undefined, 'c9');
    assert.equal((await qemuIo(['-f', 'raw', '-c', 'write -q -P 0xe1 9M 64k', nbd])).code, 0);
    await q.execute('job-complete', { id: 'mirror0' }, 'c11');
    await q.waitFor(jobEvent('mirror0', 'concluded'));
    await q.execute('job-dismiss', { id: 'mirror0' }, 'c12');
    await q.execute('query-block-exports', undefined, 'c13');
    // drive-mirror: READY then a soft cancel completes without pivot (a point-in-time copy).
    await q.execute('drive-mirror', { 'job-id': 'mirror1', device: 'tgt', target: 'tgt2.qcow2', format: 'qcow2', sync: 'full', mode: 'absolute-paths' }, 'c14');
    await q.waitFor(jobEvent('mirror1', 'ready'));
    await q.execute('block-job-cancel', { device: 'mirror1' }, 'c15');
    await q.waitFor(jobEvent('mirror1', 'null'));
    await q.execute('query-block-exports', undefined, 'c16');
    await q.execute('drive-mirror', { 'job-id': 'm5', device: 'tgt', target: 'tgt5.qcow2', format: 'qcow2', sync: 'full', 'node-name': 'tgt5' }, 'c4');
    await q.waitFor(jobEvent('m5', 'ready'));
    await q.execute('job-cancel', { id: 'm5', force: true }, 'c4b');
    await q.execute('block-job-cancel', { device: 'm5', force: true }, 'c5');
    await q.waitFor(jobEvent('m5', 'null'));
    await q.execute('quit', undefined, 'q');
    await new Promise((r) => child.once('exit', r));
    const msgs = q.received.map(norm) as Array<Record<string, unknown>>;
    return { log: [...msgs.filter((m) => !('event' in m)), ...msgs.filter((m) => 'event' in m)] };
  } finally {
    if (child.exitCode === null) child.kill('SIGKILL');
  }
}

describe('QMP mirror and active commit vs qemu-storage-daemon', oracle(), () => {
  test('READY, complete with pivot, soft and forced cancel: same events, replies and images', async () => {
    const root = scratch('qchain-qmp-mirror-');
    const res: Record<string, unknown[]> = {};
    const views: Record<string, Buffer[]> = {};
    for (const tool of ['qemu', 'qchain'] as const) {
      const dir = path.join(root, tool);
      await setup(dir);
      res[tool] = (await mirrorSession(tool, dir)).log;
      views[tool] = [];
      for (const f of ['top.qcow2', 'tgt.qcow2', 'tgt2.qcow2']) {
        views[tool].push(await qemuRawView(path.join(dir, f)));
        const c = await qemuImg(['check', path.join(dir, f)]);
        assert.equal(c.code, 0, `${tool} ${f}: ${c.stdout}`);
      }
    }
    assert.deepEqual(res.qchain, res.qemu);
    views.qchain.forEach((v, i) => assert.ok(v.equals(views.qemu[i]), `view ${i}`));
  });
});

/** The libvirt way of taking an external snapshot: blockdev-create jobs, blockdev-add, blockdev-snapshot. */
async function createSession(tool: 'qemu' | 'qchain', dir: string): Promise<{ log: unknown[]; chain: string }> {
  const child = tool === 'qemu' ? spawn(QSD, ARGS, { cwd: dir, stdio: 'ignore' })
    : spawn(process.execPath, [QCHAIN, 'daemon', ...ARGS], { cwd: dir, stdio: 'ignore' });
  try {
    await waitForSocket(path.join(dir, 'qmp.sock'), child);
    const q = await QmpClient.connect(path.join(dir, 'qmp.sock'));
    await q.waitFor((m) => 'QMP' in m);
    await q.execute('qmp_capabilities', undefined, 'c0');
    await q.execute('blockdev-create', { 'job-id': 'create-snap2-file', options: { driver: 'file', filename: 'snap2.qcow2', size: 0 } }, 'c11');
    await q.waitFor(jobEvent('create-snap2-file', 'concluded'));
    await q.execute('query-block-jobs', undefined, 'c11b');
    await q.execute('job-dismiss', { id: 'create-snap2-file' }, 'c12');
    await q.execute('blockdev-add', { driver: 'file', 'node-name': 'snap2-file', filename: 'snap2.qcow2' }, 'c13');
    await q.execute('blockdev-create', { 'job-id': 'create-snap2', options: { driver: 'qcow2', file: 'snap2-file', size: 67108864, 'backing-file': 'top.qcow2', 'backing-fmt': 'qcow2' } }, 'c14');
    await q.waitFor(jobEvent('create-snap2', 'concluded'));
    await q.execute('job-dismiss', { id: 'create-snap2' }, 'c15');
    await q.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'snap2', file: 'snap2-file', backing: null }, 'c16');
    await q.execute('blockdev-snapshot', { node: 'top', overlay: 'snap2' }, 'c17');
    await q.execute('query-block-exports', undefined, 'c18');
    await q.execute('quit', undefined, 'q');
    await new Promise((r) => child.once('exit', r));
    const chain = await qemuImg(['info', '--backing-chain', 'snap2.qcow2'], dir);
    const msgs = q.received.map(norm) as Array<Record<string, unknown>>;
    return { log: [...msgs.filter((m) => !('event' in m)), ...msgs.filter((m) => 'event' in m)], chain: chain.stdout.split('\n').filter((l) => /^(image|backing file):/.test(l)).join('\n') };
  } finally {
    if (child.exitCode === null) child.kill('SIGKILL');
  }
}

describe('QMP blockdev-create vs qemu-storage-daemon', oracle(), () => {
  test('create jobs, blockdev-add with backing null, blockdev-snapshot: same events and chain', async () => {
    const root = scratch('qchain-qmp-create-');
    const res: Record<string, Awaited<ReturnType<typeof createSession>>> = {};
    for (const tool of ['qemu', 'qchain'] as const) {
      const dir = path.join(root, tool);
      await setup(dir);
      res[tool] = await createSession(tool, dir);
    }
    assert.deepEqual(res.qchain.log, res.qemu.log);
    assert.equal(res.qchain.chain, res.qemu.chain);
  });
});
