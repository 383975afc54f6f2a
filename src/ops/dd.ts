/**
 * The copy loop of `qemu-img dd`: guest bytes [inPos, end) of the source chain are written, all of
 * them (zeros included, as blk_pwrite does), to the target from offset 0 in order. The result
 * does not depend on the block size, so the copy runs in large chunks with the next read in
 * flight while the current chunk is written.
 */
import type { Chain } from '../chain/chain.js';
import type { BlockDriver } from '../image/driver.js';

const CHUNK = 4 * 1024 * 1024;

export class DdError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'DdError';
  }
}

export async function ddCopy(src: Chain, dst: BlockDriver, inPos: number, end: number): Promise<void> {
  const read = async (pos: number): Promise<Buffer> => {
    const b = Buffer.allocUnsafe(Math.min(CHUNK, end - pos));
    try {
      await src.read(b, pos);
    } catch (e) {
      throw new DdError(`error while reading from input image file: ${e instanceof Error ? e.message : String(e)}`);
    }
    return b;
  };
  let pos = inPos;
  let next: Promise<Buffer> | null = pos < end ? read(pos) : null;
  while (next) {
    const buf = await next;
    const at = pos - inPos;
    pos += buf.length;
    next = pos < end ? read(pos) : null;
    next?.catch(() => {}); // observed on the next iteration
    try {
      await dst.write(buf, at);
    } catch (e) {
      await next?.catch(() => {});
      throw new DdError(`error while writing to output image file: ${e instanceof Error ? e.message : String(e)}`);
    }
  }
}
