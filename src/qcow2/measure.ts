/**
 * Size estimates for a new qcow2 image, as QEMU's qcow2_measure(): the fully allocated size is
 * every metadata structure for the virtual size plus all data clusters (qcow2_calc_prealloc_size),
 * and the required size replaces the data part with the clusters the source actually holds.
 */
import type { Chain } from '../chain/chain.js';
import { BLOCK_ALLOCATED, BLOCK_DATA, BLOCK_ZERO, StatusCursor } from '../ops/status.js';
import { ImageError } from '../image/errors.js';
import { MAX_L1_SIZE } from './constants.js';

export interface MeasureOptions {
  clusterSize: number;
  refcountBits: number;
  extendedL2: boolean;
  /** Output version: bitmaps are only reported for v3 output. */
  version: number;
  preallocation: 'off' | 'metadata' | 'falloc' | 'full';
  hasBackingFile: boolean;
  /** Virtual size when there is no source image. */
  size: number;
}

export interface MeasureResult {
  required: number;
  fullyAllocated: number;
  /** Present when the source and the output both support persistent bitmaps. */
  bitmaps?: number;
}

const ceilDiv = (a: number, b: number): number => Math.ceil(a / b);
const roundUp = (a: number, b: number): number => ceilDiv(a, b) * b;

/** qcow2_refcount_metadata_size(): refcount blocks and table for `clusters`, found as a fixed point. */
export function refcountMetadataSize(clusters: number, clusterSize: number, refcountOrder: number): number {
  const perTableCluster = clusterSize / 8;
  const perBlock = (clusterSize * 8) / 2 ** refcountOrder;
  let table = 0, blocks = 0, n = 0, last: number;
  do {
    last = n;
    blocks = ceilDiv(clusters + table + blocks, perBlock);
    table = ceilDiv(blocks, perTableCluster);
    n = clusters + blocks + table;
  } while (n !== last);
  return (blocks + table) * clusterSize;
}

/** qcow2_calc_prealloc_size(): header, L1, L2, refcount structures and all data clusters. */
export function preallocSize(totalSize: number, clusterSize: number, refcountOrder: number, extendedL2: boolean): number {
  const aligned = roundUp(totalSize, clusterSize);
  const l2e = extendedL2 ? 16 : 8;
  let meta = clusterSize;
  const nl2e = roundUp(aligned / clusterSize, clusterSize / l2e);
  meta += nl2e * l2e;
  const nl1e = roundUp((nl2e * l2e) / clusterSize, clusterSize / 8);
  meta += nl1e * 8;
  meta += refcountMetadataSize((meta + aligned) / clusterSize, clusterSize, refcountOrder);
  return meta + aligned;
}

/** Bytes of data clusters the source holds, counted exactly as qcow2_measure's block status loop does. */
async function requiredData(src: Chain, name: string, clusterSize: number): Promise<number> {
  const ssize = src.size;
  const cur = new StatusCursor(src, name, 0);
  let required = 0;
  for (let offset = 0; offset < ssize;) {
    const p = await cur.at(offset);
    let pnum = p.end - offset;
    if (p.flags & BLOCK_ZERO) {
      // zero regions need no data clusters
    } else if ((p.flags & (BLOCK_DATA | BLOCK_ALLOCATED)) === (BLOCK_DATA | BLOCK_ALLOCATED)) {
      // Whole clusters: the run is extended to the end of its last cluster.
      pnum = roundUp(offset + pnum, clusterSize) - offset;
      required += (offset % clusterSize) + pnum;
    }
    offset += pnum;
  }
  return required;
}

/** Bitmap directory entry size: fixed part, name and extra data, padded to 8 bytes. */
function dirEntrySize(nameSize: number, extra: number): number {
  return roundUp(24 + nameSize + extra, 8);
}

/** qcow2_get_persistent_dirty_bitmap_size(): bitmap data, tables and directory for the output. */
export function bitmapsSize(bitmaps: Array<{ name: string; granularityBits: number }>, imageSize: number, clusterSize: number): number {
  let size = 0, dir = 0;
  for (const b of bitmaps) {
    const bytes = ceilDiv(ceilDiv(imageSize, 2 ** b.granularityBits), 8);
    const clusters = ceilDiv(bytes, clusterSize);
    size += clusters * clusterSize;
    size += roundUp(clusters * 8, clusterSize);
    dir += dirEntrySize(Buffer.byteLength(b.name), 0);
  }
  return size + roundUp(dir, clusterSize);
}

/**
 * Measure a qcow2 image for `src` (or for `opts.size` without a source). `srcBitmaps` lists the
 * source's persistent bitmaps, or is null when the source cannot hold any.
 */
export async function measureQcow2(opts: MeasureOptions, src: { chain: Chain; name: string; bitmaps: Array<{ name: string; granularityBits: number }> | null } | null): Promise<MeasureResult> {
  const cs = opts.clusterSize;
  let virtualSize = roundUp(opts.size, cs);
  const l2e = opts.extendedL2 ? 16 : 8;
  const l2Tables = ceilDiv(virtualSize / cs, cs / l2e);
  if (l2Tables * 8 > MAX_L1_SIZE) throw new ImageError('The image size is too large (try using a larger cluster size)');
  let required = 0;
  if (src) {
    virtualSize = roundUp(src.chain.size, cs);
    // With a backing file nothing is known to be shared: count every cluster.
    required = opts.hasBackingFile ? virtualSize : await requiredData(src.chain, src.name, cs);
  }
  if (opts.preallocation === 'full' || opts.preallocation === 'falloc') required = virtualSize;
  const fullyAllocated = preallocSize(virtualSize, cs, Math.log2(opts.refcountBits), opts.extendedL2);
  const res: MeasureResult = { required: fullyAllocated - virtualSize + required, fullyAllocated };
  if (opts.version >= 3 && src && src.bitmaps) res.bitmaps = bitmapsSize(src.bitmaps, src.chain.size, cs);
  return res;
}
