/**
 * Random guest load for live tests: the 32 MiB three-layer chain they run on, and a seeded
 * generator of qemu-io write batches with, optionally, the guest view they must leave.
 */
import fs from 'node:fs';
import { qemuImg, qemuIo, rng } from './qemu.js';

const M = 1024 * 1024;
/** The virtual size of the chain `buildChain` makes. */
export const CHAIN_SIZE = 32 * M;

/**
 * base.qcow2 <- mid.qcow2 <- top.qcow2 (32 MiB) in `dir`, with data in each layer and a zeroed
 * range in mid (the command line is `chainArgs()` of live-qmp.ts).
 */
export async function buildChain(dir: string): Promise<void> {
  fs.mkdirSync(dir, { recursive: true });
  await qemuImg(['create', '-q', '-f', 'qcow2', 'base.qcow2', '32M'], dir);
  await qemuIo(['-c', 'write -P 0xaa 0 8M', '-c', 'write -P 0xab 20M 4M', 'base.qcow2'], dir);
  await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'mid.qcow2'], dir);
  await qemuIo(['-c', 'write -P 0xbb 4M 8M', '-c', 'write -z 21M 1M', 'mid.qcow2'], dir);
  await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', 'top.qcow2'], dir);
  await qemuIo(['-c', 'write -P 0xcc 10M 4M', 'top.qcow2'], dir);
}

export interface RandomWrites {
  /** The disk's size in bytes. */
  size: number;
  /** The longest write, in 4 KiB blocks (lengths are 1 to this many blocks). */
  maxBlocks: number;
  /** Writes in flight together before each flush. */
  batch: number;
  /** qemu-io's -q on every write. */
  quiet?: boolean;
  /** The guest view before the writes: every write is applied to it, in order. */
  model?: Buffer;
}

/**
 * Random guest writes (aio_write, one in ten a zero write) in batches of `batch` in flight, each
 * batch ended by a flush, and a last flush. Writes within a batch never overlap: neither NBD nor
 * QEMU orders overlapping requests in flight (an offline reference would itself race), so only
 * the flush boundaries define the result, and applying the writes in order to `model` gives
 * exactly what the disk must show.
 */
export function randomWrites(seed: number, n: number, o: RandomWrites): string[] {
  const r = rng(seed);
  const q = o.quiet ? ' -q' : '';
  const cmds: string[] = [];
  let batch: Array<[number, number]> = [];
  for (let i = 0; i < n; i++) {
    let off: number, len: number;
    do {
      len = (1 + Math.floor(r() * o.maxBlocks)) * 4096;
      off = Math.floor(r() * (o.size - len) / 512) * 512;
    } while (batch.some(([b, l]) => b < off + len && off < b + l));
    batch.push([off, len]);
    if (r() < 0.1) {
      cmds.push(`aio_write${q} -z ${off} ${len}`);
      o.model?.fill(0, off, off + len);
    } else {
      const p = 1 + Math.floor(r() * 254);
      cmds.push(`aio_write${q} -P 0x${p.toString(16)} ${off} ${len}`);
      o.model?.fill(p, off, off + len);
    }
    if (i % o.batch === o.batch - 1) {
      cmds.push('aio_flush');
      batch = [];
    }
  }
  cmds.push('aio_flush');
  return cmds;
}
