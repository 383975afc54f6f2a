/**
 * Fixed-newstyle option haggling, as QEMU 7.2's server answers it: LIST, INFO/GO (with block
 * sizes), STRUCTURED_REPLY, LIST/SET_META_CONTEXT (base:allocation, qemu:allocation-depth,
 * qemu:dirty-bitmap:NAME), EXPORT_NAME, ABORT; STARTTLS gets ERR_POLICY and anything else
 * (e.g. EXTENDED_HEADERS) ERR_UNSUP.
 */
import type { Socket } from 'node:net';
import * as P from './protocol.js';
import type { SocketReader } from './reader.js';
import type { DirtyBitmapView, NbdExport } from './export.js';

export interface MetaContext {
  id: number;
  name: string;
  kind: 'base' | 'depth' | 'bitmap';
  bitmap?: DirtyBitmapView;
}

export interface Negotiated {
  export: NbdExport;
  structured: boolean;
  contexts: MetaContext[];
}

const OPTION_NAMES: Record<number, string> = {
  1: 'export name', 2: 'abort', 3: 'list', 5: 'starttls', 6: 'info', 7: 'go',
  8: 'structured reply', 9: 'list meta context', 10: 'set meta context',
};

export function transmissionFlags(exp: NbdExport, structured: boolean): number {
  let f = P.TF_HAS_FLAGS | P.TF_SEND_FLUSH | P.TF_SEND_FUA | P.TF_CAN_MULTI_CONN | P.TF_SEND_CACHE;
  if (structured) f |= P.TF_SEND_DF;
  if (exp.writable) f |= P.TF_SEND_TRIM | P.TF_SEND_WRITE_ZEROES | P.TF_SEND_FAST_ZERO;
  else f |= P.TF_READ_ONLY;
  return f;
}

class OptionError extends Error {
  constructor(readonly code: number, message: string) {
    super(message);
  }
}

/** QEMU's nbd_opt_lookup. */
function optName(opt: number): string {
  return OPTION_NAMES[opt] ?? '<unknown>';
}

/** QEMU's texts for option data shorter than its fields (nbd_opt_read), and longer (nbd_reject_length). */
const shortData = (opt: number): OptionError => new OptionError(P.REP_ERR_INVALID, `Inconsistent lengths in option ${optName(opt)}`);
const longData = (opt: number): OptionError => new OptionError(P.REP_ERR_INVALID, `option '${optName(opt)}' has unexpected length`);

/** Runs the handshake; resolves with the negotiated export, or null when the client left cleanly. */
export async function handshake(reader: SocketReader, socket: Socket, find: (name: string) => NbdExport | undefined,
  list: () => NbdExport[]): Promise<Negotiated | null> {
  const hello = Buffer.alloc(18);
  hello.writeBigUInt64BE(P.NBDMAGIC, 0);
  hello.writeBigUInt64BE(P.IHAVEOPT, 8);
  hello.writeUInt16BE(P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES, 16);
  socket.write(hello);
  const cflags = (await reader.read(4)).readUInt32BE(0);
  if (cflags & ~(P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES)) throw new Error(`unknown client flags 0x${cflags.toString(16)}`);
  const noZeroes = (cflags & P.FLAG_C_NO_ZEROES) !== 0;
  let structured = false;
  let contexts: MetaContext[] = [];
  let contextsFor: string | null = null;

  const reply = (opt: number, type: number, data: Buffer = Buffer.alloc(0)): void => {
    const h = Buffer.alloc(20);
    h.writeBigUInt64BE(P.OPT_REPLY_MAGIC, 0);
    h.writeUInt32BE(opt, 8);
    h.writeUInt32BE(type >>> 0, 12);
    h.writeUInt32BE(data.length, 16);
    socket.cork();
    socket.write(h);
    if (data.length) socket.write(data);
    socket.uncork();
  };

  for (;;) {
    const h = await reader.read(16);
    if (h.readBigUInt64BE(0) !== P.IHAVEOPT) throw new Error('bad option magic');
    const opt = h.readUInt32BE(8), len = h.readUInt32BE(12);
    if (len > P.MAX_OPTION_LENGTH) {
      if (len > 16 * 1024 * 1024) throw new Error(`option of ${len} bytes`);
      await reader.read(len);
      reply(opt, P.REP_ERR_TOO_BIG, Buffer.from('option too long'));
      continue;
    }
    const data = await reader.read(len);
    try {
      switch (opt) {
        case P.OPT_EXPORT_NAME: {
          const exp = find(data.toString('utf8'));
          if (!exp) return null; // this option cannot report errors: hang up
          const b = Buffer.alloc(noZeroes ? 10 : 134);
          b.writeBigUInt64BE(BigInt(exp.chain().size), 0);
          b.writeUInt16BE(transmissionFlags(exp, structured), 8);
          socket.write(b);
          return { export: exp, structured, contexts: contextsFor === exp.name ? contexts : [] };
        }
        case P.OPT_ABORT:
          reply(opt, P.REP_ACK);
          return null;
        case P.OPT_LIST: {
          if (len !== 0) throw longData(opt);
          for (const e of list()) {
            const name = Buffer.from(e.name), desc = Buffer.from(e.description ?? '');
            const b = Buffer.alloc(4 + name.length + desc.length);
            b.writeUInt32BE(name.length, 0);
            name.copy(b, 4);
            desc.copy(b, 4 + name.length);
            reply(opt, P.REP_SERVER, b);
          }
          reply(opt, P.REP_ACK);
          break;
        }
        case P.OPT_STARTTLS:
          throw new OptionError(P.REP_ERR_POLICY, 'TLS not configured');
        case P.OPT_STRUCTURED_REPLY:
          if (len !== 0) throw longData(opt);
          if (structured) throw new OptionError(P.REP_ERR_INVALID, 'structured reply already negotiated');
          structured = true;
          reply(opt, P.REP_ACK);
          break;
        case P.OPT_INFO:
        case P.OPT_GO: {
          const { name, rest } = readName(data, opt);
          if (rest.length < 2) throw shortData(opt);
          const nreq = rest.readUInt16BE(0);
          if (rest.length < 2 + nreq * 2) throw shortData(opt);
          if (rest.length > 2 + nreq * 2) throw longData(opt);
          const reqs = new Set<number>();
          for (let i = 0; i < nreq; i++) reqs.add(rest.readUInt16BE(2 + i * 2));
          const exp = find(name);
          if (!exp) throw new OptionError(P.REP_ERR_UNKNOWN, `export '${name}' not present`);
          if (reqs.has(P.INFO_NAME)) reply(opt, P.REP_INFO, Buffer.concat([u16(P.INFO_NAME), Buffer.from(exp.name)]));
          if (reqs.has(P.INFO_DESCRIPTION) && exp.description) reply(opt, P.REP_INFO, Buffer.concat([u16(P.INFO_DESCRIPTION), Buffer.from(exp.description)]));
          const bs = Buffer.alloc(14);
          bs.writeUInt16BE(P.INFO_BLOCK_SIZE, 0);
          bs.writeUInt32BE(P.MIN_BLOCK, 2);
          bs.writeUInt32BE(P.PREFERRED_BLOCK, 6);
          bs.writeUInt32BE(P.MAX_BUFFER, 10);
          reply(opt, P.REP_INFO, bs);
          const ex = Buffer.alloc(12);
          ex.writeUInt16BE(P.INFO_EXPORT, 0);
          ex.writeBigUInt64BE(BigInt(exp.chain().size), 2);
          ex.writeUInt16BE(transmissionFlags(exp, structured), 10);
          reply(opt, P.REP_INFO, ex);
          reply(opt, P.REP_ACK);
          if (opt === P.OPT_GO) return { export: exp, structured, contexts: contextsFor === exp.name ? contexts : [] };
          break;
        }
        case P.OPT_LIST_META_CONTEXT:
        case P.OPT_SET_META_CONTEXT: {
          const set = opt === P.OPT_SET_META_CONTEXT;
          if (set && !structured) throw new OptionError(P.REP_ERR_INVALID, "request option 'set meta context' when structured reply is not negotiated");
          const { name, rest } = readName(data, opt);
          const exp = find(name);
          const queries = readQueries(rest, opt);
          if (!exp) throw new OptionError(P.REP_ERR_UNKNOWN, `export '${name}' not present`);
          const matched = matchContexts(exp, queries, set);
          for (const c of matched) {
            const nm = Buffer.from(c.name);
            const b = Buffer.alloc(4 + nm.length);
            b.writeUInt32BE(set ? c.id : 0, 0);
            nm.copy(b, 4);
            reply(opt, P.REP_META_CONTEXT, b);
          }
          if (set) {
            contexts = matched;
            contextsFor = exp.name;
          }
          reply(opt, P.REP_ACK);
          break;
        }
        default:
          throw new OptionError(P.REP_ERR_UNSUP, `Unsupported option ${opt} (${optName(opt)})`);
      }
    } catch (e) {
      if (!(e instanceof OptionError)) throw e;
      reply(opt, e.code, Buffer.from(e.message));
    }
  }
}

function u16(v: number): Buffer {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(v, 0);
  return b;
}

function readName(data: Buffer, opt: number): { name: string; rest: Buffer } {
  if (data.length < 4) throw shortData(opt);
  const n = data.readUInt32BE(0);
  if (n > P.MAX_STRING) throw new OptionError(P.REP_ERR_INVALID, `Invalid name length: ${n}`);
  if (4 + n > data.length) throw shortData(opt);
  return { name: data.toString('utf8', 4, 4 + n), rest: data.subarray(4 + n) };
}

function readQueries(rest: Buffer, opt: number): string[] {
  if (rest.length < 4) throw shortData(opt);
  const nq = rest.readUInt32BE(0);
  const out: string[] = [];
  let p = 4;
  for (let i = 0; i < nq; i++) {
    if (p + 4 > rest.length) throw shortData(opt);
    const l = rest.readUInt32BE(p);
    if (p + 4 + l > rest.length) throw shortData(opt);
    // QEMU skips a query longer than an NBD string may be.
    if (l <= P.MAX_STRING) out.push(rest.toString('utf8', p + 4, p + 4 + l));
    p += 4 + l;
  }
  if (p !== rest.length) throw new OptionError(P.REP_ERR_INVALID, 'trailing data after queries');
  return out;
}

/** The contexts an export offers, with QEMU's ids (base 0, depth 1, bitmaps from 2). */
function allContexts(exp: NbdExport): MetaContext[] {
  const out: MetaContext[] = [{ id: 0, name: 'base:allocation', kind: 'base' }];
  if (exp.allocationDepth) out.push({ id: 1, name: 'qemu:allocation-depth', kind: 'depth' });
  let id = 2;
  for (const [name, bitmap] of exp.bitmaps ?? []) out.push({ id: id++, name: `qemu:dirty-bitmap:${name}`, kind: 'bitmap', bitmap });
  return out;
}

function matchContexts(exp: NbdExport, queries: string[], set: boolean): MetaContext[] {
  const all = allContexts(exp);
  if (queries.length === 0) return set ? [] : all;
  const out: MetaContext[] = [];
  const add = (c: MetaContext): void => { if (!out.includes(c)) out.push(c); };
  for (const q of queries) {
    for (const c of all) {
      if (q === c.name) add(c);
      else if (!set && (q === 'base:' && c.kind === 'base' || q === 'qemu:' && c.kind !== 'base' ||
        q === 'qemu:dirty-bitmap:' && c.kind === 'bitmap')) add(c);
    }
  }
  return out;
}
