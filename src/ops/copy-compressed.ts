/**
 * The copy engine for compressed targets (qemu-img convert -c). Work is cut on the target's
 * cluster grid, as qemu-img's convert_iteration_sectors does with -c: a run shorter than a
 * cluster makes the whole cluster data; longer zero/unallocated runs are rounded down to whole
 * clusters. Data clusters that are entirely zero are skipped on a zero-initialised target (or
 * written as zeroes), unless -S 0 asks for every cluster to be written.
 *
 * Compression (on the image's worker pool) runs for several requests at once; the results are
 * committed in request order, so the target file is laid out sequentially and reproducibly.
 */
import type { Chain, ChainExtent } from '../chain/chain.js';
import { Qcow2Image } from '../qcow2/image.js';
import { prepareCompressed, reserveCompressed, type PreparedCompressed } from '../qcow2/compressed-write.js';
import type { CopyOptions } from './copy.js';
import { isZeroRange } from '../util/zero.js';
import { Turns } from './turns.js';

type Kind = 'data' | 'zero' | 'unallocated';

interface Job {
  seq: number;
  offset: number;
  length: number;
  kind: Kind;
}

/** The concatenation of the sources as one guest view. */
class Concat {
  readonly size: number;
  private readonly bases: number[] = [];

  constructor(private readonly sources: Chain[], private readonly topOnly: boolean) {
    let b = 0;
    for (const s of sources) {
      this.bases.push(b);
      b += s.size;
    }
    this.size = b;
  }

  /** Status runs covering [offset, offset+length) (may stop early at a source end). */
  async status(offset: number, length: number): Promise<Array<{ offset: number; length: number; kind: Kind }>> {
    const i = this.sourceAt(offset);
    const src = this.sources[i], base = this.bases[i];
    const len = Math.min(length, base + src.size - offset);
    let exts: ChainExtent[];
    if (this.topOnly) exts = (await src.top.blockStatus(offset - base, len)).map((x) => ({ ...x, depth: 0 }));
    else exts = await src.blockStatus(offset - base, len);
    const out: Array<{ offset: number; length: number; kind: Kind }> = [];
    for (const x of exts) {
      const kind: Kind = x.kind === 'data' ? 'data' : x.kind === 'zero' || !this.topOnly ? 'zero' : 'unallocated';
      out.push({ offset: x.offset + base, length: x.length, kind });
    }
    if (out.length === 0) out.push({ offset, length: len, kind: 'zero' });
    return out;
  }

  async read(buf: Buffer, offset: number): Promise<void> {
    let p = 0;
    while (p < buf.length) {
      const i = this.sourceAt(offset + p);
      const base = this.bases[i];
      const n = Math.min(buf.length - p, base + this.sources[i].size - (offset + p));
      await this.sources[i].read(buf.subarray(p, p + n), offset + p - base);
      p += n;
    }
  }

  private sourceAt(offset: number): number {
    let i = 0;
    while (i + 1 < this.sources.length && this.bases[i + 1] <= offset) i++;
    // Skip empty sources.
    while (i + 1 < this.sources.length && this.bases[i] + this.sources[i].size <= offset) i++;
    return i;
  }
}

/** Copy the concatenation of `sources` into the qcow2 `target`, compressing every data cluster. */
export async function copyChainsCompressed(sources: Chain[], target: Qcow2Image, opts: CopyOptions = {}): Promise<void> {
  const cs = target.clusterSize;
  const chunk = Math.max(cs, Math.floor((opts.chunkSize ?? 1024 * 1024) / cs) * cs);
  const parallel = Math.max(1, opts.parallel ?? 8);
  const sparse = opts.sparseSize ?? 4096;
  const view = new Concat(sources, !!opts.topOnly);
  const total = view.size;
  let done = 0;
  const report = (n: number): void => {
    done += n;
    opts.onProgress?.(Math.min(1, done / (total || 1)));
  };

  let seq = 0;
  // Cluster-grid jobs: data runs of up to `chunk` bytes, zero/unallocated runs of whole clusters.
  async function* jobs(): AsyncGenerator<Job> {
    let pos = 0;
    let exts: Array<{ offset: number; length: number; kind: Kind }> = [];
    let ei = 0;
    const kindAt = async (p: number): Promise<{ kind: Kind; end: number }> => {
      while (ei < exts.length && exts[ei].offset + exts[ei].length <= p) ei++;
      if (ei >= exts.length) {
        exts = await view.status(p, Math.min(256 * chunk, total - p));
        ei = 0;
      }
      const x = exts[ei];
      return { kind: x.kind, end: x.offset + x.length };
    };
    let pending: Job | null = null;
    const flushPending = function* (): Generator<Job> {
      if (pending) yield pending;
      pending = null;
    };
    while (pos < total) {
      const s = await kindAt(pos);
      // -S 0 on a new target: everything is written (zero clusters compressed too), as qemu-img does.
      let kind: Kind = opts.allocateAll ? 'data' : s.kind;
      let n = s.end - pos;
      if (kind === 'data') n = Math.min(n, cs);
      if (n < cs) {
        n = Math.min(cs, total - pos);
        kind = 'data';
      } else {
        n = Math.floor(n / cs) * cs;
      }
      // Merge into the pending job when it continues it (data up to `chunk` bytes).
      const p = pending as Job | null;
      if (p && p.kind === kind && p.offset + p.length === pos && (kind !== 'data' || p.length + n <= chunk)) {
        p.length += n;
      } else {
        yield* flushPending();
        pending = { seq: seq++, offset: pos, length: n, kind };
      }
      pos += n;
    }
    yield* flushPending();
  }

  const zeroInit = !!opts.targetIsZero;
  const it = jobs();
  let failure: unknown = null;
  // Allocation in request order; reads, compression and the data writes overlap.
  const turns = new Turns(opts.outOfOrder);

  const worker = async (): Promise<void> => {
    for (;;) {
      if (failure) return;
      const r = await it.next();
      if (r.done) return;
      const j = r.value;
      // Runs of whole clusters: what to compress, and what reads as zero.
      const prepared: PreparedCompressed[] = [];
      const zeros: Array<[number, number]> = [];
      try {
        if (j.kind === 'data') {
          const buf = Buffer.allocUnsafe(j.length);
          await view.read(buf, j.offset);
          let runStart = -1;
          const flushRun = async (end: number): Promise<void> => {
            if (runStart < 0) return;
            const start = runStart;
            runStart = -1; // reset before the await: the scan goes on synchronously
            prepared.push(await prepareCompressed(target, buf.subarray(start, end), j.offset + start));
          };
          const preps: Array<Promise<void>> = [];
          for (let p = 0; p < j.length; p += cs) {
            const q = Math.min(j.length, p + cs);
            if (sparse !== 0 && isZeroRange(buf, p, q)) {
              if (runStart >= 0) preps.push(flushRun(p));
              zeros.push([j.offset + p, q - p]);
            } else if (runStart < 0) runStart = p;
          }
          preps.push(flushRun(j.length));
          await Promise.all(preps);
          prepared.sort((a, b) => a.offset - b.offset);
        } else if (j.kind === 'zero') {
          zeros.push([j.offset, j.length]);
        }
      } catch (e) {
        await turns.skip(j.seq);
        throw e;
      }
      // In turn: allocation (so the layout follows guest order); after it, data and L2 entries
      // may overlap with the next request's allocation.
      const finishers: Array<() => Promise<void>> = [];
      await turns.run(j.seq, async () => {
        try {
          for (const p of prepared) finishers.push(await reserveCompressed(target, p));
          if (!zeroInit) for (const [o, n] of zeros) await target.writeZeroes(o, n);
        } catch (e) {
          for (const f of finishers) await f().catch(() => {});
          throw e;
        }
      });
      for (const f of finishers) await f();
      report(j.length);
    }
  };
  await Promise.all(Array.from({ length: parallel }, () => worker().catch((e) => { failure ??= e; })));
  if (failure) throw failure;
}
