/**
 * Dirty bitmaps over QMP against qemu-storage-daemon: the same command line and the same
 * commands (add/merge/disable/enable/clear/remove with their errors, transactions that succeed
 * and one that fails and changes nothing) go to both daemons; replies, events, the bitmaps
 * listed by query-named-block-nodes, the bitmap exported over NBD and the images left behind
 * (qemu-img info/check/compare) must match.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { oracle, qemuImg, qemuIo, run, scratch } from './helpers/qemu.js';
import { waitForSocket, type QmpMessage } from './helpers/qmp-client.js';
import { daemonArgs, exited, killIfRunning, nbdUri, onBoth, quit, spawnDaemon, withDaemon, type Tool } from './helpers/live-qmp.js';

/** Drop timestamps; keep only the bitmaps of query-named-block-nodes (the rest is covered elsewhere). */
function norm(m: QmpMessage): unknown {
  const c = JSON.parse(JSON.stringify(m)) as Record<string, unknown>;
  delete c.timestamp;
  if (c.QMP) (c.QMP as { version: unknown }).version = 'V';
  if (typeof c.id === 'string' && c.id.startsWith('nodes') && Array.isArray(c.return)) {
    c.return = (c.return as Array<Record<string, unknown>>).filter((n) => n.drv !== 'file')
      .map((n) => ({ 'node-name': n['node-name'], 'dirty-bitmaps': n['dirty-bitmaps'] }));
  }
  return c;
}

const ARGS = daemonArgs('disk.qcow2', 'disk');

async function setup(dir: string): Promise<void> {
  fs.mkdirSync(dir, { recursive: true });
  await qemuImg(['create', '-q', '-f', 'qcow2', 'disk.qcow2', '16M'], dir);
  await qemuIo(['-c', 'write -P 0xaa 0 1M', 'disk.qcow2'], dir);
  await qemuImg(['bitmap', '--add', 'disk.qcow2', 'old'], dir);
  await qemuImg(['create', '-q', '-f', 'qcow2', 'other.qcow2', '16M'], dir);
  await qemuImg(['create', '-q', '-f', 'qcow2', 'ro.qcow2', '16M'], dir);
  await qemuImg(['bitmap', '--add', 'ro.qcow2', 'pold'], dir);
}

async function guestWrite(dir: string, cmd: string): Promise<void> {
  const w = await qemuIo(['-f', 'raw', '-c', cmd, nbdUri(dir)]);
  assert.equal(w.code, 0, w.stderr);
}

interface Result { log: unknown[]; maps: string[]; info: string; check: string }

async function session(tool: Tool, dir: string): Promise<Result> {
  const maps: string[] = [];
  return withDaemon(tool, dir, ARGS, async (d) => {
    const { q } = d;
    await q.execute('qmp_capabilities', undefined, 'cap');
    await q.execute('query-named-block-nodes', undefined, 'nodes0');
    await q.execute('block-dirty-bitmap-add', { node: 'disk', name: 'b0' }, 'add0');
    await q.execute('block-dirty-bitmap-add', { node: 'disk', name: 'b0' }, 'add-dup');
    await q.execute('block-dirty-bitmap-add', { node: 'disk', name: 'old' }, 'add-dup-persistent');
    await q.execute('block-dirty-bitmap-add', { node: 'nosuch', name: 'x' }, 'add-nonode');
    await q.execute('block-dirty-bitmap-add', { node: 'disk', name: 'g', granularity: 1000 }, 'add-badgran');
    await q.execute('block-dirty-bitmap-add', { node: 'disk', name: 'g', granularity: 256 }, 'add-smallgran');
    await q.execute('block-dirty-bitmap-add', { node: 'disk', name: '' }, 'add-empty');
    await q.execute('block-dirty-bitmap-add', { node: 'disk', name: 'b1', granularity: 4096, persistent: true }, 'add1');
    await q.execute('block-dirty-bitmap-add', { node: 'disk', name: 'b2', disabled: true }, 'add2');
    await q.execute('block-dirty-bitmap-add', { node: 'disk-file', name: 'f0', persistent: true }, 'add-file-persistent');
    await q.execute('query-named-block-nodes', undefined, 'nodes1');
    await guestWrite(dir, 'write -q -P 0x11 64k 4k');
    await guestWrite(dir, 'write -q -P 0x12 3M 200k');
    await q.execute('query-named-block-nodes', undefined, 'nodes2');
    await q.execute('block-dirty-bitmap-merge', { node: 'disk', target: 'b2', bitmaps: ['b0', { node: 'disk', name: 'old' }] }, 'merge');
    await q.execute('block-dirty-bitmap-merge', { node: 'disk', target: 'nosuch', bitmaps: ['b0'] }, 'merge-notarget');
    await q.execute('block-dirty-bitmap-merge', { node: 'disk', target: 'b2', bitmaps: ['nosuch'] }, 'merge-nosrc');
    await q.execute('block-dirty-bitmap-disable', { node: 'disk', name: 'b0' }, 'disable');
    await q.execute('block-dirty-bitmap-enable', { node: 'disk', name: 'b2' }, 'enable');
    await q.execute('block-dirty-bitmap-clear', { node: 'disk', name: 'b1' }, 'clear');
    await q.execute('block-dirty-bitmap-clear', { node: 'disk', name: 'nosuch' }, 'clear-missing');
    await q.execute('block-dirty-bitmap-remove', { node: 'disk', name: 'nosuch' }, 'remove-missing');
    await q.execute('block-dirty-bitmap-remove', { node: 'disk', name: 'old' }, 'remove-persistent');
    await guestWrite(dir, 'write -q -P 0x13 8M 64k');
    await q.execute('query-named-block-nodes', undefined, 'nodes3');
    await q.execute('block-export-add', { type: 'nbd', id: 'exp1', 'node-name': 'disk', name: 'pull', bitmaps: ['b2'] }, 'export-enabled');
    await q.execute('block-export-add', { type: 'nbd', id: 'exp2', 'node-name': 'disk', name: 'pull2', bitmaps: ['nosuch'] }, 'export-nobitmap');
    await q.execute('block-export-add', { type: 'nbd', id: 'exp1', 'node-name': 'disk', name: 'pull', bitmaps: ['b0'] }, 'export-bitmap');
    maps.push((await run('nbdinfo', ['--map=qemu:dirty-bitmap:b0', nbdUri(dir, 'pull')])).stdout);
    await q.execute('query-named-block-nodes', undefined, 'nodes-busy');
    await q.execute('block-dirty-bitmap-enable', { node: 'disk', name: 'b0' }, 'enable-busy');
    await q.execute('block-dirty-bitmap-remove', { node: 'disk', name: 'b0' }, 'remove-busy');
    await q.execute('block-export-del', { id: 'exp1' }, 'export-del');
    // A failing transaction undoes its external snapshot: no new node, the export stays on disk.
    await q.execute('transaction', {
      actions: [
        { type: 'blockdev-snapshot-sync', data: { 'node-name': 'disk', 'snapshot-file': 'undone.qcow2', 'snapshot-node-name': 'undone', format: 'qcow2' } },
        { type: 'block-dirty-bitmap-add', data: { node: 'disk', name: 'b0' } },
      ],
    }, 'tx-snap-fail');
    await q.execute('query-named-block-nodes', undefined, 'nodes-undone');
    await q.execute('query-block-exports', undefined, 'exports-undone');
    // A transaction that adds a bitmap and takes an external snapshot.
    await q.execute('transaction', {
      actions: [
        { type: 'block-dirty-bitmap-add', data: { node: 'disk', name: 't0', persistent: true } },
        { type: 'blockdev-snapshot-sync', data: { 'node-name': 'disk', 'snapshot-file': 'snap.qcow2', 'snapshot-node-name': 'snap', format: 'qcow2' } },
      ],
    }, 'tx-ok');
    await q.execute('query-named-block-nodes', undefined, 'nodes4');
    // A failing transaction changes nothing: the first action is undone.
    await q.execute('transaction', {
      actions: [
        { type: 'block-dirty-bitmap-add', data: { node: 'snap', name: 's0' } },
        { type: 'block-dirty-bitmap-disable', data: { node: 'disk', name: 'b2' } },
        { type: 'block-dirty-bitmap-clear', data: { node: 'disk', name: 'b2' } },
        { type: 'block-dirty-bitmap-merge', data: { node: 'disk', target: 'b0', bitmaps: ['b1'] } },
        { type: 'block-dirty-bitmap-add', data: { node: 'snap', name: 's0' } },
      ],
    }, 'tx-fail');
    await q.execute('transaction', {
      actions: [
        { type: 'block-dirty-bitmap-add', data: { node: 'snap', name: 's1' } },
        { type: 'abort', data: {} },
      ],
    }, 'tx-abort');
    await q.execute('transaction', { actions: [{ type: 'block-dirty-bitmap-add', data: { node: 'snap', name: 's2' } }], properties: { 'completion-mode': 'grouped' } }, 'tx-grouped');
    await q.execute('transaction', { actions: [{ type: 'block-dirty-bitmap-add', data: { node: 'snap' } }] }, 'tx-badarg');
    await q.execute('transaction', { actions: [{ type: 'no-such-action', data: {} }] }, 'tx-badtype');
    await q.execute('query-named-block-nodes', undefined, 'nodes5');
    // blockdev-del stores persistent bitmaps; the next open finds them (and only them).
    const other = { driver: 'qcow2', 'node-name': 'other', file: { driver: 'file', filename: path.join(dir, 'other.qcow2') } };
    await q.execute('blockdev-add', other, 'other-add');
    await q.execute('block-dirty-bitmap-add', { node: 'other', name: 'p1', persistent: true, granularity: 131072 }, 'other-p1');
    await q.execute('block-dirty-bitmap-add', { node: 'other', name: 'n1' }, 'other-n1');
    await q.execute('block-dirty-bitmap-disable', { node: 'other', name: 'p1' }, 'other-p1-disable');
    await q.execute('blockdev-del', { 'node-name': 'other' }, 'other-del');
    await q.execute('blockdev-add', other, 'other-add2');
    await q.execute('query-named-block-nodes', undefined, 'nodes6');
    await q.execute('blockdev-del', { 'node-name': 'other' }, 'other-del2');
    // A read-only node: its stored bitmaps are read-only; new ones (even persistent) are not.
    await q.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'ro', 'read-only': true, file: { driver: 'file', filename: path.join(dir, 'ro.qcow2') } }, 'ro-add');
    await q.execute('block-dirty-bitmap-add', { node: 'ro', name: 'p', persistent: true }, 'ro-add-p');
    await q.execute('block-dirty-bitmap-add', { node: 'ro', name: 'n' }, 'ro-add-n');
    await q.execute('block-dirty-bitmap-clear', { node: 'ro', name: 'n' }, 'ro-clear-n');
    await q.execute('block-dirty-bitmap-clear', { node: 'ro', name: 'p' }, 'ro-clear-p');
    await q.execute('block-dirty-bitmap-clear', { node: 'ro', name: 'pold' }, 'ro-clear-pold');
    await q.execute('block-dirty-bitmap-disable', { node: 'ro', name: 'pold' }, 'ro-disable-pold');
    await q.execute('block-dirty-bitmap-remove', { node: 'ro', name: 'pold' }, 'ro-remove-pold');
    await q.execute('block-dirty-bitmap-add', { node: 'ro', name: 'n', persistent: true }, 'ro-add-dup');
    await q.execute('block-dirty-bitmap-add', { node: 'ro', name: 'huge', granularity: 2147483648, persistent: true }, 'ro-add-huge');
    await q.execute('block-dirty-bitmap-add', { node: 'ro', name: 'huge2', granularity: 4294967296 }, 'ro-add-huge2');
    await q.execute('query-named-block-nodes', undefined, 'nodes7');
    await quit(d, 'q');
    const info = await qemuImg(['info', '--output=json', 'disk.qcow2'], dir);
    const check = await qemuImg(['check', 'disk.qcow2'], dir);
    const roInfo = await qemuImg(['info', '--output=json', 'ro.qcow2'], dir);
    const bitmapsOf = (o: string): string => JSON.stringify(((JSON.parse(o) as Record<string, unknown>)['format-specific'] as Record<string, unknown>).data);
    return { log: q.received.map(norm), maps, info: bitmapsOf(info.stdout) + bitmapsOf(roInfo.stdout), check: check.stdout + check.stderr };
  });
}

/** The command line's --export bitmaps.0=NAME (a disabled persistent bitmap), then SIGTERM. */
async function pullFromCommandLine(tool: Tool, dir: string): Promise<{ map: string; info: string }> {
  fs.mkdirSync(dir, { recursive: true });
  await qemuImg(['create', '-q', '-f', 'qcow2', 'disk.qcow2', '16M'], dir);
  await qemuImg(['bitmap', '--add', '-g', '32768', 'disk.qcow2', 'frozen'], dir);
  await qemuIo(['-c', 'write -q -P 0xaa 40k 8k', '-c', 'write -q -P 0xab 5M 1M', 'disk.qcow2'], dir);
  await qemuImg(['bitmap', '--disable', 'disk.qcow2', 'frozen'], dir);
  await qemuImg(['bitmap', '--add', 'disk.qcow2', 'live'], dir);
  const args = [...ARGS.slice(0, 6), '--export', 'type=nbd,id=exp0,node-name=disk,name=vda,bitmaps.0=frozen'];
  const child = spawnDaemon(tool, dir, args);
  try {
    await waitForSocket(path.join(dir, 'nbd.sock'), child);
    const map = await run('nbdinfo', ['--map=qemu:dirty-bitmap:frozen', nbdUri(dir)]);
    assert.equal(map.code, 0, map.stderr);
    child.kill('SIGTERM');
    await exited(child);
    const info = await qemuImg(['info', '--output=json', 'disk.qcow2'], dir);
    return { map: map.stdout, info: JSON.stringify((JSON.parse(info.stdout) as { 'format-specific': { data: unknown } })['format-specific'].data) };
  } finally {
    killIfRunning(child);
  }
}

describe('dirty bitmaps over QMP vs qemu-storage-daemon', oracle(), () => {
  test('--export bitmaps.0=NAME serves the persistent bitmap over NBD, as QSD does; SIGTERM stores it', async () => {
    const root = scratch('qchain-pull-');
    const { qemu, qchain: ours } = await onBoth(root, pullFromCommandLine);
    assert.match(qemu.map, /dirty/);
    assert.equal(ours.map, qemu.map);
    assert.equal(ours.info, qemu.info);
  });

  test('bitmap commands, errors, transactions, NBD bitmap export: same replies, maps and images', async () => {
    const root = scratch('qchain-qmp-bitmaps-');
    const res: Partial<Record<Tool, Result>> = {};
    const tools = (process.env.QCHAIN_ONLY ?? 'qemu,qchain').split(',') as Tool[];
    for (const tool of tools) {
      const dir = path.join(root, tool);
      await setup(dir);
      res[tool] = await session(tool, dir);
      if (process.env.QCHAIN_DEBUG) fs.writeFileSync(`/tmp/qmp-bitmaps-${tool}.json`, JSON.stringify(res[tool], null, 1));
    }
    if (!res.qemu || !res.qchain) return;
    assert.deepEqual(res.qchain.log, res.qemu.log);
    assert.deepEqual(res.qchain.maps, res.qemu.maps);
    assert.equal(res.qchain.info, res.qemu.info);
    assert.equal(res.qchain.check, res.qemu.check);
    const cmp = await qemuImg(['compare', path.join(root, 'qemu/snap.qcow2'), path.join(root, 'qchain/snap.qcow2')]);
    assert.equal(cmp.code, 0, cmp.stdout + cmp.stderr);
  });
});
