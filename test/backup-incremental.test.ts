/**
 * The efficient live backup recipe (seed 003) over QMP, against qemu-storage-daemon and qchain:
 * a full backup and a new dirty bitmap in one transaction; guest writes over NBD; an incremental
 * backup into an overlay whose backing file is the full backup, with guest writes while it runs
 * (held back by a speed limit, so they land before the job copies their granules). The overlay's
 * guest view must be the disk as it was when the incremental started; the bitmap then holds
 * exactly the writes made during the job, so a second incremental catches up with the disk.
 * Pull mode: the frozen bitmap exported over NBD shows the same map as QSD's.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { oracle, qemuImg, qemuIo, qemuRawView, run, scratch } from './helpers/qemu.js';
import type { QmpClient, QmpMessage } from './helpers/qmp-client.js';
import { daemonArgs, exited, exportView, guest, nbdUri, ok, onBoth, quit, withDaemon, type Tool } from './helpers/live-qmp.js';

const ARGS = daemonArgs('disk.qcow2', 'disk');

/** What a reply carries: its error, or what it returns. */
const replyOf = (r: QmpMessage): unknown => ('error' in r ? r.error : r.return);

/** The dirty bitmaps of node 'disk' in what query-named-block-nodes returns. */
const diskBitmaps = (nodes: unknown): unknown => (nodes as Array<Record<string, unknown>>).find((n) => n['node-name'] === 'disk')?.['dirty-bitmaps'];

async function jobDone(q: QmpClient, id: string): Promise<QmpMessage> {
  return q.waitFor((m) => m.event === 'BLOCK_JOB_COMPLETED' && (m.data as { device: string }).device === id, 60000);
}

interface Result { counts: unknown[]; pullMap: string }

async function recipe(tool: Tool, dir: string): Promise<Result> {
  fs.mkdirSync(dir, { recursive: true });
  await qemuImg(['create', '-q', '-f', 'qcow2', 'disk.qcow2', '16M'], dir);
  const w0 = await qemuIo(['-c', 'write -q -P 0xaa 0 3M', '-c', 'write -q -P 0xab 8M 1M', 'disk.qcow2'], dir);
  assert.equal(w0.code, 0, w0.stderr);
  const counts: unknown[] = [];
  return withDaemon(tool, dir, ARGS, async (d) => {
    const { q } = d;
    ok(await q.execute('qmp_capabilities'));
    const bitmaps = async (): Promise<void> => {
      counts.push(diskBitmaps((await q.execute('query-named-block-nodes')).return));
    };
    // 1. Full backup and a new bitmap, atomically.
    ok(await q.execute('transaction', {
      actions: [
        { type: 'block-dirty-bitmap-add', data: { node: 'disk', name: 'bm0', persistent: true } },
        { type: 'drive-backup', data: { device: 'disk', target: path.join(dir, 'full.qcow2'), sync: 'full', format: 'qcow2', 'job-id': 'full' } },
      ],
    }));
    const full = await jobDone(q, 'full');
    assert.equal((full.data as { error?: string }).error, undefined);
    await bitmaps();
    // 2. The guest writes.
    await guest(dir, ['write -P 0x11 64k 64k', 'write -P 0x12 2M 4k', 'write -z 8M 128k', 'write -P 0x13 12M 1M']);
    await bitmaps();
    // 3. Incremental into an overlay of the full backup; the guest keeps writing meanwhile.
    const expected = await exportView(dir);
    const inc = await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'full.qcow2', '-F', 'qcow2', 'inc.qcow2'], dir);
    assert.equal(inc.code, 0, inc.stderr);
    ok(await q.execute('drive-backup', {
      device: 'disk', target: path.join(dir, 'inc.qcow2'), sync: 'incremental', bitmap: 'bm0', format: 'qcow2', mode: 'existing', 'job-id': 'inc', speed: 1,
    }));
    const busy = await q.execute('block-dirty-bitmap-remove', { node: 'disk', name: 'bm0' });
    assert.deepEqual(busy.error, { class: 'GenericError', desc: "Bitmap 'bm0' is currently in use by another operation and cannot be used" });
    await guest(dir, ['write -P 0x21 12M 64k', 'write -P 0x22 64k 4k', 'write -P 0x23 15M 64k']);
    ok(await q.execute('block-job-set-speed', { device: 'inc', speed: 0 }));
    const incDone = await jobDone(q, 'inc');
    assert.equal((incDone.data as { error?: string }).error, undefined);
    await bitmaps();
    const view = await qemuRawView(path.join(dir, 'inc.qcow2'));
    assert.ok(view.equals(expected), `${tool}: the incremental backup's view is the disk at the job's start`);
    // 4. Pull mode: freeze bm0 and start bm1 atomically, export bm0 over NBD.
    ok(await q.execute('transaction', {
      actions: [
        { type: 'block-dirty-bitmap-disable', data: { node: 'disk', name: 'bm0' } },
        { type: 'block-dirty-bitmap-add', data: { node: 'disk', name: 'bm1' } },
      ],
    }));
    await guest(dir, ['write -P 0x31 4M 64k']);
    ok(await q.execute('block-export-add', { type: 'nbd', id: 'pull', 'node-name': 'disk', name: 'pull', bitmaps: ['bm0'] }));
    const map = await run('nbdinfo', ['--map=qemu:dirty-bitmap:bm0', nbdUri(dir, 'pull')]);
    assert.equal(map.code, 0, map.stderr);
    await bitmaps();
    ok(await q.execute('block-export-del', { id: 'pull' }));
    // 5. A second incremental (from bm0, which holds the writes made during the first) catches up with the disk.
    const inc2 = await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'inc.qcow2', '-F', 'qcow2', 'inc2.qcow2'], dir);
    assert.equal(inc2.code, 0, inc2.stderr);
    const now = await exportView(dir);
    // bm0 is disabled: merge bm1 (writes since the freeze) so the backup covers everything.
    ok(await q.execute('block-dirty-bitmap-merge', { node: 'disk', target: 'bm0', bitmaps: ['bm1'] }));
    ok(await q.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'inc2', file: { driver: 'file', filename: path.join(dir, 'inc2.qcow2') }, backing: null }));
    ok(await q.execute('blockdev-backup', { device: 'disk', target: 'inc2', sync: 'bitmap', bitmap: 'bm0', 'bitmap-mode': 'on-success', 'job-id': 'inc2' }));
    const inc2Done = await jobDone(q, 'inc2');
    assert.equal((inc2Done.data as { error?: string }).error, undefined);
    await bitmaps();
    ok(await q.execute('blockdev-del', { 'node-name': 'inc2' }));
    ok(await quit(d));
    const view2 = await qemuRawView(path.join(dir, 'inc2.qcow2'));
    assert.ok(view2.equals(now), `${tool}: the second incremental's view is the disk`);
    for (const f of ['disk.qcow2', 'full.qcow2', 'inc.qcow2', 'inc2.qcow2']) {
      const c = await qemuImg(['check', f], dir);
      assert.equal(c.code, 0, `${tool} ${f}: ${c.stdout}${c.stderr}`);
    }
    const info = await qemuImg(['info', '--output=json', 'disk.qcow2'], dir);
    counts.push((JSON.parse(info.stdout) as { 'format-specific': { data: { bitmaps?: unknown } } })['format-specific'].data.bitmaps);
    return { counts, pullMap: map.stdout };
  });
}

describe('efficient live backup: full + incremental backups, pull mode', oracle(), () => {
  test('the seed 003 recipe gives point-in-time backups and the same bitmaps as QSD', async () => {
    const root = scratch('qchain-backup-inc-');
    const res = await onBoth(root, recipe);
    assert.deepEqual(res.qchain.counts, res.qemu.counts);
    assert.equal(res.qchain.pullMap, res.qemu.pullMap);
  });
});

/** Bitmap modes, a cancelled incremental and the argument errors: replies and bitmaps as QSD's. */
async function modes(tool: Tool, dir: string): Promise<unknown[]> {
  fs.mkdirSync(dir, { recursive: true });
  await qemuImg(['create', '-q', '-f', 'qcow2', 'disk.qcow2', '16M'], dir);
  for (const t of ['t1', 't2', 't3', 't4', 't5']) await qemuImg(['create', '-q', '-f', 'qcow2', `${t}.qcow2`, '16M'], dir);
  const out: unknown[] = [];
  return withDaemon(tool, dir, ARGS, async (d) => {
    const { q } = d;
    const x = async (cmd: string, args?: Record<string, unknown>): Promise<void> => {
      out.push({ cmd, reply: replyOf(await q.execute(cmd, args)) });
    };
    const bitmaps = async (): Promise<void> => {
      out.push(diskBitmaps((await q.execute('query-named-block-nodes')).return));
    };
    await x('qmp_capabilities');
    for (const t of ['t1', 't2', 't3', 't4', 't5']) await x('blockdev-add', { driver: 'qcow2', 'node-name': t, file: { driver: 'file', filename: path.join(dir, `${t}.qcow2`) } });
    await x('block-dirty-bitmap-add', { node: 'disk', name: 'bA', granularity: 32768 });
    await guest(dir, ['write -P 1 0 40k', 'write -P 2 7M 1M']);
    let seq = 0;
    const backup = (extra: Record<string, unknown>): Promise<void> => x('blockdev-backup', { device: 'disk', 'job-id': `j${++seq}`, ...extra });
    const gone = (): Promise<QmpMessage> => q.waitFor((m) => m.event === 'JOB_STATUS_CHANGE' && JSON.stringify(m.data) === JSON.stringify({ status: 'null', id: `j${seq}` }), 60000);
    // Argument errors.
    await backup({ target: 't1', sync: 'incremental' });
    await backup({ target: 't1', sync: 'bitmap' });
    await backup({ target: 't1', sync: 'incremental', bitmap: 'nosuch' });
    await backup({ target: 't1', sync: 'incremental', bitmap: 'bA', 'bitmap-mode': 'never' });
    await backup({ target: 't1', sync: 'bitmap', bitmap: 'bA' });
    await backup({ target: 't1', sync: 'full', bitmap: 'bA', 'bitmap-mode': 'never' });
    await backup({ target: 't1', sync: 'none', bitmap: 'bA', 'bitmap-mode': 'always' });
    await backup({ target: 't1', sync: 'full', 'bitmap-mode': 'always' });
    await bitmaps();
    // never: the bitmap is left as it was.
    await backup({ target: 't1', sync: 'bitmap', bitmap: 'bA', 'bitmap-mode': 'never' });
    await gone();
    await bitmaps();
    // always (success): cleared.
    await backup({ target: 't2', sync: 'bitmap', bitmap: 'bA', 'bitmap-mode': 'always' });
    await gone();
    await bitmaps();
    // full with on-success: cleared too.
    await guest(dir, ['write -P 3 1M 64k']);
    await backup({ target: 't3', sync: 'full', bitmap: 'bA', 'bitmap-mode': 'on-success' });
    await gone();
    await bitmaps();
    // A cancelled incremental keeps what it was to copy and what was written meanwhile.
    await guest(dir, ['write -P 4 2M 64k', 'write -P 5 9M 4k']);
    await backup({ target: 't4', sync: 'incremental', bitmap: 'bA', speed: 1 });
    await guest(dir, ['write -P 6 12M 100k']);
    await x('block-job-cancel', { device: `j${seq}` });
    await gone();
    await bitmaps();
    out.push({ cmd: 'quit', reply: replyOf(await quit(d)) });
    return out;
  });
}

describe('bitmap backups: modes, cancel, errors', oracle(), () => {
  test('replies and resulting bitmaps are QSD\'s', async () => {
    const root = scratch('qchain-backup-modes-');
    const { qemu, qchain: ours } = await onBoth(root, modes);
    assert.deepEqual(ours, qemu);
  });
});

/** completion-mode=grouped: two incremental backups; cancelling one cancels both and keeps both bitmaps. */
async function grouped(tool: Tool, dir: string): Promise<unknown[]> {
  fs.mkdirSync(dir, { recursive: true });
  await qemuImg(['create', '-q', '-f', 'qcow2', 'disk.qcow2', '16M'], dir);
  for (const t of ['g1', 'g2', 'g3', 'g4']) await qemuImg(['create', '-q', '-f', 'qcow2', `${t}.qcow2`, '16M'], dir);
  const out: unknown[] = [];
  return withDaemon(tool, dir, ARGS, async (d) => {
    const { q } = d;
    const x = async (cmd: string, args?: Record<string, unknown>): Promise<void> => {
      out.push({ cmd, reply: replyOf(await q.execute(cmd, args)) });
    };
    const gone = (id: string): Promise<QmpMessage> => q.waitFor((m) => m.event === 'JOB_STATUS_CHANGE' && JSON.stringify(m.data) === JSON.stringify({ status: 'null', id }), 60000);
    await x('qmp_capabilities');
    for (const t of ['g1', 'g2', 'g3', 'g4']) await x('blockdev-add', { driver: 'qcow2', 'node-name': t, file: { driver: 'file', filename: path.join(dir, `${t}.qcow2`) } });
    await x('block-dirty-bitmap-add', { node: 'disk', name: 'x' });
    await x('block-dirty-bitmap-add', { node: 'disk', name: 'y', granularity: 16384 });
    await guest(dir, ['write -P 7 1M 64k', 'write -P 8 5M 20k']);
    const pair = (a: string, b: string, speed: number): Record<string, unknown> => ({
      actions: [
        { type: 'blockdev-backup', data: { device: 'disk', target: a, sync: 'incremental', bitmap: 'x', 'job-id': a, speed } },
        { type: 'blockdev-backup', data: { device: 'disk', target: b, sync: 'incremental', bitmap: 'y', 'job-id': b, speed } },
      ],
      properties: { 'completion-mode': 'grouped' },
    });
    await x('transaction', pair('g1', 'g2', 1));
    await x('block-job-cancel', { device: 'g1' });
    await gone('g1');
    await gone('g2');
    await x('query-named-block-nodes');
    out.push(diskBitmaps((out.pop() as { reply: unknown }).reply));
    await x('transaction', pair('g3', 'g4', 0));
    await gone('g3');
    await gone('g4');
    await x('query-named-block-nodes');
    out.push(diskBitmaps((out.pop() as { reply: unknown }).reply));
    out.push({ cmd: 'quit', reply: replyOf(await quit(d)) });
    // Each job's own events, in order (the two jobs' events interleave as their runs do).
    for (const id of ['g1', 'g2', 'g3', 'g4']) {
      out.push(q.received.filter((m) => m.event && ((m.data as { id?: string }).id === id || (m.data as { device?: string }).device === id))
        // A cancelled job's progress depends on when the cancel came: not compared.
        .map((m) => ({ event: m.event, data: m.event === 'BLOCK_JOB_CANCELLED' ? { ...(m.data as object), offset: 'X' } : m.data })));
    }
    return out;
  });
}

describe('grouped transactions of bitmap backups', oracle(), () => {
  test('a cancel cancels the group and keeps every bitmap; success syncs them all: as QSD', async () => {
    const root = scratch('qchain-backup-grouped-');
    const { qemu, qchain: ours } = await onBoth(root, grouped);
    if (process.env.QCHAIN_DEBUG) fs.writeFileSync('/tmp/grouped.json', JSON.stringify({ qemu, ours }, null, 1));
    assert.deepEqual(ours, qemu);
  });
});

/** SIGTERM during an incremental backup: the persistent bitmap is stored with what was still to copy and the writes since. */
async function termDuringBackup(tool: Tool, dir: string): Promise<unknown[]> {
  fs.mkdirSync(dir, { recursive: true });
  await qemuImg(['create', '-q', '-f', 'qcow2', 'disk.qcow2', '16M'], dir);
  await qemuImg(['create', '-q', '-f', 'qcow2', 't.qcow2', '16M'], dir);
  const out: unknown[] = [];
  await withDaemon(tool, dir, ARGS, async ({ child, q }) => {
    ok(await q.execute('qmp_capabilities'));
    ok(await q.execute('block-dirty-bitmap-add', { node: 'disk', name: 'p', persistent: true }));
    await guest(dir, ['write -P 1 0 128k', 'write -P 2 6M 64k']);
    ok(await q.execute('blockdev-add', { driver: 'qcow2', 'node-name': 't', file: { driver: 'file', filename: path.join(dir, 't.qcow2') } }));
    ok(await q.execute('blockdev-backup', { device: 'disk', target: 't', sync: 'incremental', bitmap: 'p', 'job-id': 'j', speed: 1 }));
    await guest(dir, ['write -P 3 9M 4k']);
    child.kill('SIGTERM');
    await exited(child);
  });
  const info = await qemuImg(['info', '--output=json', 'disk.qcow2'], dir);
  out.push((JSON.parse(info.stdout) as { 'format-specific': { data: { bitmaps?: unknown } } })['format-specific'].data.bitmaps);
  fs.rmSync(path.join(dir, 'qmp.sock'), { force: true });
  fs.rmSync(path.join(dir, 'nbd.sock'), { force: true });
  await withDaemon(tool, dir, ARGS, async (d) => {
    ok(await d.q.execute('qmp_capabilities'));
    out.push(diskBitmaps((await d.q.execute('query-named-block-nodes')).return));
    ok(await quit(d));
  });
  return out;
}

describe('shutdown during a bitmap backup', oracle(), () => {
  test('SIGTERM keeps the bitmap whole (stored, reloaded), as QSD', async () => {
    const root = scratch('qchain-backup-term-');
    const { qemu, qchain: ours } = await onBoth(root, termDuringBackup);
    assert.deepEqual(ours, qemu);
  });
});
