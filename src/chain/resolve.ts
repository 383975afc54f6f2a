/**
 * Backing file name resolution, as QEMU does it: a relative name is joined lexically to the
 * directory of the overlay's path as given (no realpath, no normalisation); absolute names are
 * used as they are. Protocol prefixes are refused; `json:` descriptions are json-filename.ts's.
 */
import { ImageError } from '../image/errors.js';

/** QEMU's path_combine: dirname(base) + '/' + name, keeping `..` segments as written. */
export function combinePath(base: string, name: string): string {
  if (name.startsWith('/')) return name;
  const slash = base.lastIndexOf('/');
  return slash < 0 ? name : base.slice(0, slash + 1) + name;
}

/** Strips a `file:` prefix; refuses other protocols (json: names are not plain: see json-filename.ts). */
export function plainBackingName(name: string): string {
  if (name.startsWith('json:')) throw new ImageError(`Not a plain file name (a json: description): '${name}'`);
  const m = /^([A-Za-z0-9+.-]+):/.exec(name);
  if (m && !name.slice(0, m[0].length).includes('/')) {
    if (m[1] === 'file') return name.slice(5);
    throw new ImageError(`Unknown protocol '${m[1]}'`);
  }
  return name;
}

/** QEMU's path_has_protocol: a ':' before any '/' ('json:{...}', 'file:x', 'nbd:...'). */
export function hasProtocol(name: string): boolean {
  const m = /[:/\\]/.exec(name);
  return m !== null && m[0] === ':';
}

/**
 * The full backing file name QEMU shows (`full-backing-filename`): names with a protocol prefix
 * (json: pseudo-filenames included) are taken as they are, others are joined to the overlay's folder.
 */
export function fullBackingName(overlayPath: string, name: string): string {
  return hasProtocol(name) ? name : combinePath(overlayPath, name);
}

/**
 * The name to open for a layer's stored backing name: joined to the overlay's path, or a
 * `json:` description as it is (its file names are relative to the current directory).
 */
export function backingOpenName(overlayPath: string, stored: string): string {
  return stored.startsWith('json:') ? stored : combinePath(overlayPath, plainBackingName(stored));
}
