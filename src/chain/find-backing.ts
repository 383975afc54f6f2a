/**
 * QEMU's bdrv_find_backing_image: which layer of an opened chain a user-given name designates.
 * For each layer from the top, the name is made absolute against that layer's directory and
 * compared (after realpath) with the layer's own backing file name resolved the same way; the
 * match is that layer's backing file. Names with a protocol prefix are compared as strings. A
 * layer whose backing was overridden (a json: description) is matched by its backing layer's
 * file name only, as it is (QEMU compares with the node's filename; a backing that is itself
 * overridden would show a json: name, which is not matched here).
 */
import fs from 'node:fs';
import type { Chain } from './chain.js';
import { combinePath } from './resolve.js';

const hasProtocol = (s: string): boolean => /^[A-Za-z0-9+.-]+:/.test(s) && !s.slice(0, s.indexOf(':')).includes('/');

function realpath(p: string): string | null {
  try {
    return fs.realpathSync(p);
  } catch {
    return null;
  }
}

/** Depth (≥ 1) of the layer `name` designates in `chain`, or null when no layer matches. */
export function findBackingImage(chain: Chain, name: string): number | null {
  for (let d = 0; d + 1 < chain.depth; d++) {
    const cur = chain.layers[d];
    if (cur.backingOverridden) {
      const below = chain.layers[d + 1];
      if (!below.backingOverridden && name === below.filename) return d + 1;
      continue;
    }
    const stored = cur.driver.backingFile;
    if (!stored) continue;
    if (hasProtocol(name) || hasProtocol(stored)) {
      if (name === stored || name === combinePath(cur.filename, stored)) return d + 1;
      continue;
    }
    const wanted = realpath(combinePath(cur.filename, name));
    if (wanted === null) continue;
    const actual = realpath(combinePath(cur.filename, stored));
    if (actual !== null && actual === wanted) return d + 1;
  }
  return null;
}
