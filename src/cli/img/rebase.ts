/** `qemu-img rebase`: change an image's backing file, copying what differs (safe) or not (-u). */
import type { CliContext } from '../context.js';
import { CliError, UsageError, reportError } from '../util/errors.js';
import { ProgressPrinter } from '../util/progress.js';
import { FORCE_SHARE, HELP, IMAGE_OPTS, OBJECT, PROG, asCliError, open, parseArgs } from './common.js';
import { QEMU_FORMATS, cacheDirect, imageFormat, validCacheMode } from './chainops-common.js';
import type { Chain } from '../../chain/chain.js';
import { isFormat, openChain } from '../../chain/open.js';
import { findBackingImage } from '../../chain/find-backing.js';
import { backingOpenName } from '../../chain/resolve.js';
import { ImageError } from '../../image/errors.js';
import { changeBackingFile, rebaseCopy, type ChainView } from '../../ops/rebase.js';

const USAGE = 'usage: qchain img rebase [-q] [-f fmt] [-t cache] [-T src_cache] [-p] [-u] [-U] -b backing_file [-F backing_fmt] filename\n';

export async function rebaseMain(argv: string[], ctx: CliContext): Promise<number> {
  const { opts, rest } = parseArgs(argv, ':hf:F:b:upt:T:qU', [HELP, OBJECT, IMAGE_OPTS, FORCE_SHARE]);
  let fmt: string | undefined, backingFmt: string | undefined, backing: string | undefined;
  let cache: string | undefined, srcCache = 'writeback', unsafe = false, progress = false, quiet = false;
  for (const o of opts) {
    const a = o.arg as string;
    switch (o.opt) {
      case 'h': ctx.stdout.write(USAGE); return 0;
      case 'f': fmt = a; break;
      case 'F': backingFmt = a; break;
      case 'b': backing = a; break;
      case 'u': unsafe = true; break;
      case 'p': progress = true; break;
      case 't': cache = a; break;
      case 'T': srcCache = a; break;
      case 'q': quiet = true; break;
      case 'IMAGE_OPTS': throw new UsageError('--image-opts is not supported by qchain');
      default: break; // -U, --object: accepted, no effect here
    }
  }
  if (quiet) progress = false;
  if (rest.length !== 1) throw new UsageError('Expecting one image file name');
  if (!unsafe && backing === undefined) throw new UsageError('Must specify backing file (-b) or use unsafe mode (-u)');
  const file = rest[0];
  const bar = new ProgressPrinter(progress, ctx.stdout, 2.0, ctx.stderr);
  bar.print(0, 100);
  let chain: Chain | null = null, other: Chain | null = null;
  try {
    if (cache !== undefined && !validCacheMode(cache)) throw new CliError(`Invalid cache option: ${cache}`);
    if (!validCacheMode(srcCache)) throw new CliError(`Invalid source cache option: ${srcCache}`);
    // The old backing chain is not opened in unsafe mode (it may be missing or moved).
    // As commit: the rebase ends with a flush, so the copied data may go straight to the device.
    chain = await open(file, { format: imageFormat(fmt, file), readOnly: false, noBacking: unsafe, direct: cacheDirect(cache, 'auto'), noFlush: cache === 'unsafe' }, ctx);
    if (backingFmt !== undefined && !QEMU_FORMATS.includes(backingFmt)) throw new CliError(`Invalid format name: '${backingFmt}'`);
    if (!unsafe) {
      let next: ChainView | null = null;
      if (backing) {
        const real = backingOpenName(file, backing);
        const depth = findBackingImage(chain, real);
        if (depth !== null) next = { chain, depth };
        else {
          try {
            if (backingFmt !== undefined && !isFormat(backingFmt)) throw new ImageError(`Unknown driver '${backingFmt}'`);
            other = await openChain(real, { format: backingFmt as 'qcow2' | 'raw' | undefined, readOnly: true, singleFilePrefix: true, log: (l) => ctx.stderr.write(`${l}\n`) });
          } catch (e) {
            throw new CliError(`Could not open new backing file '${backing}': ${newBackingError(e, real)}`);
          }
          next = { chain: other, depth: 0 };
        }
      }
      try {
        await rebaseCopy(chain, next, { onProgress: (done, total) => bar.print(total ? (done / total) * 100 : 0, 0) });
      } catch (e) {
        throw new CliError(`Error while writing to COW image: ${asCliError(e).message}`);
      }
    }
    try {
      await changeBackingFile(chain.top, backing ? backing : null, backing ? (backingFmt ?? null) : null);
    } catch (e) {
      const code = e instanceof ImageError ? e.errno : undefined;
      if (code === 'ENOSPC') throw new CliError(`Could not change the backing file to '${backing}': No space left in the file header`);
      if (code === 'EINVAL' && backing && !backingFmt) throw new CliError(`Could not change the backing file to '${backing}': backing format must be specified`);
      throw new CliError(`Could not change the backing file to '${backing}': ${asCliError(e).message}`);
    }
    bar.print(100, 0);
  } catch (e) {
    // qemu-img reports the error before ending the progress line.
    return reportError(PROG, asCliError(e), ctx.stderr);
  } finally {
    bar.end();
    if (other) await other.close().catch(() => {});
    if (chain) await chain.close().catch(() => {});
  }
  return 0;
}

/**
 * The reason QEMU gives when the new backing file cannot be opened: the file name prefix is
 * kept only for errors of the file itself (missing, unreadable), not for format or chain errors.
 */
function newBackingError(e: unknown, real: string): string {
  const msg = asCliError(e).message;
  const prefix = `Could not open '${real}': `;
  if (!msg.startsWith(prefix)) return msg;
  const rest = msg.slice(prefix.length);
  // A json: description is not named (its file is, in its own error).
  if (real.startsWith('json:')) return rest;
  const fileError = e instanceof ImageError && e.errno !== undefined && !rest.startsWith('Could not open backing file: ');
  return fileError ? msg : rest;
}
