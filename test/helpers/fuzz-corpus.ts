/**
 * Fuzzer: the seed corpus. Small, valid images of several shapes built once per process with the
 * real qemu-img / qemu-io (v2/v3, 512 B/4 KiB/64 KiB clusters, extended L2, refcount widths 1/16/64,
 * zlib and zstd compressed clusters, internal snapshots, persistent bitmaps, qcow2 and raw backing
 * chains, a lazy-refcounts image left dirty by a crash). Each shape names its entry file (the one
 * the commands open) and the files that may be mutated (a backing file may be the broken one).
 */
import { execFileSync, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { QEMU_IMG, QEMU_IO } from './qemu.js';

export interface Shape {
  name: string;
  /** The file every command opens. */
  entry: string;
  /** Files a mutation may target (entry first). */
  targets: string[];
  /** Virtual size of the entry image. */
  size: number;
  /** Folder holding the built files (read only: iterations copy it). */
  dir: string;
}

type Step = string[];

interface Recipe {
  name: string;
  entry: string;
  targets: string[];
  size: number;
  /** Commands run in the shape's folder: ['img', ...] for qemu-img, ['io', ...] for qemu-io. */
  steps: Step[];
  /** A qemu-io run that ends with `abort` (leaves the image dirty). */
  crash?: string[];
}

const W = (file: string, ...cmds: string[]): Step => ['io', '-f', 'qcow2', ...cmds.flatMap((c) => ['-c', c]), file];
const C = (file: string, size: string, opts: string, backing?: [string, string]): Step =>
  ['img', 'create', '-q', '-f', 'qcow2', ...(opts ? ['-o', opts] : []), ...(backing ? ['-u', '-b', backing[0], '-F', backing[1]] : []), file, ...(size ? [size] : [])];

const DATA = ['write -P 0x11 0 96k', 'write -P 0x22 200k 8k', 'write -z 300k 64k', 'write -P 0x33 1000k 5k'];

const RECIPES: Recipe[] = [
  { name: 'v2-64k', entry: 'a.qcow2', targets: ['a.qcow2'], size: 2 << 20, steps: [C('a.qcow2', '2M', 'compat=0.10'), W('a.qcow2', ...DATA)] },
  { name: 'v3-4k', entry: 'a.qcow2', targets: ['a.qcow2'], size: 2 << 20, steps: [C('a.qcow2', '2M', 'cluster_size=4096'), W('a.qcow2', ...DATA, 'write -P 0x44 1900k 100k')] },
  { name: 'v3-4k-two-l2', entry: 'a.qcow2', targets: ['a.qcow2'], size: 8 << 20, steps: [C('a.qcow2', '8M', 'cluster_size=4096'), W('a.qcow2', 'write -P 0x11 0 100k', 'write -P 0x22 5M 64k')] },
  { name: 'v3-512', entry: 'a.qcow2', targets: ['a.qcow2'], size: 1 << 20, steps: [C('a.qcow2', '1M', 'cluster_size=512'), W('a.qcow2', 'write -P 0x11 0 20k', 'write -P 0x22 300k 3k', 'write -z 600k 4k', 'write -P 0x33 900k 1k')] },
  { name: 'v2-512', entry: 'a.qcow2', targets: ['a.qcow2'], size: 1 << 20, steps: [C('a.qcow2', '1M', 'compat=0.10,cluster_size=512'), W('a.qcow2', 'write -P 0x11 0 20k', 'write -P 0x22 700k 3k')] },
  { name: 'extl2-64k', entry: 'a.qcow2', targets: ['a.qcow2'], size: 2 << 20, steps: [C('a.qcow2', '2M', 'extended_l2=on'), W('a.qcow2', 'write -P 0x11 0 4k', 'write -P 0x22 70k 6k', 'write -z 130k 2k', 'write -P 0x33 1M 64k', 'write -z 1100k 64k')] },
  { name: 'extl2-32k', entry: 'a.qcow2', targets: ['a.qcow2'], size: 1 << 20, steps: [C('a.qcow2', '1M', 'extended_l2=on,cluster_size=32768'), W('a.qcow2', 'write -P 0x11 1k 3k', 'write -P 0x22 40k 1k', 'write -z 500k 2k')] },
  { name: 'rc1', entry: 'a.qcow2', targets: ['a.qcow2'], size: 2 << 20, steps: [C('a.qcow2', '2M', 'refcount_bits=1,cluster_size=4096'), W('a.qcow2', ...DATA)] },
  { name: 'rc64', entry: 'a.qcow2', targets: ['a.qcow2'], size: 2 << 20, steps: [C('a.qcow2', '2M', 'refcount_bits=64,cluster_size=4096'), W('a.qcow2', ...DATA)] },
  { name: 'rc8-lazy', entry: 'a.qcow2', targets: ['a.qcow2'], size: 1 << 20, steps: [C('a.qcow2', '1M', 'refcount_bits=8,lazy_refcounts=on'), W('a.qcow2', 'write -P 0x11 0 70k')] },
  {
    name: 'compressed-zlib', entry: 'c.qcow2', targets: ['c.qcow2'], size: 1 << 20,
    steps: [['img', 'create', '-q', '-f', 'raw', 'r.raw', '1M'], ['io', '-f', 'raw', '-c', 'write -P 0x61 0 256k', '-c', 'write -P 0x62 512k 100k', 'r.raw'],
      ['img', 'convert', '-c', '-O', 'qcow2', '-o', 'cluster_size=4096', 'r.raw', 'c.qcow2'], ['rm', 'r.raw']],
  },
  {
    name: 'compressed-zstd-64k', entry: 'c.qcow2', targets: ['c.qcow2'], size: 1 << 20,
    steps: [['img', 'create', '-q', '-f', 'raw', 'r.raw', '1M'], ['io', '-f', 'raw', '-c', 'write -P 0x61 0 256k', '-c', 'write -P 0x62 600k 100k', 'r.raw'],
      ['img', 'convert', '-c', '-O', 'qcow2', '-o', 'compression_type=zstd', 'r.raw', 'c.qcow2'], ['rm', 'r.raw'], W('c.qcow2', 'write -P 0x63 10k 4k')],
  },
  {
    name: 'compressed-v2-512', entry: 'c.qcow2', targets: ['c.qcow2'], size: 256 << 10,
    steps: [['img', 'create', '-q', '-f', 'raw', 'r.raw', '256k'], ['io', '-f', 'raw', '-c', 'write -P 0x61 0 64k', 'r.raw'],
      ['img', 'convert', '-c', '-O', 'qcow2', '-o', 'compat=0.10,cluster_size=512', 'r.raw', 'c.qcow2'], ['rm', 'r.raw']],
  },
  {
    name: 'snapshots', entry: 'a.qcow2', targets: ['a.qcow2'], size: 1 << 20,
    steps: [C('a.qcow2', '1M', 'cluster_size=4096'), W('a.qcow2', 'write -P 0x11 0 64k'), ['img', 'snapshot', '-c', 's1', 'a.qcow2'],
      W('a.qcow2', 'write -P 0x22 16k 64k'), ['img', 'snapshot', '-c', 'second-snapshot', 'a.qcow2'], W('a.qcow2', 'write -P 0x33 512k 4k')],
  },
  {
    name: 'snapshots-v2-64k', entry: 'a.qcow2', targets: ['a.qcow2'], size: 1 << 20,
    steps: [C('a.qcow2', '1M', 'compat=0.10'), W('a.qcow2', 'write -P 0x11 0 64k'), ['img', 'snapshot', '-c', 's1', 'a.qcow2'], W('a.qcow2', 'write -P 0x22 0 4k')],
  },
  {
    name: 'bitmaps', entry: 'a.qcow2', targets: ['a.qcow2'], size: 2 << 20,
    steps: [C('a.qcow2', '2M', 'cluster_size=4096'), ['img', 'bitmap', '--add', 'a.qcow2', 'b0'], ['img', 'bitmap', '--add', '-g', '512', 'a.qcow2', 'fine'],
      W('a.qcow2', ...DATA), ['img', 'bitmap', '--add', '--disable', 'a.qcow2', 'off']],
  },
  {
    name: 'chain-qcow2', entry: 'top.qcow2', targets: ['top.qcow2', 'base.qcow2'], size: 2 << 20,
    steps: [C('base.qcow2', '2M', 'cluster_size=4096'), W('base.qcow2', ...DATA), C('top.qcow2', '2M', '', ['base.qcow2', 'qcow2']),
      W('top.qcow2', 'write -P 0x55 64k 64k', 'write -z 210k 4k', 'write -P 0x66 1500k 3k')],
  },
  {
    name: 'chain-3-extl2', entry: 'c.qcow2', targets: ['c.qcow2', 'b.qcow2', 'a.qcow2'], size: 1 << 20,
    steps: [C('a.qcow2', '1M', 'compat=0.10'), W('a.qcow2', 'write -P 0x11 0 200k'), C('b.qcow2', '1M', 'extended_l2=on', ['a.qcow2', 'qcow2']),
      W('b.qcow2', 'write -P 0x22 3k 5k', 'write -z 100k 2k'), C('c.qcow2', '1M', 'cluster_size=512', ['b.qcow2', 'qcow2']), W('c.qcow2', 'write -P 0x33 1k 1k')],
  },
  {
    name: 'chain-raw-backing', entry: 'top.qcow2', targets: ['top.qcow2'], size: 1 << 20,
    steps: [['img', 'create', '-q', '-f', 'raw', 'base.raw', '1M'], ['io', '-f', 'raw', '-c', 'write -P 0x77 0 1M', 'base.raw'],
      C('top.qcow2', '1M', 'cluster_size=4096', ['base.raw', 'raw']), W('top.qcow2', 'write -P 0x55 8k 8k')],
  },
  {
    name: 'lazy-dirty', entry: 'a.qcow2', targets: ['a.qcow2'], size: 1 << 20,
    steps: [C('a.qcow2', '1M', 'lazy_refcounts=on,cluster_size=4096'), W('a.qcow2', 'write -P 0x11 0 8k')],
    crash: ['-f', 'qcow2', '-c', 'write -P 0x22 64k 64k', '-c', 'write -P 0x23 512k 4k', '-c', 'abort', 'a.qcow2'],
  },
];

export const SHAPE_NAMES = RECIPES.map((r) => r.name);

function runStep(step: Step, dir: string): void {
  const [tool, ...args] = step;
  if (tool === 'rm') { fs.rmSync(path.join(dir, args[0])); return; }
  const bin = tool === 'img' ? QEMU_IMG : QEMU_IO;
  if (!bin) throw new Error(`qemu-${tool} is not installed`);
  execFileSync(bin, args, { cwd: dir, stdio: ['ignore', 'ignore', 'pipe'] });
}

/** Build every shape under `root` (once per process) and return them by name. */
export function buildCorpus(root: string): Map<string, Shape> {
  const shapes = new Map<string, Shape>();
  for (const r of RECIPES) {
    const dir = path.join(root, r.name);
    fs.mkdirSync(dir, { recursive: true });
    for (const s of r.steps) runStep(s, dir);
    if (r.crash) {
      // qemu-io's `abort` leaves the dirty bit set and the refcounts stale (lazy refcounts).
      spawnSync(QEMU_IO ?? 'qemu-io', r.crash, { cwd: dir, stdio: 'ignore' });
    }
    shapes.set(r.name, { name: r.name, entry: r.entry, targets: r.targets, size: r.size, dir });
  }
  return shapes;
}
