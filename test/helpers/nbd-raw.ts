/**
 * A minimal raw NBD client for tests: fixed-newstyle handshake (NO_ZEROES, OPT_GO, simple
 * replies), then requests with handles matched to replies. It also exposes the socket, so
 * tests can send malformed frames on purpose.
 */
import net from 'node:net';

const NBDMAGIC = 0x4e42444d41474943n;
const IHAVEOPT = 0x49484156454f5054n;
const REQUEST_MAGIC = 0x25609513;
const SIMPLE_REPLY_MAGIC = 0x67446698;
export const CMD = { READ: 0, WRITE: 1, DISC: 2, FLUSH: 3, TRIM: 4, WRITE_ZEROES: 6 } as const;
export const FLAG_FUA = 1;

export interface Reply {
  error: number;
  data?: Buffer;
}

export class RawNbd {
  private buf: Buffer = Buffer.alloc(0);
  private want: { n: number; resolve: (b: Buffer) => void; reject: (e: Error) => void } | null = null;
  private closed = false;
  private nextHandle = 1n;
  /** Read lengths of outstanding read requests, by handle. */
  private readonly pending = new Map<bigint, { len: number; resolve: (r: Reply) => void; reject: (e: Error) => void }>();
  size = 0;

  private constructor(readonly socket: net.Socket) {
    socket.on('data', (d: Buffer) => {
      this.buf = this.buf.length ? Buffer.concat([this.buf, d]) : d;
      this.pump();
    });
    const end = (): void => {
      this.closed = true;
      this.pump();
      for (const p of this.pending.values()) p.reject(new Error('connection closed'));
      this.pending.clear();
    };
    socket.on('close', end);
    socket.on('error', end);
  }

  static connect(path: string): Promise<RawNbd> {
    return new Promise((resolve, reject) => {
      const s = net.createConnection(path, () => resolve(new RawNbd(s)));
      s.once('error', reject);
    });
  }

  /** Connect and negotiate `name` with OPT_GO. */
  static async open(path: string, name: string): Promise<RawNbd> {
    const c = await RawNbd.connect(path);
    await c.handshake(name);
    return c;
  }

  private pump(): void {
    const w = this.want;
    if (!w) return;
    if (this.buf.length >= w.n) {
      this.want = null;
      const out = this.buf.subarray(0, w.n);
      this.buf = this.buf.subarray(w.n);
      w.resolve(out);
    } else if (this.closed) {
      this.want = null;
      w.reject(new Error('connection closed'));
    }
  }

  read(n: number): Promise<Buffer> {
    return new Promise((resolve, reject) => {
      this.want = { n, resolve, reject };
      this.pump();
    });
  }

  async handshake(name: string): Promise<void> {
    const hello = await this.read(18);
    if (hello.readBigUInt64BE(0) !== NBDMAGIC || hello.readBigUInt64BE(8) !== IHAVEOPT) throw new Error('bad server greeting');
    const cf = Buffer.alloc(4);
    cf.writeUInt32BE(3, 0); // FIXED_NEWSTYLE | NO_ZEROES
    this.socket.write(cf);
    const nm = Buffer.from(name);
    const data = Buffer.alloc(4 + nm.length + 2);
    data.writeUInt32BE(nm.length, 0);
    nm.copy(data, 4);
    const h = Buffer.alloc(16);
    h.writeBigUInt64BE(IHAVEOPT, 0);
    h.writeUInt32BE(7, 8); // OPT_GO
    h.writeUInt32BE(data.length, 12);
    this.socket.write(Buffer.concat([h, data]));
    for (;;) {
      const r = await this.read(20);
      const type = r.readUInt32BE(12), len = r.readUInt32BE(16);
      const body = await this.read(len);
      if (type === 1) break; // ACK
      if (type & 0x80000000) throw new Error(`option error ${type}: ${body.toString()}`);
      if (type === 3 && body.readUInt16BE(0) === 0) this.size = Number(body.readBigUInt64BE(2));
    }
    void this.replies();
  }

  private async replies(): Promise<void> {
    try {
      for (;;) {
        const h = await this.read(16);
        if (h.readUInt32BE(0) !== SIMPLE_REPLY_MAGIC) throw new Error('bad reply magic');
        const error = h.readUInt32BE(4), handle = h.readBigUInt64BE(8);
        const p = this.pending.get(handle);
        if (!p) throw new Error(`reply for unknown handle ${handle}`);
        this.pending.delete(handle);
        p.resolve(error === 0 && p.len > 0 ? { error, data: Buffer.from(await this.read(p.len)) } : { error });
      }
    } catch {
      this.socket.destroy();
    }
  }

  /** The 28-byte request header. */
  static header(type: number, flags: number, handle: bigint, offset: number, length: number, magic = REQUEST_MAGIC): Buffer {
    const h = Buffer.alloc(28);
    h.writeUInt32BE(magic >>> 0, 0);
    h.writeUInt16BE(flags, 4);
    h.writeUInt16BE(type, 6);
    h.writeBigUInt64BE(handle, 8);
    h.writeBigUInt64BE(BigInt(offset), 16);
    h.writeUInt32BE(length >>> 0, 24);
    return h;
  }

  /** Send one request; resolves with its reply. */
  request(type: number, flags: number, offset: number, length: number, payload?: Buffer): Promise<Reply> {
    const handle = this.nextHandle++;
    const p = new Promise<Reply>((resolve, reject) => {
      this.pending.set(handle, { len: type === CMD.READ ? length : 0, resolve, reject });
    });
    this.socket.write(payload ? Buffer.concat([RawNbd.header(type, flags, handle, offset, length), payload]) : RawNbd.header(type, flags, handle, offset, length));
    return p;
  }

  disconnect(): void {
    this.socket.end(RawNbd.header(CMD.DISC, 0, 0n, 0, 0));
  }
}
