/**
 * NBD_CMD_CACHE as QEMU 7.2 serves it: a copy-on-read prefetch (blk_co_preadv with
 * BDRV_REQ_COPY_ON_READ | BDRV_REQ_PREFETCH). Every part of the request, widened to the node's
 * (sub)clusters, that the exported node itself does not hold is read from the chain below and
 * written into the node, in chunks of at most 16 MiB, a chunk of zeroes as a zero write
 * (bdrv_co_do_copy_on_readv). The writes go below the node's request checks, as the stream
 * job's do: no dirty bit, no write threshold. A read-only node is left alone.
 */
import { writeGate } from '../chain/chain.js';
import type { BlockGraph, FormatNode } from './graph.js';
import { copyOnReadWrite } from './node-io.js';

/** QEMU's MAX_BOUNCE_BUFFER. */
const MAX_BOUNCE = 16 * 1024 * 1024;

export async function cacheRange(graph: BlockGraph, node: FormatNode, offset: number, length: number): Promise<void> {
  const top = node.driver;
  if (top.readOnly || length === 0) return;
  const g = top.granularity;
  const start = Math.floor(offset / g) * g;
  const end = Math.min(top.size, Math.ceil((offset + length) / g) * g);
  const chain = graph.chain(node);
  const release = await writeGate(top).acquire(start, end);
  try {
    for (let pos = start; pos < end;) {
      const own = await top.blockStatus(pos, end - pos);
      if (own.length === 0) break;
      for (const x of own) {
        if (x.kind !== 'unallocated') continue;
        for (let o = x.offset; o < x.offset + x.length; o += MAX_BOUNCE) {
          const b = Buffer.allocUnsafe(Math.min(MAX_BOUNCE, x.offset + x.length - o));
          // With nothing below, the node's unallocated clusters read as zeroes (and get written so).
          if (chain.layers.length > 1) await chain.readFrom(1, b, o);
          else b.fill(0);
          await copyOnReadWrite(top, b, o);
        }
      }
      const last = own[own.length - 1];
      pos = last.offset + last.length;
    }
  } finally {
    release();
  }
}
