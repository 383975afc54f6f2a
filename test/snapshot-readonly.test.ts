/**
 * An external snapshot (blockdev-snapshot-sync, blockdev-snapshot, either inside a transaction)
 * reopens the node under the new overlay read-only, as qemu-storage-daemon 7.2 does: the node
 * (and an implicit file node under it) lists `ro: true`, a writable export of it is refused, its
 * image is no longer write-locked (another process may open it read-only, still not read-write),
 * and an active commit into it makes it read-write again; block-stream into it makes it read-write
 * for the job only. Same scripts against QSD and qchain.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { oracle, qemuImg, qemuIo, scratch } from './helpers/qemu.js';
import { MONITOR, norm, ok, qcow2Node, quit, serve, jobEvent, withDaemon, onBoth, type Tool } from './helpers/live-qmp.js';

type Snap = 'sync' | 'blockdev' | 'tx-sync' | 'tx-blockdev';

/** 'node-name ro' of every node in listing order (implicit names normalised). */
async function roList(q: { execute: (c: string, a?: Record<string, unknown>) => Promise<Record<string, unknown>> }): Promise<string[]> {
  const r = await q.execute('query-named-block-nodes', { flat: true });
  return (r.return as Array<{ 'node-name': string; ro: boolean }>).map((n) => `${n['node-name'].replace(/^#block\d+$/, '#implicit')} ${n.ro}`);
}

/** Whether another process can open the image read-only, and read-write. */
async function locks(dir: string): Promise<{ ro: number; rw: number }> {
  const ro = await qemuImg(['info', 'a.qcow2'], dir);
  const rw = await qemuIo(['-c', 'read 0 512', 'a.qcow2'], dir);
  return { ro: ro.code, rw: rw.code };
}

async function session(tool: Tool, dir: string, how: Snap): Promise<unknown[]> {
  fs.mkdirSync(dir, { recursive: true });
  await qemuImg(['create', '-q', '-f', 'qcow2', 'a.qcow2', '4M'], dir);
  await qemuImg(['create', '-q', '-f', 'qcow2', 'ov.qcow2', '4M'], dir);
  // The export keeps a snapshot-sync overlay in the graph (QSD frees an overlay nobody uses).
  const out: unknown[] = [];
  await withDaemon(tool, dir, ['--blockdev', 'driver=qcow2,node-name=a,file.driver=file,file.filename=a.qcow2',
    '--nbd-server', 'addr.type=unix,addr.path=nbd.sock', '--export', 'type=nbd,id=exp0,node-name=a,name=vda,writable=on', ...MONITOR], async (d) => {
    const x = async (cmd: string, args?: Record<string, unknown>): Promise<void> => { out.push(norm(await d.q.execute(cmd, args, out.length), false)); };
    await x('qmp_capabilities');
    out.push(await locks(dir));
    const sync = { 'node-name': 'a', 'snapshot-file': 'o.qcow2', 'snapshot-node-name': 'o', format: 'qcow2' };
    if (how === 'blockdev' || how === 'tx-blockdev') {
      await x('blockdev-add', { driver: 'qcow2', 'node-name': 'o', file: { driver: 'file', filename: 'ov.qcow2' }, backing: null });
    }
    if (how === 'sync') await x('blockdev-snapshot-sync', sync);
    if (how === 'blockdev') await x('blockdev-snapshot', { node: 'a', overlay: 'o' });
    if (how === 'tx-sync') await x('transaction', { actions: [{ type: 'blockdev-snapshot-sync', data: sync }] });
    if (how === 'tx-blockdev') await x('transaction', { actions: [{ type: 'blockdev-snapshot', data: { node: 'a', overlay: 'o' } }] });
    out.push(await roList(d.q));
    out.push(await locks(dir));
    await x('block-export-add', { type: 'nbd', id: 'e2', 'node-name': 'a', name: 'a2', writable: true });
    await x('block-export-add', { type: 'nbd', id: 'e3', 'node-name': 'a', name: 'a3' });
    await x('block-export-del', { id: 'e3' });
    // An active commit into the read-only node makes it read-write again, and it stays so.
    await x('block-commit', { 'job-id': 'c', device: 'o' });
    await d.q.waitFor(jobEvent('c', 'ready'));
    ok(await d.q.execute('block-job-complete', { device: 'c' }));
    await d.q.waitFor(jobEvent('c', 'null'));
    // QSD then frees a snapshot-sync overlay nobody uses any more.
    out.push(await roList(d.q));
    await x('block-commit', { 'job-id': 'c2', device: 'o' });
    out.push(await locks(dir));
    ok(await quit(d));
  });
  return out;
}

for (const how of ['sync', 'blockdev', 'tx-sync', 'tx-blockdev'] as const) {
  test(`${how}: the node under a new overlay is read-only as in qemu-storage-daemon`, oracle(), async () => {
    const root = scratch();
    const want = await session('qemu', path.join(root, 'qemu'), how);
    const got = await session('qchain', path.join(root, 'qchain'), how);
    // The oracle really shows the sealed node: read-only, openable read-only elsewhere, not read-write.
    assert.deepEqual(want.find(Array.isArray), ['o false', '#implicit false', 'a true', '#implicit true']);
    assert.deepEqual(want.filter((v) => v && typeof v === 'object' && 'rw' in v), [{ ro: 1, rw: 1 }, { ro: 0, rw: 1 }, { ro: 1, rw: 1 }]);
    assert.deepEqual(got, want);
  });
}

/** block-stream into the sealed node: read-write while the job runs, read-only again at its end. */
async function streamSession(tool: Tool, dir: string): Promise<unknown[]> {
  fs.mkdirSync(dir, { recursive: true });
  await qemuImg(['create', '-q', '-f', 'qcow2', 'base.qcow2', '4M'], dir);
  await qemuIo(['-c', 'write -q -P 1 0 1M', 'base.qcow2'], dir);
  await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'top.qcow2'], dir);
  const out: unknown[] = [];
  await withDaemon(tool, dir, [...qcow2Node('base'), ...qcow2Node('top', ',backing=base'), ...serve('top')], async (d) => {
    const x = async (cmd: string, args?: Record<string, unknown>): Promise<void> => { out.push(norm(await d.q.execute(cmd, args, out.length), false)); };
    /** The ro flag of node 'top' (QSD also lists its copy-on-read filter while a stream runs). */
    const topRo = async (): Promise<void> => {
      const r = await d.q.execute('query-named-block-nodes', { flat: true });
      out.push((r.return as Array<{ 'node-name': string; ro: boolean }>).find((n) => n['node-name'] === 'top')?.ro);
    };
    await x('qmp_capabilities');
    await x('blockdev-snapshot-sync', { 'node-name': 'top', 'snapshot-file': 's.qcow2', 'snapshot-node-name': 's', format: 'qcow2' });
    await topRo();
    await x('block-stream', { 'job-id': 'j', device: 'top', 'auto-finalize': false });
    await topRo();
    await d.q.waitFor(jobEvent('j', 'pending'));
    await topRo();
    await x('job-finalize', { id: 'j' });
    await topRo();
    // Nothing left between the top and the base: a job of length 0 that completes at once.
    await x('block-stream', { 'job-id': 'j2', device: 'top' });
    await d.q.waitFor(jobEvent('j2', 'null'));
    await topRo();
    ok(await quit(d));
    out.push(...d.q.received.filter((m) => m.event).map((m) => norm(m, false)));
  });
  return out;
}

test('block-stream into the read-only node under an overlay, as qemu-storage-daemon', oracle(), async () => {
  const { qemu: want, qchain: got } = await onBoth(scratch(), streamSession);
  assert.deepEqual(want.filter((v) => typeof v === 'boolean'), [true, false, false, true, true]);
  assert.deepEqual(got, want);
});

/** A snapshot-sync overlay nobody uses (no export on the node) is freed at once, as QSD frees it. */
async function unusedSession(tool: Tool, dir: string): Promise<unknown[]> {
  fs.mkdirSync(dir, { recursive: true });
  await qemuImg(['create', '-q', '-f', 'qcow2', 'a.qcow2', '4M'], dir);
  const out: unknown[] = [];
  await withDaemon(tool, dir, ['--blockdev', 'driver=qcow2,node-name=a,file.driver=file,file.filename=a.qcow2', ...MONITOR], async (d) => {
    const x = async (cmd: string, args?: Record<string, unknown>): Promise<void> => { out.push(norm(await d.q.execute(cmd, args, out.length), false)); };
    await x('qmp_capabilities');
    await x('blockdev-snapshot-sync', { 'node-name': 'a', 'snapshot-file': 'o.qcow2', 'snapshot-node-name': 'o', format: 'qcow2' });
    out.push(await roList(d.q));
    await x('block-export-add', { type: 'nbd', id: 'e', 'node-name': 'o' });
    await x('transaction', { actions: [{ type: 'blockdev-snapshot-sync', data: { 'node-name': 'a', 'snapshot-file': 'o2.qcow2', 'snapshot-node-name': 'o2', format: 'qcow2' } }] });
    out.push(await roList(d.q));
    out.push((await backingChainOf(dir, 'o.qcow2')));
    ok(await quit(d));
  });
  return out;
}

async function backingChainOf(dir: string, file: string): Promise<string> {
  const r = await qemuImg(['info', '--output=json', file], dir);
  return String((JSON.parse(r.stdout) as { 'backing-filename'?: string })['backing-filename']);
}

test('a snapshot-sync overlay nobody uses is freed, as qemu-storage-daemon frees it', oracle(), async () => {
  const { qemu: want, qchain: got } = await onBoth(scratch(), unusedSession);
  assert.deepEqual(want[2], ['a true', '#implicit true']);
  assert.deepEqual(got, want);
});
