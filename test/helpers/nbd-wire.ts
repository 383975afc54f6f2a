/** A raw NBD client for wire-level tests: option haggling and requests byte by byte, answers as comparable strings. */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import { qemuImg, qemuIo } from './qemu.js';

export class Raw {
  private buf = Buffer.alloc(0);
  private waiters: Array<() => void> = [];
  closed = false;
  private constructor(readonly sock: net.Socket) {
    sock.on('data', (b: Buffer) => { this.buf = Buffer.concat([this.buf, b]); this.waiters.splice(0).forEach((w) => w()); });
    sock.on('close', () => { this.closed = true; this.waiters.splice(0).forEach((w) => w()); });
    sock.on('error', () => {});
  }
  static connect(p: string): Promise<Raw> {
    return new Promise((res, rej) => { const s = net.createConnection(p, () => res(new Raw(s))); s.on('error', rej); });
  }
  async read(n: number): Promise<Buffer> {
    while (this.buf.length < n) {
      if (this.closed) throw new Error(`closed after ${this.buf.length} of ${n} bytes`);
      await new Promise<void>((r) => this.waiters.push(r));
    }
    const out = this.buf.subarray(0, n);
    this.buf = this.buf.subarray(n);
    return out;
  }
  /** What arrives until the server closes the connection. */
  async rest(): Promise<string> {
    while (!this.closed) await new Promise<void>((r) => this.waiters.push(r));
    return this.buf.toString('hex');
  }
  async hello(flags = 3): Promise<string> {
    const h = await this.read(18);
    this.sock.write(u32(flags));
    return h.toString('hex');
  }
  option(opt: number, data: Buffer = Buffer.alloc(0)): void {
    const h = Buffer.alloc(16);
    h.write('IHAVEOPT', 0, 'latin1');
    h.writeUInt32BE(opt, 8);
    h.writeUInt32BE(data.length, 12);
    this.sock.write(Buffer.concat([h, data]));
  }
  /** One option's replies up to its ACK or error, as "type data" strings. */
  async replies(): Promise<string[]> {
    const out: string[] = [];
    for (;;) {
      const h = await this.read(20);
      const type = h.readUInt32BE(12);
      const data = await this.read(h.readUInt32BE(16));
      out.push(`${h.readUInt32BE(8)} ${type.toString(16)} ${type >= 0x80000000 ? data.toString('latin1') : data.toString('hex')}`);
      if (type === 1 || type >= 0x80000000) return out;
    }
  }
  request(type: number, offset: number, length: number, flags = 0, handle = 1, payload?: Buffer): void {
    const h = Buffer.alloc(28);
    h.writeUInt32BE(0x25609513, 0);
    h.writeUInt16BE(flags, 4);
    h.writeUInt16BE(type, 6);
    h.writeBigUInt64BE(BigInt(handle), 8);
    h.writeBigUInt64BE(BigInt(offset), 16);
    h.writeUInt32BE(length, 24);
    this.sock.write(payload ? Buffer.concat([h, payload]) : h);
  }
  /** One reply (simple, or structured chunks up to DONE), data payloads summarised. */
  async reply(): Promise<string[]> {
    const out: string[] = [];
    for (;;) {
      const magic = (await this.read(4)).readUInt32BE(0);
      if (magic === 0x67446698) {
        const r = await this.read(12);
        out.push(`simple err=${r.readUInt32BE(0)} handle=${r.readBigUInt64BE(4)}`);
        return out;
      }
      assert.equal(magic, 0x668e33ef);
      const h = await this.read(16);
      const flags = h.readUInt16BE(0), type = h.readUInt16BE(2), len = h.readUInt32BE(12);
      const d = await this.read(len);
      const what = type === 1 ? `offset=${d.readBigUInt64BE(0)} data=${len - 8} first=${d[8]}` : type >= 0x8000 ? `err=${d.readUInt32BE(0)} ${d.subarray(6).toString('latin1')}` : d.toString('hex');
      out.push(`flags=${flags} type=${type} handle=${h.readBigUInt64BE(4)} ${what}`);
      if (flags & 1) return out;
    }
  }
}

export function u32(v: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(v, 0);
  return b;
}
export function u16(...v: number[]): Buffer {
  const b = Buffer.alloc(2 * v.length);
  v.forEach((x, i) => b.writeUInt16BE(x, 2 * i));
  return b;
}
/** An export name then a query list (LIST/SET_META_CONTEXT's data). */
export function ctx(name: string, queries: string[]): Buffer {
  return Buffer.concat([u32(name.length), Buffer.from(name), u32(queries.length), ...queries.flatMap((q) => [u32(q.length), Buffer.from(q)])]);
}
export const named = (name: string, rest: Buffer = u16(0)): Buffer => Buffer.concat([u32(name.length), Buffer.from(name), rest]);

/**
 * base.qcow2 (64 MiB: data at 0, zeroes at 4 MiB) <- top.qcow2 (persistent bitmap bm0, data at
 * 2 MiB) in `dir`, the images the wire-level side-by-side tests export.
 */
export async function bitmapChain(dir: string): Promise<void> {
  fs.mkdirSync(dir, { recursive: true });
  const ok = async (p: Promise<{ code: number; stderr: string }>): Promise<void> => { const r = await p; assert.equal(r.code, 0, r.stderr); };
  await ok(qemuImg(['create', '-q', '-f', 'qcow2', 'base.qcow2', '64M'], dir));
  await ok(qemuIo(['-c', 'write -P 0xaa 0 1M', '-c', 'write -z 4M 1M', 'base.qcow2'], dir));
  await ok(qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'top.qcow2'], dir));
  await ok(qemuImg(['bitmap', '--add', 'top.qcow2', 'bm0'], dir));
  await ok(qemuIo(['-c', 'write -P 0xbb 2M 64k', 'top.qcow2'], dir));
}
