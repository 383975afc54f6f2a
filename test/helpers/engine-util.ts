/**
 * Shared helpers for the engine oracle tests (engine-write / engine-read): seeded data, random
 * operation sequences, an in-memory model of the guest view, byte comparison with a useful first
 * difference, `qemu-img check` and `qemu-img map` normalisation.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { qemuImg } from './qemu.js';
import type { Chain, ChainExtent } from '../../src/chain/chain.js';

/** Fast seeded filler (xorshift32) for large buffers. */
export function fillRandom(buf: Buffer, seed: number): Buffer {
  let x = (seed >>> 0) || 0x9e3779b9;
  const n4 = buf.length >>> 2;
  const u32 = new Uint32Array(buf.buffer, buf.byteOffset, buf.byteOffset % 4 === 0 ? n4 : 0);
  if (u32.length === n4) {
    for (let i = 0; i < n4; i++) {
      x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0;
      u32[i] = x;
    }
    for (let i = n4 * 4; i < buf.length; i++) {
      x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0;
      buf[i] = x & 0xff;
    }
  } else {
    for (let i = 0; i < buf.length; i++) {
      x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0;
      buf[i] = x & 0xff;
    }
  }
  return buf;
}

export function randomBuf(len: number, seed: number): Buffer {
  return fillRandom(Buffer.allocUnsafe(len), seed);
}

export type Op =
  | { kind: 'write'; off: number; len: number; seed: number }
  | { kind: 'zero'; off: number; len: number; unmap: boolean }
  | { kind: 'discard'; off: number; len: number };

export function describeOp(o: Op): string {
  switch (o.kind) {
    case 'write': return `write(off=${o.off}, len=${o.len}, dataSeed=${o.seed})`;
    case 'zero': return `writeZeroes(off=${o.off}, len=${o.len}, mayUnmap=${o.unmap})`;
    case 'discard': return `discard(off=${o.off}, len=${o.len})`;
  }
}

export interface OpGenOptions {
  size: number;
  clusterSize: number;
  /** Bytes mapped by one L2 table (to aim requests across L2 boundaries). */
  l2Coverage: number;
  /** Subcluster size (extended L2), or the cluster size. */
  granularity: number;
  /** Relative weights of write / zero / discard. */
  weights?: { write: number; zero: number; discard: number };
  /** Cap on a single request length. */
  maxLen?: number;
}

/** A random request sequence: unaligned, cluster-aligned, cross-cluster, cross-L2 and end-of-image requests. */
export function genOps(r: () => number, n: number, o: OpGenOptions): Op[] {
  const ops: Op[] = [];
  const w = o.weights ?? { write: 6, zero: 2, discard: 2 };
  const total = w.write + w.zero + w.discard;
  const cs = o.clusterSize;
  const maxLen = Math.min(o.size, o.maxLen ?? Math.max(3 * cs + 4096, 256 * 1024));
  const int = (a: number, b: number): number => a + Math.floor(r() * (b - a + 1)); // inclusive
  for (let i = 0; i < n; i++) {
    // Length.
    let len: number;
    const lk = r();
    if (lk < 0.25) len = int(1, 1024);
    else if (lk < 0.45) len = int(1, cs * 3);
    else if (lk < 0.6) len = cs * int(1, 3);
    else if (lk < 0.75) len = o.granularity * int(1, 8);
    else len = int(1, maxLen);
    len = Math.max(1, Math.min(len, maxLen, o.size));
    // Offset.
    let off: number;
    const ok = r();
    if (ok < 0.35) off = int(0, o.size - len);
    else if (ok < 0.55) off = Math.floor(int(0, o.size - 1) / cs) * cs + (r() < 0.5 ? 0 : int(-511, 511));
    else if (ok < 0.7) off = Math.floor(int(0, o.size - 1) / o.granularity) * o.granularity;
    else if (ok < 0.85 && o.l2Coverage < o.size) {
      const b = o.l2Coverage * int(1, Math.max(1, Math.floor((o.size - 1) / o.l2Coverage)));
      off = b - int(0, Math.min(len, 2 * cs));
    } else off = o.size - len - (r() < 0.5 ? 0 : int(0, cs));
    off = Math.max(0, Math.min(off, o.size - len));
    const k = r() * total;
    if (k < w.write) ops.push({ kind: 'write', off, len, seed: Math.floor(r() * 0xffffffff) });
    else if (k < w.write + w.zero) ops.push({ kind: 'zero', off, len, unmap: r() < 0.5 });
    else ops.push({ kind: 'discard', off, len });
  }
  return ops;
}

export interface ModelLayer {
  version: 2 | 3;
  clusterSize: number;
  /** 'raw' layers ignore discard. */
  format: 'qcow2' | 'raw';
}

/**
 * Apply an op to the model of a layer's guest view. `below` is the guest view of the layers below
 * (same length as model, zero past the backing's end): a v2 discard deallocates whole clusters so
 * backing data shows through; a v3 discard turns whole clusters into zero clusters. Discard is
 * cluster-granular: partial clusters are left alone, except the image's last partial cluster when
 * the request reaches the end of the image.
 */
export function applyToModel(model: Buffer, below: Buffer, layer: ModelLayer, op: Op): void {
  switch (op.kind) {
    case 'write':
      randomBuf(op.len, op.seed).copy(model, op.off);
      return;
    case 'zero':
      model.fill(0, op.off, op.off + op.len);
      return;
    case 'discard': {
      if (layer.format === 'raw') return;
      const cs = layer.clusterSize;
      const size = model.length;
      const a = Math.ceil(op.off / cs) * cs;
      let b = Math.floor((op.off + op.len) / cs) * cs;
      if (op.off + op.len === size) b = Math.ceil(size / cs) * cs;
      b = Math.min(b, size);
      if (b <= a) return;
      if (layer.version === 2) below.copy(model, a, a, b);
      else model.fill(0, a, b);
      return;
    }
  }
}

export async function applyToChain(chain: Chain, op: Op): Promise<void> {
  switch (op.kind) {
    case 'write': return chain.write(randomBuf(op.len, op.seed), op.off);
    case 'zero': return chain.writeZeroes(op.off, op.len, { mayUnmap: op.unmap });
    case 'discard': return chain.discard(op.off, op.len);
  }
}

/**
 * Await `p`, but give up after `ms`: then `onTimeout` runs (e.g. close the chain, so an engine
 * stuck in a loop fails on its closed file instead of growing it forever) and the test fails.
 */
export async function withTimeout<T>(p: Promise<T>, ms: number, what: string, onTimeout: () => Promise<unknown>): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const t = new Promise<never>((_, reject) => {
    timer = setTimeout(() => {
      reject(new Error(`${what}: no completion after ${ms} ms (engine hang?)`));
      void onTimeout().catch(() => {});
    }, ms);
  });
  p.catch(() => {}); // a late rejection (after the timeout closed the chain) is not unhandled
  try {
    return await Promise.race([p, t]);
  } finally {
    clearTimeout(timer);
  }
}

/** Assert two buffers are equal; on mismatch report the first differing offset and a window. */
export function assertSameBytes(actual: Buffer, expected: Buffer, what: string): void {
  if (actual.length !== expected.length) {
    assert.fail(`${what}: length ${actual.length} != expected ${expected.length}`);
  }
  if (actual.equals(expected)) return;
  let i = 0;
  // Coarse then fine search.
  const step = 4096;
  while (i < actual.length && actual.subarray(i, i + step).equals(expected.subarray(i, i + step))) i += step;
  while (i < actual.length && actual[i] === expected[i]) i++;
  let j = i;
  while (j < actual.length && actual[j] !== expected[j]) j++;
  let diffBytes = 0;
  for (let k = 0; k < actual.length; k += step) {
    if (!actual.subarray(k, k + step).equals(expected.subarray(k, k + step))) diffBytes += step;
  }
  const hex = (b: Buffer): string => b.subarray(i, Math.min(i + 16, b.length)).toString('hex');
  assert.fail(`${what}: first difference at offset ${i} (0x${i.toString(16)}), run of ${j - i} differing bytes; ~${diffBytes} bytes differ in 4k blocks; actual ${hex(actual)} expected ${hex(expected)}`);
}

/** Read the whole guest view through our chain. */
export async function readAll(chain: Chain): Promise<Buffer> {
  const b = Buffer.alloc(chain.size);
  const step = 8 * 1024 * 1024;
  for (let p = 0; p < b.length; p += step) await chain.read(b.subarray(p, Math.min(b.length, p + step)), p);
  return b;
}

/** `qemu-img check` must be clean: exit 0 and "No errors were found". */
export async function assertQemuCheckClean(file: string, what: string): Promise<void> {
  const r = await qemuImg(['check', '-f', 'qcow2', file]);
  assert.ok(r.code === 0 && r.stdout.includes('No errors were found on the image.'),
    `${what}: qemu-img check ${path.basename(file)} exit ${r.code}\n${r.stdout}\n${r.stderr}`);
}

export async function qemuInfo(file: string): Promise<Record<string, unknown>> {
  const r = await qemuImg(['info', '--output=json', '-U', file]);
  if (r.code !== 0) throw new Error(`qemu-img info ${file}: ${r.stderr}`);
  return JSON.parse(r.stdout) as Record<string, unknown>;
}

export interface MapRun {
  start: number;
  length: number;
  depth: number;
  present: boolean;
  zero: boolean;
  data: boolean;
}

function mergeRuns(runs: MapRun[]): MapRun[] {
  const out: MapRun[] = [];
  for (const r of runs) {
    if (r.length <= 0) continue;
    const l = out[out.length - 1];
    if (l && l.start + l.length === r.start && l.depth === r.depth && l.present === r.present && l.zero === r.zero && l.data === r.data) {
      l.length += r.length;
    } else out.push({ ...r });
  }
  return out;
}

/** QEMU's `qemu-img map --output=json`, offsets dropped and adjacent equal runs merged. */
export async function qemuMap(file: string): Promise<MapRun[]> {
  const r = await qemuImg(['map', '--output=json', file]);
  if (r.code !== 0) throw new Error(`qemu-img map ${file}: ${r.stderr}`);
  const raw = JSON.parse(r.stdout) as Array<MapRun & { offset?: number }>;
  return mergeRuns(raw.map((x) => ({ start: x.start, length: x.length, depth: x.depth, present: x.present, zero: x.zero, data: x.data })));
}

/** Our chain's block status in the same normalised form. */
export async function ourMap(chain: Chain): Promise<MapRun[]> {
  const exts: ChainExtent[] = await chain.blockStatus(0, chain.size);
  return mergeRuns(exts.map((x) => ({
    start: x.offset, length: x.length, depth: x.depth,
    present: x.kind !== 'unallocated', zero: x.kind !== 'data', data: x.kind === 'data',
  })));
}

export function fmtRuns(runs: MapRun[]): string {
  return runs.map((r) => `[${r.start}+${r.length} d${r.depth} ${r.present ? 'P' : '-'}${r.zero ? 'Z' : '-'}${r.data ? 'D' : '-'}]`).join(' ');
}

export function assertSameMap(ours: MapRun[], qemu: MapRun[], what: string): void {
  assert.deepEqual(ours, qemu, `${what}: block status differs from qemu-img map\n ours: ${fmtRuns(ours)}\n qemu: ${fmtRuns(qemu)}`);
}

export function writeFileSized(file: string, size: number, fill?: (b: Buffer) => void): void {
  const b = Buffer.alloc(size);
  fill?.(b);
  fs.writeFileSync(file, b);
}

/** Seed: fixed unless QCHAIN_SEED overrides (printed in every assertion message). */
export function baseSeed(): number {
  const s = process.env.QCHAIN_SEED;
  return s ? Number(s) >>> 0 : 0x5eed2024;
}
