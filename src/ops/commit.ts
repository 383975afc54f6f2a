/**
 * Commit (qemu-img commit, QEMU's active commit job): copy every range allocated in the layers
 * above a base into the base, then (unless dropped) empty the top. Ranges are found by chain
 * block status and widened to the copy granularity (the base's cluster size clamped to
 * 4 KiB..64 KiB, as QEMU's dirty bitmap); each granule is copied as data or written as zeros
 * (may unmap) according to what the top's guest view holds there.
 *
 * Invariants: the top's guest view never changes (only the base is written, and only with what
 * the top already shows); the base is flushed before the top is emptied, so a crash at any
 * point leaves the top's view intact and re-running the commit finishes it.
 */
import type { Chain } from '../chain/chain.js';
import { ImageError } from '../image/errors.js';
import { Qcow2Image } from '../qcow2/image.js';
import { RateLimiter, runPool } from './pool.js';
import { Mutex } from '../util/mutex.js';
import { alignedBuffer, releaseAligned } from '../storage/aligned.js';

export interface CommitOptions {
  /** Keep the top's content (qemu-img commit -d; -b implies it). */
  drop?: boolean;
  /** Copied bytes per second (qemu-img -r; 0 = unlimited). */
  rateLimit?: number;
  /** Requests in flight. */
  parallel?: number;
  /** Largest request in bytes. */
  chunkSize?: number;
  /** Called as bytes are committed (done, total). */
  onProgress?: (done: number, total: number) => void;
}

interface Range { offset: number; length: number }
interface Job extends Range { kind: 'data' | 'zero' }

/**
 * Ranges of [0, size) allocated above `baseDepth`, widened to `gran` and merged, window by
 * window (64 MiB windows are multiples of `gran`, so no range crosses one; memory stays bounded).
 */
export async function* dirtyRanges(chain: Chain, baseDepth: number, gran: number): AsyncGenerator<Range> {
  const size = chain.size;
  const WINDOW = 64 * 1024 * 1024;
  for (let pos = 0; pos < size; pos += WINDOW) {
    let cur: Range | null = null;
    for (const x of await chain.statusFrom(0, pos, Math.min(WINDOW, size - pos))) {
      // Bytes past the end of a short intermediate layer count as allocated (zeros) in it.
      const above = x.depth < baseDepth && (x.kind !== 'unallocated' || x.depth + 1 < baseDepth);
      if (!above) continue;
      const a = Math.floor(x.offset / gran) * gran;
      const b = Math.min(size, Math.ceil((x.offset + x.length) / gran) * gran);
      if (cur && cur.offset + cur.length >= a) cur.length = Math.max(cur.length, b - cur.offset);
      else {
        if (cur) yield cur;
        cur = { offset: a, length: b - a };
      }
    }
    if (cur) yield cur;
  }
}

/** Copy granularity for a base: its cluster size clamped to [4 KiB, 64 KiB] (64 KiB for raw). */
export function commitGranularity(chain: Chain, baseDepth: number): number {
  const base = chain.layers[baseDepth].driver;
  const cs = base instanceof Qcow2Image ? base.clusterSize : 65536;
  return Math.min(65536, Math.max(4096, cs));
}

/** Commit layers [0, baseDepth) of `chain` into layer `baseDepth`, which must be open read-write. */
export async function commit(chain: Chain, baseDepth: number, opts: CommitOptions = {}): Promise<void> {
  if (baseDepth < 1 || baseDepth >= chain.depth) throw new ImageError('Image does not have a backing file');
  const top = chain.top;
  const base = chain.layers[baseDepth].driver;
  if (base.readOnly) throw new ImageError('Permission denied', 'EACCES');
  const chunk = opts.chunkSize ?? 4 * 1024 * 1024;
  const saved = chain.cacheBacking;
  // The base changes under the chain: no cached resolution of the lower layers may be used.
  chain.cacheBacking = false;
  chain.invalidate();
  try {
    if (base.size < top.size) {
      if (!base.resize) throw new ImageError(`Cannot grow '${chain.layers[baseDepth].filename}': its driver cannot resize`, 'ENOTSUP');
      await base.resize(top.size);
    }
    const gran = commitGranularity(chain, baseDepth);
    // Progress runs over the whole disk, ranges with nothing to commit counting as done when
    // passed (QEMU's commit job does the same), so one block-status scan serves both.
    const total = chain.size;
    let done = 0;
    opts.onProgress?.(0, total);
    let scanned = 0;
    async function* jobs(): AsyncGenerator<Job> {
      for await (const r of dirtyRanges(chain, baseDepth, gran)) {
        if (r.offset > scanned) advance(r.offset - scanned);
        scanned = r.offset + r.length;
        for (const x of await chain.statusFrom(0, r.offset, r.length)) {
          const kind = x.kind === 'data' ? 'data' : 'zero';
          for (let p = x.offset; p < x.offset + x.length;) {
            const next = Math.min(x.offset + x.length, (Math.floor(p / chunk) + 1) * chunk);
            yield { offset: p, length: next - p, kind };
            p = next;
          }
        }
      }
      if (total > scanned) advance(total - scanned);
    }
    function advance(n: number): void {
      done += n;
      opts.onProgress?.(done, total);
    }
    const limiter = new RateLimiter(opts.rateLimit ?? 0);
    const buffers: Buffer[] = [];
    // Reads overlap. Buffered writes into the base go one at a time (they serialise in the
    // kernel anyway, and concurrent ones only add lock contention); direct ones overlap, as the
    // device takes several at once. Buffers are page-aligned so that they can go direct.
    const writing = base.storage.direct ? null : new Mutex();
    await runPool(jobs(), opts.parallel ?? 8, async (j) => {
      if (j.kind === 'zero') {
        await base.writeZeroes(j.offset, j.length, { mayUnmap: true });
      } else {
        await limiter.take(j.length);
        const full = buffers.pop() ?? alignedBuffer(chunk);
        const buf = full.subarray(0, j.length);
        try {
          await chain.read(buf, j.offset);
          if (writing) await writing.run(() => base.write(buf, j.offset));
          else await base.write(buf, j.offset);
        } finally {
          buffers.push(full);
        }
      }
      advance(j.length);
    });
    for (const b of buffers) releaseAligned(b); // all jobs are done with them
    await base.flush();
    if (!opts.drop && top instanceof Qcow2Image) {
      await top.makeEmpty();
      await top.flush();
    }
  } finally {
    chain.invalidate();
    chain.cacheBacking = saved;
  }
}
