/** `qemu-img commit`: copy the top's data into a backing file, then empty the top. */
import type { CliContext } from '../context.js';
import { CliError, UsageError } from '../util/errors.js';
import { parseSize } from '../util/options.js';
import { ProgressPrinter } from '../util/progress.js';
import { HELP, IMAGE_OPTS, OBJECT, asCliError, open, parseArgs } from './common.js';
import { cacheDirect, imageFormat, validCacheMode } from './chainops-common.js';
import type { Chain } from '../../chain/chain.js';
import { findBackingImage } from '../../chain/find-backing.js';
import { commit } from '../../ops/commit.js';

const USAGE = 'usage: qchain img commit [-q] [-f fmt] [-t cache] [-b base] [-r rate_limit] [-d] [-p] filename\n';

export async function commitMain(argv: string[], ctx: CliContext): Promise<number> {
  const { opts, rest } = parseArgs(argv, ':f:ht:b:dpqr:', [HELP, OBJECT, IMAGE_OPTS]);
  let fmt: string | undefined, cache: string | undefined, base: string | undefined;
  let drop = false, progress = false, quiet = false, rate = 0;
  for (const o of opts) {
    const a = o.arg as string;
    switch (o.opt) {
      case 'h': ctx.stdout.write(USAGE); return 0;
      case 'f': fmt = a; break;
      case 't': cache = a; break;
      case 'b': base = a; drop = true; break; // -b implies -d
      case 'd': drop = true; break;
      case 'p': progress = true; break;
      case 'q': quiet = true; break;
      case 'r': rate = parseSize(a, { name: 'rate limit' }); break;
      case 'IMAGE_OPTS': throw new UsageError('--image-opts is not supported by qchain');
      default: break;
    }
  }
  if (quiet) progress = false;
  if (rest.length !== 1) throw new UsageError('Expecting one image file name');
  const file = rest[0];
  if (cache !== undefined && !validCacheMode(cache)) throw new CliError(`Invalid cache option: ${cache}`);
  const format = imageFormat(fmt, file);
  // Commit ends with a flush of the base, so its bulk writes may as well go straight to the
  // device: the same durability, no page-cache copy, no host cache evicted (see PERFORMANCE.md).
  const direct = cacheDirect(cache, 'auto');

  // Without -b the base is the backing file: the chain opens once, with it writable. With -b
  // the base is found by name first, then the chain is opened again with that layer writable.
  let chain: Chain | null = await open(file, { format, readOnly: false, direct, noFlush: cache === 'unsafe', ...(base === undefined ? { writableDepths: new Set([1]) } : {}) }, ctx);
  const bar = new ProgressPrinter(progress, ctx.stdout, 1.0, ctx.stderr);
  bar.print(0, 100);
  try {
    let depth: number | null;
    if (base !== undefined) {
      depth = findBackingImage(chain, base);
      if (depth === null) throw new CliError(`Did not find '${base}' in the backing chain of '${file}'`);
      // Reopen with the base writable (backing files are otherwise read-only).
      await chain.close();
      chain = null;
      chain = await open(file, { format, readOnly: false, direct, noFlush: cache === 'unsafe', writableDepths: new Set([depth]) }, ctx);
    } else {
      depth = chain.depth > 1 ? 1 : null;
      if (depth === null) throw new CliError('Image does not have a backing file');
    }
    try {
      await commit(chain, depth, {
        drop,
        rateLimit: rate,
        onProgress: (done, total) => bar.print(total ? (done / total) * 100 : 0, 0),
      });
    } catch (e) {
      throw asCliError(e);
    }
    bar.print(100, 0);
  } finally {
    bar.end();
    if (chain) await chain.close().catch(() => {});
  }
  if (!quiet) ctx.stdout.write('Image committed.\n');
  return 0;
}
