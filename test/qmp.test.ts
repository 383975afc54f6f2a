/**
 * QMP against qemu-storage-daemon: both daemons are started with the same command line and
 * driven by the same command sequence; replies and events must match (timestamps and the
 * version's package string aside), and the NBD export must follow external snapshots.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { oracle, qemuChain, qemuImg, qemuIo, qemuRawView, run, scratch } from './helpers/qemu.js';
import type { QmpMessage } from './helpers/qmp-client.js';
import { backingChain, chainArgs, jobEvent, nbdUri, onBoth, quit, repliesThenEvents, withDaemon, type Tool } from './helpers/live-qmp.js';

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
  await qemuChain(dir, '64M', [['base.qcow2', 'write -P 0xaa 0 1M'], ['mid.qcow2', 'write -P 0xbb 1M 1M'], ['top.qcow2', 'write -P 0xcc 2M 1M']]);
}

const ARGS = chainArgs(',allocation-depth=on');

async function session(tool: Tool, dir: string): Promise<{ log: unknown[]; depthMap: string; chain: string }> {
  return withDaemon(tool, dir, ARGS, async (d) => {
    const { q } = d;
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
    const w = await qemuIo(['-f', 'raw', '-c', 'write -q -P 0xd1 4M 64k', nbdUri(dir)]);
    assert.equal(w.code, 0, w.stderr);
    const depth = await run('nbdinfo', ['--map=qemu:allocation-depth', nbdUri(dir)]);
    // The libvirt way: create the overlay file with qemu-img, add it with backing null, snapshot.
    await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'snap1.qcow2', '-F', 'qcow2', 'snap2.qcow2'], dir);
    await q.execute('blockdev-add', { driver: 'file', 'node-name': 'snap2-file', filename: 'snap2.qcow2' }, 'c13');
    await q.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'snap2', file: 'snap2-file', backing: null }, 'c16');
    await q.execute('blockdev-snapshot', { node: 'snap1', overlay: 'snap2' }, 'c17');
    await q.execute('blockdev-snapshot', { node: 'snap1', overlay: 'snap2' }, 'c17b');
    await q.execute('query-block-exports', undefined, 'c18');
    await q.execute('block-export-add', { type: 'nbd', id: 'exp1', 'node-name': 'mid', name: 'old' }, 'c19');
    await q.execute('block-export-del', { id: 'exp1' }, 'c20');
    await quit(d, 'q');
    const chain = await backingChain(dir, 'snap2.qcow2');
    return { log: q.received.map(norm), depthMap: depth.stdout, chain };
  });
}

describe('QMP monitor vs qemu-storage-daemon', oracle(), () => {
  test('greeting, negotiation, errors, exports, external snapshots: same replies and events', async () => {
    const root = scratch('qchain-qmp-');
    const res = await onBoth(root, async (tool, dir) => {
      await setup(dir);
      return session(tool, dir);
    });
    assert.deepEqual(res.qchain.log, res.qemu.log);
    assert.equal(res.qchain.depthMap, res.qemu.depthMap);
    assert.equal(res.qchain.chain, res.qemu.chain);
  });
});

/** Jobs: intermediate commit and stream with the verbs around them, as QSD runs them. */
async function jobSession(tool: Tool, dir: string): Promise<{ log: unknown[]; chain: string }> {
  return withDaemon(tool, dir, ARGS, async (d) => {
    const { q } = d;
    await q.execute('qmp_capabilities', undefined, 'c0');
    await q.execute('block-job-cancel', { device: 'nosuch' }, 'e1');
    await q.execute('job-cancel', { id: 'nosuch' }, 'e2');
    await q.execute('blockdev-snapshot-sync', { 'node-name': 'top', 'snapshot-file': 'snap1.qcow2', 'snapshot-node-name': 'snap1', format: 'qcow2' }, 'c1');
    const w = await qemuIo(['-f', 'raw', '-c', 'write -q -P 0xd1 4M 64k', nbdUri(dir)]);
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
    await quit(d, 'q');
    const chain = await backingChain(dir, 'snap1.qcow2');
    // Events may interleave with replies differently; compare each stream on its own.
    return { log: repliesThenEvents(q.received.map(norm) as object[]), chain };
  });
}

describe('QMP block jobs vs qemu-storage-daemon', oracle(), () => {
  test('intermediate commit and stream: same events, replies, refusals and resulting chain', async () => {
    const root = scratch('qchain-qmp-jobs-');
    const res = await onBoth(root, async (tool, dir) => {
      await setup(dir);
      const r = await jobSession(tool, dir);
      const view = await qemuRawView(path.join(dir, 'snap1.qcow2'));
      const c = await qemuImg(['check', path.join(dir, 'snap1.qcow2')]);
      assert.equal(c.code, 0, `${tool}: ${c.stdout}`);
      return { ...r, view };
    });
    assert.deepEqual(res.qchain.log, res.qemu.log);
    assert.equal(res.qchain.chain, res.qemu.chain);
    assert.ok(res.qchain.view.equals(res.qemu.view));
  });
});

/** Active commit with pivot, blockdev-mirror with a write while READY, drive-mirror soft and forced cancel. */
async function mirrorSession(tool: Tool, dir: string): Promise<{ log: unknown[] }> {
  const nbd = nbdUri(dir);
  return withDaemon(tool, dir, ARGS, async (d) => {
    const { q } = d;
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
    await quit(d, 'q');
    return { log: repliesThenEvents(q.received.map(norm) as object[]) };
  });
}

describe('QMP mirror and active commit vs qemu-storage-daemon', oracle(), () => {
  test('READY, complete with pivot, soft and forced cancel: same events, replies and images', async () => {
    const root = scratch('qchain-qmp-mirror-');
    const res = await onBoth(root, async (tool, dir) => {
      await setup(dir);
      const { log } = await mirrorSession(tool, dir);
      const views: Buffer[] = [];
      for (const f of ['top.qcow2', 'tgt.qcow2', 'tgt2.qcow2']) {
        views.push(await qemuRawView(path.join(dir, f)));
        const c = await qemuImg(['check', path.join(dir, f)]);
        assert.equal(c.code, 0, `${tool} ${f}: ${c.stdout}`);
      }
      return { log, views };
    });
    assert.deepEqual(res.qchain.log, res.qemu.log);
    res.qchain.views.forEach((v, i) => assert.ok(v.equals(res.qemu.views[i]), `view ${i}`));
  });
});

/** The libvirt way of taking an external snapshot: blockdev-create jobs, blockdev-add, blockdev-snapshot. */
async function createSession(tool: Tool, dir: string): Promise<{ log: unknown[]; chain: string }> {
  return withDaemon(tool, dir, ARGS, async (d) => {
    const { q } = d;
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
    await quit(d, 'q');
    const chain = await backingChain(dir, 'snap2.qcow2');
    return { log: repliesThenEvents(q.received.map(norm) as object[]), chain };
  });
}

describe('QMP blockdev-create vs qemu-storage-daemon', oracle(), () => {
  test('create jobs, blockdev-add with backing null, blockdev-snapshot: same events and chain', async () => {
    const root = scratch('qchain-qmp-create-');
    const res = await onBoth(root, async (tool, dir) => {
      await setup(dir);
      return createSession(tool, dir);
    });
    assert.deepEqual(res.qchain.log, res.qemu.log);
    assert.equal(res.qchain.chain, res.qemu.chain);
  });
});
