/**
 * Host layout when allocations need new refcount blocks, against QEMU 7.2: the same writes
 * through qemu-io and qchain (CLI, and in process with either metadata cache) leave the same
 * `qemu-img map --output=json`, the same refcount table location and a clean `qemu-img check`.
 * QEMU puts a missing refcount block at the first free cluster from its free cluster index (right
 * after the run being counted, or in a hole), then searches for the run again; a write continues
 * where its previous clusters end when free there; a table that must grow is rebuilt at the
 * start of the refcount range past both (qcow2_refcount_area). convert's requests (2 MiB from
 * the start of each data run) decide where its runs split.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { oracle, qchain, qemuImg, qemuIo, rng, scratch } from './helpers/qemu.js';
import { FileStorage } from '../src/storage/file.js';
import { Qcow2Image } from '../src/qcow2/image.js';

interface Write {
  offset: number;
  length: number;
  pattern: number;
}

/** `count` writes of `length` bytes at random 64 KiB-aligned offsets below `span`. */
function randomWrites(seed: number, count: number, length: number, span: number): Write[] {
  const r = rng(seed);
  const slots = Math.floor((span - length) / 65536);
  return Array.from({ length: count }, (_, i) => ({ offset: Math.floor(r() * slots) * 65536, length, pattern: (i % 250) + 1 }));
}

function ioArgs(writes: Write[]): string[] {
  return writes.flatMap((w) => ['-c', `write -P ${w.pattern} ${w.offset} ${w.length}`]);
}

async function map(file: string): Promise<string> {
  const r = await qemuImg(['map', '--output=json', file]);
  assert.equal(r.code, 0, r.stderr);
  return r.stdout;
}

/** Refcount table offset and clusters from the header. */
function reftable(file: string): [number, number] {
  const h = Buffer.alloc(60);
  const fd = fs.openSync(file, 'r');
  fs.readSync(fd, h, 0, 60, 0);
  fs.closeSync(fd);
  return [Number(h.readBigUInt64BE(48)), h.readUInt32BE(56)];
}

async function assertClean(file: string): Promise<void> {
  const chk = await qemuImg(['check', file]);
  assert.equal(chk.code, 0, chk.stdout + chk.stderr);
  assert.match(chk.stdout, /No errors were found/);
}

/** Same map, same refcount table, both clean. */
async function assertSameLayout(expected: string, actual: string): Promise<void> {
  await assertClean(expected);
  await assertClean(actual);
  assert.equal(await map(actual), await map(expected), 'qemu-img map');
  assert.deepEqual(reftable(actual), reftable(expected), 'refcount table offset and clusters');
  assert.equal(fs.statSync(actual).size, fs.statSync(expected).size, 'file size');
}

/** The writes through Qcow2Image in this process, with the given metadata cache. */
async function writeInProcess(file: string, writes: Write[], metadataCache: 'writeback' | 'writethrough'): Promise<void> {
  const img = await Qcow2Image.open(await FileStorage.open(file, { readOnly: false }), { metadataCache });
  assert.equal(img.writeback, metadataCache === 'writeback');
  for (const w of writes) await img.write(Buffer.alloc(w.length, w.pattern), w.offset);
  await img.close();
}

const randomCases: Array<{ options: string; size: string; count: number; span: number }> = [
  // 4 KiB clusters: a refcount block covers 8 MiB of the file.
  { options: 'cluster_size=4k', size: '200G', count: 200, span: 128 << 20 },
  // 512 B clusters (writes span several L2 tables): blocks cover 128 KiB, the first table
  // cluster 8 MiB, so the table grows too.
  { options: 'cluster_size=512', size: '16G', count: 120, span: 64 << 20 },
  // 1-bit refcounts: a block covers 2 MiB.
  { options: 'cluster_size=512,refcount_bits=1', size: '16G', count: 120, span: 64 << 20 },
  // 64-bit refcounts: a block covers 32 KiB, shorter than one write; the table grows every few MiB.
  { options: 'cluster_size=512,refcount_bits=64', size: '16G', count: 120, span: 64 << 20 },
];

for (const c of randomCases) {
  test(`random 192k writes, -o ${c.options}: same map as qemu-io (CLI and both metadata caches)`, oracle(), async () => {
    const dir = scratch();
    const q = path.join(dir, 'q.qcow2');
    const created = await qemuImg(['create', '-q', '-f', 'qcow2', '-o', c.options, q, c.size]);
    assert.equal(created.code, 0, created.stderr);
    const copies = ['cli', 'wb', 'wt'].map((n) => path.join(dir, `${n}.qcow2`));
    for (const f of copies) fs.copyFileSync(q, f);
    const writes = randomWrites(7, c.count, 192 * 1024, c.span);
    const qr = await qemuIo([...ioArgs(writes), q]);
    assert.equal(qr.code, 0, qr.stderr);
    const cr = await qchain(['io', ...ioArgs(writes), copies[0]]);
    assert.equal(cr.code, 0, cr.stderr);
    await writeInProcess(copies[1], writes, 'writeback');
    await writeInProcess(copies[2], writes, 'writethrough');
    for (const f of copies) await assertSameLayout(q, f);
  });
}

test('reftable growth: 512 B clusters, 300 MiB written in 1 MiB requests: same tables and map as qemu-io', oracle(), async () => {
  const dir = scratch();
  const q = path.join(dir, 'q.qcow2'), c = path.join(dir, 'c.qcow2');
  assert.equal((await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512', q, '1G'])).code, 0);
  fs.copyFileSync(q, c);
  // Sequential 1 MiB writes with a gap every 8 MiB, then overwrites across the gaps.
  const cmds: string[] = [];
  for (let mb = 0; mb < 300; mb++) if (mb % 8 !== 7) cmds.push(`write -P ${(mb % 200) + 1} ${mb}M 1M`);
  for (let mb = 6; mb < 300; mb += 40) cmds.push(`write -P 0xee ${mb}M 3M`);
  const args = cmds.flatMap((x) => ['-c', x]);
  const qr = await qemuIo([...args, q]);
  assert.equal(qr.code, 0, qr.stderr);
  const cr = await qchain(['io', ...args, c]);
  assert.equal(cr.code, 0, cr.stderr);
  const [, clusters] = reftable(q);
  assert.ok(clusters > 1, `the table outgrew its first cluster (${clusters})`);
  await assertSameLayout(q, c);
});

test('convert -O qcow2 -o cluster_size=4k of ~1 GiB of data: same map as qemu-img convert', oracle(), async () => {
  const dir = scratch();
  const src = path.join(dir, 'src.qcow2');
  assert.equal((await qemuImg(['create', '-q', '-f', 'qcow2', src, '4G'])).code, 0);
  const cmds: string[] = [];
  for (let i = 0; i < 16; i++) cmds.push(`write -P ${i + 1} ${i * 256}M 64M`);
  cmds.push(`write -P 0x63 ${3 * 1024 + 7}M 1M`, `write -P 0x64 ${70 * 1024 + 100}k 300k`);
  const w = await qemuIo([...cmds.flatMap((x) => ['-c', x]), src]);
  assert.equal(w.code, 0, w.stderr);
  const q = path.join(dir, 'q.qcow2'), c = path.join(dir, 'c.qcow2');
  const qr = await qemuImg(['convert', '-O', 'qcow2', '-o', 'cluster_size=4k', src, q]);
  assert.equal(qr.code, 0, qr.stderr);
  const cr = await qchain(['img', 'convert', '-O', 'qcow2', '-o', 'cluster_size=4k', src, c]);
  assert.equal(cr.code, 0, cr.stderr);
  await assertSameLayout(q, c);
});

/**
 * Discards free clusters (QEMU: the free cluster index moves down to them), so later writes fill
 * holes, continue into them from their previous clusters (qcow2_alloc_clusters_at) and meet
 * missing refcount blocks there. Compared with the writethrough metadata cache: with writeback,
 * qchain applies frees only once the L2 tables that dropped the references are written back.
 */
test('random writes and discards, -o cluster_size=512: same map as qemu-io -d unmap (writethrough)', oracle(), async () => {
  const dir = scratch();
  const q = path.join(dir, 'q.qcow2'), c = path.join(dir, 'c.qcow2');
  assert.equal((await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512', q, '16G'])).code, 0);
  fs.copyFileSync(q, c);
  const r = rng(11);
  const span = 32 << 20;
  const ops: Array<{ discard: boolean; offset: number; length: number; pattern: number }> = [];
  for (let i = 0; i < 150; i++) {
    if (r() < 0.25) ops.push({ discard: true, offset: Math.floor(r() * (span / 65536)) * 65536, length: [65536, 131072, 262144][Math.floor(r() * 3)], pattern: 0 });
    else ops.push({ discard: false, offset: Math.floor(r() * ((span - 196608) / 65536)) * 65536, length: 196608, pattern: (i % 250) + 1 });
  }
  const args = ops.flatMap((o) => ['-c', o.discard ? `discard ${o.offset} ${o.length}` : `write -P ${o.pattern} ${o.offset} ${o.length}`]);
  const qr = await qemuIo(['-d', 'unmap', ...args, q]);
  assert.equal(qr.code, 0, qr.stderr);
  const img = await Qcow2Image.open(await FileStorage.open(c, { readOnly: false }), { metadataCache: 'writethrough' });
  for (const o of ops) {
    if (o.discard) await img.discard(o.offset, o.length);
    else await img.write(Buffer.alloc(o.length, o.pattern), o.offset);
  }
  await img.close();
  await assertSameLayout(q, c);
});

/**
 * preallocation=falloc/full, as qcow2_co_truncate: refcount structures covering all of the new
 * area first (qcow2_refcount_area, exact size: a new table past the last used cluster), then
 * the data area, then the L2 tables from the free cluster index (the old table's place first).
 */
test('preallocation=falloc/full, create and resize: same map and refcount table as qemu-img', oracle(), async () => {
  const dir = scratch();
  const creates: Array<[options: string, size: string]> = [
    ['cluster_size=512,preallocation=falloc', '32M'],
    ['cluster_size=512,refcount_bits=64,preallocation=full', '8M'],
    ['cluster_size=4k,preallocation=falloc', '100M'],
    ['preallocation=full', '3M'],
  ];
  for (const [options, size] of creates) {
    const q = path.join(dir, 'q.qcow2'), c = path.join(dir, 'c.qcow2');
    for (const f of [q, c]) fs.rmSync(f, { force: true });
    assert.equal((await qemuImg(['create', '-q', '-f', 'qcow2', '-o', options, q, size])).code, 0);
    const r = await qchain(['img', 'create', '-q', '-f', 'qcow2', '-o', options, c, size]);
    assert.equal(r.code, 0, r.stderr);
    await assertSameLayout(q, c);
  }
  const resizes: Array<[options: string, size: string, mode: string, newSize: string]> = [
    ['cluster_size=512', '8M', 'falloc', '40M'],
    ['cluster_size=4k', '999K', 'full', '3M'], // the old end inside a cluster
    ['cluster_size=65536', '1M', 'falloc', '1056K'],
  ];
  for (const [options, size, mode, newSize] of resizes) {
    const q = path.join(dir, 'rq.qcow2'), c = path.join(dir, 'rc.qcow2');
    for (const f of [q, c]) fs.rmSync(f, { force: true });
    assert.equal((await qemuImg(['create', '-q', '-f', 'qcow2', '-o', options, q, size])).code, 0);
    assert.equal((await qemuIo(['-c', 'write -P 1 0 64k', q])).code, 0);
    fs.copyFileSync(q, c);
    assert.equal((await qemuImg(['resize', '-q', `--preallocation=${mode}`, q, newSize])).code, 0);
    const r = await qchain(['img', 'resize', '-q', `--preallocation=${mode}`, c, newSize]);
    assert.equal(r.code, 0, r.stderr);
    await assertSameLayout(q, c);
  }
});
