/**
 * An in-memory dirty bitmap: bit n covers guest bytes [n*g, (n+1)*g), LSB first in each byte,
 * exactly as serialised on disk. Stored sparsely in chunks of one bitmap cluster each (the unit of
 * the bitmap table): a clean chunk takes no memory, and chunks loaded from the same data cluster
 * (or all-ones entries) share one buffer until written (copy on write), so memory follows the
 * distinct dirty data, not the image size or what a table claims.
 * Invariant: bits past the image's last granule are always zero.
 */
export class DirtyBitmap {
  readonly granularity: number;
  /** Number of bits (granules) in the bitmap. */
  readonly nbits: number;
  /** Bits per chunk: one cluster of serialised bitmap. */
  readonly chunkBits: number;
  /** Number of chunks (= bitmap table entries). */
  readonly nchunks: number;
  private readonly chunks = new Map<number, Uint8Array>();
  /** Chunks whose buffer is shared and must be copied before a change. */
  private readonly shared = new Set<number>();

  constructor(readonly size: number, readonly granularityBits: number, readonly chunkBytes: number) {
    this.granularity = 2 ** granularityBits;
    this.nbits = Math.ceil(size / this.granularity);
    this.chunkBits = chunkBytes * 8;
    this.nchunks = Math.ceil(this.nbits / this.chunkBits);
  }

  /** Number of chunks holding memory (loaded or dirtied). */
  get allocatedChunks(): number {
    return this.chunks.size;
  }

  /** Chunk `i`, writable (allocated or unshared first). */
  private chunk(i: number): Uint8Array {
    let c = this.chunks.get(i);
    if (c && this.shared.has(i)) {
      c = c.slice();
      this.chunks.set(i, c);
      this.shared.delete(i);
    }
    if (!c) {
      c = new Uint8Array(this.chunkBytes);
      this.chunks.set(i, c);
    }
    return c;
  }

  /** Marks guest range [offset, offset+length) dirty (whole granules, clipped to the image). */
  set(offset: number, length: number): void {
    if (length <= 0 || offset >= this.size) return;
    const first = Math.floor(offset / this.granularity);
    const last = Math.min(this.nbits - 1, Math.floor((Math.min(offset + length, this.size) - 1) / this.granularity));
    this.setBits(first, last + 1);
  }

  /** Sets bits [a, b). */
  setBits(a: number, b: number): void {
    while (a < b) {
      const ci = Math.floor(a / this.chunkBits);
      const base = ci * this.chunkBits;
      const end = Math.min(b, base + this.chunkBits);
      fillBits(this.chunk(ci), a - base, end - base, true);
      a = end;
    }
  }

  /** Clears every bit. */
  clear(): void {
    this.chunks.clear();
    this.shared.clear();
  }

  /**
   * Installs the serialised content of chunk `i` (a bitmap cluster read from disk). The buffer is
   * kept and may be shared with other chunks and bitmaps: the caller must not change it afterwards.
   */
  loadChunk(i: number, data: Uint8Array): void {
    const valid = Math.min(this.chunkBits, this.nbits - i * this.chunkBits);
    let c = data.length === this.chunkBytes ? data : Uint8Array.from(data.subarray(0, this.chunkBytes));
    if (valid < this.chunkBits) {
      // Bits beyond the image are not part of the bitmap: the last chunk gets its own copy.
      c = c === data ? c.slice() : c;
      fillBits(c, valid, this.chunkBits, false);
    }
    if (isZero(c)) {
      this.chunks.delete(i);
      this.shared.delete(i);
      return;
    }
    this.chunks.set(i, c);
    if (c === data) this.shared.add(i);
    else this.shared.delete(i);
  }

  /** Serialised chunk `i`, or null when it is all zeros (stored as a 0 table entry). */
  serializeChunk(i: number): Uint8Array | null {
    const c = this.chunks.get(i);
    return c && !isZero(c) ? c : null;
  }

  /** ORs `src` (same size, any granularity) into this bitmap, as hbitmap_merge does. */
  merge(src: DirtyBitmap): void {
    if (src.granularityBits === this.granularityBits && src.chunkBytes === this.chunkBytes) {
      for (const [i, sc] of src.chunks) {
        const d = this.chunk(i);
        const dw = new Uint32Array(d.buffer, d.byteOffset, d.length >>> 2);
        const sw = new Uint32Array(sc.buffer, sc.byteOffset, sc.length >>> 2);
        for (let k = 0; k < dw.length; k++) dw[k] |= sw[k];
      }
      return;
    }
    for (const [off, len] of src.dirtyRanges()) this.set(off, len);
  }

  /** A copy for a resized image (bdrv_dirty_bitmap_truncate): bits past the new end are dropped, new ones clean. */
  resized(size: number): DirtyBitmap {
    const out = new DirtyBitmap(size, this.granularityBits, this.chunkBytes);
    for (const [off, len] of this.dirtyRanges()) out.set(off, len);
    return out;
  }

  /** Dirty guest ranges [offset, length], merged, clipped to the image size. */
  dirtyRanges(): Array<[number, number]> {
    const out: Array<[number, number]> = [];
    let runStart = -1;
    const flush = (endBit: number): void => {
      if (runStart < 0) return;
      const a = runStart * this.granularity;
      out.push([a, Math.min(this.size, endBit * this.granularity) - a]);
      runStart = -1;
    };
    let prev = -2;
    for (const ci of [...this.chunks.keys()].sort((x, y) => x - y)) {
      const c = this.chunks.get(ci) as Uint8Array;
      const base = ci * this.chunkBits;
      // A missing chunk is clean: a run open at the end of the previous one stops there.
      if (prev !== ci - 1) flush((prev + 1) * this.chunkBits);
      prev = ci;
      // Whole 32-bit words of zeros or ones are skipped; only mixed words are read bit by bit.
      const words = new Uint32Array(c.buffer, c.byteOffset, c.length >>> 2);
      for (let w = 0; w < words.length; w++) {
        const v = words[w];
        const bit0 = base + w * 32;
        if (v === 0) { if (runStart >= 0) flush(bit0); continue; }
        if (v === 0xffffffff) { if (runStart < 0) runStart = bit0; continue; }
        // Mixed word: its bytes in file order (independent of the host's byte order).
        for (let k = 0; k < 32; k++) {
          if ((c[w * 4 + (k >>> 3)] >>> (k & 7)) & 1) { if (runStart < 0) runStart = bit0 + k; } else if (runStart >= 0) flush(bit0 + k);
        }
      }
    }
    flush(this.nbits);
    return out;
  }

  /** Whether no bit is set. */
  isEmpty(): boolean {
    for (const c of this.chunks.values()) if (!isZero(c)) return false;
    return true;
  }
}

function isZero(c: Uint8Array): boolean {
  const w = new Uint32Array(c.buffer, c.byteOffset, c.length >>> 2);
  for (let k = 0; k < w.length; k++) if (w[k] !== 0) return false;
  return true;
}

/** Sets or clears bits [a, b) of `c`, whole bytes with fill(). */
function fillBits(c: Uint8Array, a: number, b: number, on: boolean): void {
  if (a >= b) return;
  const fa = Math.ceil(a / 8), fb = Math.floor(b / 8);
  const edge = (byte: number, lo: number, hi: number): void => {
    const mask = ((1 << (hi - lo)) - 1) << lo;
    c[byte] = on ? c[byte] | mask : c[byte] & ~mask;
  };
  if (fa > fb) {
    edge(Math.floor(a / 8), a % 8, b % 8 || 8);
    return;
  }
  if (a % 8) edge(Math.floor(a / 8), a % 8, 8);
  if (fb > fa) c.fill(on ? 0xff : 0, fa, fb);
  if (b % 8) edge(fb, 0, b % 8);
}
