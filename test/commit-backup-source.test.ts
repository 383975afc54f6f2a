/**
 * An intermediate block-commit whose top is a running backup's source, as qemu-storage-daemon
 * 7.2 runs it: QEMU blocks the backup's filter above the source, not the source, so the commit
 * is taken; its completion drains the committed nodes three times (the backup pauses and resumes
 * each time, between the commit's pending and COMPLETED); the backup goes on to the same
 * point-in-time copy. Transcripts (progress aside) and the backup target's content are compared.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { oracle, qemuChain, qemuImg, scratch } from './helpers/qemu.js';
import { MONITOR, jobEvent, norm, ok, qcow2Node, quit, repliesThenEvents, withDaemon, type Tool } from './helpers/live-qmp.js';

async function session(tool: Tool, dir: string, autoFinalize: boolean): Promise<{ log: unknown[]; target: Buffer }> {
  await qemuChain(dir, '16M', [
    ['base.qcow2', 'write -q -P 1 0 1M'], ['mid.qcow2', 'write -q -P 2 1M 1M'], ['top.qcow2', 'write -q -P 3 2M 1M'],
  ]);
  await qemuImg(['create', '-q', '-f', 'qcow2', 'bt.qcow2', '16M'], dir);
  const received = await withDaemon(tool, dir, [...qcow2Node('base'), ...qcow2Node('mid', ',backing=base'), ...qcow2Node('top', ',backing=mid'), ...qcow2Node('bt'),
    '--nbd-server', 'addr.type=unix,addr.path=nbd.sock', '--export', 'type=nbd,id=et,node-name=top,name=t,writable=on', ...MONITOR], async (d) => {
    let n = 0;
    const x = async (cmd: string, args?: Record<string, unknown>): Promise<void> => { await d.q.execute(cmd, args, `${cmd}-${++n}`); };
    await x('qmp_capabilities');
    // The backup of mid is held back by its rate limit until the commit is over.
    await x('blockdev-backup', { 'job-id': 'bk', device: 'mid', target: 'bt', sync: 'full', speed: 1024 });
    await x('block-commit', { 'job-id': 'c1', device: 'top', 'top-node': 'mid', 'base-node': 'base', 'auto-finalize': autoFinalize });
    await d.q.waitFor(jobEvent('c1', 'pending'));
    if (!autoFinalize) await x('job-finalize', { id: 'c1' });
    await d.q.waitFor(jobEvent('c1', 'null'));
    await x('block-job-set-speed', { device: 'bk', speed: 0 });
    await d.q.waitFor(jobEvent('bk', 'null'));
    ok(await quit(d, 'quit'));
    return d.q.received;
  });
  const raw = path.join(dir, 'bt.raw');
  const c = await qemuImg(['convert', '-O', 'raw', 'bt.qcow2', raw], dir);
  assert.equal(c.code, 0, c.stderr);
  return { log: repliesThenEvents(received.map((m) => norm(m, true))), target: fs.readFileSync(raw) };
}

for (const autoFinalize of [true, false]) {
  test(`intermediate commit over a backup's source (auto-finalize ${autoFinalize}) as qemu-storage-daemon`, oracle(), async () => {
    const root = scratch();
    const want = await session('qemu', path.join(root, 'qemu'), autoFinalize);
    const got = await session('qchain', path.join(root, 'qchain'), autoFinalize);
    const paused = want.log.filter((m) => JSON.stringify(m) === JSON.stringify({ event: 'JOB_STATUS_CHANGE', data: { status: 'paused', id: 'bk' } }));
    assert.equal(paused.length, 4, 'the backup pauses at its start and three times at the commit\'s completion');
    assert.deepEqual(got.log, want.log);
    assert.ok(got.target.equals(want.target), 'the same point-in-time copy');
    // The copy is mid as it was: its own data over the base's.
    assert.equal(want.target[0], 1);
    assert.equal(want.target[1024 * 1024], 2);
    assert.equal(want.target[2 * 1024 * 1024], 0);
  });
}
