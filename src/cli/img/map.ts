/** `qemu-img map`: where each guest range lives, merged and formatted as qemu-img 7.2 does. */
import type { CliContext } from '../context.js';
import { CliError, UsageError } from '../util/errors.js';
import { parseSize } from '../util/options.js';
import { FORCE_SHARE, FORMAT, HELP, IMAGE_OPTS, OBJECT, OUTPUT, sourceFormat, oneFile, open, outputArg, parseArgs } from './common.js';
import type { Chain, ChainExtent } from '../../chain/chain.js';
import type { ImageFormat } from '../../chain/open.js';
import { ImageError } from '../../image/errors.js';
import { StorageError, errnoText } from '../../storage/storage.js';
import { Qcow2Image } from '../../qcow2/image.js';
import { hostRuns, metadataPreallocated } from '../../qcow2/metadata-prealloc.js';

export interface MapEntry {
  start: number;
  length: number;
  depth: number;
  present: boolean;
  zero: boolean;
  data: boolean;
  offset?: number;
  filename: string;
  compressed: boolean;
}

function toEntry(x: ChainExtent, chain: Chain): MapEntry {
  const e: MapEntry = {
    start: x.offset, length: x.length, depth: x.depth,
    present: x.kind !== 'unallocated', zero: x.kind !== 'data', data: x.kind === 'data',
    filename: chain.layers[x.depth].filename, compressed: !!x.compressed,
  };
  if (x.hostOffset !== undefined && !x.compressed) e.offset = x.hostOffset;
  return e;
}

function mergeable(a: MapEntry, b: MapEntry): boolean {
  return a.start + a.length === b.start && a.depth === b.depth && a.present === b.present && a.zero === b.zero &&
    a.data === b.data && a.compressed === b.compressed && a.filename === b.filename &&
    ((a.offset === undefined && b.offset === undefined) || (a.offset !== undefined && b.offset !== undefined && a.offset + a.length === b.offset));
}

/**
 * The entry as QEMU's block status reports it: data of a qcow2 layer QEMU treats as
 * metadata-preallocated is split by the holes of its file, which read as zero.
 */
async function withHostZeros(e: MapEntry, chain: Chain): Promise<MapEntry[]> {
  const d = chain.layers[e.depth].driver;
  if (!e.data || e.zero || e.offset === undefined || !(d instanceof Qcow2Image) || !(await metadataPreallocated(d))) return [e];
  const runs = await hostRuns(d, e.offset, e.length);
  if (runs.length === 1 && !runs[0].zero) return [e];
  const out: MapEntry[] = [];
  let skip = 0;
  for (const r of runs) {
    out.push({ ...e, start: e.start + skip, length: r.length, offset: e.offset + skip, zero: r.zero });
    skip += r.length;
  }
  return out;
}

/** Map entries for [start, start+length), chunked so memory stays bounded on huge images. */
export async function* mapEntries(chain: Chain, start: number, length: number): AsyncGenerator<MapEntry> {
  const end = Math.min(chain.size, start + length);
  // Status is asked 1 GiB at a time; while each answer is one run (an empty stretch of a huge
  // sparse image) the step doubles, up to what 2^18 runs of the finest layer can cover, so the
  // runs one answer can hold stay bounded.
  const MIN_STEP = 1024 * 1024 * 1024;
  const finest = Math.min(...chain.layers.map((l) => l.driver.granularity));
  const maxStep = Math.max(MIN_STEP, finest * 2 ** 18);
  let step = MIN_STEP;
  let pending: MapEntry | null = null;
  for (let pos = start; pos < end;) {
    const len = Math.min(step, end - pos);
    const xs = await chain.blockStatus(pos, len);
    for (const x of xs) {
      for (const e of await withHostZeros(toEntry(x, chain), chain)) {
        if (pending && mergeable(pending, e)) pending.length += e.length;
        else {
          if (pending) yield pending;
          pending = e;
        }
      }
    }
    pos += len;
    step = xs.length === 1 ? Math.min(maxStep, step * 2) : MIN_STEP;
  }
  if (pending) yield pending;
}

export function jsonEntry(e: MapEntry): string {
  return `{ "start": ${e.start}, "length": ${e.length}, "depth": ${e.depth}, "present": ${e.present}, "zero": ${e.zero}, "data": ${e.data}` +
    (e.offset !== undefined ? `, "offset": ${e.offset}` : '') + '}';
}

const hex = (n: number): string => (n === 0 ? '0' : `0x${n.toString(16)}`);

export async function mapMain(argv: string[], ctx: CliContext): Promise<number> {
  const { opts, rest } = parseArgs(argv, ':f:hU', [HELP, FORMAT, OUTPUT, OBJECT, IMAGE_OPTS, FORCE_SHARE,
    { name: 'start-offset', hasArg: 'required', val: 'START' }, { name: 'max-length', hasArg: 'required', val: 'MAXLEN' }]);
  let fmt: string | undefined, output: 'human' | 'json' = 'human';
  let start = 0, maxLen = Number.MAX_SAFE_INTEGER;
  let forceShare = false;
  for (const o of opts) {
    switch (o.opt) {
      case 'h': ctx.stdout.write('usage: qchain img map [-f fmt] [--start-offset=offset] [--max-length=len] [--output=ofmt] [-U] filename\n'); return 0;
      case 'f': fmt = o.arg as string; break;
      case 'U': forceShare = true; break;
      case 'OUTPUT': output = outputArg(o.arg as string); break;
      case 'START': start = parseSize(o.arg as string, { name: 'start offset' }); break;
      case 'MAXLEN': maxLen = parseSize(o.arg as string, { name: 'max length' }); break;
      case 'IMAGE_OPTS': throw new UsageError('--image-opts is not supported by qchain');
    }
  }
  const file = oneFile(rest);
  const chain = await open(file, { format: sourceFormat(file, fmt), readOnly: true, forceShare }, ctx);
  // What qemu-img has printed when a status query fails: the entries before it (JSON: each
  // followed by its separator, the opening bracket first) but not the one being merged.
  let out = '';
  let first = true;
  try {
    if (output === 'json') {
      for await (const e of mapEntries(chain, start, maxLen)) {
        out += (first ? '[' : ',\n') + jsonEntry(e);
        first = false;
        if (out.length > 1 << 16) {
          ctx.stdout.write(out);
          out = '';
        }
      }
      ctx.stdout.write(out + (first ? '[' : '') + ']\n');
    } else {
      out = `${'Offset'.padEnd(16)}${'Length'.padEnd(16)}${'Mapped to'.padEnd(16)}File\n`;
      for await (const e of mapEntries(chain, start, maxLen)) {
        if (e.data && e.compressed) {
          ctx.stdout.write(out);
          throw new CliError('File contains external, encrypted or compressed clusters.');
        }
        if (e.data && !e.zero && e.offset !== undefined) out += `${hex(e.start).padEnd(16)}${hex(e.length).padEnd(16)}${hex(e.offset).padEnd(16)}${e.filename}\n`;
      }
      ctx.stdout.write(out);
    }
  } catch (e) {
    const errno = e instanceof ImageError ? e.errno : e instanceof StorageError ? e.code : undefined;
    if (!errno) throw e;
    ctx.stdout.write(out + (output === 'json' ? (first ? '[' : ',\n') : ''));
    throw new CliError(`Could not read file metadata: ${errnoText(errno)}`);
  } finally {
    await chain.close();
  }
  return 0;
}
