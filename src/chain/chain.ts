/**
 * The generic chain I/O loop. A chain is a list of layers, top (depth 0) first. Reads take each
 * byte from the first layer from the top that holds it: data is read from that layer, a zero
 * layer stops the search with zeros, and bytes no layer holds read as zero. Block status reports
 * the same resolution as runs with the depth of the holding layer (what `map` and every job use).
 *
 * Cost per request does not grow with depth for cached mappings: the resolution of the backing
 * part (depth ≥ 1, read-only while the chain is open) is cached per chunk, so a read consults
 * the top layer and one cached run list, whatever the depth.
 */
import type { BackingReader, BlockDriver, Extent, ExtentKind, WriteZeroesOptions } from '../image/driver.js';
import { Lru } from '../util/lru.js';
import { RangeLock } from '../util/mutex.js';

const gates = new WeakMap<BlockDriver, RangeLock>();

const watchers = new WeakMap<BlockDriver, Set<(offset: number, length: number) => void>>();

/** Observe guest writes (data, zeroes, discards) made through any chain whose top is `d`. */
export function watchWrites(d: BlockDriver, fn: (offset: number, length: number) => void): () => void {
  let set = watchers.get(d);
  if (!set) {
    set = new Set();
    watchers.set(d, set);
  }
  set.add(fn);
  return () => set?.delete(fn);
}

/** How many copy-before-write hooks are armed anywhere (0: reads need not look for them). */
let hooksArmed = 0;

type BeforeWrite = (offset: number, length: number) => Promise<void>;
const interceptors = new WeakMap<BlockDriver, Set<BeforeWrite>>();

/**
 * Run `fn` before every guest write through a chain whose top is `d`, with the write's range
 * gated (copy-before-write for backups). `fn` must not take the same gate.
 */
export function beforeWrites(d: BlockDriver, fn: BeforeWrite): () => void {
  let set = interceptors.get(d);
  if (!set) {
    set = new Set();
    interceptors.set(d, set);
  }
  if (!set.has(fn)) {
    set.add(fn);
    hooksArmed++;
  }
  return () => {
    if (set?.delete(fn)) hooksArmed--;
  };
}

/**
 * A node got a new driver handle (reopen): its write watchers, copy-before-write hooks and write
 * gate move to the new handle (the same sets and lock, so what was armed is disarmed as before,
 * and a holder of the gate still excludes writers through the new handle).
 */
export function moveWriteHooks(from: BlockDriver, to: BlockDriver): void {
  for (const m of [watchers, interceptors, gates] as Array<WeakMap<BlockDriver, unknown>>) {
    const v = m.get(from);
    if (v === undefined) continue;
    m.set(to, v);
    m.delete(from);
  }
}

/**
 * The guest-write gate of a top layer: guest writes through a chain hold it for their range, so a
 * job that must check-then-write a range of the same layer (stream) can exclude them meanwhile.
 */
export function writeGate(d: BlockDriver): RangeLock {
  let g = gates.get(d);
  if (!g) {
    g = new RangeLock();
    gates.set(d, g);
  }
  return g;
}

export interface Layer {
  driver: BlockDriver;
  /** The file name as opened (the overlay-relative join, as QEMU shows it; a json: description's file). */
  filename: string;
  /** The layer below was given by a json: description (or none by `"backing": null`), not by the header. */
  backingOverridden?: boolean;
}

/** A run of guest bytes, resolved through the chain. */
export interface ChainExtent {
  offset: number;
  length: number;
  kind: ExtentKind;
  /** Depth of the layer that answered (the bottom for bytes no layer holds). */
  depth: number;
  hostOffset?: number;
  compressed?: boolean;
}

const CHUNK = 4 * 1024 * 1024;

/**
 * The part [offset, offset+length) of run `r` at `depth`, built field by field (one object shape
 * on the read fast path; object spread of extents of varying shapes measured slow there).
 */
function subExtent(r: Extent, offset: number, length: number, depth: number): ChainExtent {
  const x: ChainExtent = { offset, length, kind: r.kind, depth };
  if (r.hostOffset !== undefined) x.hostOffset = r.hostOffset + (offset - r.offset);
  if (r.compressed) x.compressed = true;
  return x;
}

/**
 * A run of the backing cache. All runs have this one class (one hidden class): the cache is
 * searched on every read below the top, and runs of mixed shapes (extents with and without
 * hostOffset/compressed) made those property loads megamorphic, missing V8's handler cache and
 * allocating a handler per read (hundreds of thousands of them per second on a deep chain).
 */
class Run {
  constructor(readonly offset: number, readonly length: number, readonly kind: ExtentKind, readonly depth: number,
    /** -1: none. */
    readonly host: number, readonly compressed: boolean) {}

  static of(x: ChainExtent): Run {
    return new Run(x.offset, x.length, x.kind, x.depth, x.hostOffset ?? -1, !!x.compressed);
  }

  /** The part [offset, offset+length) as a ChainExtent. */
  part(offset: number, length: number): ChainExtent {
    const x: ChainExtent = { offset, length, kind: this.kind, depth: this.depth };
    if (this.host >= 0) x.hostOffset = this.host + (offset - this.offset);
    if (this.compressed) x.compressed = true;
    return x;
  }
}

/** Index of the first run in `runs` (sorted, disjoint) that ends after `pos`. */
function firstEndingAfter(runs: Run[], pos: number): number {
  let lo = 0, hi = runs.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    const r = runs[mid];
    if (r.offset + r.length <= pos) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

export class Chain {
  private readonly backingCache = new Lru<number, Run[]>(4096);
  private readonly pending = new Map<number, Promise<Run[]>>();
  private generation = 0;
  /** The backing resolution may be cached while the layers below the top are not written. */
  cacheBacking = true;

  constructor(readonly layers: Layer[]) {
    // Each layer reads the layers below it through this chain (for copy-on-write).
    for (let d = 0; d < layers.length; d++) {
      layers[d].driver.backing = d + 1 < layers.length ? this.readerFrom(d + 1) : null;
    }
  }

  get top(): BlockDriver { return this.layers[0].driver; }
  get size(): number { return this.top.size; }
  get depth(): number { return this.layers.length; }

  /** A reader for the guest view of layers [depth..]. */
  readerFrom(depth: number): BackingReader {
    const layer = this.layers[depth].driver;
    return {
      get size() { return layer.size; },
      read: async (buf, offset) => { if (!this.tryReadSyncFrom(depth, buf, offset)) await this.readFrom(depth, buf, offset); },
      readsZero: (offset, length) => this.readsZeroFrom(depth, offset, length),
    };
  }

  /**
   * QEMU's is_zero(): block status of layers [depth..] says [offset, offset+length) reads zero
   * (not: the data happens to be zero). Past the end of that layer the guest reads zeros; data
   * whose host range the file reports as holes reads zero too (QEMU recurses there).
   */
  async readsZeroFrom(depth: number, offset: number, length: number): Promise<boolean> {
    const end = Math.min(offset + length, this.layers[depth].driver.size);
    if (end <= offset) return true;
    const xs = await this.statusFrom(depth, offset, end - offset);
    let covered = 0;
    for (const x of xs) {
      if (x.kind === 'data') {
        const d = this.layers[x.depth].driver;
        if (x.compressed || x.hostOffset === undefined || !d.hostReadsZero || !(await d.hostReadsZero(x.hostOffset, x.length))) return false;
      }
      covered += x.length;
    }
    return covered === end - offset;
  }

  /** Block status resolved from `depth` down, covering [offset, offset+length) within that layer's size. */
  async statusFrom(depth: number, offset: number, length: number): Promise<ChainExtent[]> {
    if (depth >= 1 && this.cacheBacking) return this.cachedStatus(depth, offset, length);
    return this.resolve(depth, offset, length);
  }

  /**
   * Resolve from `depth` down. With `cached`, deeper levels go through the backing cache (one
   * entry per level); without, only the caller's level is cached, so a deep chain holds one
   * entry per chunk rather than one per chunk and layer.
   */
  private async resolve(depth: number, offset: number, length: number, cached = true): Promise<ChainExtent[]> {
    const out: ChainExtent[] = [];
    const layer = this.layers[depth].driver;
    const end = Math.min(offset + length, layer.size);
    if (end <= offset) return out;
    const exts = await layer.blockStatus(offset, end - offset);
    for (const e of exts) {
      if (e.kind !== 'unallocated' || depth + 1 >= this.layers.length) {
        push(out, { ...e, depth });
        continue;
      }
      const below = this.layers[depth + 1].driver;
      const inBacking = Math.max(0, Math.min(e.offset + e.length, below.size) - e.offset);
      if (inBacking > 0) {
        const xs = cached ? await this.statusFrom(depth + 1, e.offset, inBacking) : await this.resolve(depth + 1, e.offset, inBacking, false);
        for (const x of xs) push(out, x);
      }
      // Past the end of a shorter backing file the guest reads zeros.
      if (inBacking < e.length) push(out, { offset: e.offset + inBacking, length: e.length - inBacking, kind: 'unallocated', depth });
    }
    return out;
  }

  private async cachedStatus(depth: number, offset: number, length: number): Promise<ChainExtent[]> {
    const out: ChainExtent[] = [];
    const end = Math.min(offset + length, this.layers[depth].driver.size);
    for (let c = Math.floor(offset / CHUNK); c * CHUNK < end; c++) {
      const key = c * 1024 + depth; // depth < 1024 (chain depth limit)
      const runs = this.backingCache.get(key) ?? await this.resolveChunk(key, depth, c);
      const a = Math.max(offset, c * CHUNK), b = Math.min(end, (c + 1) * CHUNK);
      for (let i = firstEndingAfter(runs, a); i < runs.length && runs[i].offset < b; i++) {
        const r = runs[i];
        const s = Math.max(a, r.offset), e = Math.min(b, r.offset + r.length);
        push(out, r.part(s, e - s));
      }
    }
    return out;
  }

  /** Resolve one chunk for the cache; concurrent misses on the same chunk share one resolution. */
  private resolveChunk(key: number, depth: number, c: number): Promise<Run[]> {
    let p = this.pending.get(key);
    if (p) return p;
    const gen = this.generation;
    p = this.resolve(depth, c * CHUNK, CHUNK, false).then((exts) => {
      const runs = exts.map(Run.of);
      if (gen === this.generation) this.backingCache.set(key, runs);
      return runs;
    }).finally(() => {
      if (this.pending.get(key) === p) this.pending.delete(key);
    });
    this.pending.set(key, p);
    return p;
  }

  /** Drop cached backing resolutions (call after anything below the top changes). */
  invalidate(): void {
    this.backingCache.clear();
    this.pending.clear();
    this.generation++;
  }

  /** Guest-visible block status of the whole chain. */
  blockStatus(offset: number, length: number): Promise<ChainExtent[]> {
    return this.statusFrom(0, offset, length);
  }

  /**
   * Layers below `depth` whose guest writes run copy-before-write hooks (the source of a fleecing
   * backup under its target): a read through them must not interleave with such a write, or it
   * could find the target not yet filled and then read the source already overwritten.
   */
  private hookedBelow(depth: number): BlockDriver[] | null {
    if (hooksArmed === 0) return null;
    let out: BlockDriver[] | null = null;
    for (let d = depth + 1; d < this.layers.length; d++) {
      const drv = this.layers[d].driver;
      if (interceptors.get(drv)?.size) (out ??= []).push(drv);
    }
    return out;
  }

  /** Read the guest view of layers [depth..] into buf; returns the resolution it read by. */
  async readFrom(depth: number, buf: Buffer, offset: number): Promise<ChainExtent[]> {
    const hooked = this.hookedBelow(depth);
    if (!hooked) return this.readResolved(depth, buf, offset);
    const releases: Array<() => void> = [];
    try {
      for (const d of hooked) releases.push(await writeGate(d).acquire(offset, offset + buf.length));
      return await this.readResolved(depth, buf, offset);
    } finally {
      for (const r of releases) r();
    }
  }

  private async readResolved(depth: number, buf: Buffer, offset: number): Promise<ChainExtent[]> {
    const exts = await this.statusFrom(depth, offset, buf.length);
    let covered = 0;
    const ios: Promise<void>[] = [];
    for (const x of exts) {
      const dst = buf.subarray(x.offset - offset, x.offset - offset + x.length);
      covered = Math.max(covered, x.offset - offset + x.length);
      if (x.kind !== 'data') dst.fill(0);
      else ios.push(readExtent(this.layers[x.depth].driver, dst, x));
    }
    if (covered < buf.length) buf.fill(0, covered);
    if (ios.length === 1) await ios[0];
    else if (ios.length) await Promise.all(ios);
    return exts;
  }

  /**
   * The read fast path: when [offset, offset+buf.length) resolves, without I/O, to one data run
   * of one layer (cached L2 table, cached backing resolution) and that layer's storage can read
   * it synchronously, read it now and return the run; otherwise read nothing and return null
   * (use `readFrom`). The result is what `readFrom` would have returned.
   */
  tryReadSync(buf: Buffer, offset: number): ChainExtent | null {
    return this.tryReadSyncFrom(0, buf, offset);
  }

  /**
   * tryReadSync of the guest view of layers [depth..] (a layer's copy-on-write fill reads from
   * depth + 1). Below the top, the resolution comes from the backing cache alone.
   */
  tryReadSyncFrom(depth: number, buf: Buffer, offset: number): ChainExtent | null {
    if (this.hookedBelow(depth)) return null; // such reads take the lower layers' write gates
    const length = buf.length;
    let x: ChainExtent | null;
    if (depth === 0) {
      const e = this.layers[0].driver.mapSync?.(offset, length);
      if (!e) return null;
      if (e.kind === 'data') x = subExtent(e, offset, length, 0);
      else if (e.kind === 'unallocated' && this.layers.length > 1) x = this.cachedRun(1, offset, length);
      else return null;
    } else x = this.cachedRun(depth, offset, length);
    if (!x || x.kind !== 'data' || x.compressed || x.hostOffset === undefined) return null;
    const storage = this.layers[x.depth].driver.storage;
    return storage.readSync?.(buf, x.hostOffset) ? x : null;
  }

  /** The cached resolution of layers [depth..] when one run covers [offset, offset+length), else null. */
  private cachedRun(depth: number, offset: number, length: number): ChainExtent | null {
    if (!this.cacheBacking) return null;
    const c = Math.floor(offset / CHUNK);
    if (Math.floor((offset + length - 1) / CHUNK) !== c || offset + length > this.layers[depth].driver.size) return null;
    const runs = this.backingCache.get(c * 1024 + depth);
    if (!runs) return null;
    const r = runs[firstEndingAfter(runs, offset)];
    if (!r || r.offset > offset || r.offset + r.length < offset + length) return null;
    return r.part(offset, length);
  }

  async read(buf: Buffer, offset: number): Promise<void> {
    if (!this.tryReadSync(buf, offset)) await this.readFrom(0, buf, offset);
  }

  write(buf: Buffer, offset: number): Promise<void> {
    return this.gated(offset, buf.length, () => this.top.write(buf, offset));
  }

  writeZeroes(offset: number, length: number, opts?: WriteZeroesOptions): Promise<void> {
    return this.gated(offset, length, () => this.top.writeZeroes(offset, length, opts));
  }

  discard(offset: number, length: number): Promise<void> {
    return this.gated(offset, length, () => this.top.discard(offset, length));
  }

  private async gated(offset: number, length: number, fn: () => Promise<void>): Promise<void> {
    const top = this.top;
    const release = await writeGate(top).acquire(offset, offset + length);
    try {
      const before = interceptors.get(top);
      if (before) for (const b of before) await b(offset, length);
      await fn();
    } finally {
      // Watchers (a mirror's dirty bitmap) learn of the write while the gate is still held.
      const w = watchers.get(top);
      if (w) for (const f of w) f(offset, length);
      release();
    }
  }

  flush(): Promise<void> {
    return this.top.flush();
  }

  /** Close every layer (top first). */
  async close(): Promise<void> {
    let err: unknown = null;
    for (const l of this.layers) {
      try {
        await l.driver.close();
      } catch (e) {
        err ??= e;
      }
    }
    if (err) throw err;
  }
}

function push(out: ChainExtent[], x: ChainExtent): void {
  if (x.length <= 0) return;
  const last = out[out.length - 1];
  if (last && last.kind === x.kind && last.depth === x.depth && !!last.compressed === !!x.compressed &&
    last.offset + last.length === x.offset &&
    ((last.hostOffset === undefined && x.hostOffset === undefined) ||
      (last.hostOffset !== undefined && x.hostOffset !== undefined && last.hostOffset + last.length === x.hostOffset))) {
    last.length += x.length;
  } else out.push(x);
}

/** Read one resolved data extent from its layer. */
function readExtent(d: BlockDriver, dst: Buffer, x: Extent): Promise<void> {
  if (!x.compressed && x.hostOffset !== undefined) return d.storage.read(dst, x.hostOffset);
  return d.readOwn(dst, x.offset);
}
