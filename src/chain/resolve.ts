/**
 * Backing file name resolution, as QEMU does it: a relative name is joined lexically to the
 * directory of the overlay's path as given (no realpath, no normalisation); absolute names are
 * used as they are. Protocol prefixes and `json:` names are refused (they can point anywhere).
 */
import { ImageError } from '../image/errors.js';

/** QEMU's path_combine: dirname(base) + '/' + name, keeping `..` segments as written. */
export function combinePath(base: string, name: string): string {
  if (name.startsWith('/')) return name;
  const slash = base.lastIndexOf('/');
  return slash < 0 ? name : base.slice(0, slash + 1) + name;
}

/** Strips a `file:` prefix; refuses other protocols and json: pseudo-names. */
export function plainBackingName(name: string): string {
  if (name.startsWith('json:')) throw new ImageError(`Backing file names using the json: pseudo-protocol are not supported: '${name}'`);
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
