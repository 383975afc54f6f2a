/**
 * Compare the guest views of two chains, as `qemu-img compare` does: walk both block statuses in
 * offset order, skip ranges that read as zero in both, and read the rest in chunks of at most
 * 2 MiB with several reads in flight. Results are consumed in offset order, so the first event
 * (status mismatch in strict mode, or content mismatch) is the one QEMU reports. Mismatch offsets
 * are sector (512-byte) granular, relative to the chunk start, as qemu-img computes them.
 */
import type { Chain } from '../chain/chain.js';
import { isZeroRange } from '../util/zero.js';
import { BLOCK_ALLOCATED, BLOCK_ZERO, StatusCursor } from './status.js';

/** qemu-img's IO_BUF_SIZE: the largest chunk compared at once. */
const IO_BUF = 2 * 1024 * 1024;
const SECTOR = 512;

export interface CompareOptions {
  strict?: boolean;
  /** Reads in flight (each up to 2 MiB per image). */
  parallel?: number;
  /** Called after each chunk with its length and the larger of the two sizes (qemu-img's progress). */
  onChunk?: (bytes: number, base: number) => void;
  /** Called when the sizes differ (non-strict), before the longer tail is checked. */
  onSizeWarning?: () => void;
}

export type CompareOutcome =
  | { kind: 'identical' }
  | { kind: 'strict-size' }
  | { kind: 'status'; offset: number }
  | { kind: 'content'; offset: number };

export interface CompareResult {
  outcome: CompareOutcome;
  /** "Warning: Image size mismatch!" was reached (printed before any tail mismatch). */
  sizeWarning: boolean;
}

/** Failures qemu-img maps to distinct exit codes: 3 (block status) and 4 (read). */
export class CompareError extends Error {
  constructor(message: string, readonly exitCode: 3 | 4) {
    super(message);
    this.name = 'CompareError';
  }
}

/** A chunk to read: compare both images, or check that one image reads zero there. */
interface Task {
  offset: number;
  length: number;
  /** 0: compare both; 1 or 2: only that image must read zero; -1: nothing to read (progress only). */
  which: -1 | 0 | 1 | 2;
}

interface Source {
  chain: Chain;
  name: string;
}

async function readChunk(src: Source, offset: number, length: number): Promise<Buffer> {
  const buf = Buffer.allocUnsafe(length);
  try {
    await src.chain.read(buf, offset);
  } catch (e) {
    const msg = e instanceof Error ? e.message : String(e);
    throw new CompareError(`Error while reading offset ${offset} of ${src.name}: ${msg}`, 4);
  }
  return buf;
}

/** qemu-img's compare_buffers: first sector whose equality differs from the first sector's. */
function firstDifferingSector(a: Buffer, b: Buffer): number {
  if (a.equals(b)) return -1;
  const step = 64 * 1024;
  for (let p = 0; p < a.length; p += step) {
    const q = Math.min(a.length, p + step);
    if (a.subarray(p, q).equals(b.subarray(p, q))) continue;
    for (let s = p; s < q; s += SECTOR) {
      const t = Math.min(q, s + SECTOR);
      if (!a.subarray(s, t).equals(b.subarray(s, t))) return s;
    }
  }
  return -1;
}

/** find_nonzero: the first sector boundary whose sector holds a non-zero byte. */
function firstNonZeroSector(b: Buffer): number {
  if (isZeroRange(b, 0, b.length)) return -1;
  const step = 64 * 1024;
  for (let p = 0; p < b.length; p += step) {
    const q = Math.min(b.length, p + step);
    if (isZeroRange(b, p, q)) continue;
    for (let s = p; s < q; s += SECTOR) if (!isZeroRange(b, s, Math.min(q, s + SECTOR))) return s;
  }
  return -1;
}

async function runTask(t: Task, s1: Source, s2: Source): Promise<number> {
  if (t.which === -1) return -1;
  if (t.which === 0) {
    const [a, b] = await Promise.all([readChunk(s1, t.offset, t.length), readChunk(s2, t.offset, t.length)]);
    return firstDifferingSector(a, b);
  }
  return firstNonZeroSector(await readChunk(t.which === 1 ? s1 : s2, t.offset, t.length));
}

/**
 * A bounded in-order pipeline: tasks start as they are queued (up to `parallel` at once) and
 * their results are taken in queue order.
 */
class Pipeline {
  private readonly queue: Array<{ task: Task; result: Promise<number> }> = [];
  constructor(private readonly s1: Source, private readonly s2: Source, private readonly parallel: number) {}

  get full(): boolean { return this.queue.length >= this.parallel; }
  get empty(): boolean { return this.queue.length === 0; }

  push(task: Task): void {
    const result = runTask(task, this.s1, this.s2);
    result.catch(() => {}); // observed when taken; avoid an unhandled rejection meanwhile
    this.queue.push({ task, result });
  }

  async take(): Promise<{ task: Task; at: number }> {
    const { task, result } = this.queue.shift() as { task: Task; result: Promise<number> };
    return { task, at: await result };
  }

  /** Let in-flight reads finish before the images are closed. */
  async drain(): Promise<void> {
    await Promise.allSettled(this.queue.map((q) => q.result));
    this.queue.length = 0;
  }
}

/** Compare the guest views of `a` and `b` (names are used in error messages). */
export async function compareChains(a: Chain, nameA: string, b: Chain, nameB: string, opts: CompareOptions = {}): Promise<CompareResult> {
  const size1 = a.size, size2 = b.size;
  const total = Math.min(size1, size2);
  const base = Math.max(size1, size2);
  const onChunk = opts.onChunk ?? (() => {});
  if (opts.strict && size1 !== size2) return { outcome: { kind: 'strict-size' }, sizeWarning: false };
  const s1: Source = { chain: a, name: nameA }, s2: Source = { chain: b, name: nameB };
  const pipe = new Pipeline(s1, s2, Math.max(1, opts.parallel ?? 8));
  try {
    // Results are taken in order; an event found in a task ends the walk at that task.
    const settle = async (): Promise<CompareOutcome | null> => {
      const { task, at } = await pipe.take();
      if (at >= 0) return { kind: 'content', offset: task.offset + at };
      onChunk(task.length, base);
      return null;
    };
    const c1 = new StatusCursor(a, nameA, 0), c2 = new StatusCursor(b, nameB, 0);
    let offset = 0;
    while (offset < total) {
      const [p1, p2] = await Promise.all([c1.at(offset), c2.at(offset)]);
      let chunk = Math.min(p1.end, p2.end, total) - offset;
      if (opts.strict && p1.flags !== p2.flags) {
        while (!pipe.empty) {
          const ev = await settle();
          if (ev) return { outcome: ev, sizeWarning: false };
        }
        return { outcome: { kind: 'status', offset }, sizeWarning: false };
      }
      const al1 = (p1.flags & BLOCK_ALLOCATED) !== 0, al2 = (p2.flags & BLOCK_ALLOCATED) !== 0;
      let which: Task['which'];
      if ((p1.flags & BLOCK_ZERO) && (p2.flags & BLOCK_ZERO)) which = -1;
      else if (al1 === al2) which = al1 ? 0 : -1;
      else which = al1 ? 1 : 2;
      if (which >= 0) chunk = Math.min(chunk, IO_BUF);
      if (which < 0 && pipe.empty) onChunk(chunk, base);
      else {
        // A skipped range behind pending reads is queued too, so progress stays in order.
        if (pipe.full) {
          const ev = await settle();
          if (ev) return { outcome: ev, sizeWarning: false };
        }
        pipe.push({ offset, length: chunk, which });
      }
      offset += chunk;
    }
    while (!pipe.empty) {
      const ev = await settle();
      if (ev) return { outcome: ev, sizeWarning: false };
    }
    if (size1 === size2) return { outcome: { kind: 'identical' }, sizeWarning: false };
    // The longer image's tail must read as zero.
    opts.onSizeWarning?.();
    const over = size1 > size2 ? s1 : s2;
    const cur = new StatusCursor(over.chain, over.name, offset);
    while (offset < base) {
      const p = await cur.at(offset);
      let chunk = p.end - offset;
      const read = (p.flags & BLOCK_ALLOCATED) !== 0 && (p.flags & BLOCK_ZERO) === 0;
      if (read) chunk = Math.min(chunk, IO_BUF);
      if (!read && pipe.empty) onChunk(chunk, base);
      else {
        if (pipe.full) {
          const ev = await settle();
          if (ev) return { outcome: ev, sizeWarning: true };
        }
        pipe.push({ offset, length: chunk, which: !read ? -1 : over === s1 ? 1 : 2 });
      }
      offset += chunk;
    }
    while (!pipe.empty) {
      const ev = await settle();
      if (ev) return { outcome: ev, sizeWarning: true };
    }
    return { outcome: { kind: 'identical' }, sizeWarning: true };
  } finally {
    await pipe.drain();
  }
}
