/**
 * blockdev-snapshot-sync's argument checks against qemu-storage-daemon (QEMU's
 * external_snapshot_prepare order): `device` names a block backend and QSD has none, so only
 * `node-name` finds a node; with `node-name` the new overlay must be named, and not by a name in
 * use; an unknown format and a raw overlay are refused with qemu-img's creation texts. The same
 * script runs against both daemons, alone and inside a transaction; every reply and the export's
 * node afterwards must match.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { oracle, qemuImg, scratch } from './helpers/qemu.js';
import { onBoth, qcow2Node, quit, serve, withDaemon, type Tool } from './helpers/live-qmp.js';

const SYNC: Array<Record<string, unknown>> = [
  {},
  { 'node-name': 'top', 'snapshot-file': 'x.qcow2' },
  { device: 'top', 'snapshot-file': 'x.qcow2', 'snapshot-node-name': 's' },
  { 'snapshot-file': 'x.qcow2', 'snapshot-node-name': 's' },
  { 'node-name': 'nope', 'snapshot-file': 'x.qcow2', 'snapshot-node-name': 's' },
  { 'node-name': 'top', 'snapshot-file': 'x.qcow2', 'snapshot-node-name': 'base' },
  { 'node-name': 'top', 'snapshot-file': 'x.qcow2', 'snapshot-node-name': 's', format: 'raw2' },
  { 'node-name': 'top', 'snapshot-file': 'x.qcow2', 'snapshot-node-name': 's', format: 'raw2', mode: 'existing' },
  { 'node-name': 'top', 'snapshot-file': 'x.qcow2', 'snapshot-node-name': 's', format: 'raw' },
  { 'node-name': 'top', 'snapshot-file': 'x.qcow2', 'snapshot-node-name': 's', mode: 'bad' },
  { 'node-name': 'top', 'snapshot-file': 'nonex.qcow2', 'snapshot-node-name': 's', mode: 'existing' },
  { 'node-name': 'base', 'snapshot-file': 'x.qcow2', 'snapshot-node-name': 's' },
];

async function session(tool: Tool, dir: string): Promise<unknown[]> {
  fs.mkdirSync(dir, { recursive: true });
  assert.equal((await qemuImg(['create', '-q', '-f', 'qcow2', 'base.qcow2', '16M'], dir)).code, 0);
  assert.equal((await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'top.qcow2'], dir)).code, 0);
  return withDaemon(tool, dir, [...qcow2Node('base'), ...qcow2Node('top', ',backing=base'), ...serve('top')], async (d) => {
    const out: unknown[] = [];
    const x = async (cmd: string, args?: Record<string, unknown>): Promise<void> => {
      const r = await d.q.execute(cmd, args, out.length);
      out.push(JSON.parse(JSON.stringify(r).replace(/#block\d+/g, '#block')));
    };
    await x('qmp_capabilities');
    for (const a of SYNC) await x('blockdev-snapshot-sync', a);
    for (const a of SYNC.slice(1, 4)) await x('transaction', { actions: [{ type: 'blockdev-snapshot-sync', data: a }] });
    await x('blockdev-snapshot-sync', { 'node-name': 'top', 'snapshot-file': 'ok.qcow2', 'snapshot-node-name': 'ok' });
    await x('query-block-exports');
    await quit(d);
    return out;
  });
}

test('blockdev-snapshot-sync refuses bad arguments with qemu-storage-daemon\'s texts', oracle(), async () => {
  const r = await onBoth(scratch(), session);
  assert.deepEqual(r.qchain, r.qemu);
  // The last snapshot was taken, and the export followed it.
  assert.deepEqual((r.qemu.at(-2) as { return: unknown }).return, {});
  assert.deepEqual((r.qemu[2] as { error: unknown }).error, { class: 'GenericError', desc: 'New overlay node-name missing' });
});
