/** `qemu-img dd`: copy (part of) an image into a new image, with dd(1)-style operands. */
import type { CliContext } from '../context.js';
import { CliError } from '../util/errors.js';
import { qemuStrtosz, INT64_MAX } from '../util/options.js';
import { FORCE_SHARE, HELP, IMAGE_OPTS, OBJECT, PROG, asCliError, open, parseArgs } from './common.js';
import type { Chain } from '../../chain/chain.js';
import { isFormat, type ImageFormat } from '../../chain/open.js';
import { FileStorage } from '../../storage/file.js';
import { createQcow2 } from '../../qcow2/create.js';
import { ddCopy } from '../../ops/dd.js';

/** cvtnum_full(): a size with suffixes within [min, max], with qemu-img's two-line message. */
function ddNumber(name: string, value: string, min: bigint, max: bigint): bigint {
  const r = qemuStrtosz(value);
  if (!r.ok && r.error !== 'ERANGE') {
    throw new CliError(`Invalid ${name} specified. You may use k, M, G, T, P or E suffixes for\nkilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.`);
  }
  if (!r.ok || r.value > max || r.value < min) throw new CliError(`Invalid ${name} specified. Must be between ${min} and ${max}.`);
  return r.value;
}

export async function ddMain(argv: string[], ctx: CliContext): Promise<number> {
  const { opts, rest } = parseArgs(argv, ':hf:O:U', [HELP, OBJECT, IMAGE_OPTS, FORCE_SHARE]);
  let fmt: string | undefined, outFmt = 'raw';
  for (const o of opts) {
    switch (o.opt) {
      case 'h': ctx.stdout.write('usage: qchain img dd [-U] [-f fmt] [-O output_fmt] [bs=block_size] [count=blocks] [skip=blocks] if=input of=output\n'); return 0;
      case 'f': fmt = o.arg as string; break;
      case 'O': outFmt = o.arg as string; break;
      case 'IMAGE_OPTS': throw new CliError('--image-opts is not supported by qchain');
      default: break; // --object, -U: accepted, no effect here
    }
  }
  let bs = 512n, count: bigint | null = null, skip: bigint | null = null;
  let inFile: string | undefined, outFile: string | undefined;
  for (const arg of rest) {
    const eq = arg.indexOf('=');
    const key = eq < 0 ? arg : arg.slice(0, eq), val = arg.slice(eq + 1);
    if (eq < 0 || !['bs', 'count', 'if', 'of', 'skip'].includes(key)) throw new CliError(`unrecognized operand ${key}`);
    if (key === 'bs') bs = ddNumber('bs', val, 1n, 2147483647n);
    else if (key === 'count') count = ddNumber('count', val, 0n, INT64_MAX);
    else if (key === 'skip') skip = ddNumber('skip', val, 0n, INT64_MAX);
    else if (key === 'if') inFile = val;
    else outFile = val;
  }
  if (inFile === undefined || outFile === undefined) throw new CliError('Must specify both input and output files');

  let src: Chain | null = null, dst: Chain | null = null;
  try {
    if (fmt !== undefined && !isFormat(fmt)) throw new CliError(`Could not open '${inFile}': Unknown driver '${fmt}'`);
    src = await open(inFile, { format: fmt as ImageFormat | undefined, readOnly: true }, ctx);
    if (!isFormat(outFmt)) throw new CliError('Unknown file format');
    if (outFmt === 'qcow') throw new CliError('qchain reads qcow (v1) images but does not write them; use qcow2');
    // qemu-img's arithmetic: count limits the end, skip moves the start (count includes skip).
    let size = BigInt(src.size);
    if (count !== null && count <= INT64_MAX / bs && count * bs < size) size = count * bs;
    const skipPastEnd = skip !== null && (skip > INT64_MAX / bs || size < bs * skip);
    const outSize = skipPastEnd ? 0n : size - bs * (skip ?? 0n);
    await createOutput(outFile, outFmt, Number(outSize));
    try {
      dst = await open(outFile, { format: outFmt, readOnly: false, noBacking: true }, ctx);
    } catch (e) {
      throw asCliError(e);
    }
    if (skipPastEnd) ctx.stderr.write(`${PROG}: ${inFile}: cannot skip to specified offset\n`);
    const inPos = skipPastEnd ? size : bs * (skip ?? 0n);
    await ddCopy(src, dst.top, Number(inPos), Number(size));
    await dst.flush();
    return 0;
  } catch (e) {
    throw asCliError(e);
  } finally {
    if (src) await src.close().catch(() => {});
    if (dst) await dst.close().catch(() => {});
  }
}

/** bdrv_create() with only a size: raw and qcow2 round it up to whole sectors. */
async function createOutput(file: string, fmt: ImageFormat, size: number): Promise<void> {
  const sectors = Math.ceil(size / 512) * 512;
  let st: FileStorage;
  try {
    st = await FileStorage.open(file, { create: true });
  } catch (e) {
    throw new CliError(`${file}: error while creating output image: Could not create '${file}': ${asCliError(e).message}`);
  }
  try {
    if (fmt === 'raw') await st.truncate(sectors);
    else await (await createQcow2(st, { size: sectors })).close();
  } catch (e) {
    throw new CliError(`${file}: error while creating output image: ${asCliError(e).message}`);
  } finally {
    await st.close().catch(() => {});
  }
}
