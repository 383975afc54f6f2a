/**
 * Dirty bitmaps on protocol (file) nodes, side by side with qemu-storage-daemon 7.2, which allows
 * non-persistent bitmaps on any node: a bare file node exported over NBD (guest writes mark its
 * bitmaps; the bits as nbdinfo --map=qemu:dirty-bitmap:NAME reads them), persistent=true refused
 * with QSD's text, the other bitmap commands and a transaction on them, and the file child of a
 * qcow2 node, whose bitmap sees the qcow2 driver's host writes (data and metadata). QMP replies
 * and events, query-named-block-nodes included, must be QSD's byte for byte (timestamps aside).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { oracle, qemuImg, qemuIo, run, scratch } from './helpers/qemu.js';
import { MONITOR, guest, nbdUri, onBoth, quit, transcript, withDaemon, type Tool } from './helpers/live-qmp.js';

const NBD = ['--nbd-server', 'addr.type=unix,addr.path=nbd.sock'];

/** The bitmap's extents as nbdinfo reads them over export `name` (nbdinfo must be installed). */
async function dirtyMap(dir: string, name: string, bitmap: string): Promise<string> {
  const r = await run('nbdinfo', [`--map=qemu:dirty-bitmap:${bitmap}`, nbdUri(dir, name)]);
  assert.equal(r.code, 0, r.stderr);
  return r.stdout.trim().split('\n').map((l) => l.trim().split(/\s+/).join(' ')).join('; ');
}

/** The files' allocation (actual-size) is the file system's business, not the interface. */
function noAllocation(msgs: unknown[]): unknown[] {
  return JSON.parse(JSON.stringify(msgs).replace(/"actual-size":\d+/g, '"actual-size":"N"')) as unknown[];
}

const cmd = (execute: string, args: Record<string, unknown> = {}): [string, Record<string, unknown>] => [execute, args];

test('bitmaps on a bare file node exported over NBD are as qemu-storage-daemon has them', oracle(), async () => {
  const root = scratch();
  const session = async (tool: Tool, dir: string): Promise<unknown[]> => {
    fs.mkdirSync(dir, { recursive: true });
    assert.equal((await qemuImg(['create', '-q', '-f', 'raw', 'd.raw', '4M'], dir)).code, 0);
    assert.equal((await qemuIo(['-f', 'raw', '-c', 'write -q -P 0x11 0 64k', path.join(dir, 'd.raw')])).code, 0);
    const maps: unknown[] = [];
    const out = await withDaemon(tool, dir, ['--blockdev', 'driver=file,node-name=f0,filename=d.raw', ...NBD, ...MONITOR], async (d) => {
      let id = 0;
      await d.q.execute('qmp_capabilities', undefined, id);
      for (const [c, a] of [
        cmd('block-dirty-bitmap-add', { node: 'f0', name: 'b1' }),
        cmd('block-dirty-bitmap-add', { node: 'f0', name: 'bp', persistent: true }),
        cmd('block-dirty-bitmap-add', { node: 'f0', name: 'b1' }),
        cmd('block-dirty-bitmap-add', { node: 'f0', name: 'b2', granularity: 512, disabled: true }),
        cmd('block-dirty-bitmap-add', { node: 'f0', name: 'b3', granularity: 1000 }),
        cmd('block-dirty-bitmap-add', { node: 'f0', name: 'b4', granularity: 4096 }),
        cmd('block-export-add', { type: 'nbd', id: 'e0', 'node-name': 'f0', name: 'vda', writable: true, bitmaps: ['b1', 'b2', 'b4'] }),
      ]) await d.q.execute(c, a, ++id);
      await guest(dir, ['write -q -P 0x22 100k 4k', 'write -q -P 0x33 1M 130k', 'write -q -z 3M 8k', 'discard -q 2M 64k']);
      for (const b of ['b1', 'b2', 'b4']) maps.push(`${b}: ${await dirtyMap(dir, 'vda', b)}`);
      for (const [c, a] of [
        cmd('query-named-block-nodes', { flat: true }),
        cmd('query-named-block-nodes'),
        cmd('block-dirty-bitmap-remove', { node: 'f0', name: 'b1' }),
        cmd('block-dirty-bitmap-clear', { node: 'f0', name: 'b1' }),
        cmd('block-dirty-bitmap-merge', { node: 'f0', target: 'b1', bitmaps: ['b4'] }),
        cmd('block-export-del', { id: 'e0' }),
        cmd('transaction', { actions: [
          { type: 'block-dirty-bitmap-add', data: { node: 'f0', name: 'b5' } },
          { type: 'block-dirty-bitmap-merge', data: { node: 'f0', target: 'b5', bitmaps: ['b1', { node: 'f0', name: 'b4' }] } },
          { type: 'block-dirty-bitmap-enable', data: { node: 'f0', name: 'b2' } },
          { type: 'block-dirty-bitmap-clear', data: { node: 'f0', name: 'b1' } },
        ] }),
        // A failing transaction undoes the add and the clear.
        cmd('transaction', { actions: [
          { type: 'block-dirty-bitmap-add', data: { node: 'f0', name: 'b6' } },
          { type: 'block-dirty-bitmap-clear', data: { node: 'f0', name: 'b5' } },
          { type: 'block-dirty-bitmap-remove', data: { node: 'f0', name: 'nope' } },
        ] }),
        cmd('block-dirty-bitmap-disable', { node: 'f0', name: 'b4' }),
        cmd('block-dirty-bitmap-remove', { node: 'f0', name: 'b3' }),
        cmd('query-named-block-nodes', { flat: true }),
        cmd('block-export-add', { type: 'nbd', id: 'e1', 'node-name': 'f0', name: 'ro', writable: false, bitmaps: ['b5'] }),
        cmd('block-export-add', { type: 'nbd', id: 'e1', 'node-name': 'f0', name: 'ro', writable: false, bitmaps: ['b4'] }),
      ]) await d.q.execute(c, a, ++id);
      maps.push(`b4 ro: ${await dirtyMap(dir, 'ro', 'b4')}`);
      await quit(d, 'quit');
      return noAllocation(transcript(d.q));
    });
    return [...out, ...maps];
  };
  const r = await onBoth(root, session);
  // The guest writes reached the file node's bitmaps.
  assert.match(String(r.qemu.at(-1)), / dirty/);
  assert.deepEqual(r.qchain, r.qemu);
});

test('a bitmap on the file child of a qcow2 node sees the host writes as qemu-storage-daemon does', oracle(), async () => {
  const root = scratch();
  const session = async (tool: Tool, dir: string): Promise<unknown[]> => {
    fs.mkdirSync(dir, { recursive: true });
    assert.equal((await qemuImg(['create', '-q', '-f', 'qcow2', 'q.qcow2', '4M'], dir)).code, 0);
    const maps: unknown[] = [];
    const args = ['--blockdev', 'driver=file,node-name=qf,filename=q.qcow2', '--blockdev', 'driver=qcow2,node-name=q0,file=qf', ...NBD, ...MONITOR];
    const out = await withDaemon(tool, dir, args, async (d) => {
      let id = 0;
      await d.q.execute('qmp_capabilities', undefined, id);
      for (const [c, a] of [
        cmd('block-dirty-bitmap-add', { node: 'qf', name: 'h', persistent: true }),
        cmd('block-dirty-bitmap-add', { node: 'qf', name: 'h' }),
        cmd('block-dirty-bitmap-add', { node: 'q0', name: 'g' }),
        cmd('query-named-block-nodes', { flat: true }),
        cmd('block-export-add', { type: 'nbd', id: 'e0', 'node-name': 'q0', name: 'vda', writable: true, bitmaps: ['g'] }),
      ]) await d.q.execute(c, a, ++id);
      await guest(dir, ['write -q -P 0x22 1M 4k', 'write -q -P 0x33 3M 64k']);
      maps.push(`g: ${await dirtyMap(dir, 'vda', 'g')}`);
      for (const [c, a] of [
        cmd('query-named-block-nodes', { flat: true }),
        cmd('block-dirty-bitmap-disable', { node: 'qf', name: 'h' }),
        // The guest bitmap and the host one are of different sizes.
        cmd('block-dirty-bitmap-merge', { node: 'q0', target: 'g', bitmaps: [{ node: 'qf', name: 'h' }] }),
        // The qcow2 node gone, its file is exported by itself with the host bitmap.
        cmd('block-export-del', { id: 'e0' }),
        cmd('blockdev-del', { 'node-name': 'q0' }),
        cmd('block-export-add', { type: 'nbd', id: 'e1', 'node-name': 'qf', name: 'host', writable: false, bitmaps: ['h'] }),
        cmd('query-named-block-nodes', { flat: true }),
      ]) await d.q.execute(c, a, ++id);
      maps.push(`h: ${await dirtyMap(dir, 'host', 'h')}`);
      await quit(d, 'quit');
      return noAllocation(transcript(d.q));
    });
    return [...out, ...maps];
  };
  const r = await onBoth(root, session);
  // The host writes (data and metadata) marked the file child's bitmap.
  assert.match(String(r.qemu.at(-1)), /^h: .* dirty/);
  assert.deepEqual(r.qchain, r.qemu);
});
