/**
 * The reference transcript of a live backup (full backup + persistent bitmap in one transaction,
 * guest writes, the bitmap copied into a disabled one and exported over NBD, an incremental
 * backup with auto-finalize off) run against qemu-storage-daemon and qchain: every reply and
 * event (timestamps aside), the exported bitmap's map, and the incremental target's own map
 * (exactly the dirty ranges) must be the same.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { oracle, qemuImg, qemuIo, run, scratch } from './helpers/qemu.js';
import type { QmpMessage } from './helpers/qmp-client.js';
import { nbdUri, qcow2Node, quit, serve, withDaemon, type Tool } from './helpers/live-qmp.js';

/** Timestamps dropped; query-named-block-nodes reduced to the bitmaps of the nodes that have some. */
function norm(m: QmpMessage): unknown {
  const c = JSON.parse(JSON.stringify(m)) as Record<string, unknown>;
  delete c.timestamp;
  if (c.QMP) (c.QMP as { version: unknown }).version = 'V';
  if (typeof c.id === 'string' && c.id.startsWith('nodes') && Array.isArray(c.return)) {
    c.return = (c.return as Array<Record<string, unknown>>).filter((n) => n['dirty-bitmaps'])
      .map((n) => ({ 'node-name': n['node-name'], 'dirty-bitmaps': n['dirty-bitmaps'] }));
  }
  return c;
}

const ARGS = [
  ...qcow2Node('tgt'),
  '--blockdev', 'driver=file,node-name=bkfull-file,filename=bkfull.qcow2',
  '--blockdev', 'driver=file,node-name=bkinc-file,filename=bkinc.qcow2',
  ...serve('tgt'),
];

interface Result { log: unknown[]; map: string; incMap: string }

async function session(tool: Tool, dir: string): Promise<Result> {
  fs.mkdirSync(dir, { recursive: true });
  await qemuImg(['create', '-q', '-f', 'qcow2', 'tgt.qcow2', '64M'], dir);
  const w = await qemuIo(['-c', 'write -q -P 0x5a 0 3M', '-c', 'write -q -P 0x5b 4M 64k', '-c', 'write -q -P 0x5c 6M 128k', 'tgt.qcow2'], dir);
  assert.equal(w.code, 0, w.stderr);
  await qemuImg(['create', '-q', '-f', 'qcow2', 'bkfull.qcow2', '64M'], dir);
  await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'bkfull.qcow2', '-F', 'qcow2', 'bkinc.qcow2'], dir);
  return withDaemon(tool, dir, ARGS, async (d) => {
    const { q } = d;
    const ev = (status: string, id: string): Promise<QmpMessage> =>
      q.waitFor((m) => m.event === 'JOB_STATUS_CHANGE' && JSON.stringify(m.data) === JSON.stringify({ status, id }), 60000);
    await q.execute('qmp_capabilities', undefined, 'c1');
    await q.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'bkfull', file: 'bkfull-file', backing: null }, 'c25');
    await q.execute('transaction', {
      actions: [
        { type: 'block-dirty-bitmap-add', data: { node: 'tgt', name: 'bm0', persistent: true } },
        { type: 'blockdev-backup', data: { 'job-id': 'backup-full', device: 'tgt', target: 'bkfull', sync: 'full' } },
      ],
    }, 'c26');
    await ev('null', 'backup-full');
    for (const c of ['write -q -P 0xf1 8M 64k', 'write -q -P 0xf2 10M 128k']) {
      const r = await qemuIo(['-f', 'raw', '-c', c, nbdUri(dir)]);
      assert.equal(r.code, 0, r.stderr);
    }
    await q.execute('query-named-block-nodes', { flat: true }, 'nodes27');
    await q.execute('block-export-add', { type: 'nbd', id: 'exp1', 'node-name': 'tgt', name: 'vda-bm', writable: false, bitmaps: ['bm0'], 'allocation-depth': true }, 'c28');
    await q.execute('transaction', {
      actions: [
        { type: 'block-dirty-bitmap-add', data: { node: 'tgt', name: 'bm0-export', disabled: true } },
        { type: 'block-dirty-bitmap-merge', data: { node: 'tgt', target: 'bm0-export', bitmaps: ['bm0'] } },
      ],
    }, 'c29');
    await q.execute('block-export-add', { type: 'nbd', id: 'exp1', 'node-name': 'tgt', name: 'vda-bm', writable: false, bitmaps: ['bm0-export'], 'allocation-depth': true }, 'c30');
    const map = await run('nbdinfo', ['--map=qemu:dirty-bitmap:bm0-export', nbdUri(dir, 'vda-bm')]);
    assert.equal(map.code, 0, map.stderr);
    await q.execute('block-export-del', { id: 'exp1' }, 'c31');
    await q.waitFor((m) => m.event === 'BLOCK_EXPORT_DELETED');
    await q.execute('block-dirty-bitmap-remove', { node: 'tgt', name: 'bm0-export' }, 'c32');
    await q.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'bkinc', file: 'bkinc-file', backing: null }, 'c38');
    await q.execute('blockdev-backup', { 'job-id': 'backup-inc', device: 'tgt', target: 'bkinc', sync: 'incremental', bitmap: 'bm0', 'auto-finalize': false, 'auto-dismiss': false }, 'c39');
    await q.waitFor((m) => m.event === 'BLOCK_JOB_PENDING');
    await q.execute('query-jobs', undefined, 'c40');
    await q.execute('job-complete', { id: 'backup-inc' }, 'c41');
    await q.execute('job-finalize', { id: 'backup-inc' }, 'c42');
    await ev('concluded', 'backup-inc');
    await q.execute('job-dismiss', { id: 'backup-inc' }, 'c43');
    await q.execute('query-named-block-nodes', { flat: true }, 'nodes44');
    await q.execute('blockdev-del', { 'node-name': 'bkinc' }, 'c45');
    await quit(d, 'q');
    const inc = await qemuImg(['map', '--output=json', 'json:{"driver":"qcow2","backing":null,"file":{"driver":"file","filename":"bkinc.qcow2"}}'], dir);
    assert.equal(inc.code, 0, inc.stderr);
    const incMap = JSON.stringify((JSON.parse(inc.stdout) as Array<Record<string, unknown>>).map((e) => ({ ...e, offset: undefined })));
    return { log: q.received.map(norm), map: map.stdout, incMap };
  });
}

describe('live backup transcript vs qemu-storage-daemon', oracle(), () => {
  test('full + bitmap transaction, pull-mode bitmap export, incremental with job-finalize: same events, maps and target', async () => {
    const root = scratch('qchain-backup-transcript-');
    const qemu = await session('qemu', path.join(root, 'qemu'));
    const ours = await session('qchain', path.join(root, 'qchain'));
    if (process.env.QCHAIN_DEBUG) fs.writeFileSync('/tmp/backup-transcript.json', JSON.stringify({ qemu, ours }, null, 1));
    assert.deepEqual(ours.log, qemu.log);
    assert.equal(ours.map, qemu.map);
    assert.equal(ours.incMap, qemu.incMap);
    const cmp = await qemuImg(['compare', path.join(root, 'qemu/bkinc.qcow2'), path.join(root, 'qchain/bkinc.qcow2')]);
    assert.equal(cmp.code, 0, cmp.stdout + cmp.stderr);
  });
});
