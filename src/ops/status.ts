/**
 * Guest block status of a chain as QEMU's bdrv_block_status_above() answers it: BDRV_BLOCK_* flags
 * per run, with runs ending where QEMU's answers end (qcow2 answers stop at an L2 table end, the
 * EOF flag follows the generic block layer's rules). Used by compare (strict mode) and measure.
 */
import type { Chain, ChainExtent } from '../chain/chain.js';
import { isZero } from './copy.js';

/** BDRV_BLOCK_* flags, as `bdrv_block_status_above` returns them. */
export const BLOCK_DATA = 0x01;
export const BLOCK_ZERO = 0x02;
export const BLOCK_OFFSET_VALID = 0x04;
export const BLOCK_ALLOCATED = 0x10;
export const BLOCK_EOF = 0x20;

/** Block status is fetched this many bytes ahead at a time. */
const STATUS_WINDOW = 256 * 1024 * 1024;

/** Block status failed for the named image (qemu-img: "Sector allocation test failed for ..."). */
export class StatusError extends Error {
  constructor(readonly filename: string) {
    super(`Sector allocation test failed for ${filename}`);
    this.name = 'StatusError';
  }
}

/** One status query answer: flags valid for [offset, end). */
export interface Piece {
  offset: number;
  end: number;
  flags: number;
}

/** Flags of a resolved extent (what QEMU's generic block layer reports for it). */
function flagsOf(chain: Chain, x: ChainExtent): number {
  if (x.kind === 'data') return BLOCK_DATA | BLOCK_ALLOCATED | (x.hostOffset !== undefined && !x.compressed ? BLOCK_OFFSET_VALID : 0);
  if (x.kind === 'zero') return BLOCK_ZERO | BLOCK_ALLOCATED | (x.hostOffset !== undefined ? BLOCK_OFFSET_VALID : 0);
  // Unallocated in every layer reads as zero; past the end of a shorter backing file the zeros
  // count as allocated in the layer above it.
  return x.depth < chain.depth - 1 ? BLOCK_ZERO | BLOCK_ALLOCATED : BLOCK_ZERO;
}

/** Where qcow2 status answers stop: each answer ends at the end of an L2 table. */
function l2Coverage(chain: Chain, depth: number): number {
  const d = chain.layers[depth].driver as { l2Coverage?: number };
  return typeof d.l2Coverage === 'number' ? d.l2Coverage : 0;
}

/** File system block size assumed for holes in sparse raw files. */
const FS_BLOCK = 4096;

/**
 * QEMU asks the file system where a raw file has holes (SEEK_HOLE) and reports them as zero.
 * Node has no SEEK_HOLE, so for a sparse raw file (fewer bytes allocated than its length) the
 * file is scanned once: all-zero file system blocks are taken to be holes, except that when more
 * blocks are allocated than hold data, a zero first block counts as data (qemu-img create writes
 * it to probe the alignment). Files without holes are reported exactly, without a scan.
 */
async function rawDataBlocks(chain: Chain, depth: number): Promise<Uint8Array | null> {
  const d = chain.layers[depth].driver;
  const size = await d.storage.size();
  const allocated = await d.storage.allocatedSize();
  if (allocated >= size) return null;
  const blocks = new Uint8Array(Math.ceil(size / FS_BLOCK));
  const step = 1024 * 1024;
  const buf = Buffer.allocUnsafe(step);
  let dataBlocks = 0;
  for (let p = 0; p < size; p += step) {
    const b = buf.subarray(0, Math.min(step, size - p));
    await d.storage.read(b, p);
    for (let q = 0; q < b.length; q += FS_BLOCK) {
      if (!isZero(b, q, Math.min(b.length, q + FS_BLOCK))) {
        blocks[(p + q) / FS_BLOCK] = 1;
        dataBlocks++;
      }
    }
  }
  if (blocks.length && !blocks[0] && allocated >= (dataBlocks + 1) * FS_BLOCK) blocks[0] = 1;
  return blocks;
}

async function refineRaw(chain: Chain, x: ChainExtent, maps: Map<number, Uint8Array | null>): Promise<ChainExtent[]> {
  const d = chain.layers[x.depth].driver;
  if (d.format !== 'raw' || x.kind !== 'data') return [x];
  if (!maps.has(x.depth)) maps.set(x.depth, await rawDataBlocks(chain, x.depth));
  const blocks = maps.get(x.depth);
  if (!blocks) return [x];
  const out: ChainExtent[] = [];
  for (let p = x.offset; p < x.offset + x.length;) {
    const bi = Math.floor(p / FS_BLOCK);
    const e = Math.min(x.offset + x.length, (bi + 1) * FS_BLOCK);
    // Past the end of the file (the size is rounded up to a sector) continues the last block.
    const zero = bi < blocks.length ? blocks[bi] === 0 : (out.length ? out[out.length - 1].kind === 'zero' : true);
    const last = out[out.length - 1];
    if (last && (last.kind === 'zero') === zero) last.length += e - p;
    else out.push({ offset: p, length: e - p, kind: zero ? 'zero' : 'data', depth: x.depth, hostOffset: p });
    p = e;
  }
  return out;
}

/** Status pieces of a chain, one window at a time, split where QEMU's answers would end. */
export class StatusCursor {
  private pieces: Piece[] = [];
  private i = 0;
  private fetched: number;
  private readonly sparse = new Map<number, Uint8Array | null>();

  /**
   * @param rawHoles find holes in sparse raw files (costs a scan of the file; only needed when
   *   the exact runs matter: strict compare, progress, measure)
   */
  constructor(private readonly chain: Chain, private readonly name: string, start: number, private readonly rawHoles = true) {
    this.fetched = start;
  }

  /** The piece containing `offset` (offset < chain.size, queried in increasing order). */
  async at(offset: number): Promise<Piece> {
    for (;;) {
      while (this.i < this.pieces.length && this.pieces[this.i].end <= offset) this.i++;
      if (this.i < this.pieces.length && this.pieces[this.i].offset <= offset) return this.pieces[this.i];
      await this.fetch(Math.max(offset, this.fetched));
    }
  }

  private async fetch(from: number): Promise<void> {
    const size = this.chain.size;
    const to = Math.min(size, from + STATUS_WINDOW);
    let exts: ChainExtent[];
    try {
      exts = await this.chain.blockStatus(from, to - from);
    } catch {
      throw new StatusError(this.name);
    }
    const out: Piece[] = [];
    const bottom = this.chain.depth - 1, bottomSize = this.chain.layers[bottom].driver.size;
    let pos = from;
    const refined: ChainExtent[] = [];
    for (const x of exts) refined.push(...(this.rawHoles ? await refineRaw(this.chain, x, this.sparse) : [x]));
    for (const x of refined) {
      if (x.offset + x.length <= pos) continue;
      const flags = flagsOf(this.chain, x);
      let a = Math.max(pos, x.offset);
      const e = x.offset + x.length;
      while (a < e) {
        // The answer for a query at `a` ends at the first L2 table end of any qcow2 layer consulted.
        let b = e;
        for (let d = 0; d <= Math.min(x.depth, this.chain.depth - 1); d++) {
          const cov = l2Coverage(this.chain, d);
          if (cov > 0 && this.chain.layers[d].driver.size > a) b = Math.min(b, (Math.floor(a / cov) + 1) * cov);
        }
        // EOF: the answer reaches the end of the top image, or (unallocated everywhere) the end of
        // the bottom image, whose own answer is the one returned.
        const eof = b === size || (x.kind === 'unallocated' && x.depth === bottom && b === bottomSize);
        out.push({ offset: a, end: b, flags: flags | (eof ? BLOCK_EOF : 0) });
        a = b;
      }
      pos = e;
    }
    if (pos < to) out.push({ offset: pos, end: to, flags: BLOCK_ZERO | (to === size ? BLOCK_EOF : 0) });
    this.pieces = out;
    this.i = 0;
    this.fetched = to;
  }
}

