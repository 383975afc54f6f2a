/** `qemu-img measure`: required and fully allocated sizes of a new image for a size or a source image. */
import type { CliContext } from '../context.js';
import { CliError, UsageError } from '../util/errors.js';
import { accumulateOptions, cvtnumRaw, parseOptString, parseOptionSize } from '../util/options.js';
import { FORCE_SHARE, HELP, IMAGE_OPTS, OBJECT, OUTPUT, PROG, asCliError, open, parseArgs } from './common.js';
import type { Chain } from '../../chain/chain.js';
import { isFormat, type ImageFormat } from '../../chain/open.js';
import { Qcow2Image } from '../../qcow2/image.js';
import { measureQcow2, type MeasureResult } from '../../qcow2/measure.js';
import { validateSnapshotL1 } from '../../qcow2/snapshot.js';
import { AUTOCLEAR_BITMAPS, TWO32 } from '../../qcow2/constants.js';

type OptType = 'size' | 'bool' | 'number' | 'string';
/** Creation options of each output format plus the file protocol's, with their QemuOpts types. */
const FILE_OPTS: Record<string, OptType> = { size: 'size', preallocation: 'string', nocow: 'bool', extent_size_hint: 'size' };
const QCOW2_OPTS: Record<string, OptType> = {
  size: 'size', compat: 'string', backing_file: 'string', backing_fmt: 'string', data_file: 'string', data_file_raw: 'bool',
  encryption: 'bool', 'encrypt.format': 'string', 'encrypt.key-secret': 'string', 'encrypt.cipher-alg': 'string',
  'encrypt.cipher-mode': 'string', 'encrypt.ivgen-alg': 'string', 'encrypt.ivgen-hash-alg': 'string', 'encrypt.hash-alg': 'string',
  'encrypt.iter-time': 'number', cluster_size: 'size', extended_l2: 'bool', preallocation: 'string', lazy_refcounts: 'bool',
  refcount_bits: 'number', compression_type: 'string', ...FILE_OPTS,
};
const RAW_OPTS: Record<string, OptType> = { ...FILE_OPTS };

/** Parse `-o` like qemu_opts_do_parse(): known names, typed values; the last value of a name wins. */
function parseCreateOpts(optstr: string, fmt: ImageFormat): Map<string, string> {
  const types = fmt === 'qcow2' ? QCOW2_OPTS : RAW_OPTS;
  const kv = new Map<string, string>();
  try {
    for (const [k, v] of parseOptString(optstr)) {
      const t = types[k];
      if (!t) throw new CliError(`Invalid parameter '${k}'`);
      if (t === 'bool' && v !== 'on' && v !== 'off') throw new CliError(`Parameter '${k}' expects 'on' or 'off'`);
      if (t === 'size') parseOptionSize(k, v);
      if (t === 'number' && !/^\s*[+-]?(0[xX][0-9a-fA-F]+|[0-9]+)$/.test(v)) throw new CliError(`Parameter '${k}' expects a number`);
      kv.set(k, v);
    }
  } catch (e) {
    throw new CliError(`${asCliError(e).message}\nInvalid options for file format '${fmt}'`);
  }
  return kv;
}

/** Persistent bitmaps of a qcow2 v3 image (name and granularity), or null if it cannot hold any. */
async function sourceBitmaps(chain: Chain): Promise<Array<{ name: string; granularityBits: number }> | null> {
  const img = chain.top;
  if (!(img instanceof Qcow2Image) || img.version < 3) return null;
  const ext = img.header.bitmapsExt;
  if (!ext || (img.header.autoclear & BigInt(AUTOCLEAR_BITMAPS)) === 0n) return [];
  const nb = ext.readUInt32BE(0);
  const dirSize = ext.readUInt32BE(8) * TWO32 + ext.readUInt32BE(12);
  const dirOff = ext.readUInt32BE(16) * TWO32 + ext.readUInt32BE(20);
  if (dirSize > 1024 * 65535) return [];
  const dir = Buffer.alloc(dirSize);
  await img.storage.read(dir, dirOff);
  const out: Array<{ name: string; granularityBits: number }> = [];
  let off = 0;
  for (let i = 0; i < nb && off + 24 <= dir.length; i++) {
    const granularityBits = dir.readUInt8(off + 17);
    const nameSize = dir.readUInt16BE(off + 18), extra = dir.readUInt32BE(off + 20);
    const name = dir.subarray(off + 24 + extra, off + 24 + extra + nameSize).toString('utf8');
    out.push({ name, granularityBits });
    off = Math.ceil((off + 24 + extra + nameSize) / 8) * 8;
  }
  return out;
}

/**
 * `-l`: measure what an internal snapshot holds (bdrv_snapshot_load_tmp): the top image reads
 * through the snapshot's L1 table (read-only), with the current virtual size.
 */
async function loadSnapshotTmp(chain: Chain, param: string): Promise<void> {
  let id: string | undefined, name: string | undefined;
  if (param.startsWith('snapshot.')) {
    for (const [k, v] of parseOptString(param)) {
      if (k === 'snapshot.id') id = v;
      else if (k === 'snapshot.name') name = v;
      else throw new CliError(`Invalid parameter '${k}'\nFailed in parsing snapshot param '${param}'`);
    }
  }
  const img = chain.top;
  if (!(img instanceof Qcow2Image)) {
    throw new CliError(`Failed to load snapshot: Block format '${img.format}' used by device '' does not support temporarily loading internal snapshots`);
  }
  const find = (i?: string, n?: string) => img.snapshots.find((s) => (i === undefined || s.id === i) && (n === undefined || s.name === n) && (i !== undefined || n !== undefined));
  // A plain parameter is an ID first, then a name.
  const sn = param.startsWith('snapshot.') ? find(id, name) : (find(param, undefined) ?? find(undefined, param));
  if (!sn) throw new CliError("Failed to load snapshot: Can't find snapshot");
  try {
    validateSnapshotL1(img, sn);
  } catch (e) {
    throw new CliError(`Failed to load snapshot: ${e instanceof Error ? e.message : String(e)}`);
  }
  img.l1 = await img.readL1Table(sn.l1TableOffset, sn.l1Size);
  img.header.l1Size = sn.l1Size;
  img.dropCaches();
  chain.invalidate();
}

/** qcow2 option checks in qcow2_measure()'s order, with its messages. */
function qcow2Params(kv: Map<string, string>): { clusterSize: number; version: number; refcountBits: number; extendedL2: boolean; preallocation: 'off' | 'metadata' | 'falloc' | 'full' } {
  const extendedL2 = kv.get('extended_l2') === 'on';
  const cs = kv.has('cluster_size') ? parseOptionSize('cluster_size', kv.get('cluster_size') as string) : 65536n;
  const bits = cs > 0n ? cs.toString(2).length - 1 : -1;
  if (bits < 9 || bits > 21 || 1n << BigInt(bits) !== cs) throw new CliError('Cluster size must be a power of two between 512 and 2048k');
  const clusterSize = Number(cs);
  if (extendedL2 && clusterSize < 16384) throw new CliError('Extended L2 entries are only supported with cluster sizes of at least 16384 bytes');
  const compat = kv.get('compat');
  let version = 3;
  if (compat === '0.10') version = 2;
  else if (compat !== undefined && compat !== '1.1') throw new CliError(`Invalid compatibility level: '${compat}'`);
  const rb = kv.has('refcount_bits') ? Number(kv.get('refcount_bits')) : 16;
  if (!(rb > 0 && rb <= 64 && Number.isInteger(Math.log2(rb)))) throw new CliError('Refcount width must be a power of two and may not exceed 64 bits');
  if (version < 3 && rb !== 16) throw new CliError('Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)');
  const pa = kv.get('preallocation') ?? 'off';
  if (pa !== 'off' && pa !== 'metadata' && pa !== 'falloc' && pa !== 'full') throw new CliError(`invalid parameter value: ${pa}`);
  if (kv.get('encrypt.format') === 'luks') {
    if (!kv.has('encrypt.key-secret')) throw new CliError("Parameter 'encrypt.key-secret' is required for cipher");
    throw new CliError('Encrypted images are not supported by qchain');
  }
  return { clusterSize, version, refcountBits: rb, extendedL2, preallocation: pa };
}

export async function measureMain(argv: string[], ctx: CliContext): Promise<number> {
  const { opts, rest } = parseArgs(argv, ':hf:O:o:l:U', [HELP, IMAGE_OPTS, OBJECT, OUTPUT, { name: 'size', hasArg: 'required', val: 'SIZE' }, FORCE_SHARE]);
  let fmt: string | undefined, outFmt = 'raw', optstr: string | undefined, snapshot: string | undefined;
  let output: 'human' | 'json' = 'human';
  let size: bigint | undefined;
  for (const o of opts) {
    const a = o.arg as string;
    switch (o.opt) {
      case 'h': ctx.stdout.write('usage: qchain img measure [--output=ofmt] [-O output_fmt] [-o options] [--size N | [-f fmt] [-l snapshot_param] filename]\n'); return 0;
      case 'f': fmt = a; break;
      case 'O': outFmt = a; break;
      case 'o': optstr = accumulateOptions(optstr, a); break;
      case 'l': snapshot = a; break;
      case 'OUTPUT':
        if (a === 'json' || a === 'human') output = a;
        else throw new CliError('--output must be used with human or json as argument.');
        break;
      case 'SIZE': {
        const r = cvtnumRaw(a);
        if (!r.ok) throw new CliError('Invalid image size specified. You may use k, M, G, T, P or E suffixes for\nkilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.');
        size = r.value;
        break;
      }
      case 'IMAGE_OPTS': throw new CliError('--image-opts is not supported by qchain');
      default: break; // --object, -U: accepted, no effect here
    }
  }
  if (rest.length > 1) throw new CliError('At most one filename argument is allowed.');
  const filename = rest[0] as string | undefined;
  if (filename === undefined && (fmt !== undefined || snapshot !== undefined)) throw new CliError('--image-opts, -f, and -l require a filename argument.');
  if (filename !== undefined && size !== undefined) throw new CliError('--size N cannot be used together with a filename.');
  if (filename === undefined && size === undefined) throw new CliError('Either --size N or one filename must be specified.');

  let chain: Chain | null = null;
  try {
    if (filename !== undefined) {
      if (fmt !== undefined && !isFormat(fmt)) throw new CliError(`Could not open '${filename}': Unknown driver '${fmt}'`);
      chain = await open(filename, { format: fmt as ImageFormat | undefined, readOnly: true }, ctx);
      if (snapshot !== undefined) await loadSnapshotTmp(chain, snapshot);
    }
    if (!isFormat(outFmt)) throw new CliError(`Unknown file format '${outFmt}'`);
    const kv = optstr !== undefined ? parseCreateOpts(optstr, outFmt) : new Map<string, string>();
    let res: MeasureResult;
    if (outFmt === 'raw') {
      const req = chain ? chain.size : roundUpBig(size ?? 0n, 512n);
      res = { required: req, fullyAllocated: req };
    } else {
      const p = qcow2Params(kv);
      const virt = size ?? (kv.has('size') ? parseOptionSize('size', kv.get('size') as string) : 0n);
      res = await measureQcow2({ ...p, hasBackingFile: kv.has('backing_file'), size: roundUpBig(virt, BigInt(p.clusterSize)) },
        chain && filename !== undefined ? { chain, name: filename, bitmaps: await sourceBitmaps(chain) } : null);
    }
    // Exact decimal digits past 2^53 (the values are multiples of the cluster size, exact as doubles).
    const dec = (n: number): string => BigInt(n).toString();
    if (output === 'human') {
      ctx.stdout.write(`required size: ${dec(res.required)}\nfully allocated size: ${dec(res.fullyAllocated)}\n`);
      if (res.bitmaps !== undefined) ctx.stdout.write(`bitmaps size: ${dec(res.bitmaps)}\n`);
    } else {
      const lines: string[] = [];
      if (res.bitmaps !== undefined) lines.push(`    "bitmaps": ${dec(res.bitmaps)}`);
      lines.push(`    "required": ${dec(res.required)}`, `    "fully-allocated": ${dec(res.fullyAllocated)}`);
      ctx.stdout.write(`{\n${lines.join(',\n')}\n}\n`);
    }
    return 0;
  } catch (e) {
    if (e instanceof UsageError) throw e;
    const msg = asCliError(e).message;
    // Size parse errors carry a hint that QEMU prints without the program prefix.
    if (msg.includes('\nOptional suffix')) {
      ctx.stderr.write(msg.split('\n').map((l) => (l.startsWith('Optional suffix') || l.startsWith('and exabytes') ? `${l}\n` : `${PROG}: ${l}\n`)).join(''));
      return 1;
    }
    throw asCliError(e);
  } finally {
    if (chain) await chain.close().catch(() => {});
  }
}

/** ROUND_UP on the exact value, then a Number (multiples of a power of two stay exact). */
function roundUpBig(v: bigint, to: bigint): number {
  return Number(((v + to - 1n) / to) * to);
}
