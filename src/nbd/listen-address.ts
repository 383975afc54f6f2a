/**
 * Where the NBD server listens, and QEMU's messages when it cannot (util/qemu-sockets.c): a TCP
 * port given as a string is a service name as getaddrinfo reads it (digits, truncated to 16 bits
 * as glibc does, or a name from /etc/services); a Unix socket's bind errors name the path.
 */
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { errnoText } from '../storage/storage.js';

export type NbdAddress = { type: 'unix'; path: string; abstract?: boolean } | { type: 'inet'; host: string; port: number | string; numeric?: boolean };

/** A TCP service's port from /etc/services, or null. */
function servicePort(name: string): number | null {
  let text: string;
  try {
    text = fs.readFileSync('/etc/services', 'utf8');
  } catch {
    return null;
  }
  for (const line of text.split('\n')) {
    const [names, port] = ((words) => [[words[0], ...words.slice(2)], words[1]])(line.replace(/#.*/, '').trim().split(/\s+/));
    const m = /^(\d+)\/tcp$/.exec(port ?? '');
    if (m && names.includes(name)) return Number(m[1]);
  }
  return null;
}

/** The TCP port and host to listen on; throws QEMU's "address resolution failed" where getaddrinfo would fail. */
export function tcpTarget(a: Extract<NbdAddress, { type: 'inet' }>): { host: string | undefined; port: number } {
  const fail = (why: string): Error => new Error(`address resolution failed for ${a.host}:${a.port}: ${why}`);
  let port: number;
  if (typeof a.port === 'number') port = a.port;
  else if (/^\d+$/.test(a.port)) port = Number(BigInt(a.port) & 0xffffn);
  else {
    const p = a.port === '' ? 0 : servicePort(a.port);
    if (p === null) throw fail('Servname not supported for ai_socktype');
    port = p;
  }
  if (a.numeric && a.host !== '' && !net.isIP(a.host)) throw fail('Name or service not known');
  return { host: a.host === '' ? undefined : a.host, port };
}

/** QEMU's message for a failed listen. */
export function listenError(a: NbdAddress, e: NodeJS.ErrnoException): Error {
  if (a.type === 'inet') {
    if (e.code === 'ENOTFOUND') return new Error(`address resolution failed for ${a.host}:${a.port}: Name or service not known`);
    if (e.code === 'EAI_AGAIN') return new Error(`address resolution failed for ${a.host}:${a.port}: Temporary failure in name resolution`);
    return new Error(`Failed to find an available port: ${errnoText(e.code)}`);
  }
  // libuv reports a missing folder as EACCES.
  let code = e.code;
  if (code === 'EACCES' && !a.abstract && !fs.existsSync(path.dirname(a.path))) code = 'ENOENT';
  return new Error(`Failed to bind socket to ${a.path}: ${errnoText(code)}`);
}
