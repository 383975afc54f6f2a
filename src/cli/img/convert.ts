/** `qemu-img convert`: flatten what the guest sees into a new (or existing) image. */
import fs from 'node:fs';
import type { CliContext } from '../context.js';
import { CliError, UsageError } from '../util/errors.js';
import { accumulateOptions, hasHelpOption, parseOptString, parseOptionSize, parseSize } from '../util/options.js';
import { ProgressPrinter } from '../util/progress.js';
import { FORCE_SHARE, HELP, IMAGE_OPTS, OBJECT, PROG, asCliError, formatArg, outputFormatArg, open, parseArgs } from './common.js';
import type { Chain } from '../../chain/chain.js';
import type { ImageFormat } from '../../chain/open.js';
import { FileStorage } from '../../storage/file.js';
import { cacheDirect, validCacheMode } from './chainops-common.js';
import { createQcow2, validateCreateOptions, type Preallocation, type Qcow2CreateOptions } from '../../qcow2/create.js';
import { copyChains, type CopyOptions } from '../../ops/copy.js';
import { copyChainsCompressed } from '../../ops/copy-compressed.js';
import { Qcow2Image } from '../../qcow2/image.js';
import type { Qcow2Bitmaps } from '../../qcow2/bitmaps.js';
import { checkBitmaps, copyBitmaps, persistentBitmaps } from '../../ops/copy-bitmaps.js';

export async function convertMain(argv: string[], ctx: CliContext): Promise<number> {
  const { opts, rest } = parseArgs(argv, ':hf:O:B:CcF:o:l:S:pt:T:qnm:WUr:', [HELP, OBJECT, IMAGE_OPTS,
    { name: 'target-image-opts', hasArg: 'no', val: 'TIO' }, { name: 'salvage', hasArg: 'no', val: 'SALVAGE' },
    { name: 'target-is-zero', hasArg: 'no', val: 'TIZ' }, { name: 'bitmaps', hasArg: 'no', val: 'BITMAPS' },
    { name: 'skip-broken-bitmaps', hasArg: 'no', val: 'SBB' }, FORCE_SHARE]);
  let srcFmt: ImageFormat | undefined, outFmt: ImageFormat = 'raw';
  let backing: string | undefined, backingFmt: string | undefined, optstr: string | undefined;
  let compress = false, progress = false, noCreate = false, targetIsZero = false;
  let sparse = 4096, parallel = 8, outOfOrder = false;
  let forceShare = false, bitmaps = false, skipBroken = false;
  // qemu-img convert writes its output with cache=unsafe unless told otherwise: no flushes.
  // Without -t, qchain also writes the bulk data with O_DIRECT where the file system allows it
  // (see cacheDirect): -t unsafe or -t writeback keep it in the page cache.
  let cache: string | undefined, srcCache = 'writeback';
  for (const o of opts) {
    const a = o.arg as string;
    switch (o.opt) {
      case 'h': ctx.stdout.write('usage: qchain img convert [-c] [-p] [-q] [-n] [-f fmt] [-O output_fmt] [-B backing_file [-F backing_fmt]] [-o options] [-S sparse_size] [-m num_coroutines] [-W] filename [filename2 [...]] output_filename\n'); return 0;
      case 'f': srcFmt = formatArg(a); break;
      case 'U': forceShare = true; break;
      case 'O': outFmt = outputFormatArg(a); break;
      case 'B': backing = a; break;
      case 'F': backingFmt = a; break;
      case 'c': compress = true; break;
      case 'o': optstr = accumulateOptions(optstr, a); break;
      case 'S': sparse = sparseSizeArg(a); break;
      case 'p': progress = true; break;
      case 'q': progress = false; break;
      case 'n': noCreate = true; break;
      case 'm': {
        const n = Number(a);
        if (!Number.isInteger(n) || n < 1 || n > 16) throw new CliError('Invalid number of coroutines. Allowed number of coroutines is between 1 and 16');
        parallel = n;
        break;
      }
      case 'TIZ': targetIsZero = true; break;
      case 'W': outOfOrder = true; break;
      case 't': cache = a; break;
      case 'T': srcCache = a; break;
      case 'BITMAPS': bitmaps = true; break;
      case 'SBB': skipBroken = true; break;
      case 'l': throw new CliError('Converting from an internal snapshot (-l) is not supported yet');
      case 'IMAGE_OPTS': case 'TIO': throw new UsageError('--image-opts is not supported by qchain');
      default: break; // -C, -r, --salvage: accepted, no effect here
    }
  }
  if (optstr !== undefined && hasHelpOption(optstr)) {
    const { createMain } = await import('./create.js');
    return createMain(['-f', outFmt, '-o', optstr], ctx);
  }
  if (skipBroken && !bitmaps) throw new CliError('Use of --skip-broken-bitmaps requires --bitmaps');
  if (rest.length < 2) throw new CliError('Must specify image file name');
  if (compress) {
    const prealloc = optstr !== undefined ? new Map(parseOptString(optstr)).get('preallocation') : undefined;
    if (!noCreate && outFmt !== 'qcow2') throw new CliError('Compression not supported for this file format');
    if (prealloc !== undefined && prealloc !== 'off') throw new CliError('Compression and preallocation not supported at the same time');
  }
  if (targetIsZero && !noCreate) throw new CliError('--target-is-zero requires use of -n flag');
  const { parseCreateOptions } = await import('./create.js');
  if (noCreate && optstr !== undefined) throw new CliError('-o has no effect when skipping image creation');
  const target = rest[rest.length - 1];
  const srcNames = rest.slice(0, -1);
  if (bitmaps && srcNames.length > 1) throw new CliError('Copying bitmaps only possible with single source');

  if (!validCacheMode(srcCache)) throw new CliError(`Invalid source cache option: ${srcCache}`);
  const sources: Chain[] = [];
  let dst: Chain | null = null;
  const bar = new ProgressPrinter(progress, ctx.stdout, 1.0, ctx.stderr);
  let hasBacking = false;
  try {
    for (const s of srcNames) sources.push(await open(s, { format: srcFmt, readOnly: true, forceShare }, ctx));
    if (bitmaps) {
      const srcBitmaps = persistentBitmaps(sources[0].top);
      if (!srcBitmaps) throw new CliError('Source lacks bitmap support');
      try {
        checkBitmaps(srcBitmaps, skipBroken);
      } catch (e) {
        throw asCliError(e);
      }
    }
    const total = sources.reduce((a, c) => a + c.size, 0);
    // As qemu-img 7.2, once the sources are open: the target's options, where -B/-F override
    // -o backing_file/backing_fmt; a backing file from either makes the copy top-only.
    let targetBacking = backing, targetBackingFmt = backingFmt;
    if (!noCreate) {
      const kv = parseCreateOptions(outFmt, optstr);
      if (outFmt === 'raw' && backing !== undefined) throw new CliError(`Backing file not supported for file format '${outFmt}'`);
      if (outFmt === 'raw' && backingFmt !== undefined) throw new CliError(`Backing file format not supported for file format '${outFmt}'`);
      targetBacking = backing ?? kv.get('backing_file');
      targetBackingFmt = backingFmt ?? kv.get('backing_fmt');
    }
    hasBacking = targetBacking !== undefined;
    if (targetIsZero && hasBacking) {
      // qemu-img 7.2 reports this one and exits with status 0.
      ctx.stderr.write(`${PROG}: Cannot use --target-is-zero when the destination image has a backing file\n`);
      return 0;
    }
    if (srcNames.length > 1 && hasBacking) throw new CliError('Having a backing file for the target makes no sense when concatenating multiple input images');
    if (!noCreate && hasBacking && !targetBackingFmt) throw new CliError('Use of backing file requires explicit backing format');
    if (!noCreate) await createTarget(target, outFmt, total, optstr, targetBacking, targetBackingFmt);
    if (cache !== undefined && !validCacheMode(cache)) throw new CliError(`Invalid cache option: ${cache}`);
    try {
      dst = await open(target, { format: outFmt, readOnly: false, noFlush: (cache ?? 'unsafe') === 'unsafe', direct: cacheDirect(cache, 'auto') }, ctx);
    } catch (e) {
      throw new CliError(asCliError(e).message);
    }
    if (bitmaps && !persistentBitmaps(dst.top)) throw new CliError(`Format driver '${dst.top.format}' does not support bitmaps`);
    if (noCreate && dst.size < total) throw new CliError('output file is smaller than input file');
    if (compress && !(dst.top instanceof Qcow2Image)) throw new CliError('Compression not supported for this file format');
    if (progress) bar.print(0, 100);
    const copy = compress
      ? (s: Chain[], _t: unknown, o: CopyOptions) => copyChainsCompressed(s, dst!.top as Qcow2Image, o)
      : copyChains;
    await copy(sources, dst.top, {
      sparseSize: sparse,
      topOnly: hasBacking,
      parallel,
      targetIsZero: (!noCreate && !hasBacking) || targetIsZero,
      outOfOrder,
      allocateAll: sparse === 0 && !noCreate,
      // Only with -p: progress needs a first pass over the block status to count the requests.
      onProgress: progress ? (f) => bar.print(f * 100, 0) : undefined,
    });
    if (compress) {
      // qemu-img ends a compressed copy with a zero-length compressed write, which rounds the
      // file up to a whole sector.
      const st = dst.top.storage;
      const len = await st.size();
      if (len % 512 !== 0) await st.truncate(len + 512 - (len % 512));
    }
    if (bitmaps) {
      try {
        await copyBitmaps(persistentBitmaps(sources[0].top) as Qcow2Bitmaps, persistentBitmaps(dst.top) as Qcow2Bitmaps,
          (m) => ctx.stderr.write(`${PROG}: warning: ${m}\n`));
      } catch (e) {
        throw new CliError(asCliError(e).message);
      }
    }
    await dst.flush();
    if (progress) {
      bar.print(100, 0);
      bar.end();
    }
  } catch (e) {
    const msg = asCliError(e).message;
    if (e instanceof CliError || msg.startsWith('Could not open') || msg.includes(': error while') || msg.startsWith('error while reading')) throw e instanceof CliError ? e : new CliError(msg);
    throw new CliError(`error while writing at byte 0: ${msg}`);
  } finally {
    for (const s of sources) await s.close().catch(() => {});
    if (dst) await dst.close().catch(() => {});
  }
  return 0;
}

async function createTarget(file: string, fmt: ImageFormat, size: number, optstr: string | undefined, backing?: string, backingFmt?: string): Promise<void> {
  const kv = new Map<string, string>(optstr ? parseOptString(optstr) : []);
  const st = await FileStorage.open(file, { create: true, lock: 'write' }).catch((e: Error) => { throw new CliError(`${file}: error while converting ${fmt}: ${e.message}`); });
  try {
    if (fmt === 'raw') {
      await st.truncate(Math.ceil(size / 512) * 512);
      return;
    }
    const compat = kv.get('compat');
    const o: Qcow2CreateOptions = {
      size,
      version: compat === '0.10' || compat === 'v2' ? 2 : 3,
      clusterSize: kv.has('cluster_size') ? Number(parseOptionSize('cluster_size', kv.get('cluster_size') as string)) : undefined,
      refcountBits: kv.has('refcount_bits') ? Number(kv.get('refcount_bits')) : undefined,
      lazyRefcounts: kv.get('lazy_refcounts') === 'on',
      extendedL2: kv.get('extended_l2') === 'on',
      compressionType: kv.get('compression_type') as 'zlib' | 'zstd' | undefined,
      backingFile: backing ?? null,
      backingFormat: backingFmt ?? null,
      preallocation: (kv.get('preallocation') ?? 'off') as Preallocation,
    };
    try {
      const ct = kv.get('compression_type');
      if (ct !== undefined && ct !== 'zlib' && ct !== 'zstd') throw new Error(`Parameter 'compression-type' does not accept value '${ct}'`);
      validateCreateOptions(o);
    } catch (e) {
      // qcow2_co_create_opts deletes the file it created when the options are refused.
      await st.close().catch(() => {});
      await fs.promises.unlink(file).catch(() => {});
      throw new CliError(`${file}: error while converting qcow2: ${asCliError(e).message}`);
    }
    const img = await createQcow2(st, o);
    await img.close();
  } finally {
    await st.close().catch(() => {});
  }
}

/** `-S`: qemu-img's sparse detection size (a multiple of 512 up to 16 MiB; 0 disables). */
function sparseSizeArg(a: string): number {
  let v: number;
  try {
    v = parseSize(a, { name: 'buffer size for sparse output' });
  } catch {
    throw new CliError('Invalid buffer size for sparse output specified. You may use k, M, G, T, P or E suffixes for\n' +
      'kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.');
  }
  if (v % 512 !== 0 || v > 16 * 1024 * 1024) {
    throw new CliError('Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to 16777216. Select 0 to disable sparse detection (fully allocates output).');
  }
  return v;
}
