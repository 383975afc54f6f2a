/** The NBD server: listens on Unix or TCP sockets and serves a set of named exports. */
import net from 'node:net';
import fs from 'node:fs';
import type { NbdExport } from './export.js';
import { NbdConnection } from './connection.js';

import { listenError, tcpTarget, type NbdAddress } from './listen-address.js';

export type { NbdAddress } from './listen-address.js';

export class NbdServer {
  readonly exports = new Map<string, NbdExport>();
  private readonly servers: net.Server[] = [];
  private readonly sockets = new Set<net.Socket>();
  /** Connections still running (their requests in flight included). */
  private readonly running = new Set<Promise<void>>();
  /**
   * Clients served at once at most (0: no limit). Beyond it, as QEMU stops accepting (the
   * kernel's backlog holds the clients), a connected client waits for its greeting until
   * another one leaves.
   */
  maxConnections = 0;
  private readonly waiting: net.Socket[] = [];

  constructor(private readonly log: (line: string) => void = () => {}) {}

  addExport(e: NbdExport): void {
    if (this.exports.has(e.name)) throw new Error(`Block export id '${e.name}' is already in use`);
    this.exports.set(e.name, e);
  }

  removeExport(name: string): boolean {
    return this.exports.delete(name);
  }

  /**
   * Listen on `addr`; Unix sockets are created with mode 0600 (abstract ones have no file), TCP
   * binds where told (every address for an empty host). Failures carry QEMU's messages.
   */
  async listen(addr: NbdAddress): Promise<void> {
    const tcp = addr.type === 'inet' ? tcpTarget(addr) : null;
    const srv = net.createServer((sock) => {
      this.sockets.add(sock);
      sock.on('close', () => this.sockets.delete(sock));
      if (this.maxConnections && this.running.size >= this.maxConnections) {
        sock.on('error', () => {});
        this.waiting.push(sock);
      } else this.serve(sock);
    });
    await new Promise<void>((resolve, reject) => {
      if (addr.type === 'unix') {
        if (!addr.abstract) fs.rmSync(addr.path, { force: true });
        const old = process.umask(0o177);
        srv.once('error', (e) => {
          process.umask(old);
          reject(listenError(addr, e));
        });
        srv.listen(addr.abstract ? `\0${addr.path}` : addr.path, () => {
          process.umask(old);
          resolve();
        });
      } else {
        srv.once('error', (e) => reject(listenError(addr, e)));
        srv.listen(tcp?.port, tcp?.host, () => resolve());
      }
    });
    this.servers.push(srv);
  }

  private serve(sock: net.Socket): void {
    const c = new NbdConnection(sock, (n) => this.exports.get(n), () => [...this.exports.values()], this.log);
    const p = c.run().finally(() => {
      this.running.delete(p);
      // A slot is free: the longest-waiting client still connected is greeted.
      let next: net.Socket | undefined;
      while ((next = this.waiting.shift()) && next.destroyed);
      if (next) this.serve(next);
    });
    this.running.add(p);
  }

  /** Stop listening and drop every client; resolves once their requests in flight are over. */
  async close(): Promise<void> {
    this.waiting.length = 0;
    for (const s of this.sockets) s.destroy();
    await Promise.all(this.servers.map((s) => new Promise<void>((r) => s.close(() => r()))));
    await Promise.all([...this.running]);
    this.servers.length = 0;
  }
}
