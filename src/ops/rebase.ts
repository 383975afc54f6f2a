/**
 * Rebase (qemu-img rebase): give an image another backing file. Safe mode first copies into the
 * image every range it does not hold itself whose content differs between the old backing view
 * and the new one (compared in 512-byte sectors, as QEMU does); then the header's backing name
 * and format are rewritten. Unsafe mode only rewrites the header.
 *
 * Invariants: during the copy the image's guest view never changes (only bytes equal to what
 * the old backing shows are written, into ranges the image does not hold); the data is flushed
 * before the header switches, so a crash leaves either the old pointer with a correct view or
 * the new pointer with all needed data.
 */
import type { Chain, ChainExtent } from '../chain/chain.js';
import type { BlockDriver } from '../image/driver.js';
import { ImageError } from '../image/errors.js';
import { Qcow2Image } from '../qcow2/image.js';
import { runPool } from './pool.js';
import { Mutex } from '../util/mutex.js';
import { alignedBuffer, releaseAligned } from '../storage/aligned.js';

/** The guest view of layers [depth..] of a chain. */
export interface ChainView {
  chain: Chain;
  depth: number;
}

export interface RebaseCopyOptions {
  parallel?: number;
  /** Bytes compared per request. */
  chunkSize?: number;
  onProgress?: (done: number, total: number) => void;
}

const SECTOR = 512;
const BLOCK = 64 * 1024;

/**
 * Byte runs to write so that `x` (the old view) lands where it differs from `y`: within each
 * allocation unit of `unit` bytes (≥ 512) that differs, the span from its first to its last
 * differing 512-byte sector. The same units get allocated as when writing only the differing
 * sectors (as QEMU does), with the same content, in far fewer compares and writes.
 */
export function differingRuns(x: Buffer, y: Buffer, unit = SECTOR): Array<[number, number]> {
  const runs: Array<[number, number]> = [];
  if (x.equals(y)) return runs;
  const n = x.length;
  const u = Math.min(BLOCK, Math.max(SECTOR, unit));
  const same = (s: number, e: number): boolean => x.subarray(s, e).equals(y.subarray(s, e));
  for (let p = 0; p < n; p += BLOCK) {
    const q = Math.min(n, p + BLOCK);
    if (same(p, q)) continue;
    for (let ua = p; ua < q; ua += u) {
      const ub = Math.min(q, ua + u);
      if (same(ua, ub)) continue;
      let first = ua;
      while (same(first, Math.min(ub, first + SECTOR))) first += SECTOR;
      let last = ub;
      for (;;) {
        const s = Math.floor((last - 1 - ua) / SECTOR) * SECTOR + ua;
        if (!same(s, last)) break;
        last = s;
      }
      const prev = runs[runs.length - 1];
      if (prev && prev[1] === first) prev[1] = last;
      else runs.push([first, last]);
    }
  }
  return runs;
}

const zeroish = (xs: ChainExtent[]): boolean => xs.every((x) => x.kind !== 'data');

/**
 * The copy phase of a safe rebase of `chain.top` from its current backing (layers 1..) onto
 * `next` (null = no backing: flatten). When `next` is a layer of the same chain, ranges not
 * allocated between the old backing and that layer are skipped (their views are the same).
 */
export async function rebaseCopy(chain: Chain, next: ChainView | null, opts: RebaseCopyOptions = {}): Promise<void> {
  const top = chain.top;
  const size = top.size;
  const chunk = opts.chunkSize ?? 2 * 1024 * 1024;
  const oldSize = chain.depth > 1 ? chain.layers[1].driver.size : 0;
  const prefix = next && next.chain === chain ? next.depth : null;
  const newSize = next ? next.chain.layers[next.depth].driver.size : 0;
  let done = 0;
  opts.onProgress?.(0, size);

  // Candidate chunks: unallocated in the image, split at the chunk grid and at the old backing's end.
  async function* chunks(): AsyncGenerator<{ offset: number; length: number }> {
    const WINDOW = 32 * chunk;
    for (let pos = 0; pos < size; pos += WINDOW) {
      const len = Math.min(WINDOW, size - pos);
      for (const e of await top.blockStatus(pos, len)) {
        if (e.kind !== 'unallocated') continue;
        let ranges: Array<{ offset: number; length: number }> = [{ offset: e.offset, length: e.length }];
        if (prefix !== null) {
          // Only what the layers above the new backing hold can differ (within the old backing).
          ranges = [];
          const inOld = Math.max(0, Math.min(e.offset + e.length, oldSize) - e.offset);
          if (inOld > 0) {
            for (const x of await chain.statusFrom(1, e.offset, inOld)) if (x.depth < prefix) ranges.push({ offset: x.offset, length: x.length });
          }
          if (inOld < e.length) ranges.push({ offset: e.offset + inOld, length: e.length - inOld });
        }
        for (const r of ranges) {
          for (let p = r.offset; p < r.offset + r.length;) {
            let q = Math.min(r.offset + r.length, (Math.floor(p / chunk) + 1) * chunk);
            if (p < oldSize && q > oldSize) q = oldSize;
            yield { offset: p, length: q - p };
            p = q;
          }
        }
      }
      done = Math.max(done, pos);
      opts.onProgress?.(done, size);
    }
  }

  const pool: Array<[Buffer, Buffer]> = [];
  // Reads and compares overlap; buffered writes into the image go one request at a time (they
  // serialise in the kernel; concurrent ones only add contention), direct ones overlap.
  const writing = top.storage.direct ? null : new Mutex();
  const write = async (runs: Array<[number, number]>, a: Buffer, c: { offset: number }, beyondOld: boolean): Promise<void> => {
    for (const [s, e] of runs) {
      if (beyondOld) await top.writeZeroes(c.offset + s, e - s);
      else await top.write(a.subarray(s, e), c.offset + s);
    }
  };
  await runPool(chunks(), opts.parallel ?? 8, async (c) => {
    const beyondOld = c.offset >= oldSize;
    const oldStatus = beyondOld ? [] : await chain.statusFrom(1, c.offset, c.length);
    const inNew = Math.max(0, Math.min(c.length, newSize - c.offset));
    const newStatus = next && inNew > 0 ? await next.chain.statusFrom(next.depth, c.offset, inNew) : [];
    if (zeroish(oldStatus) && zeroish(newStatus)) return;
    const bufs = pool.pop() ?? [alignedBuffer(chunk), alignedBuffer(chunk)];
    try {
      const a = bufs[0].subarray(0, c.length), b = bufs[1].subarray(0, c.length);
      if (beyondOld) a.fill(0);
      if (inNew < c.length) b.fill(0, inNew);
      // Both views are read at once (independent reads).
      await Promise.all([
        beyondOld ? null : chain.readFrom(1, a, c.offset),
        inNew > 0 && next ? next.chain.readFrom(next.depth, b.subarray(0, inNew), c.offset) : null,
      ]);
      const runs = differingRuns(a, b, top.granularity);
      if (runs.length === 0) return;
      if (writing) await writing.run(() => write(runs, a, c, beyondOld));
      else await write(runs, a, c, beyondOld);
    } finally {
      pool.push(bufs);
    }
  });
  for (const [a, b] of pool) {
    releaseAligned(a);
    releaseAligned(b);
  }
  await top.flush();
  opts.onProgress?.(size, size);
}

/**
 * Rewrite the backing pointer (QEMU's bdrv_change_backing_file with the format required):
 * errors carry QEMU's errno (EINVAL without a format, ENOTSUP for raw, ENOSPC when the header
 * cluster cannot hold the name).
 */
export async function changeBackingFile(d: BlockDriver, name: string | null, format: string | null): Promise<void> {
  if (name !== null && !format) throw new ImageError('Invalid argument', 'EINVAL');
  if (!(d instanceof Qcow2Image)) throw new ImageError('Operation not supported', 'ENOTSUP');
  await d.changeBackingFile(name, format);
}
