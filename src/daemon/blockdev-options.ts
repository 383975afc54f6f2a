/**
 * blockdev-add's argument names as QEMU 7.2's QAPI schema defines them (BlockdevOptions for the
 * file, raw and qcow2 drivers): an unknown name is refused with QEMU's text, as its input
 * visitor does before anything is opened. Options QEMU has and qchain does not implement are
 * refused with a clear message when they ask for other than the default, never silently ignored
 * (cache.direct=on; detect-zeroes=unmap on protocol nodes).
 */
import { QmpError, type DetectZeroes } from './graph.js';

type Args = Record<string, unknown>;

const COMMON = ['driver', 'node-name', 'discard', 'cache', 'read-only', 'auto-read-only', 'force-share', 'detect-zeroes'];
const BY_DRIVER: Record<string, string[]> = {
  file: ['filename', 'pr-manager', 'locking', 'aio', 'aio-max-batch', 'drop-cache', 'x-check-cache-dropped'],
  raw: ['file', 'offset', 'size'],
  qcow2: ['file', 'backing', 'lazy-refcounts', 'pass-discard-request', 'pass-discard-snapshot', 'pass-discard-other', 'overlap-check',
    'cache-size', 'l2-cache-size', 'l2-cache-entry-size', 'refcount-cache-size', 'cache-clean-interval', 'encrypt', 'data-file'],
};
const CACHE = ['direct', 'no-flush'];

/** Throws QEMU's "Parameter 'x' is unexpected" for a name the driver's options do not have (`prefix` for nested objects). */
export function checkBlockdevNames(a: Args, prefix = ''): void {
  const driver = typeof a.driver === 'string' ? a.driver : '';
  const known = BY_DRIVER[driver];
  if (!known) return; // unknown drivers are refused by name elsewhere
  for (const k of Object.keys(a)) {
    if (!COMMON.includes(k) && !known.includes(k)) throw new QmpError(`Parameter '${prefix}${k}' is unexpected`);
  }
  const cache = a.cache;
  if (cache && typeof cache === 'object') {
    for (const k of Object.keys(cache)) if (!CACHE.includes(k)) throw new QmpError(`Parameter '${prefix}cache.${k}' is unexpected`);
  }
  if (a.file && typeof a.file === 'object') checkBlockdevNames(a.file as Args, `${prefix}file.`);
}

/**
 * Values qchain does not implement, refused (QEMU's own checks first). `discard` is the node's
 * discard option as given.
 */
export function checkBlockdevSupport(a: Args, prefix = ''): void {
  const dz = a['detect-zeroes'];
  if (dz !== undefined) {
    if (dz !== 'off' && dz !== 'on' && dz !== 'unmap') throw new QmpError(`Parameter '${prefix}detect-zeroes' does not accept value '${String(dz)}'`);
    if (dz === 'unmap' && a.discard !== 'unmap') throw new QmpError('setting detect-zeroes to unmap is not allowed without setting discard operation to unmap');
    // On a protocol node the writes are the format driver's host writes. With =on a zero buffer
    // becomes a zero write that keeps the range allocated (fallocate ZERO_RANGE), which is what
    // writing it does: the same file size, contents and map (the host may count an extent block
    // more or less), so it is accepted and the zeroes are written. With =unmap QEMU 7.2 punches holes with
    // KEEP_SIZE, so clusters allocated at the end of a qcow2 file stay past its end and
    // qemu-img check reports errors: not reproduced.
    if (dz === 'unmap' && a.driver === 'file') throw new QmpError('detect-zeroes=unmap is not supported by qchain on protocol nodes');
  }
  const cache = a.cache as Args | undefined;
  if (cache && typeof cache === 'object') {
    for (const k of CACHE) {
      if (cache[k] !== undefined && typeof cache[k] !== 'boolean') throw new QmpError(`Invalid parameter type for '${prefix}cache.${k}', expected: boolean`);
    }
    if (cache.direct === true) throw new QmpError('cache.direct=on is not supported by qchain (I/O goes through the page cache)');
  }
  if (a.file && typeof a.file === 'object') checkBlockdevSupport(a.file as Args, `${prefix}file.`);
}

/** QEMU's warning for `"backing": ""` (bdrv_open_inherit), printed before the node is opened. */
export const EMPTY_BACKING_WARNING = 'warning: Use of "backing": "" is deprecated; use "backing": null instead';

/**
 * A qcow2 node's `backing` (BlockdevRefOrNull): a node name, null for no backing, undefined when
 * absent (the header's chain is opened). The string "null" is a node name like any other; the
 * empty string means no backing, as null, and `warn` is called with QEMU's deprecation warning.
 * Backing options given inline (an object) are refused: qchain attaches named nodes only.
 */
export function backingRef(v: unknown, warn: (line: string) => void): string | null | undefined {
  if (v === undefined || v === null) return v;
  if (typeof v === 'string') {
    if (v !== '') return v;
    warn(EMPTY_BACKING_WARNING);
    return null;
  }
  if (typeof v === 'object' && !Array.isArray(v)) throw new QmpError('backing given as options is not supported by qchain (add the backing node, then name it: backing=NODE)');
  throw new QmpError("Invalid parameter type for 'backing', expected: BlockdevRefOrNull");
}

/**
 * A node's detect-zeroes and cache.no-flush (checked by checkBlockdevSupport); `noFlushGiven`
 * is undefined when no-flush was not given (an inline file then inherits its format node's).
 */
export function nodeWriteOptions(a: Args): { detectZeroes: DetectZeroes; noFlush: boolean; noFlushGiven: boolean | undefined } {
  const dz = a['detect-zeroes'];
  const cache = a.cache && typeof a.cache === 'object' ? a.cache as Args : {};
  const nf = cache['no-flush'];
  return { detectZeroes: dz === 'on' || dz === 'unmap' ? dz : 'off', noFlush: nf === true, noFlushGiven: typeof nf === 'boolean' ? nf : undefined };
}
