/**
 * "We write → QEMU agrees": seeded random writes, zero writes (with/without unmap) and discards
 * through our library on chains built with our createQcow2 (cluster sizes 512..2M, compat 0.10
 * and 1.1, refcount widths 1..64, extended L2, lazy refcounts, 1–4 layers, a raw base, overlays
 * larger/smaller than their backing). An in-memory model holds the expected guest view. After
 * each scenario every file must pass `qemu-img check` with no errors and no leaks, and QEMU's
 * guest view and our own read must both equal the model byte for byte.
 *
 * Also: refcount-table growth, many concurrent overlapping requests ("last issued wins"), and
 * random writes into QEMU-made images (internal snapshots, compressed, extended L2, v2), with
 * `qemu-img snapshot -a` proving shared clusters were copied, not overwritten.
 *
 * Seeds: QCHAIN_SEED=<n> overrides the base seed; each assertion message carries its seed.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { oracle, qemuImg, qemuRawView, rng, scratch } from './helpers/qemu.js';
import {
  applyToChain, applyToModel, assertQemuCheckClean, assertSameBytes, baseSeed, describeOp, genOps, randomBuf, readAll,
  withTimeout, type Op,
} from './helpers/engine-util.js';
import { builders } from './helpers/engine-images.js';
import { openChain } from '../src/chain/open.js';
import type { Chain } from '../src/chain/chain.js';
import { createQcow2 } from '../src/qcow2/create.js';
import { FileStorage } from '../src/storage/file.js';

const dir = scratch('qchain-engine-write-');
const KiB = 1024;
const MiB = 1024 * 1024;
/** Per-request limit: a request that takes longer is an engine hang (the chain is closed to stop it). */
const OP_TIMEOUT = 10_000;

function seedFor(name: string): number {
  let h = baseSeed();
  for (const c of name) h = (Math.imul(h ^ c.charCodeAt(0), 0x01000193) >>> 0);
  return h;
}

interface LayerSpec {
  fmt: 'qcow2' | 'raw';
  size: number;
  cs?: number;
  v?: 2 | 3;
  rc?: number;
  xl2?: boolean;
  lazy?: boolean;
  ops: number;
  weights?: { write: number; zero: number; discard: number };
}

function geometry(l: LayerSpec): { cs: number; l2Coverage: number; granularity: number } {
  const cs = l.fmt === 'raw' ? 512 : (l.cs ?? 65536);
  const l2Coverage = l.fmt === 'raw' ? Number.MAX_SAFE_INTEGER : (cs / (l.xl2 ? 16 : 8)) * cs;
  return { cs, l2Coverage, granularity: l.xl2 ? cs / 32 : cs };
}

/** Apply ops one by one to chain and model; after each, read back around the request (locates the first bad op). */
async function applyOps(chain: Chain, model: Buffer, below: Buffer, spec: LayerSpec, ops: Op[], what: string): Promise<void> {
  const { cs } = geometry(spec);
  const layer = { version: spec.v ?? 3, clusterSize: cs, format: spec.fmt } as const;
  for (let i = 0; i < ops.length; i++) {
    const op = ops[i];
    if (process.env.QCHAIN_TRACE) console.error(`${what} op #${i} ${describeOp(op)}`);
    try {
      await withTimeout(applyToChain(chain, op), OP_TIMEOUT, `${what} op #${i} ${describeOp(op)}`, () => chain.close());
    } catch (e) {
      assert.fail(`${what} op #${i} ${describeOp(op)} failed: ${(e as Error).stack}`);
    }
    applyToModel(model, below, layer, op);
    const a = Math.max(0, Math.floor(op.off / cs) * cs - cs);
    const b = Math.min(model.length, Math.ceil((op.off + op.len) / cs) * cs + cs, a + 8 * MiB);
    const got = Buffer.alloc(b - a);
    await chain.read(got, a);
    assertSameBytes(got, model.subarray(a, b), `${what} read-back after op #${i} ${describeOp(op)}`);
  }
}

async function createLayer(file: string, spec: LayerSpec, backing: { name: string; fmt: string } | null): Promise<void> {
  if (spec.fmt === 'raw') {
    fs.writeFileSync(file, Buffer.alloc(0));
    fs.truncateSync(file, spec.size);
    return;
  }
  const st = await FileStorage.open(file, { create: true });
  const img = await createQcow2(st, {
    size: spec.size, clusterSize: spec.cs ?? 65536, version: spec.v ?? 3, refcountBits: spec.rc ?? 16,
    extendedL2: !!spec.xl2, lazyRefcounts: !!spec.lazy,
    ...(backing ? { backingFile: backing.name, backingFormat: backing.fmt } : {}),
  });
  await img.close();
}

/** Build the chain bottom-up, writing to each layer before the next overlay is created; check with QEMU. */
async function runScenario(name: string, layers: LayerSpec[]): Promise<void> {
  const seed = seedFor(name);
  const r = rng(seed);
  const what = `[${name} seed=${seed}]`;
  const sub = fs.mkdtempSync(path.join(dir, 'sc-'));
  const files: string[] = [];
  let prev: Buffer | null = null;
  let model = Buffer.alloc(0);
  for (let i = 0; i < layers.length; i++) {
    const spec = layers[i];
    const file = path.join(sub, `L${i}.${spec.fmt}`);
    await createLayer(file, spec, i > 0 ? { name: path.basename(files[i - 1]), fmt: layers[i - 1].fmt } : null);
    files.push(file);
    // The guest view of the layers below, at this layer's size (zero past the backing's end).
    const below = Buffer.alloc(spec.size);
    if (prev) prev.copy(below, 0, 0, Math.min(prev.length, spec.size));
    model = Buffer.from(below);
    const g = geometry(spec);
    const ops = genOps(r, spec.ops, {
      size: spec.size, clusterSize: g.cs, l2Coverage: g.l2Coverage, granularity: g.granularity,
      weights: spec.weights ?? (spec.fmt === 'raw' ? { write: 4, zero: 1, discard: 0 } : undefined),
    });
    const chain = await openChain(file, { format: spec.fmt });
    try {
      assert.equal(chain.depth, i + 1, `${what} chain depth`);
      assert.equal(chain.size, spec.size, `${what} layer ${i} size`);
      await applyOps(chain, model, below, spec, ops, `${what} layer ${i}`);
      assertSameBytes(await readAll(chain), model, `${what} our view of layer ${i} after its ops`);
      await chain.flush();
    } finally {
      await chain.close();
    }
    prev = model;
  }
  const top = files[files.length - 1];
  for (let i = 0; i < files.length; i++) if (layers[i].fmt === 'qcow2') await assertQemuCheckClean(files[i], `${what} layer ${i}`);
  assertSameBytes(await qemuRawView(top), model, `${what} QEMU's guest view vs model`);
  const ro = await openChain(top, { readOnly: true });
  try {
    assertSameBytes(await readAll(ro), model, `${what} our read-only view after reopen`);
  } finally {
    await ro.close();
  }
}

const q = (o: Omit<LayerSpec, 'fmt'>): LayerSpec => ({ fmt: 'qcow2', ...o });
const raw = (size: number, ops: number): LayerSpec => ({ fmt: 'raw', size, ops });

const SCENARIOS: Array<[string, LayerSpec[]]> = [
  ['c512 v3 rc1 single', [q({ size: 8 * MiB, cs: 512, rc: 1, ops: 80 })]],
  ['c512 v3 rc64 base + rc16 overlay', [q({ size: 8 * MiB, cs: 512, rc: 64, ops: 40 }), q({ size: 8 * MiB, cs: 512, ops: 60 })]],
  ['c512 v2 2-deep', [q({ size: 8 * MiB, cs: 512, v: 2, ops: 40 }), q({ size: 8 * MiB, cs: 512, v: 2, ops: 60 })]],
  ['c4k v3 rc8 3-deep mixed clusters', [q({ size: 16 * MiB, cs: 4096, rc: 8, ops: 40 }), q({ size: 16 * MiB, cs: 65536, ops: 40 }), q({ size: 16 * MiB, cs: 4096, rc: 8, ops: 80 })]],
  ['c4k v2 odd size', [q({ size: 8 * MiB + 1536, cs: 4096, v: 2, ops: 100 })]],
  ['c4k v3 rc16 odd size 2-deep', [q({ size: 8 * MiB + 3584, cs: 4096, ops: 40 }), q({ size: 8 * MiB + 3584, cs: 65536, ops: 60 })]],
  ['c64k 4-deep (64k, 512, v2 4k, 64k)', [q({ size: 32 * MiB, ops: 30 }), q({ size: 32 * MiB, cs: 512, ops: 30 }), q({ size: 32 * MiB, cs: 4096, v: 2, ops: 30 }), q({ size: 32 * MiB, ops: 80 })]],
  ['c64k v3 rc64 over rc16 base', [q({ size: 16 * MiB, ops: 40 }), q({ size: 16 * MiB, rc: 64, ops: 80 })]],
  ['c4k rc2 / rc4 / rc32 3-deep', [q({ size: 8 * MiB, cs: 4096, rc: 2, ops: 40 }), q({ size: 8 * MiB, cs: 4096, rc: 4, ops: 40 }), q({ size: 8 * MiB, cs: 4096, rc: 32, ops: 60 })]],
  ['c64k extl2 over plain 64k', [q({ size: 16 * MiB, ops: 40 }), q({ size: 16 * MiB, xl2: true, ops: 100 })]],
  ['c16k extl2 rc64 cross-L2 single', [q({ size: 32 * MiB, cs: 16384, xl2: true, rc: 64, ops: 120 })]],
  ['c32k extl2 rc1 3-deep', [q({ size: 16 * MiB, cs: 32768, xl2: true, rc: 1, ops: 40 }), q({ size: 16 * MiB, cs: 16384, xl2: true, ops: 40 }), q({ size: 16 * MiB, cs: 65536, xl2: true, rc: 1, ops: 80 })]],
  ['c2M v3 + extl2 2M overlay', [q({ size: 32 * MiB, cs: 2 * MiB, ops: 20 }), q({ size: 32 * MiB, cs: 2 * MiB, xl2: true, ops: 40 })]],
  ['c2M v2 single', [q({ size: 32 * MiB, cs: 2 * MiB, v: 2, ops: 30 })]],
  ['raw base, v2 4k middle, larger v3 64k top', [raw(8 * MiB, 20), q({ size: 8 * MiB, cs: 4096, v: 2, ops: 40 }), q({ size: 12 * MiB, ops: 80 })]],
  ['raw base, larger extl2 32k top', [raw(6 * MiB, 20), q({ size: 16 * MiB, cs: 32768, xl2: true, ops: 100 })]],
  ['lazy refcounts 2-deep', [q({ size: 16 * MiB, lazy: true, ops: 40 }), q({ size: 16 * MiB, cs: 4096, rc: 1, lazy: true, ops: 80 })]],
  ['v2 discard-heavy top over v3 base', [q({ size: 16 * MiB, ops: 40, weights: { write: 1, zero: 0, discard: 0 } }), q({ size: 16 * MiB, v: 2, cs: 4096, ops: 100, weights: { write: 3, zero: 2, discard: 4 } })]],
  ['overlay smaller than backing', [q({ size: 16 * MiB, ops: 40 }), q({ size: 8 * MiB, cs: 4096, ops: 60 })]],
];

for (const [name, layers] of SCENARIOS) {
  test(`we write, QEMU agrees: ${name}`, oracle(), () => runScenario(name, layers));
}

/** Refcount table offset/clusters from the header. */
function refcountTableClusters(file: string): number {
  const b = Buffer.alloc(72);
  const fd = fs.openSync(file, 'r');
  try {
    fs.readSync(fd, b, 0, 72, 0);
  } finally {
    fs.closeSync(fd);
  }
  return b.readUInt32BE(56);
}

test('refcount table grows past one cluster (512-byte clusters, refcount_bits=64)', oracle(), async () => {
  const name = 'reftable-growth';
  const seed = seedFor(name);
  const what = `[${name} seed=${seed}]`;
  const r = rng(seed);
  const file = path.join(dir, 'grow.qcow2');
  const size = 16 * MiB;
  await createLayer(file, q({ size, cs: 512, rc: 64, ops: 0 }), null);
  assert.equal(refcountTableClusters(file), 1, `${what} fresh image has one refcount-table cluster`);
  // One refcount block covers 64 clusters (32 KiB); one table cluster covers 64 blocks (2 MiB of file).
  // Write ~4 MiB in a shuffled order of pieces so data, L2 tables and refcount blocks interleave.
  // Pieces stay under 32 KiB (< 64 new clusters per L2 table): a whole L2 table of new clusters
  // is a separate case (see 'one request allocating a whole L2 table' below).
  const model = Buffer.alloc(size);
  const pieces: number[] = [];
  for (let c = 0; c < 160; c++) pieces.push(c);
  for (let i = pieces.length - 1; i > 0; i--) {
    const j = Math.floor(r() * (i + 1));
    [pieces[i], pieces[j]] = [pieces[j], pieces[i]];
  }
  const spec = q({ size, cs: 512, rc: 64, ops: 0 });
  const chain = await openChain(file);
  try {
    const ops: Op[] = pieces.map((c) => ({ kind: 'write', off: c * 64 * KiB + Math.floor(r() * 3000), len: 20 * KiB + Math.floor(r() * 11 * KiB), seed: seed + c }));
    ops.push(...genOps(r, 30, { size, clusterSize: 512, l2Coverage: 64 * 512, granularity: 512, maxLen: 31 * KiB }));
    await applyOps(chain, model, Buffer.alloc(size), spec, ops, what);
    assertSameBytes(await readAll(chain), model, `${what} our view`);
  } finally {
    await chain.close();
  }
  const n = refcountTableClusters(file);
  assert.ok(n > 1, `${what} refcount table should have grown beyond 1 cluster, has ${n} (file ${fs.statSync(file).size} bytes)`);
  await assertQemuCheckClean(file, what);
  assertSameBytes(await qemuRawView(file), model, `${what} QEMU's view`);
});

test('one request allocating a whole L2 table of clusters, refcount_bits=64 (512-byte clusters)', oracle(), async () => {
  // 32 KiB at 0 = 64 new clusters in one L2 table = exactly one refcount block's span.
  const file = path.join(dir, 'rc64-full-l2.qcow2');
  await createLayer(file, q({ size: MiB, cs: 512, rc: 64, ops: 0 }), null);
  const model = Buffer.alloc(MiB);
  const chain = await openChain(file);
  try {
    await applyOps(chain, model, Buffer.alloc(MiB), q({ size: MiB, cs: 512, rc: 64, ops: 0 }), [{ kind: 'write', off: 0, len: 32 * KiB, seed: 7 }], '[rc64-full-l2]');
  } finally {
    await chain.close();
  }
  await assertQemuCheckClean(file, '[rc64-full-l2]');
  assertSameBytes(await qemuRawView(file), model, "[rc64-full-l2] QEMU's view");
});

// ---- concurrency ------------------------------------------------------------------------------

interface ConcOpts {
  name: string;
  base?: LayerSpec; // written sequentially first
  top: LayerSpec;
  n: number;
  /** Requests are aimed at [0, region) so that they overlap heavily. */
  region: number;
  maxLen: number;
  mixed: boolean;
}

async function runConcurrent(o: ConcOpts): Promise<void> {
  const seed = seedFor(o.name);
  const what = `[${o.name} seed=${seed}]`;
  const r = rng(seed);
  const sub = fs.mkdtempSync(path.join(dir, 'cc-'));
  const files: string[] = [];
  let below = Buffer.alloc(o.top.size);
  if (o.base) {
    const bf = path.join(sub, 'base.qcow2');
    await createLayer(bf, o.base, null);
    files.push(bf);
    const c = await openChain(bf);
    try {
      const data = randomBuf(o.base.size, seed ^ 0xbeef);
      await c.write(data, 0);
      below = Buffer.alloc(o.top.size);
      data.copy(below, 0, 0, Math.min(data.length, below.length));
    } finally {
      await c.close();
    }
  }
  const tf = path.join(sub, 'top.qcow2');
  await createLayer(tf, o.top, o.base ? { name: 'base.qcow2', fmt: 'qcow2' } : null);
  files.push(tf);
  const model = Buffer.from(below);
  const { cs } = geometry(o.top);
  const layer = { version: o.top.v ?? 3, clusterSize: cs, format: 'qcow2' } as const;
  const ops: Op[] = [];
  for (let i = 0; i < o.n; i++) {
    const len = 1 + Math.floor(r() * o.maxLen);
    const off = Math.floor(r() * (o.region - len));
    const k = o.mixed ? r() : 0;
    if (k < 0.6) ops.push({ kind: 'write', off, len, seed: Math.floor(r() * 0xffffffff) });
    else if (k < 0.8) ops.push({ kind: 'zero', off, len, unmap: r() < 0.5 });
    else ops.push({ kind: 'discard', off, len });
  }
  const chain = await openChain(tf);
  try {
    // Issue everything at once; overlapping requests must take effect in issue order.
    const results = await withTimeout(Promise.allSettled(ops.map((op) => applyToChain(chain, op))), 4 * OP_TIMEOUT, `${what} concurrent requests`, () => chain.close());
    results.forEach((x, i) => assert.equal(x.status, 'fulfilled', `${what} op #${i} ${describeOp(ops[i])} failed: ${x.status === 'rejected' ? (x.reason as Error).stack : ''}`));
    for (const op of ops) applyToModel(model, below, layer, op);
    assertSameBytes(await readAll(chain), model, `${what} our view after ${o.n} concurrent requests (model: last issued wins)`);
  } finally {
    await chain.close();
  }
  for (const f of files) await assertQemuCheckClean(f, what);
  assertSameBytes(await qemuRawView(tf), model, `${what} QEMU's view after concurrent requests`);
}

test('concurrent overlapping writes, 64k clusters over a backing file', oracle(), () => runConcurrent({
  name: 'conc-64k-backing', base: q({ size: 8 * MiB, ops: 0 }), top: q({ size: 8 * MiB, ops: 0 }),
  n: 300, region: 2 * MiB, maxLen: 150 * KiB, mixed: false,
}));

test('concurrent overlapping writes, 512-byte clusters (L2 and refcount-block allocation races)', oracle(), () => runConcurrent({
  name: 'conc-512', top: q({ size: 8 * MiB, cs: 512, rc: 8, ops: 0 }),
  n: 300, region: 4 * MiB, maxLen: 40 * KiB, mixed: false,
}));

test('concurrent overlapping writes, extended L2 over a backing file', oracle(), () => runConcurrent({
  name: 'conc-extl2', base: q({ size: 8 * MiB, cs: 4096, ops: 0 }), top: q({ size: 8 * MiB, cs: 32768, xl2: true, ops: 0 }),
  n: 300, region: 1 * MiB, maxLen: 20 * KiB, mixed: false,
}));

test('concurrent overlapping writes on a fresh lazy_refcounts image', oracle(), () => runConcurrent({
  name: 'conc-lazy', top: q({ size: 8 * MiB, lazy: true, ops: 0 }),
  n: 200, region: 1 * MiB, maxLen: 100 * KiB, mixed: false,
}));

test('concurrent overlapping writes, zero writes and discards (issue order)', oracle(), () => runConcurrent({
  name: 'conc-mixed', base: q({ size: 8 * MiB, ops: 0 }), top: q({ size: 8 * MiB, ops: 0 }),
  n: 300, region: 2 * MiB, maxLen: 200 * KiB, mixed: true,
}));

// ---- we write into QEMU-made images ---------------------------------------------------------

const INTO: Array<{ builder: string; below?: (files: string[]) => string }> = [
  { builder: 'internal-snapshots' },
  { builder: 'compressed-zlib-64k' },
  { builder: 'compressed-zstd-64k' },
  { builder: 'extl2-over-backing' },
  { builder: 'v2-chain', below: (f) => f[0] },
  { builder: 'three-deep-zero-mask' },
];

for (const { builder, below: belowOf } of INTO) {
  test(`we write into a QEMU-made image: ${builder}`, oracle(), async () => {
    const name = `into-${builder}`;
    const seed = seedFor(name);
    const what = `[${name} seed=${seed}]`;
    const sub = fs.mkdtempSync(path.join(dir, 'into-'));
    const img = await builders[builder](sub, seed);
    const model = await qemuRawView(img.top);
    const below = belowOf ? Buffer.alloc(img.size) : Buffer.alloc(img.size);
    if (belowOf) (await qemuRawView(belowOf(img.qcow2Files))).copy(below);
    const r = rng(seed ^ 0x1234);
    const spec = q({ size: img.size, cs: img.clusterSize, v: img.version, ops: 0 });
    const ops = genOps(r, 120, { size: img.size, clusterSize: img.clusterSize, l2Coverage: img.l2Coverage, granularity: img.granularity });
    const chain = await openChain(img.top);
    try {
      await applyOps(chain, model, below, spec, ops, what);
      assertSameBytes(await readAll(chain), model, `${what} our view`);
    } finally {
      await chain.close();
    }
    for (const f of img.qcow2Files) await assertQemuCheckClean(f, what);
    assertSameBytes(await qemuRawView(img.top), model, `${what} QEMU's view after our writes`);
    // Internal snapshots must still hold their content: we copied shared clusters before writing.
    for (const s of img.snapshots ?? []) {
      const r2 = await qemuImg(['snapshot', '-a', s.name, img.top]);
      assert.equal(r2.code, 0, `${what} snapshot -a ${s.name}: ${r2.stderr}`);
      assertSameBytes(await qemuRawView(img.top), s.view, `${what} content of snapshot ${s.name} after our writes`);
      await assertQemuCheckClean(img.top, `${what} after snapshot -a ${s.name}`);
    }
  });
}
