/**
 * QEMU's `json:{...}` pseudo-filenames: the options of a node given as a file name (on the command
 * line, or as an overlay's backing file name, as a daemon writes it for a node whose attached
 * backing differs from its header). QEMU 7.2 flattens the object to dotted keys (`file.filename`
 * and `"file": {"filename": ...}` are the same), takes the options it knows and refuses what is
 * left over, naming the first one in its hash table's order.
 *
 * A description is a format node (`driver` qcow2, raw or qcow, or none: probed) over a `file`
 * node (`driver` file or none; `filename` relative to the current directory, not to any overlay),
 * with an optional `backing`: options of another description, or null for none; absent means
 * the header's chain. Options qchain implements are honoured (read-only, the qcow2 cache sizes,
 * file locking; node-name is ignored), other options QEMU has are refused with a message naming
 * qchain, unknown ones with QEMU's text. Errors here are QEMU's texts without the "Could not open 'NAME': " prefix.
 */
import { ImageError } from '../image/errors.js';
import type { CacheSizeOptions } from '../qcow2/cache-sizes.js';
import { qemuStrtosz } from '../util/strtosz.js';
import { JsonParseError, parseQemuJson, type JsonValue } from './qemu-json.js';

/** Flattened options: dotted keys, scalars (or an empty object/list kept whole). */
export type FlatOptions = Map<string, JsonValue>;

/** The backing of a description: another one, a node name (never found offline), or none. */
export type BackingSpec = { options: FlatOptions } | { ref: string } | null;

export interface NodeSpec {
  /** `driver` of the format node; undefined: probed. */
  driver?: string;
  /** The file node's `filename`, as given (relative to the current directory). */
  filename: string;
  /** undefined: the header's backing chain. */
  backing?: BackingSpec;
  readOnly?: boolean;
  /** `file.locking` = off. */
  noLock?: boolean;
  /** qcow2's l2-cache-size, refcount-cache-size, cache-size (checked once the format is known). */
  qcow2: Map<string, JsonValue>;
  /** Options nobody took: the first one (QEMU's order) is refused once the node is open. */
  leftover: string[];
  /** The file node's unknown option, refused once the file is open. */
  fileLeftover?: string;
}

export const isJsonName = (name: string): boolean => name.startsWith('json:');

const QCOW2_OPTIONS = ['l2-cache-size', 'refcount-cache-size', 'cache-size'];
/** Options QEMU 7.2 has for these drivers that qchain does not implement (refused naming qchain). */
const COMMON_UNSUPPORTED = ['discard', 'detect-zeroes', 'auto-read-only', 'force-share', 'cache'];
const UNSUPPORTED: Record<string, string[]> = {
  qcow2: ['lazy-refcounts', 'pass-discard-request', 'pass-discard-snapshot', 'pass-discard-other', 'overlap-check',
    'cache-clean-interval', 'l2-cache-entry-size', 'encrypt', 'data-file', ...COMMON_UNSUPPORTED],
  raw: ['offset', 'size', ...COMMON_UNSUPPORTED],
  qcow: ['encrypt', ...COMMON_UNSUPPORTED],
};
const FILE_UNSUPPORTED = ['pr-manager', 'aio', 'aio-max-batch', 'drop-cache', 'x-check-cache-dropped', ...COMMON_UNSUPPORTED];
const PROTOCOLS = ['file'];
const FORMATS = ['qcow2', 'raw', 'qcow'];

/** QEMU's tdb_hash (qobject/qdict.c): where a key sits in a QDict, hence the order of its iteration. */
function qdictBucket(key: string): number {
  const b = Buffer.from(key, 'utf8');
  let v = Math.imul(0x238f13af, b.length) >>> 0;
  for (let i = 0; i < b.length; i++) v = (v + ((b[i] << ((i * 5) % 24)) >>> 0)) >>> 0;
  return ((Math.imul(1103515243, v) + 12345) >>> 0) % 512;
}

/** The key QEMU names first among `keys` (qdict_first: lowest bucket, newest entry first). */
export function firstQdictKey(keys: string[]): string | undefined {
  let best: string | undefined, bestBucket = Infinity;
  for (const k of keys) {
    const b = qdictBucket(k);
    if (b <= bestBucket) {
      best = k;
      bestBucket = b;
    }
  }
  return best;
}

/** QEMU's qdict_flatten: nested objects and lists become dotted keys; empty ones stay whole. */
export function flatten(m: Map<string, JsonValue>): FlatOptions {
  const out: FlatOptions = new Map();
  const nested: Array<[string, JsonValue]> = [];
  for (const [k, v] of m) {
    if ((v instanceof Map && v.size) || (Array.isArray(v) && v.length)) nested.push([k, v]);
    else out.set(k, v);
  }
  const walk = (prefix: string, v: JsonValue): void => {
    if (v instanceof Map && v.size) for (const [k, x] of v) walk(`${prefix}.${k}`, x);
    else if (Array.isArray(v) && v.length) v.forEach((x, i) => walk(`${prefix}.${i}`, x));
    else out.set(prefix, v);
  };
  // Nested members replace flat ones of the same name.
  for (const [k, v] of nested) walk(k, v);
  return out;
}

/** The options of a `json:` name, flattened; throws QEMU's parse errors. */
export function parseJsonName(name: string): FlatOptions {
  let v: JsonValue;
  try {
    v = parseQemuJson(name.slice('json:'.length));
  } catch (e) {
    if (e instanceof JsonParseError) throw new ImageError(`Could not parse the JSON options: ${e.message}`);
    throw e;
  }
  if (!(v instanceof Map)) throw new ImageError('Invalid JSON object given');
  return flatten(v);
}

/** The options under `prefix.` (prefix removed), taken out of `m`. */
function extract(m: FlatOptions, prefix: string): FlatOptions {
  const out: FlatOptions = new Map();
  for (const [k, v] of [...m]) {
    if (!k.startsWith(`${prefix}.`)) continue;
    out.set(k.slice(prefix.length + 1), v);
    m.delete(k);
  }
  return out;
}

/** QEMU's qapi_bool_parse for a bool option given as JSON (true/false, or "on"/"off" ...). */
function boolOption(name: string, v: JsonValue): boolean {
  if (v === true || v === false) return v;
  if (typeof v === 'string' && ['on', 'yes', 'true', 'y'].includes(v)) return true;
  if (typeof v === 'string' && ['off', 'no', 'false', 'n'].includes(v)) return false;
  throw new ImageError(`Parameter '${name}' expects 'on' or 'off'`);
}

function refuseUnsupported(keys: Iterable<string>, list: string[], what: string): void {
  for (const k of keys) {
    if (list.includes(k.split('.')[0])) throw new ImageError(`qchain does not support the ${what} option '${k}' in json: file names`);
  }
}

/**
 * A node description from flattened options. `formatOverride` (`-f`, or the overlay header's
 * backing format) takes the place of `driver`. With `noBacking` (qemu-img info), backing
 * options other than null are not taken and so are refused as left over, as QEMU does.
 */
export function nodeSpec(opts: FlatOptions, { formatOverride, defaultDriver, noBacking = false }:
  { formatOverride?: string; defaultDriver?: string; noBacking?: boolean } = {}): NodeSpec {
  const m: FlatOptions = new Map(opts);
  const d = m.get('driver');
  m.delete('driver');
  const driver = formatOverride ?? (typeof d === 'string' ? d : defaultDriver);
  const fileRef = m.get('file');
  const fileOpts = extract(m, 'file');
  if (driver === undefined && !m.has('file') && !fileOpts.size) throw new ImageError('Must specify either driver or file');
  if (driver !== undefined && formatOverride === undefined) {
    if (PROTOCOLS.includes(driver)) throw new ImageError(`qchain does not open the '${driver}' protocol driver as an image; describe it as {"driver": "raw", "file": {...}}`);
    if (!FORMATS.includes(driver)) throw new ImageError(`Unknown driver '${driver}'`);
  }
  if (typeof fileRef === 'string') throw new ImageError(`Cannot find device='${fileRef}' nor node-name='${fileRef}'`);
  m.delete('file');
  if (!fileOpts.size) throw new ImageError('A block device must be specified for "file"');
  // The file node.
  const fd = fileOpts.get('driver');
  fileOpts.delete('driver');
  if (typeof fd === 'string' && !PROTOCOLS.includes(fd)) {
    if (FORMATS.includes(fd)) throw new ImageError(`qchain supports only a 'file' node below a format node in json: file names, not '${fd}'`);
    throw new ImageError(`Unknown driver '${fd}'`);
  }
  const filename = fileOpts.get('filename');
  fileOpts.delete('filename');
  if (typeof filename !== 'string') throw new ImageError("The 'file' block driver requires a file name");
  fileOpts.delete('node-name');
  let readOnly = false;
  if (fileOpts.has('read-only')) {
    readOnly = boolOption('read-only', fileOpts.get('read-only') as JsonValue);
    fileOpts.delete('read-only');
  }
  let noLock = false;
  if (fileOpts.has('locking')) {
    const l = fileOpts.get('locking');
    if (l !== 'on' && l !== 'off' && l !== 'auto') throw new ImageError(`Parameter 'locking' does not accept value '${String(l)}'`);
    noLock = l === 'off';
    fileOpts.delete('locking');
  }
  refuseUnsupported(fileOpts.keys(), FILE_UNSUPPORTED, 'file');
  const spec: NodeSpec = { driver, filename, noLock, readOnly, qcow2: new Map(), leftover: [], fileLeftover: firstQdictKey([...fileOpts.keys()]) };
  // Generic block options.
  m.delete('node-name');
  if (m.has('read-only')) {
    spec.readOnly = boolOption('read-only', m.get('read-only') as JsonValue) || readOnly;
    m.delete('read-only');
  }
  // The backing: null (no backing) is always taken; options only when the backing is opened.
  if (m.has('backing') && m.get('backing') === null) {
    spec.backing = null;
    m.delete('backing');
  } else if (!noBacking) {
    const b = m.get('backing');
    const sub = extract(m, 'backing');
    if (typeof b === 'string') spec.backing = { ref: b };
    else if (sub.size) spec.backing = { options: sub };
    // Another value (a number, {}) is dropped: the header's chain is opened.
    m.delete('backing');
  }
  for (const k of QCOW2_OPTIONS) {
    if (!m.has(k)) continue;
    spec.qcow2.set(k, m.get(k) as JsonValue);
    m.delete(k);
  }
  spec.leftover = [...m.keys()];
  return spec;
}

/** QEMU's size option parsing (qemu_opt_get_size: a number or a string with a suffix). */
function sizeOption(name: string, v: JsonValue): number {
  const s = typeof v === 'number' && Number.isInteger(v) && v >= 0 ? String(v) : typeof v === 'string' ? v : null;
  const r = s === null ? null : qemuStrtosz(s);
  if (!r?.ok) {
    throw new ImageError(`Parameter '${name}' expects a non-negative number below 2^64\n` +
      'Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.');
  }
  return Number(r.value);
}

/** The qcow2 cache options of a description (values checked; they apply if the image is qcow2). */
export function qcow2CacheOptions(spec: NodeSpec): CacheSizeOptions | undefined {
  if (!spec.qcow2.size) return undefined;
  const c: CacheSizeOptions = {};
  for (const [k, v] of spec.qcow2) {
    const n = sizeOption(k, v);
    if (k === 'l2-cache-size') c.l2CacheBytes = n;
    else if (k === 'refcount-cache-size') c.refcountCacheBytes = n;
    else c.cacheSize = n;
  }
  return c;
}

/** QEMU's error for the options nobody took, if any (the first in its order). */
export function leftoverError(spec: NodeSpec, format: string): ImageError | null {
  // Options QEMU has for this format but qchain does not implement come first, naming qchain.
  try {
    refuseUnsupported(spec.leftover, UNSUPPORTED[format] ?? [], format);
  } catch (e) {
    return e as ImageError;
  }
  // The qcow2 options are left over for another format.
  const k = firstQdictKey(format === 'qcow2' ? spec.leftover : [...spec.leftover, ...spec.qcow2.keys()]);
  return k === undefined ? null : new ImageError(`Block format '${format}' does not support the option '${k}'`);
}

export function fileLeftoverError(spec: NodeSpec): ImageError | null {
  return spec.fileLeftover === undefined ? null : new ImageError(`Block protocol 'file' doesn't support the option '${spec.fileLeftover}'`);
}
