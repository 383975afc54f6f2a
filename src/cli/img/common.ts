/** Shared pieces of the `qchain img` commands: argument parsing, opening, error text. */
import { getopt, GetoptError, qemuImgGetoptMessage, type LongOption, type ParsedOption } from '../util/getopt.js';
import { CliError, UsageError } from '../util/errors.js';
import { ImageError } from '../../image/errors.js';
import { BitmapError } from '../../qcow2/bitmaps.js';
import { openChain, isFormat, type ImageFormat, type OpenOptions } from '../../chain/open.js';
import type { Chain } from '../../chain/chain.js';
import type { CliContext } from '../context.js';

export const PROG = 'qemu-img';

export interface Parsed {
  opts: ParsedOption[];
  rest: string[];
}

/** getopt with qemu-img's error messages. */
export function parseArgs(argv: string[], short: string, long: LongOption[]): Parsed {
  try {
    return getopt(argv, short, long);
  } catch (e) {
    if (e instanceof GetoptError) throw new UsageError(qemuImgGetoptMessage(e));
    throw e;
  }
}

export const HELP: LongOption = { name: 'help', hasArg: 'no', val: 'h' };
export const OBJECT: LongOption = { name: 'object', hasArg: 'required', val: 'OBJECT' };
export const IMAGE_OPTS: LongOption = { name: 'image-opts', hasArg: 'no', val: 'IMAGE_OPTS' };
export const FORCE_SHARE: LongOption = { name: 'force-share', hasArg: 'no', val: 'U' };
export const OUTPUT: LongOption = { name: 'output', hasArg: 'required', val: 'OUTPUT' };
export const FORMAT: LongOption = { name: 'format', hasArg: 'required', val: 'f' };

/** Validates a `-f`/`-O` format name. */
export function formatArg(name: string): ImageFormat {
  if (!isFormat(name)) throw new CliError(`Unknown file format '${name}'`);
  return name;
}

/** Validates a format to write (`create -f`, `convert -O`, `dd -O`): qcow (v1) is read only. */
export function outputFormatArg(name: string): ImageFormat {
  const f = formatArg(name);
  if (f === 'qcow') throw new CliError('qchain reads qcow (v1) images but does not write them; use qcow2');
  return f;
}

/**
 * A source image's `-f` name, checked when the image is opened (qemu-img names the file:
 * "Could not open 'x': Unknown driver 'y'").
 */
export function sourceFormat(file: string, name: string | undefined): ImageFormat | undefined {
  if (name !== undefined && !isFormat(name)) throw new CliError(`Could not open '${file}': Unknown driver '${name}'`);
  return name;
}

export function outputArg(v: string): 'human' | 'json' {
  if (v === 'human' || v === 'json') return v;
  throw new CliError(`--output must be used with human or json as argument.`);
}

/** Open a chain, turning library errors into one-line CLI errors. */
export async function open(file: string, opts: OpenOptions, ctx: CliContext): Promise<Chain> {
  try {
    return await openChain(file, { log: (l) => ctx.stderr.write(engineLine(l)), ...opts });
  } catch (e) {
    throw asCliError(e);
  }
}

/**
 * An engine diagnostic as qemu-img prints it: plain lines end with a newline; warnings get the
 * program prefix and are printed verbatim (QEMU's warn_report + error_printf, no final newline).
 */
export function engineLine(l: string): string {
  return l.startsWith('warning: ') ? `${PROG}: ${l}` : `${l}\n`;
}

export function asCliError(e: unknown): Error {
  if (e instanceof CliError) return e;
  if (e instanceof BitmapError && e.hint) return new CliError(`${e.message}\n${e.hint.replace(/\n$/, '')}`);
  if (e instanceof ImageError) return new CliError(e.message);
  if (e instanceof Error) return new CliError(e.message);
  return new CliError(String(e));
}

/** Exactly one positional file argument (qemu-img: "Expecting one image file name"). */
export function oneFile(rest: string[]): string {
  if (rest.length < 1) throw new UsageError('Expecting one image file name');
  if (rest.length > 1) throw new UsageError(`Expecting one image file name`);
  return rest[0];
}

/** Stable JSON printing as QEMU's qobject pretty printer (4-space indent). */
export function qemuJson(v: unknown): string {
  // QEMU prints an empty list or dict open, with the closing bracket on its own line.
  return JSON.stringify(v, null, 4).replace(/^( *)(.*)(\[\]|\{\})(,?)$/gm, (_m, ind: string, pre: string, br: string, comma: string) =>
    `${ind}${pre}${br[0]}\n${ind}${br[1]}${comma}`)
    // QEMU escapes every character outside printable ASCII as \uXXXX (upper-case hex).
    .replace(/[\u007f-\uffff]|\\u00[01][0-9a-f]/g, (c) => (c.length === 1 ? `\\u${c.charCodeAt(0).toString(16).toUpperCase().padStart(4, '0')}` : c.toUpperCase().replace('\\U', '\\u')));
}

/** strerror text for an errno code carried by library errors. */
export function errnoMessage(code: string | undefined): string {
  switch (code) {
    case 'EIO': return 'Input/output error';
    case 'EINVAL': return 'Invalid argument';
    case 'EACCES': return 'Permission denied';
    case 'ENOSPC': return 'No space left on device';
    case 'EPERM': return 'Operation not permitted';
    case 'ENOTSUP': return 'Operation not supported';
    case 'ENOENT': return 'No such file or directory';
    case 'EFBIG': return 'File too large';
    case 'ERANGE': return 'Numerical result out of range';
    default: return code ?? 'Input/output error';
  }
}
