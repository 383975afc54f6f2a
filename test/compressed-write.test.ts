/**
 * Compressed writes, with QEMU as the judge: images we write with `convert -c` and `io write -c`
 * must pass `qemu-img check`, compare equal to their source, read back the same bytes through
 * QEMU and through us, and have the same compressed/allocated cluster counts as QEMU's own
 * `qemu-img convert -c` of the same source. Covers zlib and zstd, cluster sizes 512..2M,
 * extended L2, v2, refcount_bits=1, images whose size is not a multiple of the cluster size,
 * and a qemu-io session run side by side with ours (messages and resulting images).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { filterTiming, oracle, qchain, qemuImg, qemuIo, qemuRawView, scratch } from './helpers/qemu.js';
import { assertQemuCheckClean, assertSameBytes, fillRandom, qemuInfo, readAll } from './helpers/engine-util.js';
import { openChain } from '../src/chain/open.js';

const dir = scratch('qchain-compwrite-');
const KiB = 1024;
const MiB = 1024 * 1024;

/**
 * A raw source of `size` bytes built from 4 KiB pieces: random (incompressible), text-like
 * (compressible), zero, and a few with a random half; chosen by a seeded sequence.
 */
function mixedSource(file: string, size: number, seed: number): Buffer {
  const b = Buffer.alloc(size);
  const piece = 4 * KiB;
  let x = seed >>> 0 || 1;
  const next = (): number => {
    x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0;
    return x;
  };
  const text = Buffer.from('the quick brown fox jumps over the lazy dog 0123456789\n');
  for (let p = 0; p < size; p += piece) {
    const q = Math.min(size, p + piece);
    const r = next() % 8;
    if (r < 2) fillRandom(b.subarray(p, q), next());
    else if (r < 5) for (let k = p; k < q; k += text.length) text.copy(b, k, 0, Math.min(text.length, q - k));
    else if (r === 5) fillRandom(b.subarray(p, p + Math.floor((q - p) / 2)), next());
    // else: zero
  }
  // A long zero stretch and a long random stretch, so whole clusters of each exist at 2M.
  if (size > 8 * MiB) {
    b.fill(0, 2 * MiB, 5 * MiB);
    fillRandom(b.subarray(5 * MiB, 7 * MiB), seed ^ 0xabc);
  }
  fs.writeFileSync(file, b);
  return b;
}

/** `N/M = x% allocated, y% fragmented, z% compressed clusters` from qemu-img check. */
async function checkSummary(file: string): Promise<string> {
  const r = await qemuImg(['check', file]);
  assert.equal(r.code, 0, `qemu-img check ${file}: ${r.stdout}${r.stderr}`);
  const line = r.stdout.split('\n').find((l) => l.includes('compressed clusters')) ?? '';
  return line.replace(/, [0-9.]+% fragmented/, '');
}

interface Case {
  cs: number;
  type: 'zlib' | 'zstd';
  size: number;
  extra?: string;
}

const cases: Case[] = [
  { cs: 512, type: 'zlib', size: 300 * KiB + 512 },
  { cs: 4 * KiB, type: 'zstd', size: 1 * MiB + 1536 },
  { cs: 64 * KiB, type: 'zlib', size: 3 * MiB + 4608 },
  { cs: 64 * KiB, type: 'zstd', size: 3 * MiB },
  { cs: 64 * KiB, type: 'zlib', size: 2 * MiB + 512, extra: 'extended_l2=on' },
  { cs: 32 * KiB, type: 'zstd', size: 2 * MiB + 1024, extra: 'extended_l2=on' },
  { cs: 64 * KiB, type: 'zlib', size: 2 * MiB + 2048, extra: 'compat=0.10' },
  { cs: 64 * KiB, type: 'zlib', size: 1 * MiB + 512, extra: 'refcount_bits=1' },
  { cs: 2 * MiB, type: 'zlib', size: 9 * MiB + 512 },
  { cs: 2 * MiB, type: 'zstd', size: 10 * MiB },
];

for (const c of cases) {
  const name = `convert -c cs=${c.cs} ${c.type} size=${c.size}${c.extra ? ' ' + c.extra : ''}`;
  test(name, oracle(), async () => {
    const tag = `${c.cs}-${c.type}-${c.size}-${(c.extra ?? '').replace(/[=,]/g, '_')}`;
    const src = path.join(dir, `src-${tag}.raw`);
    const data = mixedSource(src, c.size, c.cs ^ c.size);
    const opts = [`cluster_size=${c.cs}`, ...(c.type === 'zstd' ? ['compression_type=zstd'] : []), ...(c.extra ? [c.extra] : [])].join(',');
    const ours = path.join(dir, `ours-${tag}.qcow2`);
    const theirs = path.join(dir, `qemu-${tag}.qcow2`);
    const r = await qchain(['img', 'convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', opts, src, ours]);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stdout + r.stderr, '');
    const q = await qemuImg(['convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', opts, src, theirs]);
    assert.equal(q.code, 0, q.stderr);

    await assertQemuCheckClean(ours, name);
    const cmp = await qemuImg(['compare', '-f', 'raw', '-F', 'qcow2', src, ours]);
    assert.equal(cmp.stdout, 'Images are identical.\n', name);
    assertSameBytes(await qemuRawView(ours), data, `${name}: QEMU's view`);
    const chain = await openChain(ours, { readOnly: true });
    try {
      assertSameBytes(await readAll(chain), data, `${name}: our view`);
    } finally {
      await chain.close();
    }
    // Same clusters compressed / allocated as qemu-img convert -c decides.
    const summary = await checkSummary(ours);
    assert.match(summary, /[1-9][0-9.]*% compressed clusters/, `${name}: nothing compressed: ${summary}`);
    assert.equal(summary, await checkSummary(theirs), `${name}: cluster statistics differ from qemu-img convert -c`);
    const info = await qemuInfo(ours);
    const spec = (info['format-specific'] as { data: Record<string, unknown> }).data;
    assert.equal(spec['compression-type'], c.type);
  });
}

test('convert -c packs compressed clusters into shared host clusters', oracle(), async () => {
  const src = path.join(dir, 'pack.raw');
  const text = Buffer.from('compressible line of text, repeated many times over and over\n');
  const b = Buffer.alloc(4 * MiB);
  for (let p = 0; p < b.length; p += text.length) text.copy(b, p, 0, Math.min(text.length, b.length - p));
  fs.writeFileSync(src, b);
  const out = path.join(dir, 'pack.qcow2');
  const r = await qchain(['img', 'convert', '-c', '-f', 'raw', '-O', 'qcow2', src, out]);
  assert.equal(r.code, 0, r.stderr);
  await assertQemuCheckClean(out, 'pack');
  // 64 compressed clusters of ~1 KiB each share a handful of host clusters.
  const info = await qemuInfo(out);
  assert.ok((info['actual-size'] as number) < 8 * 64 * KiB, `file too large: ${info['actual-size']}`);
  assert.equal((await checkSummary(out)).split(' = ')[0], '64/64');
  assertSameBytes(await qemuRawView(out), b, 'pack');
});

test('convert -c option errors as qemu-img', oracle(), async () => {
  const src = path.join(dir, 'err.raw');
  fs.writeFileSync(src, Buffer.alloc(MiB, 1));
  for (const args of [
    ['-c', '-O', 'raw', src, path.join(dir, 'err1.raw')],
    ['-c', '-O', 'qcow2', '-o', 'preallocation=metadata', src, path.join(dir, 'err2.qcow2')],
    ['-c', '-O', 'qcow2', '-o', 'compat=0.10,compression_type=zstd', src, path.join(dir, 'err3.qcow2')],
    ['-c', '-O', 'qcow2', '-o', 'compression_type=foo', src, path.join(dir, 'err4.qcow2')],
  ]) {
    const q = await qemuImg(['convert', ...args]);
    for (const f of fs.readdirSync(dir)) if (f.startsWith('err') && f !== 'err.raw') fs.rmSync(path.join(dir, f));
    const o = await qchain(['img', 'convert', ...args]);
    assert.equal(o.stderr, q.stderr, args.join(' '));
    assert.equal(o.stdout, q.stdout, args.join(' '));
    assert.equal(o.code, q.code, args.join(' '));
  }
});

test('convert -c -S 0 compresses every cluster, as qemu-img', oracle(), async () => {
  const src = path.join(dir, 's0.raw');
  const b = Buffer.alloc(MiB);
  b.fill(7, 0, 100 * KiB);
  fs.writeFileSync(src, b);
  const ours = path.join(dir, 's0-ours.qcow2'), theirs = path.join(dir, 's0-qemu.qcow2');
  assert.equal((await qchain(['img', 'convert', '-c', '-S', '0', '-f', 'raw', '-O', 'qcow2', src, ours])).code, 0);
  assert.equal((await qemuImg(['convert', '-c', '-S', '0', '-f', 'raw', '-O', 'qcow2', src, theirs])).code, 0);
  await assertQemuCheckClean(ours, 's0');
  assert.equal(await checkSummary(ours), await checkSummary(theirs));
  assertSameBytes(await qemuRawView(ours), b, 's0');
});

/** One qemu-io script, run by qemu-io and by us on identical fresh images. */
async function sideBySide(name: string, createOpts: string, size: string, cmds: string[]): Promise<void> {
  const a = path.join(dir, `${name}-qemu.qcow2`), b = path.join(dir, `${name}-ours.qcow2`);
  assert.equal((await qemuImg(['create', '-q', '-f', 'qcow2', '-o', createOpts, a, size])).code, 0);
  fs.copyFileSync(a, b);
  const args = cmds.flatMap((c) => ['-c', c]);
  const q = await qemuIo([...args, a]);
  const o = await qchain(['io', ...args, b]);
  assert.equal(filterTiming(o.stdout), filterTiming(q.stdout), `${name}: stdout`);
  assert.equal(o.stderr, q.stderr, `${name}: stderr`);
  assert.equal(o.code, q.code, `${name}: exit code`);
  await assertQemuCheckClean(b, name);
  const cmp = await qemuImg(['compare', a, b]);
  assert.equal(cmp.stdout, 'Images are identical.\n', `${name}: ${cmp.stdout}${cmp.stderr}`);
  assert.equal(await checkSummary(b), await checkSummary(a), `${name}: cluster statistics`);
}

test('io write -c side by side with qemu-io (zlib, unaligned image end)', oracle(), async () => {
  await sideBySide('io-zlib', 'cluster_size=65536', '1000K', [
    'write -c -P 5 0 64k', 'write -c 0 64k', 'write -c 512 64k', 'write -c 65536 512', 'write -c 960k 40k',
    'write -c 128k 128k', 'write -c 1 512', 'write -c -P 0 256k 64k', 'write -c 320k 0', 'write -z 384k 64k',
    'write -c 384k 64k', 'write -c -P 3 448k 192k', 'write -c 2M 64k', 'write -c -f 640k 64k', 'read -P 3 448k 192k',
    'read -P 5 0 64k',
  ]);
});

test('io write -c side by side with qemu-io (zstd, extended L2, 16k clusters)', oracle(), async () => {
  await sideBySide('io-zstd', 'cluster_size=16384,compression_type=zstd,extended_l2=on', '1M', [
    'write -c -P 9 0 64k', 'write -c -P 0 64k 16k', 'write -P 1 80k 1k', 'write -c 80k 16k', 'write -z 96k 32k',
    'write -c -P 2 96k 16k', 'write -c -P 4 1008k 16k', 'read -P 9 0 64k', 'read -P 2 96k 16k', 'read -P 4 1008k 16k',
  ]);
});

test('io write -c side by side with qemu-io (v2, 512-byte clusters)', oracle(), async () => {
  await sideBySide('io-v2', 'cluster_size=512,compat=0.10', '64K', [
    'write -c -P 1 0 4k', 'write -c -P 2 4k 512', 'write -c 4k 512', 'write -c 8k 1024', 'read -P 1 0 4k',
  ]);
});

test('io write -c on raw fails like qemu-io', oracle(), async () => {
  const f = path.join(dir, 'io-raw.raw');
  fs.writeFileSync(f, Buffer.alloc(MiB));
  const q = await qemuIo(['-f', 'raw', '-c', 'write -c 0 64k', f]);
  const o = await qchain(['io', '-f', 'raw', '-c', 'write -c 0 64k', f]);
  assert.equal(o.stdout, q.stdout);
  assert.equal(o.code, q.code);
});
