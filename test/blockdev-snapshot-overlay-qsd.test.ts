/**
 * blockdev-snapshot's checks on the overlay, as qemu-storage-daemon 7.2 makes them: an overlay
 * that is exported or is a format node's file is "already in use" (one that is only another
 * node's backing is not), a protocol or raw node "does not support backing images", one with a
 * backing "already has a backing image", a read-only one is refused ("Block node is
 * read-only"), an overlay under an exported node's chain is in use too (the node's own backing
 * even once not exported itself), and one that would close a loop is refused ("would create a
 * cycle").
 * Same script against both daemons; the export follows the one accepted overlay.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { oracle, qemuImg, scratch } from './helpers/qemu.js';
import type { QmpMessage } from './helpers/qmp-client.js';
import { MONITOR, onBoth, qcow2Node, quit, withDaemon, type Tool } from './helpers/live-qmp.js';

const ARGS = [...qcow2Node('base'), ...qcow2Node('top', ',backing=base'),
  '--nbd-server', 'addr.type=unix,addr.path=nbd.sock',
  '--export', 'type=nbd,id=exp0,node-name=top,name=vda,writable=on',
  '--export', 'type=nbd,id=exp1,node-name=base,name=ro', ...MONITOR];

const SCRIPT: Array<[string, Record<string, unknown>]> = [
  ['blockdev-snapshot', { node: 'top', overlay: 'nope' }],
  ['blockdev-snapshot', { node: 'nope', overlay: 'base' }],
  ['blockdev-snapshot', { node: 'top', overlay: 'base' }],
  ['blockdev-snapshot', { node: 'top', overlay: 'top' }],
  ['blockdev-snapshot', { node: 'top', overlay: 'top-file' }],
  ['blockdev-add', { driver: 'file', 'node-name': 'xf', filename: 'x.qcow2' }],
  ['blockdev-snapshot', { node: 'top', overlay: 'xf' }],
  ['blockdev-add', { driver: 'qcow2', 'node-name': 'x', file: 'xf' }],
  ['blockdev-snapshot', { node: 'top', overlay: 'xf' }],
  ['blockdev-add', { driver: 'raw', 'node-name': 'r', file: { driver: 'file', filename: 'r.img' } }],
  ['blockdev-snapshot', { node: 'top', overlay: 'r' }],
  ['blockdev-add', { driver: 'qcow2', 'node-name': 'ro', 'read-only': true, file: { driver: 'file', filename: 'w.qcow2' }, backing: null }],
  ['blockdev-snapshot', { node: 'top', overlay: 'ro' }],
  ['blockdev-add', { driver: 'qcow2', 'node-name': 'y', file: { driver: 'file', filename: 'y.qcow2' }, backing: null }],
  ['blockdev-add', { driver: 'qcow2', 'node-name': 'z', file: { driver: 'file', filename: 'z.qcow2' }, backing: 'y' }],
  ['blockdev-snapshot', { node: 'top', overlay: 'z' }],
  ['blockdev-snapshot', { node: 'z', overlay: 'y' }],
  ['block-export-del', { id: 'exp1' }],
  ['wait-deleted', {}],
  ['blockdev-snapshot', { node: 'top', overlay: 'base' }],
  ['blockdev-snapshot', { node: 'top', overlay: 'y' }],
  ['blockdev-snapshot', { node: 'top', overlay: 'x' }],
  ['query-block-exports', {}],
];

async function session(tool: Tool, dir: string): Promise<unknown[]> {
  fs.mkdirSync(dir, { recursive: true });
  for (const f of ['base', 'x', 'w', 'y', 'z']) assert.equal((await qemuImg(['create', '-q', '-f', 'qcow2', `${f}.qcow2`, '16M'], dir)).code, 0);
  assert.equal((await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'top.qcow2'], dir)).code, 0);
  assert.equal((await qemuImg(['create', '-q', '-f', 'raw', 'r.img', '16M'], dir)).code, 0);
  return withDaemon(tool, dir, ARGS, async (d) => {
    const out: unknown[] = [];
    await d.q.execute('qmp_capabilities');
    for (const [i, [cmd, args]] of SCRIPT.entries()) {
      if (cmd === 'wait-deleted') {
        await d.q.waitFor((m) => m.event === 'BLOCK_EXPORT_DELETED');
        continue;
      }
      const r: QmpMessage = await d.q.execute(cmd, args, i);
      out.push([cmd, r]);
    }
    await quit(d);
    return out;
  });
}

test('blockdev-snapshot refuses overlays as qemu-storage-daemon does', oracle(), async () => {
  const r = await onBoth(scratch(), session);
  assert.deepEqual(r.qchain, r.qemu);
  assert.ok(JSON.stringify(r.qemu).includes('The overlay is already in use'));
});
