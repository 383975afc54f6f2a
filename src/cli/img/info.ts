/** `qemu-img info`: human and JSON descriptions identical to qemu-img 7.2's. */
import type { CliContext } from '../context.js';
import { CliError, UsageError } from '../util/errors.js';
import { sizeToStr } from '../util/human.js';
import { FORCE_SHARE, FORMAT, HELP, IMAGE_OPTS, OBJECT, OUTPUT, sourceFormat, asCliError, oneFile, open, outputArg, parseArgs, qemuJson } from './common.js';
import type { Chain } from '../../chain/chain.js';
import type { BlockDriver } from '../../image/driver.js';
import { Qcow2Image } from '../../qcow2/image.js';
import { QcowImage } from '../../qcow/image.js';
import { AUTOCLEAR_DATA_FILE_RAW, INCOMPAT_DATA_FILE } from '../../qcow2/constants.js';
import type { Snapshot } from '../../qcow2/snapshot-table.js';
import type { BitmapInfo } from '../../qcow2/bitmaps.js';
import { backingOpenName, fullBackingName } from '../../chain/resolve.js';
import type { ImageFormat } from '../../chain/open.js';

/** The ImageInfo object, keys in the order qemu-img 7.2 prints them. */
export async function imageInfo(d: BlockDriver, filename: string): Promise<Record<string, unknown>> {
  const o: Record<string, unknown> = {};
  if (d.backingFile && d.backingFormat) o['backing-filename-format'] = d.backingFormat;
  if (d instanceof Qcow2Image && d.snapshots.length) o.snapshots = d.snapshots.map(snapshotInfo);
  o['virtual-size'] = d.size;
  o.filename = filename;
  if (d instanceof Qcow2Image || d instanceof QcowImage) o['cluster-size'] = d.clusterSize;
  o.format = d.format;
  o['actual-size'] = await d.storage.allocatedSize();
  if (d instanceof QcowImage && d.encrypted) o.encrypted = true;
  if (d instanceof Qcow2Image) {
    const bitmaps = d.bitmaps?.info() ?? [];
    const data: Record<string, unknown> = d.version >= 3
      ? {
        compat: '1.1', 'compression-type': d.compressionType === 1 ? 'zstd' : 'zlib', 'lazy-refcounts': d.lazyRefcounts,
        ...(bitmaps.length ? { bitmaps: bitmaps.map((b) => ({ flags: b.flags, name: b.name, granularity: b.granularity })) } : {}),
        'refcount-bits': 2 ** d.header.refcountOrder,
        ...(d.header.dataFile !== null ? { 'data-file': d.header.dataFile } : {}),
        ...((d.header.incompatible & BigInt(INCOMPAT_DATA_FILE)) !== 0n ? { 'data-file-raw': (d.header.autoclear & BigInt(AUTOCLEAR_DATA_FILE_RAW)) !== 0n } : {}),
        corrupt: d.corrupt, 'extended-l2': d.extL2,
      }
      : { compat: '0.10', 'compression-type': 'zlib', 'refcount-bits': 16 };
    o['format-specific'] = { type: 'qcow2', data };
  }
  if (d.backingFile) {
    o['full-backing-filename'] = fullBackingName(filename, d.backingFile);
    o['backing-filename'] = d.backingFile;
  }
  o['dirty-flag'] = d instanceof Qcow2Image ? d.dirty : false;
  return o;
}

function snapshotInfo(s: Snapshot): Record<string, unknown> {
  const o: Record<string, unknown> = {};
  if (s.icount >= 0) o.icount = s.icount;
  o['vm-clock-nsec'] = s.vmClockNsec % 1e9;
  o.name = s.name;
  o['date-sec'] = s.dateSec;
  o['date-nsec'] = s.dateNsec;
  o['vm-clock-sec'] = Math.floor(s.vmClockNsec / 1e9);
  o.id = s.id;
  o['vm-state-size'] = s.vmStateSize;
  return o;
}

const pad2 = (n: number): string => String(n).padStart(2, '0');

/** One row of QEMU's snapshot table (`%-9s %-16s %8s%20s%13s%11s`), or the header row. */
export function snapshotRow(s: Snapshot | null): string {
  if (!s) return `${'ID'.padEnd(10)}${'TAG'.padEnd(17)}${'VM SIZE'.padStart(8)}${'DATE'.padStart(20)}${'VM CLOCK'.padStart(13)}${'ICOUNT'.padStart(11)}`;
  const t = new Date(s.dateSec * 1000);
  const date = `${t.getFullYear()}-${pad2(t.getMonth() + 1)}-${pad2(t.getDate())} ${pad2(t.getHours())}:${pad2(t.getMinutes())}:${pad2(t.getSeconds())}`;
  const secs = Math.floor(s.vmClockNsec / 1e9);
  const clock = `${pad2(Math.floor(secs / 3600))}:${pad2(Math.floor(secs / 60) % 60)}:${pad2(secs % 60)}.${String(Math.floor((s.vmClockNsec % 1e9) / 1e6)).padStart(3, '0')}`;
  const icount = s.icount >= 0 ? String(s.icount) : '';
  return `${s.id.padEnd(9)} ${s.name.padEnd(16)} ${sizeToStr(s.vmStateSize).padStart(8)}${date.padStart(20)}${clock.padStart(13)}${icount.padStart(11)}`;
}

export function humanInfo(info: Record<string, unknown>, d: BlockDriver): string {
  const lines: string[] = [];
  lines.push(`image: ${info.filename}`);
  lines.push(`file format: ${info.format}`);
  lines.push(`virtual size: ${sizeToStr(info['virtual-size'] as number)} (${info['virtual-size']} bytes)`);
  lines.push(`disk size: ${sizeToStr(info['actual-size'] as number)}`);
  if (info.encrypted) lines.push('encrypted: yes');
  if (info['cluster-size'] !== undefined) lines.push(`cluster_size: ${info['cluster-size']}`);
  if (info['dirty-flag']) lines.push('cleanly shut down: no');
  if (info['backing-filename'] !== undefined) {
    const stored = info['backing-filename'] as string, full = info['full-backing-filename'] as string;
    lines.push(stored === full ? `backing file: ${stored}` : `backing file: ${stored} (actual path: ${full})`);
    if (info['backing-filename-format'] !== undefined) lines.push(`backing file format: ${info['backing-filename-format']}`);
  }
  if (d instanceof Qcow2Image && d.snapshots.length) {
    lines.push('Snapshot list:');
    lines.push(snapshotRow(null));
    for (const s of d.snapshots) lines.push(snapshotRow(s));
  }
  const fs = info['format-specific'] as { data: Record<string, unknown> } | undefined;
  if (fs) {
    lines.push('Format specific information:');
    const names: Record<string, string> = { compat: 'compat', 'compression-type': 'compression type', 'lazy-refcounts': 'lazy refcounts', 'refcount-bits': 'refcount bits', corrupt: 'corrupt', 'extended-l2': 'extended l2', 'data-file': 'data file', 'data-file-raw': 'data file raw' };
    for (const [k, v] of Object.entries(fs.data)) {
      if (k === 'bitmaps') lines.push('    bitmaps:', ...humanBitmaps(v as BitmapInfo[]));
      else lines.push(`    ${names[k] ?? k}: ${v}`);
    }
  }
  return lines.join('\n') + '\n';
}

/** The bitmaps list as QEMU's human dump prints a list of objects (indices, nested lists). */
function humanBitmaps(list: BitmapInfo[]): string[] {
  const out: string[] = [];
  list.forEach((b, i) => {
    out.push(`        [${i}]:`, '            flags:');
    b.flags.forEach((f, j) => out.push(`                [${j}]: ${f}`));
    out.push(`            name: ${b.name}`, `            granularity: ${b.granularity}`);
  });
  return out;
}

export async function infoMain(argv: string[], ctx: CliContext): Promise<number> {
  const { opts, rest } = parseArgs(argv, ':f:hU', [HELP, FORMAT, OUTPUT, { name: 'backing-chain', hasArg: 'no', val: 'CHAIN' }, OBJECT, IMAGE_OPTS, FORCE_SHARE]);
  let fmt: string | undefined, output: 'human' | 'json' = 'human', chainMode = false;
  let forceShare = false;
  for (const o of opts) {
    switch (o.opt) {
      case 'h': ctx.stdout.write('usage: qchain img info [-f fmt] [--output=ofmt] [--backing-chain] [-U] filename\n'); return 0;
      case 'f': fmt = o.arg as string; break;
      case 'U': forceShare = true; break;
      case 'OUTPUT': output = outputArg(o.arg as string); break;
      case 'CHAIN': chainMode = true; break;
      case 'IMAGE_OPTS': throw new UsageError('--image-opts is not supported by qchain');
    }
  }
  const file = oneFile(rest);
  // Each image of the chain is opened on its own (as qemu-img does), so an error names the image
  // that fails, and a loop is reported when a name comes back.
  const infos: Record<string, unknown>[] = [];
  const texts: string[] = [];
  const seen = new Set<string>();
  let name = file;
  let format = sourceFormat(file, fmt);
  for (;;) {
    if (seen.has(name)) throw new CliError(`Backing file '${name}' creates an infinite loop.`);
    seen.add(name);
    const chain: Chain = await open(name, { format, readOnly: true, noBacking: true, noRepair: true, noIo: true, forceShare }, ctx);
    let next: string | null;
    let nextFormat: string | null;
    // A json: description shows (and resolves names against) its file's name.
    const shown = chain.layers[0].filename;
    try {
      const info = await imageInfo(chain.top, shown);
      infos.push(info);
      texts.push(humanInfo(info, chain.top));
      next = chain.top.backingFile ?? null;
      nextFormat = chain.top.backingFormat ?? null;
    } finally {
      await chain.close();
    }
    if (!chainMode || !next) break;
    try {
      name = backingOpenName(shown, next);
    } catch (e) {
      throw new CliError(`Could not open '${next}': ${asCliError(e).message}`);
    }
    format = nextFormat === null ? undefined : sourceFormat(name, nextFormat);
  }
  if (output === 'json') ctx.stdout.write(qemuJson(chainMode ? infos : infos[0]) + '\n');
  else ctx.stdout.write(texts.join('\n'));
  return 0;
}
