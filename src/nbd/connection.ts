/**
 * One NBD client: fixed-newstyle option haggling, then transmission with many requests in
 * flight and replies sent as each completes (out of order). Replies are written whole, with no
 * await between their parts, so they never interleave. A malformed request or oversized
 * payload ends this client's connection only.
 */
import type { Socket } from 'node:net';
import * as P from './protocol.js';
import { ClosedError, SocketReader } from './reader.js';
import type { NbdExport } from './export.js';
import { handshake, type Negotiated } from './handshake.js';
import { ReplyQueue } from './reply-queue.js';
import type { ChainExtent } from '../chain/chain.js';

/** Requests executing at once per connection; header reading pauses beyond this. */
const MAX_IN_FLIGHT = 64;
/** Payload bytes (write data, read replies) of the requests executing at once, at most (one request is always admitted). */
const MAX_BYTES_IN_FLIGHT = 32 * 1024 * 1024;
/** Reply bytes the client has not taken yet beyond which no new request is read. */
const MAX_UNSENT = 16 * 1024 * 1024;
/** Extents per block-status chunk at most (a reply may cover less than asked). */
const MAX_EXTENTS = 65536;

/** Flags a read may carry and still take the fast path (they change nothing for one data run). */
const READ_FAST_FLAGS = P.CMD_FLAG_FUA | P.CMD_FLAG_DF;

export interface ConnectionLog {
  (line: string): void;
}

export class NbdConnection {
  private readonly reader: SocketReader;
  private inFlight = 0;
  private bytesInFlight = 0;
  private slotWaiter: (() => void) | null = null;
  private idle: (() => void) | null = null;
  /** Replies leave together at the end of the current event-loop turn. */
  private readonly replies: ReplyQueue;

  constructor(private readonly socket: Socket, private readonly exports: (name: string) => NbdExport | undefined,
    private readonly listExports: () => NbdExport[], private readonly log: ConnectionLog = () => {}) {
    this.reader = new SocketReader(socket);
    this.replies = new ReplyQueue(socket);
    socket.setNoDelay(true);
    socket.on('error', () => {});
  }

  async run(): Promise<void> {
    try {
      const n = await handshake(this.reader, this.socket, this.exports, this.listExports);
      if (n) await this.transmission(n);
    } catch (e) {
      if (!(e instanceof ClosedError)) this.log(`NBD client dropped: ${e instanceof Error ? e.message : String(e)}`);
    } finally {
      await this.drained();
      this.replies.flush();
      this.socket.destroySoon?.();
      this.socket.end();
    }
  }

  private drained(): Promise<void> {
    if (this.inFlight === 0) return Promise.resolve();
    return new Promise((r) => { this.idle = r; });
  }

  private async transmission(n: Negotiated): Promise<void> {
    for (;;) {
      if (this.inFlight >= MAX_IN_FLIGHT) await this.slot();
      // A client that does not read its replies is not read from either: memory stays bounded.
      while (this.replies.unsent > MAX_UNSENT && !this.socket.destroyed) await this.sent();
      // Requests already buffered are parsed without a promise each.
      const h = this.reader.tryRead(28) ?? await this.reader.read(28);
      const flags = h.readUInt16BE(4), type = h.readUInt16BE(6);
      const handle = h.subarray(8, 16);
      const offset = h.readUInt32BE(16) * 0x100000000 + h.readUInt32BE(20);
      const length = h.readUInt32BE(24);
      // As QEMU: an EINVAL reply to the request's handle, then the client is dropped (the stream
      // cannot be followed past a bad header, nor past a payload larger than the limit).
      const magic = h.readUInt32BE(0);
      if (magic !== P.REQUEST_MAGIC) {
        this.error(n, { handle }, P.EINVAL, `invalid magic (got 0x${magic.toString(16)})`);
        throw new Error('bad request magic');
      }
      if (type === P.CMD_WRITE && length > P.MAX_BUFFER) {
        this.error(n, { handle }, P.EINVAL, tooLong(length));
        throw new Error(`write of ${length} bytes exceeds the maximum`);
      }
      const cost = (type === P.CMD_WRITE || type === P.CMD_READ) && length <= P.MAX_BUFFER ? length : 0;
      while (this.inFlight > 0 && this.bytesInFlight + cost > MAX_BYTES_IN_FLIGHT) await this.slot();
      const payload = type === P.CMD_WRITE ? this.reader.tryRead(length) ?? await this.reader.read(length) : null;
      if (type === P.CMD_DISC) return;
      // The common read (one data run, mapping cached, page-cache hit) is answered right here.
      if (type === P.CMD_READ && this.fastRead(n, flags, handle, offset, length)) continue;
      this.inFlight++;
      this.bytesInFlight += cost;
      void this.execute(n, { flags, type, handle, offset, length, payload }).finally(() => {
        this.inFlight--;
        this.bytesInFlight -= cost;
        const w = this.slotWaiter;
        this.slotWaiter = null;
        w?.();
        if (this.inFlight === 0) this.idle?.();
      });
    }
  }

  /** Until a request in flight completes. */
  private slot(): Promise<void> {
    return new Promise<void>((r) => { this.slotWaiter = r; });
  }

  /** Until the client has taken the replies written so far (or is gone); queued ones are written first. */
  private sent(): Promise<void> {
    if (this.socket.destroyed) return Promise.resolve();
    // Below the limit the backlog is in the queue, which the turn's end writes out.
    if (this.socket.writableLength <= MAX_UNSENT) return new Promise<void>((r) => setImmediate(r));
    return new Promise<void>((r) => {
      const done = (): void => {
        this.socket.off('drain', done);
        this.socket.off('close', done);
        r();
      };
      this.socket.on('drain', done);
      this.socket.on('close', done);
    });
  }

  /**
   * A read served synchronously, with no promise: true when the reply was sent, false when
   * nothing was done and the request must take the normal path (which handles every error).
   */
  private fastRead(n: Negotiated, flags: number, handle: Buffer, offset: number, length: number): boolean {
    const exp = n.export;
    if (!exp.tryEnter && exp.enter) return false;
    const leave = exp.tryEnter?.() ?? null;
    if (exp.tryEnter && !leave) return false;
    try {
      if (flags & ~(n.structured ? READ_FAST_FLAGS : P.CMD_FLAG_FUA) || length === 0 || length > P.MAX_BUFFER || !Number.isSafeInteger(offset)) return false;
      const chain = exp.chain();
      if (offset + length > chain.size) return false;
      // Header and data go straight into the turn's reply slab when they fit.
      const hl = n.structured ? 28 : 16;
      const slot = this.replies.reserve(hl + length);
      const buf = slot ? slot.subarray(hl) : Buffer.allocUnsafe(length);
      let ok = false;
      try {
        ok = chain.tryReadSync(buf, offset) !== null;
      } finally {
        if (!ok && slot) this.replies.unreserve(hl + length);
      }
      if (!ok) return false;
      const h = slot ? slot.subarray(0, hl) : Buffer.allocUnsafe(hl);
      if (n.structured) dataHeader(h, P.REPLY_FLAG_DONE, handle, offset, length);
      else simpleHeader(h, handle, 0);
      if (!slot) this.replies.push2(h, buf);
      return true;
    } catch {
      return false;
    } finally {
      leave?.();
    }
  }

  private async execute(n: Negotiated, r: Request): Promise<void> {
    // Requests run inside the export's "entered" section, so the daemon can drain them (pivot).
    let leave: (() => void) | null = null;
    try {
      const exp = n.export;
      leave = exp.tryEnter?.() ?? (exp.enter ? await exp.enter() : null);
      await this.executeEntered(n, r);
    } catch (e) {
      // Nothing a request meets (an export or node gone under it) may take the daemon down.
      this.error(n, r, P.EIO, e instanceof Error ? e.message : String(e));
    } finally {
      leave?.();
    }
  }

  private async executeEntered(n: Negotiated, r: Request): Promise<void> {
    const exp = n.export;
    try {
      const chain = exp.chain();
      const size = chain.size;
      // QEMU 7.2's checks (nbd_co_receive_request), in its order and with its texts; every
      // refusal is EINVAL (nbd_trip answers them all so).
      if ((r.type === P.CMD_READ || r.type === P.CMD_CACHE) && r.length > P.MAX_BUFFER) return this.error(n, r, P.EINVAL, tooLong(r.length));
      const writes = r.type === P.CMD_WRITE || r.type === P.CMD_TRIM || r.type === P.CMD_WRITE_ZEROES;
      if (writes && !exp.writable) return this.error(n, r, P.EINVAL, 'Export is read-only');
      if (!Number.isSafeInteger(r.offset) || r.offset > size || r.length > size - r.offset) {
        return this.error(n, r, P.EINVAL, `operation past EOF; From: ${r.offset}, Len: ${r.length}, Size: ${size}`);
      }
      const valid = P.CMD_FLAG_FUA | (r.type === P.CMD_READ && n.structured ? P.CMD_FLAG_DF : 0) |
        (r.type === P.CMD_WRITE_ZEROES ? P.CMD_FLAG_NO_HOLE | P.CMD_FLAG_FAST_ZERO : 0) | (r.type === P.CMD_BLOCK_STATUS ? P.CMD_FLAG_REQ_ONE : 0);
      if (r.flags & ~valid) return this.error(n, r, P.EINVAL, `unsupported flags for command ${CMD_NAMES[r.type] ?? '<unknown>'} (got 0x${r.flags.toString(16)})`);
      if (r.type > P.CMD_BLOCK_STATUS || r.type === P.CMD_DISC) return this.error(n, r, P.EINVAL, `invalid request type (${r.type}) received`);
      switch (r.type) {
        case P.CMD_READ: return await this.read(n, r);
        case P.CMD_WRITE:
          await chain.write(r.payload as Buffer, r.offset);
          if (r.flags & P.CMD_FLAG_FUA) await chain.flush();
          return this.ok(r);
        case P.CMD_WRITE_ZEROES:
          await chain.writeZeroes(r.offset, r.length, { mayUnmap: !(r.flags & P.CMD_FLAG_NO_HOLE) });
          if (r.flags & P.CMD_FLAG_FUA) await chain.flush();
          return this.ok(r);
        case P.CMD_TRIM:
          if (exp.discard) await chain.discard(r.offset, r.length);
          if (r.flags & P.CMD_FLAG_FUA) await chain.flush();
          return this.ok(r);
        case P.CMD_FLUSH:
          await chain.flush();
          return this.ok(r);
        case P.CMD_CACHE:
          await exp.cache?.(r.offset, r.length);
          return this.ok(r);
        case P.CMD_BLOCK_STATUS:
          return await this.blockStatus(n, r);
      }
    } catch (e) {
      this.error(n, r, P.EIO, e instanceof Error ? e.message : String(e));
    }
  }

  private ok(r: Request): void {
    simpleHeader(this.replies.reserve(16) as Buffer, r.handle, 0);
  }

  /** An error reply: a structured ERROR chunk when negotiated, else a simple reply. */
  private error(n: Negotiated, r: Pick<Request, 'handle'>, code: number, msg: string): void {
    if (!n.structured) {
      simpleHeader(this.replies.reserve(16) as Buffer, r.handle, code);
      return;
    }
    const m = Buffer.from(msg.slice(0, 4096), 'utf8');
    const p = Buffer.alloc(6 + m.length);
    p.writeUInt32BE(code, 0);
    p.writeUInt16BE(m.length, 4);
    m.copy(p, 6);
    this.chunk(r, P.REPLY_FLAG_DONE, P.REPLY_TYPE_ERROR, [p]);
  }

  private chunk(r: Pick<Request, 'handle'>, flags: number, type: number, parts: Buffer[]): void {
    const h = Buffer.alloc(20);
    h.writeUInt32BE(P.STRUCTURED_REPLY_MAGIC, 0);
    h.writeUInt16BE(flags, 4);
    h.writeUInt16BE(type, 6);
    r.handle.copy(h, 8);
    h.writeUInt32BE(parts.reduce((a, b) => a + b.length, 0), 16);
    this.replies.push(h);
    for (const p of parts) this.replies.push(p);
  }

  /** One OFFSET_DATA chunk: header and offset in one small buffer, then the data. */
  private dataChunk(r: Request, flags: number, offset: number, data: Buffer): void {
    dataHeader(this.replies.reserve(28) as Buffer, flags, r.handle, offset, data.length);
    this.replies.push(data);
  }

  private async read(n: Negotiated, r: Request): Promise<void> {
    const chain = n.export.chain();
    const buf = Buffer.allocUnsafe(r.length);
    if (!n.structured) {
      await chain.read(buf, r.offset);
      simpleHeader(this.replies.reserve(16) as Buffer, r.handle, 0);
      this.replies.push(buf);
      return;
    }
    if (r.length === 0) return this.chunk(r, P.REPLY_FLAG_DONE, P.REPLY_TYPE_NONE, []);
    // The resolution the read used also gives the data/hole segments (one lookup per request).
    const resolved = await chain.readFrom(0, buf, r.offset);
    const exts = r.flags & P.CMD_FLAG_DF ? null : resolved;
    if (exts && exts.length === 1 && exts[0].kind === 'data' && exts[0].offset === r.offset && exts[0].length === r.length) {
      return this.dataChunk(r, P.REPLY_FLAG_DONE, r.offset, buf);
    }
    // Data and hole segments (DF: one data chunk); each chunk is sent whole, the last with DONE.
    const segs: Array<{ off: number; len: number; data: boolean }> = [];
    if (!exts) segs.push({ off: r.offset, len: r.length, data: true });
    else {
      for (const x of exts) {
        const data = x.kind === 'data';
        const last = segs[segs.length - 1];
        if (last && last.data === data && last.off + last.len === x.offset) last.len += x.length;
        else segs.push({ off: x.offset, len: x.length, data });
      }
      const covered = segs.reduce((a, s) => a + s.len, 0);
      if (covered < r.length) segs.push({ off: r.offset + covered, len: r.length - covered, data: false });
    }
    segs.forEach((s, i) => {
      const done = i === segs.length - 1 ? P.REPLY_FLAG_DONE : 0;
      if (s.data) this.dataChunk(r, done, s.off, buf.subarray(s.off - r.offset, s.off - r.offset + s.len));
      else {
        const o = Buffer.alloc(12);
        o.writeBigUInt64BE(BigInt(s.off), 0);
        o.writeUInt32BE(s.len, 8);
        this.chunk(r, done, P.REPLY_TYPE_OFFSET_HOLE, [o]);
      }
    });
  }

  private async blockStatus(n: Negotiated, r: Request): Promise<void> {
    if (r.length === 0) return this.error(n, r, P.EINVAL, 'need non-zero length');
    if (!n.structured || n.contexts.length === 0) return this.error(n, r, P.EINVAL, 'CMD_BLOCK_STATUS not negotiated');
    const chain = n.export.chain();
    const one = (r.flags & P.CMD_FLAG_REQ_ONE) !== 0;
    let exts: ChainExtent[] | null = null;
    const parts: Buffer[][] = [];
    for (const ctx of n.contexts) {
      let runs: Array<[number, number]>;
      if (ctx.kind === 'bitmap') {
        runs = (ctx.bitmap?.status(r.offset, r.length) ?? []).map(([, len, d]) => [len, d ? P.STATE_DIRTY : 0]);
      } else {
        exts ??= await chain.blockStatus(r.offset, r.length);
        runs = exts.map((x) => [x.length, ctx.kind === 'base'
          ? (x.kind === 'data' ? 0 : P.STATE_HOLE | P.STATE_ZERO)
          : (x.kind === 'unallocated' ? 0 : x.depth + 1)]);
      }
      const merged: Array<[number, number]> = [];
      for (const [len, f] of runs) {
        const last = merged[merged.length - 1];
        if (last && last[1] === f && last[0] + len <= 0xffffffff) last[0] += len;
        else merged.push([len, f]);
        if (merged.length >= (one ? 1 : MAX_EXTENTS)) break;
      }
      if (merged.length === 0) merged.push([r.length, ctx.kind === 'base' ? P.STATE_HOLE | P.STATE_ZERO : 0]);
      if (one) merged[0][0] = Math.min(merged[0][0], r.length);
      const p = Buffer.alloc(4 + merged.length * 8);
      p.writeUInt32BE(ctx.id, 0);
      merged.forEach(([len, f], i) => {
        p.writeUInt32BE(len, 4 + i * 8);
        p.writeUInt32BE(f >>> 0, 8 + i * 8);
      });
      parts.push([p]);
    }
    parts.forEach((p, i) => this.chunk(r, i === parts.length - 1 ? P.REPLY_FLAG_DONE : 0, P.REPLY_TYPE_BLOCK_STATUS, p));
  }
}

/** QEMU's nbd_cmd_lookup. */
const CMD_NAMES: Record<number, string> = {
  [P.CMD_READ]: 'read', [P.CMD_WRITE]: 'write', [P.CMD_DISC]: 'disconnect', [P.CMD_FLUSH]: 'flush',
  [P.CMD_TRIM]: 'trim', [P.CMD_CACHE]: 'cache', [P.CMD_WRITE_ZEROES]: 'write zeroes', [P.CMD_BLOCK_STATUS]: 'block status',
};

/** QEMU's text (with its stray space) for a read, write or cache longer than the limit. */
function tooLong(length: number): string {
  return `len (${length} ) is larger than max len (${P.MAX_BUFFER})`;
}

interface Request {
  flags: number;
  type: number;
  handle: Buffer;
  offset: number;
  length: number;
  payload: Buffer | null;
}

/** A simple reply's 16-byte header into `h`. */
function simpleHeader(h: Buffer, handle: Buffer, error: number): void {
  h.writeUInt32BE(P.SIMPLE_REPLY_MAGIC, 0);
  h.writeUInt32BE(error, 4);
  handle.copy(h, 8);
}

/** The 28-byte header of an OFFSET_DATA chunk of `length` data bytes into `h`. */
function dataHeader(h: Buffer, flags: number, handle: Buffer, offset: number, length: number): void {
  h.writeUInt32BE(P.STRUCTURED_REPLY_MAGIC, 0);
  h.writeUInt16BE(flags, 4);
  h.writeUInt16BE(P.REPLY_TYPE_OFFSET_DATA, 6);
  handle.copy(h, 8);
  h.writeUInt32BE(8 + length, 16);
  h.writeUInt32BE(Math.floor(offset / 0x100000000), 20);
  h.writeUInt32BE(offset >>> 0, 24);
}
