/**
 * The NBD wire, byte for byte against qemu-storage-daemon 7.2: the same raw-socket script runs
 * against both daemons (same command line, copies of one chain) and every answer must match.
 * Options: LIST_META_CONTEXT queries (all, "qemu:", "base:", "qemu:dirty-bitmap:", unknown
 * namespaces, unknown export), SET_META_CONTEXT before and after STRUCTURED_REPLY (ids), INFO
 * with block sizes and flags (0x0ded writable, read-only), short and long option data, overlong
 * names, unknown options, ABORT, EXPORT_NAME with and without NO_ZEROES. Commands: READ as
 * OFFSET_DATA/OFFSET_HOLE chunks (and DF), WRITE+FUA, FLUSH, WRITE_ZEROES with NO_HOLE and
 * FAST_ZERO, TRIM, CACHE, BLOCK_STATUS over three contexts (and REQ_ONE), and the refusals
 * (past EOF, oversized, zero length, unknown command or flag, read-only export, block status not
 * negotiated), a bad request magic and an oversized write (an EINVAL reply, then the client is
 * dropped).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { oracle, scratch } from './helpers/qemu.js';
import { Raw, bitmapChain, ctx, named, u16, u32 } from './helpers/nbd-wire.js';
import { MONITOR, onBoth, qcow2Node, quit, withDaemon, type Tool } from './helpers/live-qmp.js';

const M = 1024 * 1024;


const ARGS = [...qcow2Node('base'), ...qcow2Node('top', ',backing=base'),
  '--nbd-server', 'addr.type=unix,addr.path=nbd.sock',
  '--export', 'type=nbd,id=exp0,node-name=top,name=vda,writable=on,allocation-depth=on,bitmaps.0=bm0',
  '--export', 'type=nbd,id=exp1,node-name=base,name=ro', ...MONITOR];

async function script(sock: string): Promise<string[]> {
  const log: string[] = [];
  // Options.
  let c = await Raw.connect(sock);
  log.push(await c.hello());
  const options: Array<[number, Buffer]> = [
    [9, ctx('vda', [])], [9, ctx('vda', ['qemu:'])], [9, ctx('vda', ['base:'])], [9, ctx('vda', ['qemu:dirty-bitmap:'])],
    [9, ctx('vda', ['nope:x', 'base:allocation', 'x'.repeat(5000)])], [9, ctx('nosuch', [])],
    [10, ctx('vda', ['base:allocation'])], [8, Buffer.alloc(0)], [8, Buffer.alloc(0)],
    [10, ctx('vda', ['base:allocation', 'qemu:allocation-depth', 'qemu:dirty-bitmap:bm0', 'qemu:dirty-bitmap:zz'])],
    [6, named('vda', u16(3, 0, 1, 2))], [6, named('ro')], [6, named('nosuch')], [7, Buffer.alloc(3)], [6, Buffer.alloc(2)],
    [9, Buffer.concat([named('vda', Buffer.alloc(0)), u32(1)])], [3, Buffer.from('x')], [8, Buffer.from('x')],
    [6, Buffer.concat([named('vda'), Buffer.from('q')])], [6, named('v'.repeat(5000))], [9, Buffer.concat([named('v'.repeat(5000), Buffer.alloc(0)), u32(0)])],
    [6, Buffer.concat([u32(6), Buffer.from('vd')])], [1234, Buffer.alloc(0)], [11, Buffer.alloc(0)], [5, Buffer.alloc(0)], [3, Buffer.alloc(0)], [2, Buffer.alloc(0)],
  ];
  for (const [opt, data] of options) {
    c.option(opt, data);
    log.push(...await c.replies());
  }
  log.push(`after abort: ${await c.rest()}`);
  // EXPORT_NAME, with and without NO_ZEROES, and of an export that is not there.
  for (const [flags, name] of [[3, 'vda'], [1, 'vda'], [3, 'nosuch']] as Array<[number, string]>) {
    c = await Raw.connect(sock);
    await c.hello(flags);
    c.option(1, Buffer.from(name));
    if (name === 'nosuch') log.push(`export name ${name}: ${await c.rest()}`);
    else {
      log.push(`export name ${name}: ${(await c.read(flags & 2 ? 10 : 134)).toString('hex')}`);
      c.request(0, 0, 16);
      log.push(...await c.reply());
      c.sock.destroy();
    }
  }
  // Transmission with structured replies and three contexts.
  c = await Raw.connect(sock);
  await c.hello();
  c.option(8);
  await c.replies();
  c.option(10, ctx('vda', ['base:allocation', 'qemu:allocation-depth', 'qemu:dirty-bitmap:bm0']));
  log.push(...await c.replies());
  c.option(7, named('vda', u16(1, 3)));
  log.push(...await c.replies());
  let handle = 0;
  const r = async (type: number, offset: number, length: number, flags = 0, payload?: Buffer): Promise<void> => {
    c.request(type, offset, length, flags, ++handle, payload);
    log.push(`${type} ${offset} ${length} ${flags}: ${(await c.reply()).join(' | ')}`);
  };
  await r(7, 0, 16 * M);
  await r(7, 0, 16 * M, 8);
  await r(0, 0, 4096);
  await r(0, 8 * M, 65536);
  await r(0, M - 4096, 8192);
  await r(0, M - 4096, 8192, 4);
  await r(1, 6 * M, 65536, 1, Buffer.alloc(65536, 0x11));
  await r(3, 0, 0);
  await r(3, 0, 0, 1);
  await r(6, 7 * M, 65536);
  await r(6, 7 * M + 65536, 65536, 2);
  await r(6, 9 * M, 65536, 0x10);
  await r(6, 9 * M + 65536, 65536, 0x12);
  await r(4, 10 * M, 65536);
  await r(5, 32 * M, 65536);
  await r(7, 6 * M, 4 * M);
  await r(0, 6 * M, 4096);
  await r(0, 64 * M, 1);
  await r(1, 64 * M - 1, 2, 0, Buffer.from('ab'));
  await r(6, 64 * M - 1, 2);
  await r(0, 0, 33 * M);
  await r(5, 0, 33 * M);
  await r(0, 0, 0);
  await r(7, 0, 0);
  await r(99, 0, 0);
  await r(0, 0, 4096, 0x80);
  await r(1, 0, 4096, 2, Buffer.alloc(4096));
  await r(4, 0, 4096, 0x10);
  await r(7, 0, 4096, 4);
  c.request(2, 0, 0);
  log.push(`after disc: ${await c.rest()}`);
  // A read-only export, with structured replies but no context.
  c = await Raw.connect(sock);
  await c.hello();
  c.option(8);
  await c.replies();
  c.option(7, named('ro'));
  log.push(...await c.replies());
  for (const [type, len] of [[1, 512], [6, 512], [4, 512], [3, 0], [7, 512], [5, 512]]) {
    c.request(type, 0, len, 0, type, type === 1 ? Buffer.alloc(len) : undefined);
    log.push(`ro ${type}: ${(await c.reply()).join(' | ')}`);
  }
  c.sock.destroy();
  // A bad request magic, then an oversized write: an EINVAL reply each, then the client is dropped.
  for (const structured of [false, true]) {
    for (const bad of ['magic', 'write']) {
      c = await Raw.connect(sock);
      await c.hello();
      if (structured) {
        c.option(8);
        await c.replies();
      }
      c.option(7, named('vda'));
      await c.replies();
      if (bad === 'magic') c.sock.write(Buffer.concat([u32(0xdeadbeef), Buffer.alloc(4), Buffer.from('handle!!'), Buffer.alloc(12)]));
      else c.request(1, 0, 64 * M, 0, 7);
      log.push(`bad ${bad} (structured ${structured}): ${(await c.reply()).join(' | ')} then ${await c.rest()}`);
    }
  }
  return log;
}

async function session(tool: Tool, dir: string): Promise<string[]> {
  await bitmapChain(dir);
  return withDaemon(tool, dir, ARGS, async (d) => {
    await d.q.execute('qmp_capabilities');
    const log = await script(path.join(dir, 'nbd.sock'));
    await quit(d);
    return log;
  });
}

test('the NBD wire answers as qemu-storage-daemon\'s, byte for byte', oracle(), async () => {
  const r = await onBoth(scratch(), session);
  assert.deepEqual(r.qchain, r.qemu);
  // The script did reach its end on QSD (the read-only export's and the dropped clients' answers).
  assert.ok(r.qemu.some((l) => l.startsWith('ro 1: ') && l.includes('Export is read-only')), r.qemu.join('\n'));
  assert.ok(r.qemu.some((l) => l.startsWith('bad write (structured true)')), r.qemu.join('\n'));
});
