/** `qemu-img compare`: 0 identical, 1 different, 2 open error, 3 block status error, 4 read error. */
import type { CliContext } from '../context.js';
import { CliError, UsageError } from '../util/errors.js';
import { ProgressPrinter } from '../util/progress.js';
import { FORCE_SHARE, HELP, IMAGE_OPTS, OBJECT, asCliError, open, parseArgs } from './common.js';
import type { Chain } from '../../chain/chain.js';
import { isFormat, type ImageFormat } from '../../chain/open.js';
import { compareChains, CompareError } from '../../ops/compare.js';
import { StatusError } from '../../ops/status.js';

const CACHE_MODES = ['none', 'writeback', 'writethrough', 'directsync', 'unsafe'];

export async function compareMain(argv: string[], ctx: CliContext): Promise<number> {
  const { opts, rest } = parseArgs(argv, ':hf:F:T:pqsU', [HELP, OBJECT, IMAGE_OPTS, FORCE_SHARE]);
  let fmt1: string | undefined, fmt2: string | undefined, cache = 'writeback';
  let progress = false, quiet = false, strict = false;
  for (const o of opts) {
    const a = o.arg as string;
    switch (o.opt) {
      case 'h': ctx.stdout.write('usage: qchain img compare [-f fmt] [-F fmt] [-T src_cache] [-p] [-q] [-s] [-U] filename1 filename2\n'); return 0;
      case 'f': fmt1 = a; break;
      case 'F': fmt2 = a; break;
      case 'T': cache = a; break;
      case 'p': progress = true; break;
      case 'q': quiet = true; break;
      case 's': strict = true; break;
      case 'IMAGE_OPTS': throw new CliError('--image-opts is not supported by qchain', 2);
      default: break; // --object, -U: accepted, no effect here
    }
  }
  // qemu-img: -q wins over -p.
  if (quiet) progress = false;
  if (rest.length !== 2) throw new UsageError('Expecting two image file names');
  const [file1, file2] = rest;
  const print = (s: string): void => { if (!quiet) ctx.stdout.write(s); };
  const bar = new ProgressPrinter(progress, ctx.stdout, 2.0, ctx.stderr);
  let a: Chain | null = null, b: Chain | null = null;
  try {
    if (!CACHE_MODES.includes(cache)) throw new CliError(`Invalid source cache option: ${cache}`, 2);
    a = await openOr2(file1, fmt1, ctx);
    b = await openOr2(file2, fmt2, ctx);
    bar.print(0, 100);
    const res = await compareChains(a, file1, b, file2, {
      strict,
      onChunk: (n, base) => bar.print(Math.fround(Math.fround(n / base) * 100), 100),
      onSizeWarning: () => print('Warning: Image size mismatch!\n'),
    });
    const o = res.outcome;
    switch (o.kind) {
      case 'identical': print('Images are identical.\n'); return 0;
      case 'strict-size': print('Strict mode: Image size mismatch!\n'); return 1;
      case 'status': print(`Strict mode: Offset ${o.offset} block status mismatch!\n`); return 1;
      default: print(`Content mismatch at offset ${o.offset}!\n`); return 1;
    }
  } catch (e) {
    if (e instanceof CompareError) throw new CliError(e.message, e.exitCode);
    if (e instanceof StatusError) throw new CliError(e.message, 3);
    if (e instanceof CliError) throw e;
    throw new CliError(asCliError(e).message, 4);
  } finally {
    if (a) await a.close().catch(() => {});
    if (b) await b.close().catch(() => {});
    bar.end();
  }
}

async function openOr2(file: string, fmt: string | undefined, ctx: CliContext): Promise<Chain> {
  if (fmt !== undefined && !isFormat(fmt)) throw new CliError(`Could not open '${file}': Unknown driver '${fmt}'`, 2);
  try {
    return await open(file, { format: fmt as ImageFormat | undefined, readOnly: true }, ctx);
  } catch (e) {
    throw new CliError(asCliError(e).message, 2);
  }
}
