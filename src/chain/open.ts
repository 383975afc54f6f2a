/**
 * Opening images and their backing chains by file name, with QEMU's rules: the backing format
 * comes from the header (probed only when the header has none, and then only for reading),
 * relative names resolve against the overlay's directory, loops and excessive depth are refused,
 * and an optional gate refuses implicit opens outside allowed directories.
 */
import fs from 'node:fs';
import path from 'node:path';
import { FileStorage, type DirectMode } from '../storage/file.js';
import type { LockMode } from '../storage/lock.js';
import type { Storage } from '../storage/storage.js';
import { StorageError } from '../storage/storage.js';
import type { BlockDriver } from '../image/driver.js';
import { ImageError } from '../image/errors.js';
import { Qcow2Image } from '../qcow2/image.js';
import { RawImage } from '../raw/raw.js';
import { QcowImage } from '../qcow/image.js';
import { probeQcow } from '../qcow/header.js';
import { MAX_CHAIN_DEPTH } from '../qcow2/constants.js';
import { Chain, type Layer } from './chain.js';
import type { CacheSizeOptions } from '../qcow2/cache-sizes.js';
import { combinePath, plainBackingName } from './resolve.js';
import { fileLeftoverError, isJsonName, leftoverError, nodeSpec, parseJsonName, qcow2CacheOptions, type FlatOptions, type NodeSpec } from './json-filename.js';

export type ImageFormat = 'qcow2' | 'raw' | 'qcow';

export interface OpenOptions {
  /** Format of the named image; probed when absent. */
  format?: ImageFormat;
  /** Open the named image read-only (backing files are read-only unless listed in writableDepths). */
  readOnly?: boolean;
  /** Depths (1 = the named image's backing file, ...) to open read-write, e.g. a commit's base. */
  writableDepths?: ReadonlySet<number>;
  /** Open only the named image, not its backing chain. */
  noBacking?: boolean;
  /** Maximum number of images in the chain. */
  maxDepth?: number;
  /** Gate for backing files: return false to refuse opening `resolvedPath`. */
  allowBacking?: (resolvedPath: string) => boolean;
  /** Diagnostic lines (corruption notices, repairs). */
  log?: (line: string) => void;
  /** Name the file once in errors about the file itself (qemu-img create's backing check does). */
  singleFilePrefix?: boolean;
  /** Do not repair a dirty image on read-write open (check does its own). */
  noRepair?: boolean;
  /** Metadata only: no guest data will be read (QEMU's BDRV_O_NO_IO; `info`). */
  noIo?: boolean;
  /** The top is opened to be checked (QEMU's BDRV_O_CHECK; `check`). */
  checkMode?: boolean;
  /** Share every permission with other openers (qemu-img -U); only for read-only opens. */
  forceShare?: boolean;
  /** Take no image locks at all (default: QEMU-compatible locks). */
  noLock?: boolean;
  /** The named image's flushes do nothing (cache=unsafe), and those of the writable backing layers. */
  noFlush?: boolean;
  /** Bulk data writes bypass the page cache, in every writable layer (see FileOpenOptions.direct). */
  direct?: DirectMode;
  /** The named image's qcow2 cache options (QEMU's l2-cache-size, cache-size). */
  cache?: CacheSizeOptions;
  /** L2 cache size of images opened without cache options (backing files; default QEMU's 32 MiB). */
  defaultL2CacheBytes?: number;
}

export const FORMATS: readonly ImageFormat[] = ['qcow2', 'raw', 'qcow'];

export function isFormat(s: string): s is ImageFormat {
  return (FORMATS as readonly string[]).includes(s);
}

/** Guess the format from the first bytes, as QEMU's probe does for the formats we know. */
export async function probeFormat(storage: Storage): Promise<ImageFormat> {
  const head = Buffer.alloc(512);
  await storage.read(head, 0);
  if (Qcow2Image.probe(head)) return 'qcow2';
  // qcow v1 (QFI\xfb, version 1): never raw, or a guest write could clobber its header.
  return probeQcow(head) ? 'qcow' : 'raw';
}

async function openStorage(file: string, readOnly: boolean, lock: LockMode, noFlush = false, direct: DirectMode = 'off'): Promise<FileStorage> {
  if (file === '') throw new ImageError("Could not open '': The 'file' block driver requires a file name");
  try {
    return await FileStorage.open(file, { readOnly, lock, noFlush, direct });
  } catch (e) {
    // Lock conflicts are named by the caller (QEMU prefixes them once, or not at all for backing files).
    if (e instanceof StorageError && (e.code === 'ELOCKED' || e.code === 'ENOTREG')) throw new ImageError(e.message, e.code);
    if (e instanceof StorageError) throw new ImageError(`Could not open '${file}': ${e.message}`, e.code);
    throw e;
  }
}

/** Open one image file with a known or probed format. Errors read "Could not open 'F': reason". */
export interface ImageOpenOptions {
  format?: ImageFormat; readOnly?: boolean; log?: (l: string) => void; noRepair?: boolean; noIo?: boolean; checkMode?: boolean;
  lock?: LockMode; noFlush?: boolean; direct?: DirectMode;
  /** qcow2 cache options (l2-cache-size, cache-size) and the L2 cache size without them. */
  cache?: CacheSizeOptions; defaultL2CacheBytes?: number;
}

export async function openImage(file: string, opts: ImageOpenOptions = {}): Promise<{ driver: BlockDriver; probed: boolean }> {
  const storage = await openStorage(file, !!opts.readOnly, opts.lock ?? (opts.readOnly ? 'read' : 'write'), opts.noFlush, opts.direct);
  try {
    const fmt = opts.format ?? (await probeFormat(storage));
    const driver = fmt === 'qcow2'
      ? await Qcow2Image.open(storage, { readOnly: opts.readOnly, log: opts.log, noRepair: opts.noRepair, noIo: opts.noIo, checkMode: opts.checkMode,
        l2CacheBytes: opts.cache?.l2CacheBytes ?? (opts.cache?.cacheSize === undefined ? opts.defaultL2CacheBytes : undefined),
        refcountCacheBytes: opts.cache?.refcountCacheBytes, cacheSize: opts.cache?.cacheSize })
      : fmt === 'qcow' ? await QcowImage.open(storage, { readOnly: opts.readOnly, noIo: opts.noIo })
        : await RawImage.open(storage, { readOnly: opts.readOnly });
    if (driver instanceof RawImage && !opts.format && !driver.readOnly) {
      // A probed raw image must never become something else through guest writes.
      driver.restrictBlock0 = true;
      opts.log?.(`WARNING: Image format was not specified for '${file}' and probing guessed raw.\n` +
        '         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n' +
        "         Specify the 'raw' format explicitly to remove the restrictions.");
    }
    return { driver, probed: !opts.format };
  } catch (e) {
    await storage.close().catch(() => {});
    if (e instanceof ImageError && !e.message.startsWith('Could not open') && e.errno !== 'ELOCKED') {
      throw new ImageError(`Could not open '${file}': ${e.message}`, e.errno);
    }
    throw e;
  }
}

function identity(file: string): string {
  try {
    const st = fs.statSync(file);
    return `${st.dev}:${st.ino}`;
  } catch {
    return path.resolve(file);
  }
}

/** What a layer is opened from: a file name, or a `json:` description (its file name inside). */
interface Source {
  name: string;
  spec?: NodeSpec;
  format?: ImageFormat;
  /** Named by a header (not by the caller): the directory gate and loop detection apply. */
  implicit: boolean;
  /** The name as the header stores it (loop errors). */
  stored: string;
}

/** Open the image of a description: its file with its options, then its file options checked. */
async function openSpec(spec: NodeSpec, o: ImageOpenOptions): Promise<BlockDriver> {
  const readOnly = !!o.readOnly || !!spec.readOnly;
  const lock: LockMode | undefined = spec.noLock ? 'none' : readOnly && o.lock === 'write' ? 'read' : o.lock;
  const cache = qcow2CacheOptions(spec);
  const { driver } = await openImage(spec.filename, { ...o, format: spec.driver as ImageFormat | undefined, readOnly, lock, cache: cache ?? o.cache });
  const err = fileLeftoverError(spec);
  if (err) {
    await driver.close().catch(() => {});
    throw err;
  }
  return driver;
}

/** The description of a `json:` name given by the caller (`-f` replaces its driver). */
function topSource(file: string, opts: OpenOptions): Source {
  if (!isJsonName(file)) return { name: file, format: opts.format, implicit: false, stored: file };
  try {
    const spec = nodeSpec(parseJsonName(file), { formatOverride: opts.format, noBacking: opts.noBacking });
    return { name: spec.filename, spec, implicit: false, stored: file };
  } catch (e) {
    if (e instanceof ImageError) throw new ImageError(`Could not open '${file}': ${e.message}`, e.errno);
    throw e;
  }
}

/**
 * Open `file` and (unless noBacking) its whole backing chain. `file` may be a `json:{...}`
 * description (see json-filename.ts), and so may the backing file names headers store: a
 * described backing replaces the header's (or `"backing": null` drops it). Every file a header
 * leads to, described or named, passes the directory gate and the loop check.
 */
export async function openChain(file: string, opts: OpenOptions = {}): Promise<Chain> {
  const maxDepth = opts.maxDepth ?? MAX_CHAIN_DEPTH;
  const lockFor = (readOnly: boolean): LockMode =>
    opts.noLock ? 'none' : readOnly ? (opts.forceShare ? 'shared' : 'read') : 'write';
  const layers: Layer[] = [];
  /** Each layer's description and error prefix, for the left-over option check at the end. */
  const specs: Array<{ spec?: NodeSpec; prefix: string; implicit?: boolean }> = [];
  const seen = new Set<string>();
  let src: Source;
  try {
    src = topSource(file, opts);
    let top: BlockDriver;
    try {
      const o: ImageOpenOptions = { readOnly: opts.readOnly, log: opts.log, noRepair: opts.noRepair, noIo: opts.noIo, checkMode: opts.checkMode, lock: lockFor(!!opts.readOnly), noFlush: opts.noFlush, direct: opts.direct,
        cache: opts.cache, defaultL2CacheBytes: opts.defaultL2CacheBytes };
      top = src.spec ? await openSpec(src.spec, o) : (await openImage(file, { ...o, format: opts.format })).driver;
    } catch (e) {
      if (src.spec && e instanceof ImageError) {
        // A description's file is named once (its own error), its format errors not at all.
        const own = `Could not open '${src.name}': `;
        const msg = !e.errno && e.message.startsWith(own) ? e.message.slice(own.length) : e.message;
        throw new ImageError(`Could not open '${file}': ${msg}`, e.errno);
      }
      if (e instanceof ImageError && e.errno === 'ELOCKED') throw new ImageError(`Could not open '${file}': ${e.message}`, e.errno);
      if (e instanceof ImageError && e.errno === 'ENOTREG') throw new ImageError(`Could not open '${file}': ${e.message}`, e.errno);
      // qemu-img names the file twice when the file itself cannot be opened (the block layer and
      // the protocol driver both prefix it); format errors are named once.
      if (e instanceof ImageError && e.errno && e.errno !== 'EIO' && e.message.startsWith(`Could not open '${file}': `) &&
        !opts.singleFilePrefix) {
        throw new ImageError(`Could not open '${file}': ${e.message}`, e.errno);
      }
      throw e;
    }
    layers.push({ driver: top, filename: src.name, backingOverridden: src.spec?.backing !== undefined });
    specs.push({ spec: src.spec, prefix: '' });
    seen.add(identity(src.name));
    let cur = layers[0];
    let curSpec = src.spec;
    let prefix = '';
    while (!opts.noBacking) {
      const fail = (msg: string, errno?: string): never => { throw new ImageError(`Could not open '${file}': ${prefix}${msg}`, errno); };
      let next: Source;
      const explicit = curSpec?.backing;
      if (explicit === null) break;
      if (explicit !== undefined) {
        // A described backing (the caller's, or one inside a description a header named).
        if (cur.driver.format === 'raw') fail("Driver doesn't support backing files");
        prefix += 'Could not open backing file: ';
        if ('ref' in explicit) fail(`Cannot find device='${explicit.ref}' nor node-name='${explicit.ref}'`);
        let spec: NodeSpec;
        try {
          spec = nodeSpec((explicit as { options: FlatOptions }).options, { defaultDriver: cur.driver.backingFormat ?? undefined });
        } catch (e) {
          if (e instanceof ImageError) fail(e.message, e.errno);
          throw e;
        }
        next = { name: spec.filename, spec, implicit: !!specs[layers.length - 1].implicit, stored: spec.filename };
      } else {
        const stored = cur.driver.backingFile;
        if (!stored) break;
        prefix += 'Could not open backing file: ';
        const fmtName = cur.driver.backingFormat;
        if (isJsonName(stored)) {
          // The header's backing format replaces the description's driver (QEMU joins the two, its own first).
          let spec: NodeSpec;
          try {
            spec = nodeSpec(parseJsonName(stored), { formatOverride: fmtName ?? undefined });
          } catch (e) {
            if (e instanceof ImageError) fail(e.message, e.errno);
            throw e;
          }
          next = { name: spec.filename, spec, implicit: true, stored };
        } else {
          next = { name: combinePath(cur.filename, plainBackingName(stored)), implicit: true, stored };
        }
        if (fmtName) {
          if (!isFormat(fmtName)) fail(`Unknown driver '${fmtName}'`);
          next.format = fmtName as ImageFormat;
        }
      }
      if (layers.length >= maxDepth) throw new ImageError(`Backing chain of '${file}' is deeper than ${maxDepth} images`);
      const name = next.name;
      const id = identity(name);
      if (next.implicit) {
        if (seen.has(id)) throw new ImageError(`Backing file '${next.stored}' creates an infinite loop.`, 'ELOOP');
        if (opts.allowBacking && !opts.allowBacking(path.resolve(name))) {
          fail(`Refusing to open '${name}': outside the allowed directories`, 'EACCES');
        }
      }
      seen.add(id);
      let opened: BlockDriver;
      try {
        const writable = !!opts.writableDepths?.has(layers.length);
        // Backing files inherit check mode (QEMU passes BDRV_O_CHECK down the chain).
        const o: ImageOpenOptions = { readOnly: !writable, log: opts.log, lock: lockFor(!writable), checkMode: opts.checkMode, defaultL2CacheBytes: opts.defaultL2CacheBytes,
          direct: opts.direct, noFlush: writable ? opts.noFlush : undefined };
        opened = next.spec ? await openSpec(next.spec, o) : (await openImage(name, { ...o, format: next.format })).driver;
      } catch (e) {
        if (e instanceof ImageError) {
          // A backing file's format errors are not named again (its file errors are).
          const own = `Could not open '${name}': `;
          const msg = !e.errno && e.message.startsWith(own) ? e.message.slice(own.length) : e.message;
          fail(msg, e.errno);
        }
        throw e;
      }
      const layer: Layer = { driver: opened, filename: name, backingOverridden: next.spec?.backing !== undefined };
      layers.push(layer);
      specs.push({ spec: next.spec, prefix, implicit: next.implicit });
      cur = layer;
      curSpec = next.spec;
    }
    // Options nobody took are refused once the node and its backing are open, the deepest first.
    for (let d = layers.length - 1; d >= 0; d--) {
      const { spec, prefix: p } = specs[d];
      const err = spec && leftoverError(spec, layers[d].driver.format);
      if (err) throw new ImageError(`Could not open '${file}': ${p}${err.message}`);
    }
    // A description's read-only=on refuses a writer once the node is open (QEMU's permission check).
    if (src.spec?.readOnly && !opts.readOnly) throw new ImageError(`Could not open '${file}': Block node is read-only`, 'EACCES');
  } catch (e) {
    for (const l of layers) await l.driver.close().catch(() => {});
    throw e;
  }
  return new Chain(layers);
}

/** Take the locks of an open chain (opened with noLock): the top for its mode, the rest read-only. */
export function relockChain(chain: Chain, opts: { readOnly: boolean; forceShare?: boolean }): void {
  chain.layers.forEach((l, depth) => {
    const st = l.driver.storage;
    if (!(st instanceof FileStorage)) return;
    const ro = depth > 0 || opts.readOnly;
    try {
      st.lock(ro ? (opts.forceShare ? 'shared' : 'read') : 'write');
    } catch (e) {
      if (e instanceof StorageError) throw new ImageError(depth === 0 ? `Could not open '${l.filename}': ${e.message}` : `Could not open backing file: ${e.message}`, e.code);
      throw e;
    }
  });
}
