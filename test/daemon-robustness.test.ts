/**
 * One `qchain daemon` under hostile load: 64 NBD clients of mixed I/O (a bounded number of
 * operations each, on disjoint regions so a model predicts every byte), NBD clients sending
 * malformed frames or vanishing mid-write, a client that never reads its replies, and QMP
 * clients sending garbage or flooding commands without reading. The daemon must stay up (fresh
 * clients work afterwards), keep its memory bounded, and leave an image that holds every
 * acknowledged write and passes qemu-img check.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { QCHAIN, oracle, qemuImg, qemuRawView, rng, scratch } from './helpers/qemu.js';
import { QmpClient, waitForSocket } from './helpers/qmp-client.js';
import { CMD, FLAG_FUA, RawNbd } from './helpers/nbd-raw.js';

const MiB = 1024 * 1024;
const CLIENTS = 64;
const REGION = MiB;
/** Past the clients' regions: where hostile clients write (contents not modelled). */
const SCRATCH = CLIENTS * REGION;
const SIZE = SCRATCH + 16 * MiB;
const OPS = 40;
const RSS_LIMIT = 300 * MiB;


function rss(pid: number): number {
  try {
    const m = /VmRSS:\s+(\d+) kB/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
    return m ? Number(m[1]) * 1024 : 0;
  } catch {
    return 0;
  }
}

/** Resolves when the server has closed the socket. */
function closed(s: net.Socket): Promise<void> {
  return new Promise((r) => {
    if (s.destroyed) return r();
    s.on('close', () => r());
    s.resume();
  });
}

class Model {
  readonly data = Buffer.alloc(SIZE);
  /** 1 where the byte is known (trimmed ranges and the scratch area are not). */
  readonly known = new Uint8Array(SIZE).fill(1, 0, SCRATCH);

  write(off: number, b: Buffer): void {
    b.copy(this.data, off);
    this.known.fill(1, off, off + b.length);
  }

  zero(off: number, len: number): void {
    this.data.fill(0, off, off + len);
    this.known.fill(1, off, off + len);
  }

  forget(off: number, len: number): void {
    this.known.fill(0, off, off + len);
  }

  /** The first offset in [off, off+len) where `b` differs from a known byte, or -1. */
  mismatch(off: number, b: Buffer): number {
    for (let i = 0; i < b.length; i++) if (this.known[off + i] && this.data[off + i] !== b[i]) return off + i;
    return -1;
  }
}

/** One well-behaved client: OPS requests, one at a time, inside its own region. */
async function mixedClient(sock: string, idx: number, model: Model): Promise<void> {
  const c = await RawNbd.open(sock, 'vda');
  const r = rng(1000 + idx);
  const base = idx * REGION;
  const range = (): [number, number] => {
    const len = 512 * (1 + Math.floor(r() * 128));
    const off = base + 512 * Math.floor(r() * ((REGION - len) / 512 + 1));
    return [off, len];
  };
  for (let i = 0; i < OPS; i++) {
    const k = r();
    const [off, len] = range();
    if (k < 0.4) {
      const b = Buffer.alloc(len, (idx * 7 + i) & 0xff);
      b.writeUInt32LE(idx * 1000 + i, 0);
      const rep = await c.request(CMD.WRITE, r() < 0.5 ? FLAG_FUA : 0, off, len, b);
      assert.equal(rep.error, 0, 'write');
      model.write(off, b);
    } else if (k < 0.65) {
      const rep = await c.request(CMD.READ, 0, off, len);
      assert.equal(rep.error, 0, 'read');
      assert.equal(model.mismatch(off, rep.data as Buffer), -1, `client ${idx}: read at ${off}+${len} differs from the model`);
    } else if (k < 0.75) {
      assert.equal((await c.request(CMD.TRIM, 0, off, len)).error, 0, 'trim');
      model.forget(off, len);
    } else if (k < 0.9) {
      assert.equal((await c.request(CMD.WRITE_ZEROES, r() < 0.5 ? FLAG_FUA : 0, off, len)).error, 0, 'write zeroes');
      model.zero(off, len);
    } else {
      assert.equal((await c.request(CMD.FLUSH, 0, 0, 0)).error, 0, 'flush');
    }
  }
  assert.equal((await c.request(CMD.FLUSH, 0, 0, 0)).error, 0, 'final flush');
  c.disconnect();
  await closed(c.socket);
}

/** Clients that break the protocol: each must only lose its own connection. */
async function hostileNbd(sock: string): Promise<void> {
  // Garbage instead of the client flags.
  const g = await RawNbd.connect(sock);
  g.socket.write(Buffer.alloc(4096, 0x41));
  await closed(g.socket);
  // Bad request magic.
  const a = await RawNbd.open(sock, 'vda');
  a.socket.write(RawNbd.header(CMD.READ, 0, 1n, 0, 512, 0xdeadbeef));
  await closed(a.socket);
  // A write announcing more than the maximum payload.
  const b = await RawNbd.open(sock, 'vda');
  b.socket.write(RawNbd.header(CMD.WRITE, 0, 1n, SCRATCH, 0xffffffff));
  await closed(b.socket);
  // An unknown command is refused with EINVAL; the connection goes on.
  const c = await RawNbd.open(sock, 'vda');
  assert.equal((await c.request(99, 0, 0, 512)).error, 22);
  assert.equal((await c.request(CMD.READ, 0, SCRATCH, 512)).error, 0);
  // Unknown flags too.
  assert.equal((await c.request(CMD.READ, 0x8000, SCRATCH, 512)).error, 22);
  c.disconnect();
  await closed(c.socket);
  // A truncated header, then the peer goes away.
  const d = await RawNbd.open(sock, 'vda');
  d.socket.end(RawNbd.header(CMD.READ, 0, 1n, 0, 512).subarray(0, 10));
  await closed(d.socket);
  // Half a write payload, then the socket is destroyed.
  const e = await RawNbd.open(sock, 'vda');
  e.socket.write(RawNbd.header(CMD.WRITE, 0, 1n, SCRATCH + MiB, MiB));
  await new Promise<void>((r) => e.socket.write(Buffer.alloc(MiB / 2, 0xee), () => r()));
  e.socket.destroy();
  // An option of absurd length during the handshake.
  const f = await RawNbd.connect(sock);
  await f.read(18);
  const h = Buffer.alloc(20);
  h.writeUInt32BE(3, 0);
  h.writeBigUInt64BE(0x49484156454f5054n, 4);
  h.writeUInt32BE(7, 12);
  h.writeUInt32BE(0xfffffff0, 16);
  f.socket.write(h);
  await closed(f.socket);
}

/**
 * A client that asks for many large reads and never reads the replies: the daemon must stop
 * taking its requests instead of buffering replies without bound.
 */
async function neverReads(sock: string): Promise<RawNbd> {
  const c = await RawNbd.open(sock, 'vda');
  c.socket.pause();
  for (let i = 0; i < 64; i++) {
    c.socket.write(RawNbd.header(CMD.READ, 0, BigInt(i + 1), SCRATCH - 32 * MiB + (i % 2) * 16 * MiB, 32 * MiB));
  }
  return c;
}

/** QMP garbage from a client that never negotiates properly, then one that floods without reading. */
async function hostileQmp(qmpSock: string): Promise<void> {
  const q = await QmpClient.connect(qmpSock);
  await q.waitFor((m) => 'QMP' in m);
  q.sendRaw('this is not json\r\n');
  q.sendRaw('{"execute": 5}\r\n[1, 2, 3]\r\n"string"\r\n42\r\n');
  q.sendRaw(`${'['.repeat(100000)}${']'.repeat(100000)}\r\n`);
  q.sendRaw(`{"execute": "${'a'.repeat(20 * MiB)}"}\r\n`);
  q.sendRaw(`${'z'.repeat(4 * MiB)}\r\n`);
  q.sendRaw('{"execute": "qmp_capabilities"}\r\n');
  await q.execute('qmp_capabilities', undefined, 'neg');
  const bad: Array<[string, Record<string, unknown> | undefined]> = [
    ['no-such-command', undefined],
    ['block-stream', { device: 5 }],
    ['block-stream', { device: 'nosuch' }],
    ['blockdev-add', { driver: 'qcow2', 'node-name': 'x', file: { driver: 'file', filename: 123 } }],
    ['blockdev-add', { driver: 'qcow2', 'node-name': 'x', file: { driver: 'file', filename: '/nonexistent/x.qcow2' } }],
    ['block-export-add', { type: 'nbd', id: 'e2', 'node-name': 'nosuch' }],
    ['nbd-server-start', { addr: 'nope' }],
    ['block-job-set-speed', { device: 'nosuch', speed: -1 }],
    ['blockdev-del', { 'node-name': 'disk' }],
    ['query-jobs', { unexpected: [1, 2] }],
  ];
  for (const [cmd, args] of bad) {
    const rep = await q.execute(cmd, args, `bad-${cmd}`);
    assert.ok('error' in rep || 'return' in rep, `${cmd}: ${JSON.stringify(rep)}`);
  }
  q.sendRaw('{"execute": "query-jobs", "arguments": [], "id": "arr"}\r\n');
  await q.waitFor((m) => m.id === 'arr');
  q.close();
  // A client that floods commands and never reads the replies.
  const flood = await new Promise<net.Socket>((res, rej) => {
    const s = net.createConnection(qmpSock, () => res(s));
    s.on('error', rej);
  });
  flood.pause();
  flood.write('{"execute": "qmp_capabilities"}\r\n');
  const line = '{"execute": "query-named-block-nodes", "id": "flood"}\r\n';
  const batch = line.repeat(2000);
  // The daemon stops reading a client that does not read: wait until it has taken the first
  // batch, then leave with the rest unsent.
  await new Promise<void>((r) => flood.write(batch, () => r()));
  for (let i = 0; i < 24; i++) flood.write(batch);
  flood.destroy();
}

test('daemon robustness: concurrent, malformed and vanishing clients', { skip: oracle().skip, timeout: 300000 }, async (t) => {
  const dir = scratch('qchain-robust-');
  const img = path.join(dir, 'disk.qcow2');
  assert.equal((await qemuImg(['create', '-q', '-f', 'qcow2', img, String(SIZE)])).code, 0);
  const args = [
    '--blockdev', `driver=file,node-name=disk-file,filename=${img},discard=unmap`,
    '--blockdev', 'driver=qcow2,node-name=disk,file=disk-file,discard=unmap',
    '--nbd-server', 'addr.type=unix,addr.path=nbd.sock',
    '--export', 'type=nbd,id=exp0,node-name=disk,name=vda,writable=on',
    '--chardev', 'socket,id=qmp0,path=qmp.sock,server=on,wait=off',
    '--monitor', 'chardev=qmp0',
  ];
  const child = spawn(process.execPath, [QCHAIN, 'daemon', ...args], { cwd: dir, stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr?.on('data', (d: Buffer) => { stderr += d.toString(); });
  let peak = 0;
  const sampler = setInterval(() => { peak = Math.max(peak, rss(child.pid as number)); }, 20);
  try {
    const nbdSock = path.join(dir, 'nbd.sock'), qmpSock = path.join(dir, 'qmp.sock');
    await waitForSocket(qmpSock, child);
    await waitForSocket(nbdSock, child);
    const model = new Model();
    const lazy = await neverReads(nbdSock);
    const results = await Promise.allSettled([
      ...Array.from({ length: CLIENTS }, (_, i) => mixedClient(nbdSock, i, model)),
      hostileNbd(nbdSock),
      hostileQmp(qmpSock),
    ]);
    const failed = results.filter((x): x is PromiseRejectedResult => x.status === 'rejected');
    assert.deepEqual(failed.map((f) => String(f.reason).slice(0, 300)), [], `peak RSS ${(peak / MiB).toFixed(0)} MiB; ${stderr.slice(0, 2000)}`);
    peak = Math.max(peak, rss(child.pid as number));
    lazy.socket.destroy();
    assert.equal(child.exitCode, null, `daemon exited: ${stderr}`);
    t.diagnostic(`daemon peak RSS ${(peak / MiB).toFixed(0)} MiB`);
    assert.ok(peak < RSS_LIMIT, `daemon RSS peaked at ${(peak / MiB).toFixed(0)} MiB`);

    // Fresh clients still work.
    const c = await RawNbd.open(nbdSock, 'vda');
    const rd = await c.request(CMD.READ, 0, 0, 4096);
    assert.equal(model.mismatch(0, rd.data as Buffer), -1);
    c.disconnect();
    const q = await QmpClient.connect(qmpSock);
    await q.waitFor((m) => 'QMP' in m, 60000);
    await q.execute('qmp_capabilities', undefined, 'cap');
    const ex = await q.execute('query-block-exports', undefined, 'exp');
    assert.deepEqual(ex.return, [{ 'node-name': 'disk', 'shutting-down': false, type: 'nbd', id: 'exp0' }]);
    await q.execute('quit', undefined, 'quit');
    const code = await new Promise<number | null>((r) => {
      if (child.exitCode !== null) r(child.exitCode);
      else child.on('exit', (c2) => r(c2));
    });
    assert.equal(code, 0, stderr);

    const chk = await qemuImg(['check', img]);
    assert.equal(chk.code, 0, chk.stdout + chk.stderr);
    const view = await qemuRawView(img, 'qcow2');
    const bad = model.mismatch(0, view.subarray(0, SIZE));
    assert.equal(bad, -1, `final image differs from the model at ${bad}`);
  } finally {
    clearInterval(sampler);
    if (child.exitCode === null) child.kill('SIGKILL');
  }
});
