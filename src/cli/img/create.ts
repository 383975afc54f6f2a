/** `qemu-img create`: new qcow2 or raw images, with backing files and creation options. */
import type { CliContext } from '../context.js';
import { CliError, UsageError } from '../util/errors.js';
import { accumulateOptions, escapeOptValue, hasHelpOption, parseOptString, parseSizeBig, parseOptionSize } from '../util/options.js';
import { HELP, OBJECT, PROG, asCliError, formatArg, outputFormatArg, open, parseArgs } from './common.js';
import { FileStorage } from '../../storage/file.js';
import { createQcow2, validateCreateOptions, type Preallocation, type Qcow2CreateOptions } from '../../qcow2/create.js';
import { backingOpenName } from '../../chain/resolve.js';
import { ImageError } from '../../image/errors.js';
import { isFormat, type ImageFormat } from '../../chain/open.js';

const QCOW2_OPTS = ['size', 'compat', 'backing_file', 'backing_fmt', 'data_file', 'data_file_raw', 'encryption', 'encrypt.format',
  'cluster_size', 'extended_l2', 'preallocation', 'lazy_refcounts', 'refcount_bits', 'compression_type', 'nocow'];
const RAW_OPTS = ['size', 'preallocation'];

const QCOW2_HELP = `Supported options:
  backing_file=<str>     - File name of a base image
  backing_fmt=<str>      - Image format of the base image
  cluster_size=<size>    - qcow2 cluster size
  compat=<str>           - Compatibility level (v2 [0.10] or v3 [1.1])
  compression_type=<str> - Compression method used for image cluster compression
  extended_l2=<bool (on/off)> - Extended L2 tables
  lazy_refcounts=<bool (on/off)> - Postpone refcount updates
  preallocation=<str>    - Preallocation mode (allowed values: off, metadata, falloc, full)
  refcount_bits=<num>    - Width of a reference count entry in bits
  size=<size>            - Virtual disk size
`;
const RAW_HELP = `Supported options:
  preallocation=<str>    - Preallocation mode (allowed values: off, falloc, full)
  size=<size>            - Virtual disk size
`;

/** QemuOpts option types: values are checked when the option string is parsed, before anything is created. */
const OPT_TYPES: Record<string, 'bool' | 'size' | 'number' | 'string'> = {
  size: 'size', cluster_size: 'size', refcount_bits: 'number',
  extended_l2: 'bool', lazy_refcounts: 'bool', data_file_raw: 'bool', nocow: 'bool', encryption: 'bool',
};

/** QEMU's qapi_bool_parse(). */
function bool(name: string, v: string): boolean {
  if (['on', 'yes', 'true', 'y'].includes(v)) return true;
  if (['off', 'no', 'false', 'n'].includes(v)) return false;
  throw new CliError(`Parameter '${name}' expects 'on' or 'off'`);
}

/** QemuOpts type checks of `-o` values (QEMU reports them prefixed with the file name). */
function checkOptionValue(k: string, v: string): void {
  const t = OPT_TYPES[k];
  if (t === 'bool') bool(k, v);
  else if (t === 'size') parseOptionSize(k, v);
  else if (t === 'number' && !/^\s*[+-]?(0[xX][0-9a-fA-F]+|[0-9]+)$/.test(v)) throw new CliError(`Parameter '${k}' expects a number`);
}

/** The `-o` string of a new image, checked as QemuOpts does (names, then value types); later keys win. */
export function parseCreateOptions(fmt: ImageFormat, optstr: string | undefined): Map<string, string> {
  const kv = new Map<string, string>();
  for (const [k, v] of optstr ? parseOptString(optstr) : []) {
    if (!(fmt === 'qcow2' ? QCOW2_OPTS : RAW_OPTS).includes(k)) throw new CliError(`Invalid parameter '${k}'`);
    checkOptionValue(k, v);
    kv.set(k, v);
  }
  return kv;
}

const INT64_MAX = (1n << 63n) - 1n;
/** QEMU's BDRV_MAX_LENGTH: the largest image length the block layer accepts. */
const BDRV_MAX_LENGTH = 9223372035781033984n;

export async function createMain(argv: string[], ctx: CliContext): Promise<number> {
  const { opts, rest } = parseArgs(argv, ':F:b:f:ho:qu', [HELP, OBJECT]);
  let fmtArg = 'raw';
  let backing: string | undefined, backingFmt: string | undefined, optstr: string | undefined;
  let quiet = false, unsafe = false;
  for (const o of opts) {
    switch (o.opt) {
      case 'h': ctx.stdout.write(`usage: qchain img create [-f fmt] [-b backing_file [-F backing_fmt]] [-u] [-o options] filename [size]\n`); return 0;
      case 'F': backingFmt = o.arg; break;
      case 'b': backing = o.arg; break;
      case 'f': fmtArg = o.arg as string; break;
      case 'o': optstr = accumulateOptions(optstr, o.arg as string); break;
      case 'q': quiet = true; break;
      case 'u': unsafe = true; break;
      case 'OBJECT': throw new CliError('--object is not supported by qchain');
    }
  }
  if (optstr !== undefined && hasHelpOption(optstr)) {
    ctx.stdout.write(formatArg(fmtArg) === 'qcow2' ? QCOW2_HELP : RAW_HELP);
    return 0;
  }
  if (rest.length < 1) throw new UsageError('Expecting image file name');
  const file = rest[0];
  if (rest.length > 2) throw new UsageError(`Unexpected argument: ${rest[2]}`);
  const named = (e: unknown): never => { throw new CliError(`${file}: ${asCliError(e).message}`); };
  let fmt: ImageFormat;
  try {
    fmt = outputFormatArg(fmtArg);
  } catch (e) {
    return named(e);
  }
  // The size argument is checked first, then the -o pairs (names and value types), then -b/-F.
  let sizeBig: bigint | undefined;
  if (rest[1] !== undefined) sizeBig = parseSizeBig(rest[1]);
  let kv: Map<string, string>;
  try {
    kv = parseCreateOptions(fmt, optstr);
  } catch (e) {
    return named(e);
  }
  if (backing !== undefined) kv.set('backing_file', backing);
  if (backingFmt !== undefined) kv.set('backing_fmt', backingFmt);
  if (sizeBig !== undefined) kv.set('size', String(sizeBig));
  else if (kv.has('size')) sizeBig = parseOptionSize('size', kv.get('size') as string);
  let size: number | undefined = sizeBig === undefined ? undefined : Number(sizeBig);
  const backingFile = kv.get('backing_file');
  if (backingFile !== undefined && backingFile === file) {
    throw new CliError(`${file}: Error: Trying to create an image with the same filename as the backing file`);
  }
  // The size defaults to the backing file's (which is then opened to validate it).
  const fail = (msg: string): never => { throw new CliError(`${file}: ${msg}`); };
  if (fmt === 'raw' && backingFile !== undefined) throw new CliError(`${file}: Backing file not supported for file format 'raw'`);
  if (backingFile !== undefined && !kv.get('backing_fmt') && unsafe) {
    ctx.stderr.write(`${PROG}: ${file}: Backing file specified without backing format\n`);
    return 1;
  }
  if (backingFile !== undefined && !unsafe) {
    // A json: description is opened as it is (its file names are relative to the current directory).
    const bpath = backingOpenName(file, backingFile);
    const bfmtArg = kv.get('backing_fmt');
    let chain;
    try {
      if (bfmtArg !== undefined && !isFormat(bfmtArg)) throw new CliError(`Unknown driver '${bfmtArg}'`);
      chain = await open(bpath, { format: bfmtArg as ImageFormat | undefined, readOnly: true, singleFilePrefix: true }, ctx);
    } catch (e) {
      let msg = asCliError(e).message;
      // qemu-img names the file only for errors of the file itself, not of its format.
      const prefix = `Could not open '${bpath}': `;
      if (msg.startsWith(prefix) && !/^(No such file or directory|Permission denied|Is a directory)$/.test(msg.slice(prefix.length))) {
        msg = msg.slice(prefix.length);
      }
      ctx.stderr.write(`${PROG}: ${file}: ${msg}\nCould not open backing image.\n`);
      return 1;
    }
    if (bfmtArg === undefined) {
      // qemu-img 7.2 opens the backing file first, then names the format it detected (without a trailing newline).
      const detected = chain.top.format;
      await chain.close();
      ctx.stderr.write(`${PROG}: ${file}: Backing file specified without backing format\nDetected format of ${detected}.`);
      return 1;
    }
    if (size === undefined) {
      size = chain.size;
      sizeBig = BigInt(size);
    }
    await chain.close();
  } else if (size === undefined) {
    return fail('Image creation needs a size parameter');
  }
  printFormatting(ctx, quiet, file, fmt, kv, sizeBig as bigint);
  try {
    checkLength(fmt, sizeBig as bigint);
    await createImage(file, fmt, size as number, kv);
  } catch (e) {
    throw new CliError(`${file}: ${asCliError(e).message}`);
  }
  return 0;
}

/**
 * The length checks QEMU makes when it sizes the new image (after the Formatting line): rounded
 * up to sectors, it must be a valid offset and within BDRV_MAX_LENGTH; beyond that qchain's own
 * limit (guest offsets are exact JavaScript integers) applies.
 */
function checkLength(fmt: ImageFormat, size: bigint): void {
  const rounded = (size + 511n) / 512n * 512n;
  if (fmt === 'raw') {
    if (rounded > INT64_MAX) throw new ImageError('Could not resize file: Invalid argument');
    if (rounded > BigInt(Number.MAX_SAFE_INTEGER)) throw new ImageError('Could not resize file: File too large');
    return;
  }
  if (rounded > INT64_MAX) throw new ImageError('Could not resize image: Image size cannot be negative');
  if (rounded > BDRV_MAX_LENGTH) throw new ImageError(`Could not resize image: offset(${rounded}) exceeds maximum(${BDRV_MAX_LENGTH})`);
}

/** The `Formatting '…', fmt=… k=v …` line, keys in qemu-img's order. */
function printFormatting(ctx: CliContext, quiet: boolean, file: string, fmt: ImageFormat, kv: Map<string, string>, size: bigint | undefined): void {
  if (quiet) return;
  const parts: string[] = [];
  const add = (k: string, v: string | undefined): void => {
    if (v !== undefined) parts.push(`${k}=${escapeOptValue(v)}`);
  };
  const sz = size !== undefined ? String(size) : kv.get('size');
  if (fmt === 'raw') {
    add('size', sz);
    add('preallocation', kv.get('preallocation'));
  } else {
    add('cluster_size', kv.get('cluster_size') !== undefined ? String(parseOptionSize('cluster_size', kv.get('cluster_size') as string)) : '65536');
    add('extended_l2', kv.get('extended_l2') ?? 'off');
    add('preallocation', kv.get('preallocation'));
    add('compression_type', kv.get('compression_type') ?? 'zlib');
    add('size', sz ?? '0');
    add('compat', kv.get('compat'));
    add('backing_file', kv.get('backing_file'));
    add('backing_fmt', kv.get('backing_fmt'));
    add('data_file', kv.get('data_file'));
    add('data_file_raw', kv.get('data_file_raw'));
    add('encryption', kv.get('encryption'));
    add('lazy_refcounts', kv.get('lazy_refcounts') ?? 'off');
    add('refcount_bits', kv.get('refcount_bits') ?? '16');
    add('nocow', kv.get('nocow'));
  }
  ctx.stdout.write(`Formatting '${file}', fmt=${fmt} ${parts.join(' ')}\n`);
}

async function createImage(file: string, fmt: ImageFormat, size: number, kv: Map<string, string>): Promise<void> {
  const prealloc = (kv.get('preallocation') ?? 'off') as Preallocation;
  if (!['off', 'metadata', 'falloc', 'full'].includes(prealloc)) throw new ImageError(`Parameter 'preallocation' does not accept value '${prealloc}'`);
  if (fmt === 'raw' && prealloc === 'metadata') {
    // file-posix creates (and empties) the file before its truncate refuses the mode.
    const st = await createFile(file);
    try {
      await st.truncate(0);
    } finally {
      await st.close();
    }
    throw new ImageError('Unsupported preallocation mode: metadata');
  }
  if (fmt === 'raw') {
    const st = await createFile(file);
    try {
      const rounded = Math.ceil(size / 512) * 512;
      if (prealloc === 'full' || prealloc === 'falloc') {
        const z = Buffer.alloc(Math.min(rounded, 4 * 1024 * 1024));
        for (let p = 0; p < rounded; p += z.length) await st.write(z.subarray(0, Math.min(z.length, rounded - p)), p);
      }
      await st.truncate(rounded);
    } finally {
      await st.close();
    }
    return;
  }
  if (kv.has('encryption') || kv.has('encrypt.format')) throw new ImageError('Encrypted images are not supported by qchain');
  const compat = kv.get('compat');
  let version: 2 | 3 = 3;
  if (compat === '0.10' || compat === 'v2') version = 2;
  else if (compat !== undefined && compat !== '1.1' && compat !== 'v3') throw new ImageError(`Parameter 'version' does not accept value '${compat}'`);
  const ct = kv.get('compression_type');
  if (ct !== undefined && ct !== 'zlib' && ct !== 'zstd') throw new ImageError(`Parameter 'compression-type' does not accept value '${ct}'`);
  const o: Qcow2CreateOptions = {
    size,
    version,
    clusterSize: kv.has('cluster_size') ? Number(parseOptionSize('cluster_size', kv.get('cluster_size') as string)) : undefined,
    refcountBits: kv.has('refcount_bits') ? Number(kv.get('refcount_bits')) : undefined,
    lazyRefcounts: kv.has('lazy_refcounts') ? bool('lazy_refcounts', kv.get('lazy_refcounts') as string) : false,
    extendedL2: kv.has('extended_l2') ? bool('extended_l2', kv.get('extended_l2') as string) : false,
    compressionType: ct as 'zlib' | 'zstd' | undefined,
    backingFile: kv.get('backing_file') ?? null,
    backingFormat: kv.get('backing_fmt') ?? null,
    preallocation: prealloc,
  };
  if (o.backingFile && o.backingFile.length > 1023) {
    throw new ImageError(`Could not assign backing file '${o.backingFile}' with format '${o.backingFormat}': Invalid argument`);
  }
  validateCreateOptions(o); // before the file is touched
  // qcow2_co_create checks the data file options after the refcount options.
  if (!kv.has('data_file') && kv.has('data_file_raw') && bool('data_file_raw', kv.get('data_file_raw') as string)) throw new ImageError('data-file-raw requires data-file');
  if (kv.has('data_file')) throw new ImageError('External data files are not supported by qchain');
  const st = await createFile(file);
  try {
    const img = await createQcow2(st, o);
    await img.close();
  } catch (e) {
    await st.close().catch(() => {});
    throw e;
  }
}

/** The file-posix create step, with its message. */
async function createFile(file: string): Promise<FileStorage> {
  try {
    return await FileStorage.open(file, { create: true, lock: 'write' });
  } catch (e) {
    const msg = e instanceof Error ? e.message : String(e);
    const m = /(No such file or directory|Is a directory|Permission denied|Read-only file system|Not a directory)$/.exec(msg);
    if (m) throw new ImageError(`Could not create '${file}': ${m[1]}`);
    throw e;
  }
}
