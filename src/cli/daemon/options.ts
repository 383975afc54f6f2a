/**
 * qemu-storage-daemon's command line for the parts qchain implements: --blockdev, --nbd-server,
 * --export, plus a short form (--nbd PATH file). Option values are QEMU keyval strings
 * ("a=b,c=d", a literal comma written ",,").
 */
import { UsageError } from '../util/errors.js';
import { qemuStrtosz } from '../util/options.js';
import { collectCacheOptions, type CacheSizeOptions } from '../../qcow2/cache-sizes.js';
import { backingRef, checkBlockdevNames, checkBlockdevSupport, nodeWriteOptions } from '../../daemon/blockdev-options.js';
import type { DetectZeroes } from '../../daemon/graph.js';

export function parseKeyval(s: string): Map<string, string> {
  const out = new Map<string, string>();
  let i = 0;
  while (i < s.length) {
    let key = '';
    while (i < s.length && s[i] !== '=' && s[i] !== ',') key += s[i++];
    if (s[i] !== '=') throw new UsageError(`Expected '=' after parameter '${key}'`);
    i++;
    let val = '';
    for (;;) {
      if (i >= s.length) break;
      if (s[i] === ',') {
        if (s[i + 1] === ',') {
          val += ',';
          i += 2;
          continue;
        }
        i++;
        break;
      }
      val += s[i++];
    }
    if (out.has(key)) throw new UsageError(`Parameter '${key}' given more than once`);
    out.set(key, val);
  }
  return out;
}

export interface BlockdevSpec {
  driver: string; nodeName: string; filename?: string; file?: string; backing?: string | null; readOnly: boolean; discard: boolean;
  /** qcow2 l2-cache-size / cache-size, when given. */
  cache?: CacheSizeOptions;
  /** Warnings to print (with `where`) as the node is opened: `backing=` (empty) is deprecated. */
  warnings: string[];
  /** The option as written ('--blockdev driver=...'), which QEMU's messages about it start with; '' for the short form. */
  where: string;
  detectZeroes: DetectZeroes; noFlush: boolean;
  /** locking=off on the protocol node (file.locking=off for an inline one). */
  noLock?: boolean;
  /** An inline file's (file.cache.no-flush, file.detect-zeroes), when given. */
  fileNoFlush?: boolean; fileDetectZeroes?: DetectZeroes;
}
export interface ExportSpec { id: string; nodeName: string; name: string; writable: boolean; allocationDepth: boolean; bitmaps: string[]; where: string }
export type AddrSpec = { type: 'unix'; path: string } | { type: 'inet'; host: string; port: number };
export interface NbdServerSpec { addr: AddrSpec; where: string; maxConnections?: number }

/** QEMU's message about an option: the option as written, then the message (error_report with a command line location). */
export function located(where: string, msg: string): string {
  return where ? `${where}: ${msg}` : msg;
}

export interface DaemonOptions {
  /** QMP monitor socket paths (--chardev socket,... with --monitor chardev=..., or --qmp PATH). */
  monitors: string[];
  blockdevs: BlockdevSpec[];
  nbdServers: NbdServerSpec[];
  exports: ExportSpec[];
  pidfile?: string;
}

function bool(key: string, v: string | undefined, def: boolean): boolean {
  if (v === undefined) return def;
  if (v === 'on' || v === 'true' || v === 'yes') return true;
  if (v === 'off' || v === 'false' || v === 'no') return false;
  throw new UsageError(`Parameter '${key}' expects 'on' or 'off'`);
}

/** QEMU's discard option: "unmap"/"on" passes discards down, "ignore"/"off" (the default) drops them. */
function discardOpt(v: string | undefined): boolean {
  if (v === undefined || v === 'ignore' || v === 'off') return false;
  if (v === 'unmap' || v === 'on') return true;
  throw new UsageError(`Invalid discard option '${v}'`);
}

/**
 * blockdev-add's name and support checks on a --blockdev's keys (nested by their dots; on/off as
 * booleans); the options as blockdev-add's arguments.
 */
function blockdevChecks(kv: Map<string, string>): Record<string, unknown> {
  const root: Record<string, unknown> = {};
  for (const [k, v] of kv) {
    const parts = k.split('.');
    let o = root;
    for (const p of parts.slice(0, -1)) {
      if (typeof o[p] !== 'object' || o[p] === null) o[p] = {};
      o = o[p] as Record<string, unknown>;
    }
    o[parts[parts.length - 1]] = parts[0] === 'cache' || parts[1] === 'cache' ? (v === 'on' || v === 'true' ? true : v === 'off' || v === 'false' ? false : v) : v;
  }
  try {
    checkBlockdevNames(root);
    checkBlockdevSupport(root);
  } catch (e) {
    throw new UsageError(e instanceof Error ? e.message : String(e));
  }
  return root;
}

/** The qcow2 cache options among a --blockdev's keys (sizes with QEMU's k/M/G suffixes). */
function cacheOpts(kv: Map<string, string>): CacheSizeOptions | undefined {
  return collectCacheOptions((name) => {
    const v = kv.get(name);
    if (v === undefined) return undefined;
    const r = qemuStrtosz(v);
    if (!r.ok || r.value > BigInt(Number.MAX_SAFE_INTEGER)) throw new UsageError(`Parameter '${name}' expects a non-negative number below 2^64`);
    return Number(r.value);
  });
}

function addr(kv: Map<string, string>): AddrSpec {
  const type = kv.get('addr.type');
  if (type === 'unix') {
    const path = kv.get('addr.path');
    if (!path) throw new UsageError("Parameter 'addr.path' is missing");
    return { type, path };
  }
  if (type === 'inet') {
    const port = Number(kv.get('addr.port'));
    if (!Number.isInteger(port) || port < 0 || port > 65535) throw new UsageError("Parameter 'addr.port' expects a port number");
    return { type, host: kv.get('addr.host') ?? '127.0.0.1', port };
  }
  throw new UsageError(`Parameter 'addr.type' does not accept value '${type ?? ''}'`);
}

/** The options whose messages QEMU starts with the option as written. */
const LOCATED = ['--blockdev', '--nbd-server', '--export', '--monitor'];

/** A QmpError from the shared blockdev checks, as a command line error. */
function qmpCheck<T>(f: () => T): T {
  try {
    return f();
  } catch (e) {
    throw new UsageError(e instanceof Error ? e.message : String(e));
  }
}

export function parseDaemonArgs(argv: string[]): DaemonOptions {
  const o: DaemonOptions = { monitors: [], blockdevs: [], nbdServers: [], exports: [] };
  const chardevs = new Map<string, string>();
  const positional: string[] = [];
  let shortNbd: AddrSpec | null = null;
  let shortName = '';
  let shortWritable = true;
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const eq = a.indexOf('=');
    const [flag, inline] = a.startsWith('--') && eq > 0 ? [a.slice(0, eq), a.slice(eq + 1)] : [a, undefined];
    const value = (): string => {
      if (inline !== undefined) return inline;
      if (i + 1 >= argv.length) throw new UsageError(`option '${flag}' requires an argument`);
      return argv[++i];
    };
    // What QEMU's messages about this option start with: the option as written (one or two words).
    const where = inline !== undefined ? a : `${flag} ${argv[i + 1] ?? ''}`;
    try {
      switch (flag) {
        case '--blockdev': {
          const kv = parseKeyval(value());
          const root = blockdevChecks(kv);
          const { detectZeroes, noFlush } = nodeWriteOptions(root);
          const inlineFile = root.file && typeof root.file === 'object' ? nodeWriteOptions(root.file as Record<string, unknown>) : undefined;
          const driver = kv.get('driver');
          const nodeName = kv.get('node-name');
          if (!driver) throw new UsageError("Parameter 'driver' is missing");
          if (!nodeName) throw new UsageError("'node-name' must be specified for the root node");
          const warnings: string[] = [];
          // backing=NAME names a node (also 'null'); backing= (empty) is no backing, deprecated.
          const backing = qmpCheck(() => backingRef([...kv.keys()].some((k) => k.startsWith('backing.')) ? {} : kv.get('backing'), (w) => warnings.push(w)));
          const locking = kv.get(driver === 'file' ? 'locking' : 'file.locking');
          if (locking !== undefined && !['on', 'off', 'auto'].includes(locking)) throw new UsageError(`Parameter '${driver === 'file' ? '' : 'file.'}locking' does not accept value '${locking}'`);
          o.blockdevs.push({ noLock: locking === 'off', driver, nodeName, filename: kv.get('filename') ?? kv.get('file.filename'), file: kv.get('file'), backing, readOnly: bool('read-only', kv.get('read-only'), false), discard: discardOpt(kv.get('discard')), cache: cacheOpts(kv), detectZeroes, noFlush, fileNoFlush: inlineFile?.noFlushGiven, fileDetectZeroes: inlineFile?.detectZeroes, warnings, where });
          break;
        }
        case '--nbd-server': {
          const kv = parseKeyval(value());
          const mc = kv.get('max-connections');
          if (mc !== undefined && !/^[0-9]+$/.test(mc)) throw new UsageError("Parameter 'max-connections' expects integer");
          o.nbdServers.push({ addr: addr(kv), where, maxConnections: mc === undefined ? 0 : Number(mc) });
          break;
        }
        case '--export': {
          const kv = parseKeyval(value());
          if (kv.get('type') !== 'nbd') throw new UsageError(`Parameter 'type' does not accept value '${kv.get('type') ?? ''}'`);
          const id = kv.get('id'), nodeName = kv.get('node-name');
          if (!id) throw new UsageError("Parameter 'id' is missing");
          if (!nodeName) throw new UsageError("Parameter 'node-name' is missing");
          o.exports.push({
            id, nodeName, name: kv.get('name') ?? nodeName, writable: bool('writable', kv.get('writable'), false),
            allocationDepth: bool('allocation-depth', kv.get('allocation-depth'), false),
            bitmaps: [...kv.entries()].filter(([k]) => k.startsWith('bitmaps.')).map(([, v]) => v), where,
          });
          break;
        }
        case '--pidfile': o.pidfile = value(); break;
        case '--chardev': {
          const v = value();
          const comma = v.indexOf(',');
          const backend = comma < 0 ? v : v.slice(0, comma);
          const kv = parseKeyval(comma < 0 ? '' : v.slice(comma + 1));
          if (backend !== 'socket') throw new UsageError(`chardev backend '${backend}' is not supported (use socket)`);
          const id = kv.get('id'), path = kv.get('path');
          if (!id) throw new UsageError("Parameter 'id' is missing");
          if (!path) throw new UsageError('chardev: socket: no path given (only unix sockets are supported)');
          if (!bool('server', kv.get('server'), false)) throw new UsageError('chardev: only server=on sockets are supported');
          chardevs.set(id, path);
          break;
        }
        case '--monitor': {
          const v = value();
          const kv = v.includes('=') ? parseKeyval(v) : new Map([['chardev', v]]);
          const id = kv.get('chardev') ?? '';
          const path = chardevs.get(id);
          if (path === undefined) throw new UsageError(`chardev "${id}" not found`);
          o.monitors.push(path);
          break;
        }
        case '--qmp': o.monitors.push(value()); break;
        // Short form.
        case '--nbd': shortNbd = { type: 'unix', path: value() }; break;
        case '--nbd-tcp': {
          const v = value();
          const c = v.lastIndexOf(':');
          shortNbd = { type: 'inet', host: c > 0 ? v.slice(0, c) : '127.0.0.1', port: Number(c >= 0 ? v.slice(c + 1) : v) };
          break;
        }
        case '--name': shortName = value(); break;
        case '--read-only': case '-r': shortWritable = false; break;
        default:
          if (a.startsWith('-')) throw new UsageError(`unrecognized option '${a}'`);
          positional.push(a);
      }
    } catch (e) {
      const hasValue = inline !== undefined || where !== `${flag} `;
      throw e instanceof UsageError && hasValue && LOCATED.includes(flag) ? new UsageError(located(where, e.message)) : e;
    }
  }
  if (positional.length > 1) throw new UsageError('Expecting one image file name');
  if (positional.length === 1) {
    o.blockdevs.push({ driver: 'auto', nodeName: 'disk0', filename: positional[0], readOnly: !shortWritable, discard: true, detectZeroes: 'off', noFlush: false, warnings: [], where: '' });
    if (shortNbd) o.nbdServers.push({ addr: shortNbd, where: '' });
    o.exports.push({ id: 'export0', nodeName: 'disk0', name: shortName, writable: shortWritable, allocationDepth: true, bitmaps: [], where: '' });
  } else if (shortNbd) {
    throw new UsageError('--nbd needs an image file name');
  }
  return o;
}
