/**
 * `qemu-img resize [--object objectdef] [--image-opts] [-f fmt] [--preallocation=prealloc] [-q]
 * [--shrink] filename [+ | -]size`, with qemu-img 7.2's argument handling: the size is taken
 * off the end of the command line before option parsing (so "-1G" is not an option), and the
 * checks come in qemu-img's order.
 */
import type { CliContext } from '../context.js';
import { CliError, UsageError } from '../util/errors.js';
import { qemuStrtosz } from '../util/options.js';
import { HELP, IMAGE_OPTS, OBJECT, PROG, asCliError, formatArg, open, parseArgs } from './common.js';
import type { ImageFormat } from '../../chain/open.js';
import type { ResizeOptions } from '../../image/driver.js';

type Prealloc = NonNullable<ResizeOptions['preallocation']>;
const PREALLOC_MODES = ['off', 'metadata', 'falloc', 'full'];

export async function resizeMain(argv: string[], ctx: CliContext): Promise<number> {
  if (argv.length < 2) throw new UsageError('Not enough arguments');
  let size = argv[argv.length - 1];
  const { opts, rest } = parseArgs(argv.slice(0, -1), ':f:hq', [HELP, OBJECT, IMAGE_OPTS,
    { name: 'preallocation', hasArg: 'required', val: 'PREALLOC' }, { name: 'shrink', hasArg: 'no', val: 'SHRINK' }]);
  let fmt: ImageFormat | undefined;
  let quiet = false, shrink = false;
  let prealloc: Prealloc = 'off';
  for (const o of opts) {
    switch (o.opt) {
      case 'h':
        ctx.stdout.write('usage: qchain img resize [--object objectdef] [--image-opts] [-f fmt] [--preallocation=prealloc] [-q] [--shrink] filename [+ | -]size\n');
        return 0;
      case 'f': fmt = formatArg(o.arg as string); break;
      case 'q': quiet = true; break;
      case 'SHRINK': shrink = true; break;
      case 'PREALLOC': {
        const a = o.arg as string;
        if (!PREALLOC_MODES.includes(a)) throw new CliError(`Invalid preallocation mode '${a}'`);
        prealloc = a as Prealloc;
        break;
      }
      case 'IMAGE_OPTS': throw new UsageError('--image-opts is not supported by qchain');
      default: break; // --object: accepted, nothing to define here
    }
  }
  if (rest.length !== 1) throw new UsageError('Expecting image file name and size');
  const file = rest[0];

  let relative = 0n;
  if (size.startsWith('+')) { relative = 1n; size = size.slice(1); }
  else if (size.startsWith('-')) { relative = -1n; size = size.slice(1); }
  const parsed = qemuStrtosz(size);
  for (const w of parsed.warnings) ctx.stderr.write(`${PROG}: warning: ${w}\n`);
  if (!parsed.ok) {
    // qemu_opt_set's message: the first line prefixed, the hint lines not.
    if (parsed.error === 'ERANGE') throw new CliError(`Value '${size}' is out of range for parameter 'size'`);
    ctx.stderr.write(`${PROG}: Parameter 'size' expects a non-negative number below 2^64\n` +
      'Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.\n');
    return 1;
  }
  const n = BigInt.asIntN(64, parsed.value);

  const chain = await open(file, { format: fmt, readOnly: false }, ctx);
  try {
    const top = chain.top;
    const current = BigInt(top.size);
    const total = relative === 0n ? n : BigInt.asIntN(64, current + n * relative);
    if (total <= 0n) throw new CliError('New image size must be positive');
    if (total <= current && prealloc !== 'off') throw new CliError('Preallocation can only be used for growing images');
    if (total < current && !shrink) {
      ctx.stderr.write(`${PROG}: Use the --shrink option to perform a shrink operation.\n`);
      ctx.stderr.write(`${PROG}: warning: Shrinking an image will delete all data beyond the shrunken image's end. ` +
        'Before performing such an operation, make sure there is no important data there.\n');
      return 1;
    }
    if (typeof top.resize !== 'function') throw new CliError('Image format driver does not support resize');
    // Sizes past 2^53 are beyond any L1 table qchain can hold: QEMU's answer for them.
    if (total > BigInt(Number.MAX_SAFE_INTEGER)) throw new CliError('Failed to grow the L1 table: File too large');
    try {
      await top.resize(Number(total), { shrink: true, preallocation: prealloc });
    } catch (e) {
      throw asCliError(e);
    }
  } finally {
    await chain.close().catch(() => {});
  }
  if (!quiet) ctx.stdout.write('Image resized.\n');
  return 0;
}
