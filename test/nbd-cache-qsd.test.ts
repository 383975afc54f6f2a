/**
 * NBD_CMD_CACHE as qemu-storage-daemon 7.2 serves it: a copy-on-read prefetch into the exported
 * node. Caches over data, zero clusters and unallocated space of the backing, straddling, over
 * clusters the node holds already, larger than one 16 MiB bounce buffer, and on a read-only
 * export of a writable node without backing; afterwards the images' maps (qemu-img map), the
 * guest view, the exported dirty bitmap (copy-on-read sets no dirty bit) and qemu-img check
 * must be the same as QSD's.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { oracle, qemuImg, qemuIo, scratch } from './helpers/qemu.js';
import { Raw, bitmapChain, ctx, named } from './helpers/nbd-wire.js';
import { MONITOR, onBoth, qcow2Node, quit, withDaemon, type Tool } from './helpers/live-qmp.js';

const M = 1024 * 1024;

const ARGS = [...qcow2Node('base'), ...qcow2Node('top', ',backing=base'),
  '--nbd-server', 'addr.type=unix,addr.path=nbd.sock',
  '--export', 'type=nbd,id=exp0,node-name=top,name=vda,writable=on,bitmaps.0=bm0',
  '--export', 'type=nbd,id=exp1,node-name=base,name=ro', ...MONITOR];

const CACHES: Array<[string, number, number]> = [
  ['vda', 0, 4096], ['vda', 4 * M + 100, 10], ['vda', 32 * M, 65536], ['vda', M - 4096, 8192],
  ['vda', 2 * M, 4096], ['vda', 8 * M, 20 * M], ['ro', 40 * M, 65536], ['ro', 0, 4096],
];

async function session(tool: Tool, dir: string): Promise<unknown[]> {
  await bitmapChain(dir);
  const out: unknown[] = [];
  await withDaemon(tool, dir, ARGS, async (d) => {
    await d.q.execute('qmp_capabilities');
    const sock = path.join(dir, 'nbd.sock');
    for (const name of ['vda', 'ro']) {
      const c = await Raw.connect(sock);
      await c.hello();
      c.option(8);
      await c.replies();
      c.option(7, named(name));
      await c.replies();
      let h = 0;
      for (const [n, off, len] of CACHES) {
        if (n !== name) continue;
        c.request(5, off, len, 0, ++h);
        out.push(`${n} cache ${off} ${len}: ${(await c.reply()).join(' | ')}`);
      }
      c.sock.destroy();
    }
    // The bitmap over the whole disk: only the 64 KiB written before the daemon started is dirty.
    const c = await Raw.connect(sock);
    await c.hello();
    c.option(8);
    await c.replies();
    c.option(10, ctx('vda', ['qemu:dirty-bitmap:bm0']));
    await c.replies();
    c.option(7, named('vda'));
    await c.replies();
    c.request(7, 0, 64 * M);
    out.push(`bitmap: ${(await c.reply()).join(' | ')}`);
    c.sock.destroy();
    await quit(d);
  });
  for (const f of ['top', 'base']) {
    const map = await qemuImg(['map', '--output=json', '-f', 'qcow2', f + '.qcow2'], dir);
    // Host offsets are layout, not behaviour: where each run is, how deep, data or zero.
    out.push(f, (JSON.parse(map.stdout) as Array<Record<string, unknown>>).map((e) => [e.start, e.length, e.depth, e.data, e.zero]));
    const check = await qemuImg(['check', f + '.qcow2'], dir);
    assert.equal(check.code, 0, check.stdout);
  }
  const view = await qemuImg(['compare', '-f', 'qcow2', '-F', 'raw', 'top.qcow2', path.join(dir, '..', 'guest.raw')], dir);
  out.push(`guest view: ${view.code}`);
  return out;
}

test('NBD CACHE copies the backing data up as qemu-storage-daemon does', oracle(), async () => {
  const root = scratch();
  // The guest view the chain had to start with.
  assert.equal((await qemuImg(['create', '-q', '-f', 'raw', path.join(root, 'guest.raw'), '64M'])).code, 0);
  assert.equal((await qemuIo(['-f', 'raw', '-c', 'write -P 0xaa 0 1M', '-c', 'write -P 0xbb 2M 64k', path.join(root, 'guest.raw')])).code, 0);
  const r = await onBoth(root, session);
  assert.deepEqual(r.qchain, r.qemu);
  assert.ok(r.qemu.includes('guest view: 0'), JSON.stringify(r.qemu));
  // QSD did copy up: the top holds the first cluster now.
  assert.deepEqual((r.qemu[r.qemu.indexOf('top') + 1] as unknown[][])[0], [0, 65536, 0, true, false]);
});
