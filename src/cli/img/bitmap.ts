/**
 * `qemu-img bitmap`: add, remove, clear, enable, disable and merge persistent dirty bitmaps.
 * Actions run in command-line order; the first failure stops the run (exit 1), and the image is
 * still closed cleanly, so earlier actions are kept, as qemu-img does.
 */
import type { CliContext } from '../context.js';
import { CliError, UsageError } from '../util/errors.js';
import { parseSizeBig } from '../util/options.js';
import { HELP, IMAGE_OPTS, OBJECT, PROG, asCliError, open, parseArgs } from './common.js';
import { Qcow2Image } from '../../qcow2/image.js';
import { BitmapError, Qcow2Bitmaps } from '../../qcow2/bitmaps.js';
import type { Chain } from '../../chain/chain.js';
import { isFormat, type ImageFormat } from '../../chain/open.js';

type Action = { op: 'add' | 'remove' | 'clear' | 'enable' | 'disable' } | { op: 'merge'; src: string };

const USAGE = 'usage: qchain img bitmap (--add [-g granularity] | --remove | --clear | --enable | --disable | --merge source [-b source_file [-F source_fmt]])... [-f fmt] filename bitmap\n';

export async function bitmapMain(argv: string[], ctx: CliContext): Promise<number> {
  const { opts, rest } = parseArgs(argv, ':b:f:F:g:h', [
    HELP, OBJECT, IMAGE_OPTS,
    { name: 'add', hasArg: 'no', val: 'ADD' }, { name: 'remove', hasArg: 'no', val: 'REMOVE' },
    { name: 'clear', hasArg: 'no', val: 'CLEAR' }, { name: 'enable', hasArg: 'no', val: 'ENABLE' },
    { name: 'disable', hasArg: 'no', val: 'DISABLE' }, { name: 'merge', hasArg: 'required', val: 'MERGE' },
    { name: 'granularity', hasArg: 'required', val: 'g' }, { name: 'source-file', hasArg: 'required', val: 'b' },
    { name: 'source-format', hasArg: 'required', val: 'F' },
  ]);
  const actions: Action[] = [];
  let fmt: string | undefined, srcFmt: string | undefined, srcFile: string | undefined;
  let granularity = 0n;
  for (const o of opts) {
    switch (o.opt) {
      case 'h': ctx.stdout.write(USAGE); return 0;
      case 'b': srcFile = o.arg as string; break;
      case 'f': fmt = o.arg as string; break;
      case 'F': srcFmt = o.arg as string; break;
      case 'g': granularity = parseSizeBig(o.arg as string, { name: 'granularity' }); break;
      case 'ADD': actions.push({ op: 'add' }); break;
      case 'REMOVE': actions.push({ op: 'remove' }); break;
      case 'CLEAR': actions.push({ op: 'clear' }); break;
      case 'ENABLE': actions.push({ op: 'enable' }); break;
      case 'DISABLE': actions.push({ op: 'disable' }); break;
      case 'MERGE': actions.push({ op: 'merge', src: o.arg as string }); break;
      case 'IMAGE_OPTS': throw new UsageError('--image-opts is not supported by qchain');
    }
  }
  const fail = (msg: string): number => {
    ctx.stderr.write(`${PROG}: ${msg}\n`);
    return 1;
  };
  if (actions.length === 0) return fail('Need at least one of --add, --remove, --clear, --enable, --disable, or --merge');
  if (granularity !== 0n && !actions.some((a) => a.op === 'add')) return fail('granularity only supported with --add');
  if (srcFmt !== undefined && srcFile === undefined) return fail('-F only supported with -b');
  if (srcFile !== undefined && !actions.some((a) => a.op === 'merge')) return fail('Merge bitmap source file only supported with --merge');
  if (rest.length !== 2) return fail('Expecting filename and bitmap name');
  const [filename, name] = rest;

  // The bitmaps live in this image alone: no backing chain is opened.
  const chain = await open(filename, { format: driver(filename, fmt), readOnly: false, noBacking: true }, ctx);
  let src: Chain | null = null;
  let status = 0;
  try {
    if (srcFile !== undefined) src = await open(srcFile, { format: driver(srcFile, srcFmt), readOnly: true, noBacking: true }, ctx);
    const set = bitmapsOf(chain);
    const srcSet = src ? bitmapsOf(src) : set;
    for (const a of actions) {
      try {
        await run(a, set, srcSet, name, granularity);
      } catch (e) {
        const hint = e instanceof BitmapError && e.hint ? e.hint : '';
        ctx.stderr.write(`${PROG}: Operation ${a.op} on bitmap ${name} failed: ${e instanceof Error ? e.message : String(e)}\n${hint}`);
        status = 1;
        break;
      }
    }
  } finally {
    try {
      await src?.close();
      await chain.close();
    } catch (e) {
      // Storing the bitmaps happens on close; a failure there fails the command.
      ctx.stderr.write(`${PROG}: Error while closing the image: ${asCliError(e).message}\n`);
      status = 1;
    }
  }
  return status;
}

/** A -f/-F format is looked up when the image is opened (qemu-img's img_open message). */
function driver(file: string, fmt: string | undefined): ImageFormat | undefined {
  if (fmt === undefined) return undefined;
  if (!isFormat(fmt)) throw new CliError(`Could not open '${file}': Unknown driver '${fmt}'`);
  return fmt;
}

/** The image's bitmaps; formats without persistent bitmaps have none (and cannot add any). */
function bitmapsOf(chain: Chain): Qcow2Bitmaps | null {
  const d = chain.top;
  return d instanceof Qcow2Image ? d.bitmaps : null;
}

async function run(a: Action, set: Qcow2Bitmaps | null, srcSet: Qcow2Bitmaps | null, name: string, granularity: bigint): Promise<void> {
  if (!set) {
    if (a.op === 'add') {
      if (name === '') throw new BitmapError('Bitmap name cannot be empty');
      checkGranularity(granularity);
      throw new BitmapError(`Can't store persistent bitmaps to #block1${String(Math.floor(Math.random() * 100)).padStart(2, '0')}: Operation not supported`);
    }
    throw new BitmapError(`Dirty bitmap '${name}' not found`);
  }
  switch (a.op) {
    case 'add': {
      if (name === '') throw new BitmapError('Bitmap name cannot be empty');
      set.add(name, checkGranularity(granularity));
      return;
    }
    case 'remove': return set.remove(name);
    case 'clear': return set.clear(name);
    case 'enable': return set.setEnabled(name, true);
    case 'disable': return set.setEnabled(name, false);
    case 'merge':
      set.lookup(name);
      if (!srcSet) throw new BitmapError(`Dirty bitmap '${a.src}' not found`);
      return set.merge(name, srcSet, a.src);
  }
}

/** QMP's granularity is a uint32 (0 = the default): -g values wrap as the C conversion does. */
function checkGranularity(g: bigint): number | undefined {
  if (g === 0n) return undefined;
  const v = Number(g % 0x100000000n);
  if (v < 512 || (v & (v - 1)) !== 0) throw new BitmapError('Granularity must be power of 2 and at least 512');
  return v;
}
