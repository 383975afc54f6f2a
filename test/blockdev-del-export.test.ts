/**
 * blockdev-del of an exported node is refused with QEMU's bdrv_has_blk text ("Node a is in use"),
 * as qemu-storage-daemon 7.2 refuses it; once the export is gone the node goes. Same script
 * against QSD and qchain, replies compared.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { oracle, qemuImg, scratch } from './helpers/qemu.js';
import { MONITOR, norm, quit, withDaemon, onBoth, type Tool } from './helpers/live-qmp.js';

async function session(tool: Tool, dir: string): Promise<unknown[]> {
  fs.mkdirSync(dir, { recursive: true });
  await qemuImg(['create', '-q', '-f', 'qcow2', 'a.qcow2', '4M'], dir);
  const out: unknown[] = [];
  await withDaemon(tool, dir, ['--nbd-server', 'addr.type=unix,addr.path=nbd.sock', ...MONITOR], async (d) => {
    const x = async (cmd: string, args?: Record<string, unknown>): Promise<void> => { out.push(norm(await d.q.execute(cmd, args, out.length), false)); };
    await x('qmp_capabilities');
    await x('blockdev-add', { driver: 'qcow2', 'node-name': 'a', file: { driver: 'file', filename: 'a.qcow2' } });
    await x('block-export-add', { type: 'nbd', id: 'e', 'node-name': 'a' });
    await x('blockdev-del', { 'node-name': 'a' });
    await x('block-export-add', { type: 'nbd', id: 'e2', 'node-name': 'a', name: 'x', writable: true });
    await x('blockdev-del', { 'node-name': 'a' });
    await x('block-export-del', { id: 'e' });
    await x('block-export-del', { id: 'e2' });
    await x('blockdev-del', { 'node-name': 'a' });
    await quit(d, 'quit');
  });
  return out;
}

test('blockdev-del of an exported node: refused as qemu-storage-daemon refuses it', oracle(), async () => {
  const { qemu: want, qchain: got } = await onBoth(scratch(), session);
  assert.deepEqual(want[3], { id: 3, error: { class: 'GenericError', desc: 'Node a is in use' } });
  assert.deepEqual(got, want);
});
