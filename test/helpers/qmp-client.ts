/** A small QMP client for the tests and the benchmarks (bench/daemon.ts): sends commands, collects replies and events in arrival order. */
import type { ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';

export interface QmpMessage {
  [k: string]: unknown;
}

export class QmpClient {
  private buf = '';
  readonly received: QmpMessage[] = [];
  private waiters: Array<() => void> = [];
  /** Resolves once the connection is closed and everything the server sent has been received. */
  readonly closed: Promise<void>;

  private constructor(private readonly sock: net.Socket) {
    this.closed = new Promise((r) => sock.once('close', () => r()));
    sock.setEncoding('utf8');
    sock.on('data', (d: string) => {
      this.buf += d;
      let i;
      while ((i = this.buf.indexOf('\r\n')) >= 0) {
        const line = this.buf.slice(0, i);
        this.buf = this.buf.slice(i + 2);
        if (line.trim()) this.received.push(JSON.parse(line) as QmpMessage);
      }
      this.waiters.splice(0).forEach((w) => w());
    });
    sock.on('close', () => this.waiters.splice(0).forEach((w) => w()));
  }

  /**
   * Connect to a monitor socket. A server binds its socket file before it listens, so a client
   * that saw the file may still be refused for a moment: ECONNREFUSED is retried briefly.
   */
  static async connect(path: string): Promise<QmpClient> {
    for (let attempt = 0; ; attempt++) {
      try {
        return await new Promise<QmpClient>((res, rej) => {
          const s = net.createConnection(path, () => res(new QmpClient(s)));
          s.on('error', rej);
        });
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code !== 'ECONNREFUSED' || attempt >= 100) throw e;
        await new Promise((r) => setTimeout(r, 20));
      }
    }
  }

  /** Wait until a message satisfying `pred` has arrived (returns it). */
  async waitFor(pred: (m: QmpMessage) => boolean, timeoutMs = 10000): Promise<QmpMessage> {
    const t0 = Date.now();
    for (;;) {
      const m = this.received.find(pred);
      if (m) return m;
      if (this.sock.destroyed || Date.now() - t0 > timeoutMs) throw new Error(`timed out waiting; got ${JSON.stringify(this.received)}`);
      await new Promise<void>((r) => {
        this.waiters.push(r);
        setTimeout(r, 100);
      });
    }
  }

  sendRaw(text: string): void {
    this.sock.write(text);
  }

  /** Send a command and wait for its reply (matched by id). */
  async execute(cmd: string, args?: Record<string, unknown>, id: unknown = `c${Math.random().toString(36).slice(2)}`): Promise<QmpMessage> {
    this.sock.write(JSON.stringify({ execute: cmd, ...(args ? { arguments: args } : {}), id }) + '\r\n');
    return this.waitFor((m) => JSON.stringify(m.id) === JSON.stringify(id) && ('return' in m || 'error' in m));
  }

  close(): void {
    this.sock.destroy();
  }
}

/** Wait until a daemon has created its socket file `p` (failing if the daemon exited first). */
export async function waitForSocket(p: string, child: ChildProcess): Promise<void> {
  for (let i = 0; i < 400; i++) {
    if (fs.existsSync(p)) return;
    if (child.exitCode !== null) throw new Error(`daemon exited with ${child.exitCode}`);
    await new Promise((r) => setTimeout(r, 25));
  }
  throw new Error(`no ${p}`);
}
