/**
 * NBD server and export management against qemu-storage-daemon 7.2, side by side:
 * nbd-server-stop closes every NBD export (BLOCK_EXPORT_DELETED each, oldest first; the nodes
 * are free again), block-export-add's refusals (an export name or description over 4096 bytes,
 * an unknown iothread, an enabled bitmap on a read-only export before the bitmap's busy state),
 * and max-connections: with a limit of 1 a second client connects but gets no greeting until
 * the first one leaves.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { oracle, qemuImg, qemuIo, scratch } from './helpers/qemu.js';
import type { QmpMessage } from './helpers/qmp-client.js';
import { MONITOR, onBoth, qcow2Node, quit, withDaemon, type Tool } from './helpers/live-qmp.js';

const ARGS = [...qcow2Node('base'), ...qcow2Node('top', ',backing=base'),
  '--nbd-server', 'addr.type=unix,addr.path=nbd.sock',
  '--export', 'type=nbd,id=exp0,node-name=top,name=vda,writable=on,bitmaps.0=bm0',
  '--export', 'type=nbd,id=exp1,node-name=base,name=ro', ...MONITOR];

/** Whether a client on `sock` gets the 18-byte greeting within `ms`; the socket stays open. */
function greeted(sock: net.Socket, ms: number): Promise<boolean> {
  return new Promise((r) => {
    let got = 0;
    const t = setTimeout(() => { sock.off('data', on); r(false); }, ms);
    const on = (b: Buffer): void => {
      got += b.length;
      if (got >= 18) { clearTimeout(t); sock.off('data', on); r(true); }
    };
    sock.on('data', on);
  });
}

async function session(tool: Tool, dir: string): Promise<unknown[]> {
  fs.mkdirSync(dir, { recursive: true });
  const ok = async (p: Promise<{ code: number; stderr: string }>): Promise<void> => { const r = await p; assert.equal(r.code, 0, r.stderr); };
  await ok(qemuImg(['create', '-q', '-f', 'qcow2', 'base.qcow2', '16M'], dir));
  await ok(qemuIo(['-c', 'write -P 1 0 1M', 'base.qcow2'], dir));
  await ok(qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'top.qcow2'], dir));
  await ok(qemuImg(['bitmap', '--add', 'top.qcow2', 'bm0'], dir));
  return withDaemon(tool, dir, ARGS, async (d) => {
    const out: unknown[] = [];
    const x = async (cmd: string, args?: Record<string, unknown>): Promise<void> => {
      const r: QmpMessage = await d.q.execute(cmd, args, out.length);
      out.push([cmd, JSON.parse(JSON.stringify(r).replace(/#block\d+/g, '#block'))]);
    };
    await x('qmp_capabilities');
    await x('block-export-add', { type: 'nbd', id: 'e1', 'node-name': 'top', name: 'x'.repeat(4097) });
    await x('block-export-add', { type: 'nbd', id: 'e1', 'node-name': 'top', name: 'ok', description: 'd'.repeat(4097) });
    await x('block-export-add', { type: 'nbd', id: 'e1', 'node-name': 'top', name: 'x'.repeat(4096) });
    await x('block-export-add', { type: 'nbd', id: 'e2', 'node-name': 'top', name: 'e2', iothread: 'io0' });
    await x('block-export-add', { type: 'nbd', id: 'e3', 'node-name': 'top', name: 'e3', bitmaps: ['bm0'] });
    await x('block-export-add', { type: 'nbd', id: 'e4', 'node-name': 'top', name: 'e4', bitmaps: ['bm0'], writable: true });
    await x('block-export-add', { type: 'nbd', id: 'e5', 'node-name': 'base', name: 'e5', 'fixed-iothread': true });
    await x('query-block-exports');
    await x('blockdev-del', { 'node-name': 'top' });
    await x('nbd-server-stop');
    await x('nbd-server-stop');
    await x('query-block-exports');
    await x('block-dirty-bitmap-clear', { node: 'top', name: 'bm0' });
    await x('blockdev-del', { 'node-name': 'top' });
    await x('blockdev-del', { 'node-name': 'top-file' });
    out.push(d.q.received.filter((m) => m.event === 'BLOCK_EXPORT_DELETED').map((m) => m.data));
    // max-connections: 1.
    await x('nbd-server-start', { addr: { type: 'unix', data: { path: 'nbd2.sock' } }, 'max-connections': 1 });
    await x('block-export-add', { type: 'nbd', id: 'f1', 'node-name': 'base', name: 'f1' });
    const sock = path.join(dir, 'nbd2.sock');
    const a = net.createConnection(sock);
    out.push(['first greeted', await greeted(a, 2000)]);
    const b = net.createConnection(sock);
    out.push(['second greeted while the first stays', await greeted(b, 500)]);
    a.destroy();
    out.push(['second greeted once the first left', await greeted(b, 2000)]);
    b.destroy();
    await quit(d);
    return out;
  });
}

test('nbd-server-stop, block-export-add refusals and max-connections as qemu-storage-daemon\'s', oracle(), async () => {
  const r = await onBoth(scratch(), session);
  assert.deepEqual(r.qchain, r.qemu);
  assert.ok(JSON.stringify(r.qemu).includes('"second greeted once the first left",true'), JSON.stringify(r.qemu));
});
