/**
 * The copy step every job shares: for one chunk of the guest range, copy what the layers
 * [fromDepth, toDepth) of a chain hold into a target driver (data as data, zero as zero),
 * skipping what they do not hold. Returns the bytes actually copied (for the rate limit).
 */
import type { Chain } from '../chain/chain.js';
import type { BlockDriver } from '../image/driver.js';
import { tagged } from './errors.js';

export const JOB_CHUNK = 1024 * 1024;

export interface CopyOptions {
  /**
   * What the layers do not hold reads as zeros and must do so on the target too (a mirror of the
   * whole chain, QEMU's MIRROR_METHOD_ZERO): it is zeroed there, not skipped.
   */
  zeroUnallocated?: boolean;
  /** Zeros may deallocate the target's clusters (the mirror's unmap option). */
  mayUnmap?: boolean;
  /** Counts the bytes copied as data (not zeroed), what a mirror's rate limit charges. */
  stats?: { data: number };
}

export async function copyLayers(chain: Chain, fromDepth: number, toDepth: number, target: BlockDriver,
  offset: number, length: number, buf: Buffer, opts: CopyOptions = {}): Promise<number> {
  let copied = 0;
  const exts = await tagged('read', () => chain.statusFrom(fromDepth, offset, length));
  for (const x of exts) {
    const unallocated = x.depth >= toDepth || x.kind === 'unallocated';
    if (unallocated && !opts.zeroUnallocated) continue;
    if (unallocated || x.kind === 'zero') {
      await tagged('write', () => target.writeZeroes(x.offset, x.length, opts.mayUnmap ? { mayUnmap: true } : {}));
    } else {
      const b = buf.subarray(0, x.length);
      await tagged('read', () => chain.readFrom(fromDepth, b, x.offset));
      await tagged('write', () => target.write(b, x.offset));
      if (opts.stats) opts.stats.data += x.length;
    }
    copied += x.length;
  }
  return copied;
}
