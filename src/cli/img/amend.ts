/** `qemu-img amend`: change compat level, refcount width or lazy refcounts of a qcow2 image. */
import type { CliContext } from '../context.js';
import { CliError, UsageError } from '../util/errors.js';
import { accumulateOptions, hasHelpOption, parseOptString, parseOptionSize } from '../util/options.js';
import { ProgressPrinter } from '../util/progress.js';
import { HELP, IMAGE_OPTS, OBJECT, PROG, asCliError, open, parseArgs } from './common.js';
import type { Chain } from '../../chain/chain.js';
import { isFormat, type ImageFormat } from '../../chain/open.js';
import { Qcow2Image } from '../../qcow2/image.js';
import { amendOperationCount, amendQcow2, type AmendOperation, type AmendOptions } from '../../qcow2/amend.js';

type OptType = 'size' | 'bool' | 'number' | 'string';
const AMEND_OPTS: Record<string, OptType> = {
  backing_file: 'string', backing_fmt: 'string', compat: 'string', data_file: 'string', data_file_raw: 'bool',
  'encrypt.iter-time': 'number', 'encrypt.keyslot': 'number', 'encrypt.new-secret': 'string', 'encrypt.old-secret': 'string',
  'encrypt.state': 'string', lazy_refcounts: 'bool', refcount_bits: 'number', size: 'size',
};
/** qcow2 creation options (amend names them "only supported for image creation"). */
const CREATE_OPTS: Record<string, OptType> = {
  size: 'size', compat: 'string', backing_file: 'string', backing_fmt: 'string', data_file: 'string', data_file_raw: 'bool',
  encryption: 'bool', 'encrypt.format': 'string', 'encrypt.key-secret': 'string', 'encrypt.cipher-alg': 'string',
  'encrypt.cipher-mode': 'string', 'encrypt.ivgen-alg': 'string', 'encrypt.ivgen-hash-alg': 'string', 'encrypt.hash-alg': 'string',
  'encrypt.iter-time': 'number', cluster_size: 'size', extended_l2: 'bool', preallocation: 'string', lazy_refcounts: 'bool',
  refcount_bits: 'number', compression_type: 'string',
};

const AMEND_HELP = `Amend options for 'qcow2':
  backing_file=<str>     - File name of a base image
  backing_fmt=<str>      - Image format of the base image
  compat=<str>           - Compatibility level (v2 [0.10] or v3 [1.1])
  data_file=<str>        - File name of an external data file
  data_file_raw=<bool (on/off)> - The external data file must stay valid as a raw image
  encrypt.iter-time=<num> - Time to spend in PBKDF in milliseconds
  encrypt.keyslot=<num>  - Select a single keyslot to modify explicitly
  encrypt.new-secret=<str> - New secret to set in the matching keyslots. Empty string to erase
  encrypt.old-secret=<str> - Select all keyslots that match this password
  encrypt.state=<str>    - Select new state of affected keyslots (active/inactive)
  lazy_refcounts=<bool (on/off)> - Postpone refcount updates
  refcount_bits=<num>    - Width of a reference count entry in bits
  size=<size>            - Virtual disk size
`;

const CACHE_MODES = ['none', 'writeback', 'writethrough', 'directsync', 'unsafe'];

/** An error whose second line is a hint printed without the program prefix (error_append_hint). */
class HintedError extends CliError {}

/** qemu_opts_do_parse() against one option list: the first error's text, or null. */
function parseError(pairs: Array<[string, string]>, types: Record<string, OptType>): string | null {
  for (const [k, v] of pairs) {
    const t = types[k];
    if (!t) return `Invalid parameter '${k}'`;
    if (t === 'bool' && v !== 'on' && v !== 'off') return `Parameter '${k}' expects 'on' or 'off'`;
    if (t === 'number' && !/^\s*[+-]?(0[xX][0-9a-fA-F]+|[0-9]+)$/.test(v)) return `Parameter '${k}' expects a number`;
    if (t === 'size') {
      try {
        parseOptionSize(k, v);
      } catch (e) {
        return (e as Error).message;
      }
    }
  }
  return null;
}

function amendOptions(optstr: string): AmendOptions {
  const pairs = parseOptString(optstr);
  const err = parseError(pairs, AMEND_OPTS);
  if (err !== null) {
    if (parseError(pairs, { ...CREATE_OPTS, ...AMEND_OPTS }) === null) throw new HintedError(`${err}\nThis option is only supported for image creation`);
    // Size parse errors carry unprefixed explanation lines too.
    throw new HintedError(err);
  }
  const kv = new Map(pairs);
  const o: AmendOptions = {};
  // Checked in the order of QEMU's amend option list (encryption first, then the common options).
  // qchain images never have encryption or an external data file, so those options always fail.
  if ([...kv.keys()].some((k) => k.startsWith('encrypt.'))) throw new CliError("Can't amend encryption options - encryption not present");
  if (kv.has('size')) o.size = Number(parseOptionSize('size', kv.get('size') as string));
  if (kv.has('compat')) {
    const c = kv.get('compat') as string;
    if (c === '0.10' || c === 'v2') o.version = 2;
    else if (c === '1.1' || c === 'v3') o.version = 3;
    else throw new CliError(`Unknown compatibility level ${c}`);
  }
  if (kv.has('backing_file')) o.backingFile = kv.get('backing_file');
  if (kv.has('backing_fmt')) o.backingFormat = kv.get('backing_fmt');
  if (kv.has('data_file')) throw new CliError('data-file can only be set for images that use an external data file');
  if (kv.get('data_file_raw') === 'on') throw new CliError('data-file-raw cannot be set on existing images');
  if (kv.has('lazy_refcounts')) o.lazyRefcounts = kv.get('lazy_refcounts') === 'on';
  if (kv.has('refcount_bits')) {
    const n = Number(kv.get('refcount_bits'));
    if (!(n > 0 && n <= 64 && Number.isInteger(Math.log2(n)))) throw new CliError('Refcount width must be a power of two and may not exceed 64 bits');
    o.refcountBits = n;
  }
  return o;
}

/** qcow2_amend_helper_cb + amend_status_cb: per-operation progress projected over all operations. */
function progressFor(bar: ProgressPrinter, totalOps: number): (op: AmendOperation, offset: number, work: number) => void {
  let last: AmendOperation | null = null;
  let offsetCompleted = 0, opsCompleted = 0, lastWork = 0;
  const f32 = Math.fround;
  return (op, offset, work) => {
    if (op !== last) {
      if (last !== null) {
        offsetCompleted += lastWork;
        opsCompleted++;
      }
      last = op;
    }
    lastWork = work;
    const current = offsetCompleted + work;
    const projected = Math.trunc((current * (totalOps - opsCompleted - 1)) / (opsCompleted + 1));
    bar.print(f32(f32(f32(100) * f32(offsetCompleted + offset)) / f32(current + projected)), 0);
  };
}

function writeHinted(ctx: CliContext, msg: string): number {
  const lines = msg.split('\n');
  ctx.stderr.write(`${PROG}: ${lines[0]}\n${lines.slice(1).map((l) => `${l}\n`).join('')}`);
  return 1;
}

export async function amendMain(argv: string[], ctx: CliContext): Promise<number> {
  const { opts, rest } = parseArgs(argv, ':ho:f:t:pq', [HELP, OBJECT, IMAGE_OPTS, { name: 'force', hasArg: 'no', val: 'FORCE' }]);
  let optstr: string | undefined, fmt: string | undefined, cache = 'writeback';
  let progress = false, quiet = false;
  for (const o of opts) {
    const a = o.arg as string;
    switch (o.opt) {
      case 'h': ctx.stdout.write('usage: qchain img amend [-p] [-q] [-f fmt] [-t cache] [--force] -o options filename\n'); return 0;
      case 'o': optstr = accumulateOptions(optstr, a); break;
      case 'f': fmt = a; break;
      case 't': cache = a; break;
      case 'p': progress = true; break;
      case 'q': quiet = true; break;
      case 'IMAGE_OPTS': throw new CliError('--image-opts is not supported by qchain');
      default: break; // --object, --force: accepted (no encryption support, nothing to force)
    }
  }
  if (optstr === undefined) throw new UsageError('Must specify options (-o)');
  if (quiet) progress = false;
  const bar = new ProgressPrinter(progress, ctx.stdout, 1.0, ctx.stderr);
  let chain: Chain | null = null;
  try {
    const helpFor = (f: string): number => {
      if (f === 'qcow2') {
        ctx.stdout.write(AMEND_HELP);
        return 0;
      }
      throw new CliError(isFormat(f) ? `Format driver '${f}' does not support option amendment` : `Unknown file format '${f}'`);
    };
    if (fmt !== undefined && hasHelpOption(optstr)) return helpFor(fmt);
    if (rest.length !== 1) throw new CliError('Expecting one image file name');
    const file = rest[0];
    if (!CACHE_MODES.includes(cache)) throw new CliError(`Invalid cache option: ${cache}`);
    if (fmt !== undefined && !isFormat(fmt)) throw new CliError(`Could not open '${file}': Unknown driver '${fmt}'`);
    chain = await open(file, { format: fmt as ImageFormat | undefined, readOnly: false }, ctx);
    const img = chain.top;
    if (hasHelpOption(optstr)) return helpFor(img.format);
    if (!(img instanceof Qcow2Image)) throw new CliError(`Format driver '${img.format}' does not support option amendment`);
    const o = amendOptions(optstr);
    bar.print(0, 0);
    try {
      await amendQcow2(img, o, progressFor(bar, amendOperationCount(img, o)));
    } finally {
      bar.print(100, 0);
    }
    return 0;
  } catch (e) {
    if (e instanceof UsageError) throw e;
    const msg = asCliError(e).message;
    if (e instanceof HintedError || msg.includes('\n')) return writeHinted(ctx, msg);
    throw asCliError(e);
  } finally {
    if (chain) await chain.close().catch(() => {});
    bar.end();
  }
}
