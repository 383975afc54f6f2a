/**
 * The NBD server against real clients: `qchain daemon` and qemu-storage-daemon are started with
 * the same command line on copies of one chain, and nbdinfo, nbdcopy, qemu-img and qemu-io must
 * see the same export from both. Raw-socket tests cover the handshake answers QEMU gives and
 * that a misbehaving client is dropped alone.
 */
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { QCHAIN, oracle, qemuImg, qemuIo, qemuRawView, run, scratch } from './helpers/qemu.js';
import { waitForSocket } from './helpers/qmp-client.js';
import { QSD } from './helpers/live-qmp.js';

function qsdArgs(file: string, sock: string, extra = ''): string[] {
  return ['--blockdev', `driver=file,node-name=f0,filename=${file}`, '--blockdev', 'driver=qcow2,node-name=d0,file=f0',
    '--nbd-server', `addr.type=unix,addr.path=${sock}`,
    '--export', `type=nbd,id=e0,node-name=d0,name=vda,writable=on,allocation-depth=on${extra}`];
}

async function startDaemon(tool: 'qemu' | 'qchain', args: string[], sock: string): Promise<ChildProcess> {
  const child = tool === 'qemu' ? spawn(QSD, args, { stdio: ['ignore', 'ignore', 'pipe'] })
    : spawn(process.execPath, [QCHAIN, 'daemon', ...args], { stdio: ['ignore', 'ignore', 'pipe'] });
  await waitForSocket(sock, child);
  return child;
}

async function stop(child: ChildProcess): Promise<number | null> {
  if (child.exitCode !== null) return child.exitCode;
  const done = new Promise<number | null>((r) => child.once('exit', (c) => r(c)));
  child.kill('SIGTERM');
  return done;
}

function uri(sock: string, name = 'vda'): string {
  return `nbd+unix:///${name}?socket=${sock}`;
}

describe('NBD export vs qemu-storage-daemon', oracle(), () => {
  const dir = scratch('qchain-nbd-');
  const daemons: Record<string, { child: ChildProcess; sock: string; dir: string }> = {};

  before(async () => {
    // A 3-layer chain with data in each layer, zero clusters and unallocated space.
    const base = path.join(dir, 'src');
    fs.mkdirSync(base);
    await qemuImg(['create', '-q', '-f', 'qcow2', 'base.qcow2', '64M'], base);
    await qemuIo(['-c', 'write -P 0xaa 0 1M', '-c', 'write -P 0xab 10M 3M', 'base.qcow2'], base);
    await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'mid.qcow2'], base);
    await qemuIo(['-c', 'write -P 0xbb 1M 1M', '-c', 'write -z 11M 512k', 'mid.qcow2'], base);
    await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', 'top.qcow2'], base);
    await qemuIo(['-c', 'write -P 0xcc 2M 1M', '-c', 'write -P 0xcd 12345678 70000', 'top.qcow2'], base);
    for (const tool of ['qemu', 'qchain'] as const) {
      const d = path.join(dir, tool);
      fs.cpSync(base, d, { recursive: true });
      const sock = path.join(d, 'nbd.sock');
      daemons[tool] = { child: await startDaemon(tool, qsdArgs(path.join(d, 'top.qcow2'), sock), sock), sock, dir: d };
    }
  });

  after(async () => {
    for (const d of Object.values(daemons)) await stop(d.child);
  });

  test('the same command line starts both; the unix socket is private', () => {
    const mode = fs.statSync(daemons.qchain.sock).mode & 0o777;
    assert.equal(mode, 0o600);
  });

  test('nbdinfo sees the same export (flags, sizes, contexts)', async () => {
    const strip = (s: string): string => s.split('\n').filter((l) => !/content:|uri:/.test(l)).join('\n');
    const q = await run('nbdinfo', [uri(daemons.qemu.sock)]);
    const m = await run('nbdinfo', [uri(daemons.qchain.sock)]);
    assert.equal(q.code, 0, q.stderr);
    assert.equal(strip(m.stdout), strip(q.stdout));
  });

  for (const ctx of ['base:allocation', 'qemu:allocation-depth']) {
    test(`nbdinfo --map=${ctx} is the same`, async () => {
      const q = await run('nbdinfo', [`--map=${ctx}`, uri(daemons.qemu.sock)]);
      const m = await run('nbdinfo', [`--map=${ctx}`, uri(daemons.qchain.sock)]);
      assert.equal(q.code, 0, q.stderr);
      assert.equal(m.stdout, q.stdout);
    });
  }

  test('nbdinfo --list and qemu-img map over NBD agree', async () => {
    const q = await run('nbdinfo', ['--list', '--json', `nbd+unix://?socket=${daemons.qemu.sock}`]);
    const m = await run('nbdinfo', ['--list', '--json', `nbd+unix://?socket=${daemons.qchain.sock}`]);
    const shape = (s: string): unknown => {
      const j = JSON.parse(s) as { exports: Array<Record<string, unknown>> };
      return j.exports.map((e) => ({ ...e, uri: undefined, content: undefined }));
    };
    assert.deepEqual(shape(m.stdout), shape(q.stdout));
    const qm = await qemuImg(['map', '--output=json', '-f', 'raw', uri(daemons.qemu.sock)]);
    const mm = await qemuImg(['map', '--output=json', '-f', 'raw', uri(daemons.qchain.sock)]);
    assert.equal(mm.stdout, qm.stdout);
  });

  test('nbdcopy out of the export gives the guest view; nbdcopy into it writes', async () => {
    const d = daemons.qchain.dir;
    const out = path.join(d, 'copy.raw');
    const r = await run('nbdcopy', [uri(daemons.qchain.sock), out]);
    assert.equal(r.code, 0, r.stderr);
    const expect = await qemuRawView(path.join(dir, 'src', 'top.qcow2'));
    assert.ok(fs.readFileSync(out).equals(expect));
    // Write a patterned raw image into both exports, then compare the files behind them.
    const pat = path.join(dir, 'pattern.raw');
    const buf = Buffer.alloc(64 * 1024 * 1024);
    for (let i = 0; i < buf.length; i += 1024 * 1024) if ((i / 1048576) % 3 !== 0) buf.fill(i / 1048576, i, i + 1048576);
    fs.writeFileSync(pat, buf);
    for (const t of ['qemu', 'qchain']) {
      const w = await run('nbdcopy', [pat, uri(daemons[t].sock)]);
      assert.equal(w.code, 0, w.stderr);
    }
    const back = await run('nbdcopy', [uri(daemons.qchain.sock), path.join(d, 'back.raw')]);
    assert.equal(back.code, 0, back.stderr);
    assert.ok(fs.readFileSync(path.join(d, 'back.raw')).equals(buf));
  });

  test('qemu-io over NBD: writes, zero writes, discards, flushes and reads with many requests in flight', async () => {
    const cmds = ['aio_write -P 0x11 0 64k', 'aio_write -P 0x22 64k 64k', 'aio_write -P 0x33 1M 1M', 'aio_flush',
      'write -z 3M 1M', 'discard 5M 1M', 'write -P 0x44 -f 40M 4k', 'flush', 'read -P 0x11 0 64k', 'read -P 0x22 64k 64k',
      'read -P 0x33 1M 1M', 'read -P 0 3M 1M', 'read -P 0x44 40M 4k'];
    for (const t of ['qemu', 'qchain']) {
      const r = await qemuIo(['-f', 'raw', ...cmds.flatMap((c) => ['-c', c]), uri(daemons[t].sock)]);
      assert.equal(r.code, 0, `${t}: ${r.stderr}${r.stdout}`);
      assert.ok(!/verification failed/i.test(r.stdout), `${t}: ${r.stdout}`);
    }
  });

  test('requests past the end fail with EINVAL and the connection lives on', async () => {
    const out: string[] = [];
    for (const t of ['qemu', 'qchain']) {
      const r = await qemuIo(['-f', 'raw', '-c', 'read 64M 512', '-c', 'read -P 0x11 0 512', uri(daemons[t].sock)]);
      assert.match(r.stdout, /read 512\/512 bytes at offset 0/);
      out.push(`${r.code} ${r.stderr}`);
    }
    assert.equal(out[1], out[0]);
  });

  test('the images behind both daemons hold the same guest view and pass check', async () => {
    const ds = Object.values(daemons);
    for (const d of ds) assert.equal(await stop(d.child), 0);
    const q = await qemuRawView(path.join(daemons.qemu.dir, 'top.qcow2'));
    const m = await qemuRawView(path.join(daemons.qchain.dir, 'top.qcow2'));
    assert.ok(m.equals(q));
    const c = await qemuImg(['check', path.join(daemons.qchain.dir, 'top.qcow2')]);
    assert.equal(c.code, 0, c.stdout);
  });
});

/** Minimal raw client for handshake checks. */
class RawClient {
  private buf = Buffer.alloc(0);
  private waiters: Array<() => void> = [];
  closed = false;
  constructor(readonly sock: net.Socket) {
    sock.on('data', (b: Buffer) => { this.buf = Buffer.concat([this.buf, b]); this.waiters.splice(0).forEach((w) => w()); });
    sock.on('close', () => { this.closed = true; this.waiters.splice(0).forEach((w) => w()); });
  }
  static connect(p: string): Promise<RawClient> {
    return new Promise((res, rej) => { const s = net.createConnection(p, () => res(new RawClient(s))); s.on('error', rej); });
  }
  async read(n: number): Promise<Buffer> {
    while (this.buf.length < n) {
      if (this.closed) throw new Error('closed');
      await new Promise<void>((r) => this.waiters.push(r));
    }
    const out = this.buf.subarray(0, n);
    this.buf = this.buf.subarray(n);
    return out;
  }
  option(opt: number, data: Buffer = Buffer.alloc(0)): void {
    const h = Buffer.alloc(16);
    h.write('IHAVEOPT', 0, 'latin1');
    h.writeUInt32BE(opt, 8);
    h.writeUInt32BE(data.length, 12);
    this.sock.write(Buffer.concat([h, data]));
  }
  async reply(): Promise<{ opt: number; type: number; data: Buffer }> {
    const h = await this.read(20);
    const len = h.readUInt32BE(16);
    return { opt: h.readUInt32BE(8), type: h.readUInt32BE(12), data: await this.read(len) };
  }
}

describe('NBD handshake answers as QEMU 7.2', oracle(), () => {
  test('hello, unsupported options, unknown exports, and a rude client dropped alone', async () => {
    const dir = scratch('qchain-nbd-raw-');
    await qemuImg(['create', '-q', '-f', 'qcow2', path.join(dir, 'a.qcow2'), '1M']);
    const results: Record<string, string[]> = {};
    for (const tool of ['qemu', 'qchain'] as const) {
      const sock = path.join(dir, `${tool}.sock`);
      const d = await startDaemon(tool, qsdArgs(path.join(dir, 'a.qcow2'), sock).map((a) => a.replace(',writable=on', '')), sock);
      try {
        const c = await RawClient.connect(sock);
        const hello = await c.read(18);
        const lines = [hello.toString('hex')];
        c.sock.write(Buffer.from([0, 0, 0, 3]));
        for (const [opt, data] of [[11, Buffer.alloc(0)], [5, Buffer.alloc(0)], [3, Buffer.alloc(0)],
          [6, Buffer.from('000000066e6f737563680000', 'hex')], [8, Buffer.alloc(0)], [8, Buffer.alloc(0)], [4, Buffer.alloc(0)]] as Array<[number, Buffer]>) {
          c.option(opt, data);
          for (;;) {
            const r = await c.reply();
            lines.push(`${r.opt} ${r.type.toString(16)} ${r.data.toString('latin1')}`);
            if (r.type === 1 || r.type >= 0x80000000) break;
          }
        }
        // A second client sends garbage and is dropped; the first keeps working.
        const bad = await RawClient.connect(sock);
        await bad.read(18);
        bad.sock.write(Buffer.from('this is not an NBD client at all, nope'));
        for (let i = 0; i < 100 && !bad.closed; i++) await new Promise((r) => setTimeout(r, 20));
        lines.push(`rude client closed: ${bad.closed}`);
        c.option(3);
        const again = await c.reply();
        lines.push(`still serving: ${again.type}`);
        c.sock.destroy();
        results[tool] = lines;
      } finally {
        await stop(d);
      }
    }
    assert.deepEqual(results.qchain, results.qemu);
  });
});

describe('qchain daemon short form', oracle(), () => {
  test('--nbd SOCKET file: writable export named "", discards reach the image, SIGTERM closes cleanly', async () => {
    const dir = scratch('qchain-nbd-short-');
    const img = path.join(dir, 'disk.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'lazy_refcounts=on', img, '16M']);
    const sock = path.join(dir, 's.sock');
    const d = await startDaemon('qchain', ['--nbd', sock, img], sock);
    try {
      const r = await qemuIo(['-f', 'raw', '-c', 'write -P 7 0 4M', '-c', 'discard 1M 2M', '-c', 'read -P 0 1M 2M', '-c', 'read -P 7 3M 1M', uri(sock, '')]);
      assert.equal(r.code, 0, r.stdout + r.stderr);
      assert.doesNotMatch(r.stdout, /verification failed/);
    } finally {
      assert.equal(await stop(d), 0);
    }
    // Clean close: no dirty bit left, no leaks, discarded clusters freed.
    const c = await qemuImg(['check', img]);
    assert.equal(c.code, 0, c.stdout);
    const info = JSON.parse((await qemuImg(['info', '--output=json', img])).stdout) as { 'dirty-flag': boolean };
    assert.equal(info['dirty-flag'], false);
    const map = JSON.parse((await qemuImg(['map', '--output=json', img])).stdout) as Array<{ start: number; length: number; data: boolean }>;
    assert.deepEqual(map.filter((e) => e.data).map((e) => [e.start, e.length]), [[0, 1048576], [3145728, 1048576]]);
  });
});
