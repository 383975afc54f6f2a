/**
 * Guest block status of a chain as QEMU's bdrv_block_status_above() answers it: BDRV_BLOCK_* flags
 * per run, with runs ending where QEMU's answers end (qcow2 answers stop at an L2 table end, the
 * EOF flag follows the generic block layer's rules). Used by compare (strict mode) and measure.
 * Holes of sparse raw files come from the raw driver's own block status (SEEK_DATA/SEEK_HOLE,
 * as QEMU's file driver finds them); without those seeks a raw file is all data.
 */
import type { Chain, ChainExtent } from '../chain/chain.js';

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

/** Status pieces of a chain, one window at a time, split where QEMU's answers would end. */
export class StatusCursor {
  private pieces: Piece[] = [];
  private i = 0;
  private fetched: number;

  constructor(private readonly chain: Chain, private readonly name: string, start: number) {
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
    for (const x of exts) {
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

