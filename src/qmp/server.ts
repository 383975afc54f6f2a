/**
 * The QMP monitor: greeting, capabilities negotiation, one JSON object per command with the
 * reply ending in CRLF, `id` echoed verbatim, errors as {"error": {"class", "desc"}}, and
 * asynchronous events (with timestamps) broadcast to the connected client. Like
 * qemu-storage-daemon's monitor chardev, one client is served at a time; the next one is
 * greeted when the previous one leaves.
 */
import net from 'node:net';
import fs from 'node:fs';
import { JsonStream, type Framed } from './framing.js';
import { qemuJson } from './json-out.js';

/** Commands read ahead of the one running, and reply bytes not yet taken by the client, at most. */
const MAX_QUEUED = 256;
const MAX_UNSENT = 1024 * 1024;

export const VERSION = { qemu: { micro: 0, minor: 2, major: 7 }, package: 'qchain' };

export class CommandError extends Error {
  constructor(message: string, readonly errorClass = 'GenericError') {
    super(message);
  }
}

export type Args = Record<string, unknown>;
export type Handler = (args: Args, session: QmpSession) => Promise<unknown> | unknown;

export class QmpSession {
  negotiated = false;
  /** The client enabled the 'oob' capability. */
  oob = false;
  constructor(readonly socket: net.Socket) {}
  send(obj: unknown): void {
    if (!this.socket.destroyed) this.socket.write(`${qemuJson(obj)}\r\n`);
  }
}

export class QmpServer {
  private readonly servers: net.Server[] = [];
  private current: QmpSession | null = null;
  private readonly waiting: net.Socket[] = [];
  /** Called after a `quit` reply has been sent. */
  onQuit: () => void = () => {};

  constructor(private readonly commands: Map<string, Handler>) {}

  /** Emit an event to the connected client (if any). */
  event(name: string, data?: Record<string, unknown>): void {
    const now = Date.now();
    const ev: Record<string, unknown> = { timestamp: { seconds: Math.floor(now / 1000), microseconds: (now % 1000) * 1000 + Math.floor(Math.random() * 1000) }, event: name };
    if (data) ev.data = data;
    if (this.current?.negotiated) this.current.send(ev);
  }

  async listen(p: string): Promise<void> {
    const srv = net.createServer((sock) => {
      sock.on('error', () => {});
      if (this.current) this.waiting.push(sock);
      else this.serve(sock);
    });
    fs.rmSync(p, { force: true });
    await new Promise<void>((resolve, reject) => {
      srv.once('error', reject);
      const old = process.umask(0o177);
      srv.listen(p, () => {
        process.umask(old);
        resolve();
      });
    });
    this.servers.push(srv);
  }

  private serve(sock: net.Socket): void {
    const s = new QmpSession(sock);
    this.current = s;
    s.send({ QMP: { version: VERSION, capabilities: ['oob'] } });
    const stream = new JsonStream();
    // Commands run one after another, in arrival order. A client that sends faster than the
    // commands run, or never reads its replies, is stopped being read (as QEMU's monitor
    // suspends), so neither the queue nor the unsent replies grow without bound.
    const queue: Framed[] = [];
    let running = false;
    const work = async (): Promise<void> => {
      running = true;
      while (queue.length && !sock.destroyed) {
        if (sock.writableLength > MAX_UNSENT) await sent(sock);
        const f = queue.shift() as Framed;
        try {
          await this.dispatch(s, f);
        } catch {
          // A reply that cannot be sent (closed socket) ends nothing but this command.
        }
        if (queue.length < MAX_QUEUED / 2 && sock.isPaused()) sock.resume();
      }
      queue.length = 0;
      running = false;
    };
    sock.on('data', (chunk: Buffer) => {
      for (const f of stream.push(chunk)) queue.push(f);
      if (queue.length >= MAX_QUEUED) sock.pause();
      if (!running) void work();
    });
    sock.on('close', () => {
      if (this.current === s) this.current = null;
      const next = this.waiting.shift();
      if (next && !next.destroyed) this.serve(next);
    });
  }

  private async dispatch(s: QmpSession, f: { value: unknown } | { error: string }): Promise<void> {
    if ('error' in f) return s.send({ error: { class: 'GenericError', desc: f.error } });
    const msg = f.value;
    if (typeof msg !== 'object' || msg === null || Array.isArray(msg)) {
      return s.send({ error: { class: 'GenericError', desc: 'QMP input must be a JSON object' } });
    }
    const m = msg as Record<string, unknown>;
    const idPart = 'id' in m ? { id: m.id } : {};
    const reply = (body: Record<string, unknown>): void => s.send({ ...body, ...idPart });
    const fail = (cls: string, desc: string): void => s.send({ ...idPart, error: { class: cls, desc } });
    // QEMU's qmp_dispatch_check_obj: 'exec-oob' only once the client enabled OOB.
    for (const k of Object.keys(m)) {
      if (!['execute', 'arguments', 'id', ...(s.oob ? ['exec-oob'] : [])].includes(k)) return fail('GenericError', `QMP input member '${k}' is unexpected`);
    }
    const oob = 'exec-oob' in m;
    if (oob && 'execute' in m) return fail('GenericError', "QMP input member 'execute' clashes with 'exec-oob'");
    const key = oob ? 'exec-oob' : 'execute';
    const cmd = m[key];
    if (cmd === undefined) return fail('GenericError', "QMP input lacks member 'execute'");
    if (typeof cmd !== 'string') return fail('GenericError', `QMP input member '${key}' must be a string`);
    const args = m.arguments ?? {};
    if (typeof args !== 'object' || args === null || Array.isArray(args)) return fail('GenericError', "QMP input member 'arguments' must be an object");
    if (!s.negotiated) {
      if (cmd !== 'qmp_capabilities') return fail('CommandNotFound', "Expecting capabilities negotiation with 'qmp_capabilities'");
      if (oob) return fail('GenericError', 'The command qmp_capabilities does not support OOB');
      try {
        s.oob = capabilities(args as Args);
      } catch (e) {
        return fail('GenericError', (e as Error).message);
      }
      s.negotiated = true;
      return reply({ return: {} });
    }
    if (cmd === 'qmp_capabilities') return fail(oob ? 'GenericError' : 'CommandNotFound', oob ? 'The command qmp_capabilities does not support OOB' : 'Capabilities negotiation is already complete, command ignored');
    const h = this.commands.get(cmd);
    if (!h) return fail('CommandNotFound', `The command ${cmd} has not been found`);
    // No command of the daemon's may run out of band (QEMU: only a few migration and test commands).
    if (oob) return fail('GenericError', `The command ${cmd} does not support OOB`);
    try {
      const ret = await h(args as Args, s);
      reply({ return: ret ?? {} });
      if (cmd === 'quit') {
        s.socket.end();
        this.onQuit();
      }
    } catch (e) {
      if (e instanceof CommandError) return fail(e.errorClass, e.message);
      const cls = (e as { errorClass?: unknown }).errorClass;
      fail(typeof cls === 'string' ? cls : 'GenericError', e instanceof Error ? e.message : String(e));
    }
  }

  async close(): Promise<void> {
    this.current?.socket.destroy();
    for (const w of this.waiting) w.destroy();
    await Promise.all(this.servers.map((s) => new Promise<void>((r) => s.close(() => r()))));
  }
}

/**
 * qmp_capabilities' arguments: whether 'oob' is enabled. QEMU's texts, the enum's one included
 * (its visitor names a list element 'null').
 */
function capabilities(a: Args): boolean {
  onlyArgs(a, ['enable']);
  const e = a.enable;
  if (e === undefined) return false;
  if (!Array.isArray(e)) throw new CommandError("Invalid parameter type for 'enable', expected: array");
  for (const v of e) {
    if (typeof v !== 'string') throw new CommandError("Invalid parameter type for 'null', expected: string");
    if (v !== 'oob') throw new CommandError(`Parameter 'null' does not accept value '${v}'`);
  }
  return e.length > 0;
}

/** Until the client has taken the replies written so far (or is gone). */
function sent(sock: net.Socket): Promise<void> {
  if (sock.destroyed) return Promise.resolve();
  return new Promise<void>((r) => {
    const done = (): void => {
      sock.off('drain', done);
      sock.off('close', done);
      r();
    };
    sock.on('drain', done);
    sock.on('close', done);
  });
}

/** Argument accessors with QEMU's messages for missing and mistyped members. */
export function str(a: Args, key: string): string {
  const v = a[key];
  if (v === undefined) throw new CommandError(`Parameter '${key}' is missing`);
  if (typeof v !== 'string') throw new CommandError(`Invalid parameter type for '${key}', expected: string`);
  return v;
}

export function optStr(a: Args, key: string): string | undefined {
  return a[key] === undefined ? undefined : str(a, key);
}

export function optBool(a: Args, key: string, def: boolean): boolean {
  const v = a[key];
  if (v === undefined) return def;
  if (typeof v !== 'boolean') throw new CommandError(`Invalid parameter type for '${key}', expected: boolean`);
  return v;
}

export function optInt(a: Args, key: string): number | undefined {
  const v = a[key];
  if (v === undefined) return undefined;
  if (typeof v !== 'number' || !Number.isInteger(v)) throw new CommandError(`Invalid parameter type for '${key}', expected: integer`);
  return v;
}

/**
 * A uint64 member: any JSON integer (QEMU takes a negative one as 2^64 + v; it is kept as given
 * here, and shown so, as QEMU's int64 query fields show it), anything else refused with QEMU's text.
 */
export function uint64(a: Args, key: string): number {
  const v = a[key];
  if (v === undefined) throw new CommandError(`Parameter '${key}' is missing`);
  if (typeof v !== 'number' || !Number.isInteger(v)) throw new CommandError(`Parameter '${key}' expects uint64`);
  return v;
}

/** Refuse members a command does not declare, as QEMU's generated visitors do. */
export function onlyArgs(a: Args, allowed: readonly string[]): Args {
  for (const k of Object.keys(a)) if (!allowed.includes(k)) throw new CommandError(`Parameter '${k}' is unexpected`);
  return a;
}
