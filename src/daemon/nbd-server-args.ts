/**
 * nbd-server-start's arguments as QEMU 7.2's QAPI visitor reads them. `addr` is a
 * SocketAddressLegacy: {"type": "unix"|"inet"|"vsock"|"fd", "data": {...}}, the members inside
 * `data` (QSD refuses the flat form {"type": "unix", "path": ...} with "Parameter 'addr.data' is
 * missing"; only the command line's --nbd-server takes the flat SocketAddress). Messages are
 * QEMU's, quirks included: an unknown type names 'type', not 'addr.type'; an unsigned member of
 * the wrong JSON type "expects uint64" under its full name, out of range "expects uint16_t" /
 * "uint32_t" under its own name. Checks of values the visitor accepts come after "NBD server
 * already running" (startChecks).
 */
import { CommandError, type Args } from '../qmp/server.js';
import { QmpError } from './graph.js';
import type { NbdAddress } from '../nbd/server.js';

/** The members of each address type's `data`, and their JSON types. */
const DATA: Record<string, Record<string, 'string' | 'boolean' | 'uint16'>> = {
  unix: { path: 'string', abstract: 'boolean', tight: 'boolean' },
  inet: { host: 'string', port: 'string', numeric: 'boolean', to: 'uint16', ipv4: 'boolean', ipv6: 'boolean', 'keep-alive': 'boolean', mptcp: 'boolean' },
  vsock: { cid: 'string', port: 'string' },
  fd: { str: 'string' },
};
const REQUIRED: Record<string, string[]> = { unix: ['path'], inet: ['host', 'port'], vsock: ['cid', 'port'], fd: ['str'] };

const isObject = (v: unknown): v is Args => !!v && typeof v === 'object' && !Array.isArray(v);

/** One member of a struct, visited as QAPI does: missing, wrong type, range. */
function member(o: Args, key: string, path: string, type: 'string' | 'boolean' | 'uint16' | 'uint32', required: boolean): void {
  const v = o[key];
  if (v === undefined) {
    if (required) throw new CommandError(`Parameter '${path}' is missing`);
    return;
  }
  if (type === 'string' || type === 'boolean') {
    if (typeof v !== type) throw new CommandError(`Invalid parameter type for '${path}', expected: ${type}`);
    return;
  }
  if (typeof v !== 'number' || !Number.isInteger(v)) throw new CommandError(`Parameter '${path}' expects uint64`);
  const max = type === 'uint16' ? 0xffff : 0xffffffff;
  if (v < 0 || v > max) throw new CommandError(`Parameter '${key}' expects ${type}_t`);
}

function noOthers(o: Args, known: string[], prefix: string): void {
  for (const k of Object.keys(o)) if (!known.includes(k)) throw new CommandError(`Parameter '${prefix}${k}' is unexpected`);
}

export interface NbdServerStartArgs {
  /** The address as given: type and its data members. */
  type: string;
  data: Args;
  tlsCreds?: string;
  maxConnections: number;
}

/** The visitor's checks, in its order: addr (type, data and its members), tls-creds, tls-authz, max-connections, then unknown members. */
export function nbdServerStartArgs(a: Args): NbdServerStartArgs {
  const addr = a.addr;
  if (addr === undefined) throw new CommandError("Parameter 'addr' is missing");
  if (!isObject(addr)) throw new CommandError("Invalid parameter type for 'addr', expected: object");
  member(addr, 'type', 'addr.type', 'string', true);
  const type = addr.type as string;
  const members = DATA[type];
  if (!members) throw new CommandError(`Parameter 'type' does not accept value '${type}'`);
  const data = addr.data;
  if (data === undefined) throw new CommandError("Parameter 'addr.data' is missing");
  if (!isObject(data)) throw new CommandError("Invalid parameter type for 'addr.data', expected: object");
  for (const [k, t] of Object.entries(members)) member(data, k, `addr.data.${k}`, t, REQUIRED[type].includes(k));
  noOthers(data, Object.keys(members), 'addr.data.');
  noOthers(addr, ['type', 'data'], 'addr.');
  member(a, 'tls-creds', 'tls-creds', 'string', false);
  member(a, 'tls-authz', 'tls-authz', 'string', false);
  member(a, 'max-connections', 'max-connections', 'uint32', false);
  noOthers(a, ['addr', 'tls-creds', 'tls-authz', 'max-connections'], '');
  return { type, data, tlsCreds: a['tls-creds'] as string | undefined, maxConnections: (a['max-connections'] as number | undefined) ?? 0 };
}

/**
 * What QEMU checks once the server is known not to run (nbd_server_start), and what qchain does
 * not implement: the address to listen on.
 */
export function startChecks(s: NbdServerStartArgs): NbdAddress {
  // qchain has no objects (no object-add), so no TLS credentials can exist. tls-authz without
  // tls-creds is accepted and has no effect, as in QEMU 7.2.
  if (s.tlsCreds !== undefined) throw new QmpError(`No TLS credentials with id '${s.tlsCreds}'`);
  const d = s.data;
  switch (s.type) {
    case 'unix':
      if (d.abstract === true && d.tight === false) throw new QmpError('abstract sockets with tight=false are not supported by qchain');
      return { type: 'unix', path: d.path as string, abstract: d.abstract === true };
    case 'inet':
      if (d.to !== undefined) throw new QmpError('port ranges (to) are not supported by qchain');
      if (d.ipv4 !== undefined || d.ipv6 !== undefined) throw new QmpError('ipv4/ipv6 address family options are not supported by qchain');
      if (d.mptcp === true) throw new QmpError('mptcp is not supported by qchain');
      // keep-alive only concerns connecting sockets: QEMU ignores it for a listening one.
      return { type: 'inet', host: d.host as string, port: d.port as string, numeric: d.numeric === true };
    case 'fd':
      // QSD's message: its monitor has no file descriptors to pass.
      throw new QmpError('only QEMU supports file descriptor passing');
    default:
      throw new QmpError(`${s.type} addresses are not supported by qchain`);
  }
}
