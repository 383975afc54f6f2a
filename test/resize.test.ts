/**
 * `qchain img resize` and qemu-io `truncate` against qemu-img/qemu-io 7.2: the same image is
 * prepared by QEMU, copied, and resized by each tool. The results must have the same exit code
 * and messages, pass `qemu-img check`, compare equal, have the same virtual size and block status
 * (offsets ignored), and, for the plain grow/shrink cases, be byte-identical files (same L1/L2
 * placement, same file length after the shrink's cut).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { filterTiming, oracle, qchain, qemuImg, qemuIo, scratch } from './helpers/qemu.js';
import { assertQemuCheckClean, qemuInfo, qemuMap } from './helpers/engine-util.js';

const dir = scratch('qchain-resize-');
let seq = 0;

interface Case {
  name: string;
  create: string;
  size: string;
  writes: string[];
  args: string[];
  /** Files must be byte-identical (layout matches QEMU exactly). */
  identical?: boolean;
  /** Take the snapshot "s1" after the writes (and write once more). */
  snapshot?: boolean;
}

async function prepare(c: Case): Promise<{ a: string; b: string }> {
  const n = seq++;
  const a = path.join(dir, `q${n}.qcow2`), b = path.join(dir, `o${n}.qcow2`);
  const cr = await qemuImg(['create', '-q', '-f', 'qcow2', '-o', c.create, a, c.size], dir);
  assert.equal(cr.code, 0, cr.stderr);
  if (c.writes.length) {
    const w = await qemuIo([...c.writes.flatMap((x) => ['-c', x]), a], dir);
    assert.equal(w.code, 0, w.stderr);
  }
  if (c.snapshot) {
    assert.equal((await qemuImg(['snapshot', '-c', 's1', a])).code, 0);
    assert.equal((await qemuIo(['-c', 'write -P 0x55 64k 64k', a])).code, 0);
  }
  fs.copyFileSync(a, b);
  return { a, b };
}

async function sameResult(c: Case, a: string, b: string): Promise<void> {
  const q = await qemuImg(['resize', ...c.args.map((x) => (x === 'FILE' ? a : x))], dir);
  const o = await qchain(['img', 'resize', ...c.args.map((x) => (x === 'FILE' ? b : x))], dir);
  assert.equal(o.stderr.replaceAll(b, a), q.stderr, `${c.name}: stderr`);
  assert.equal(o.stdout, q.stdout, `${c.name}: stdout`);
  assert.equal(o.code, q.code, `${c.name}: exit code`);
  await assertQemuCheckClean(b, c.name);
  const cmp = await qemuImg(['compare', a, b]);
  assert.equal(cmp.stdout, 'Images are identical.\n', `${c.name}: ${cmp.stdout}${cmp.stderr}`);
  const iq = await qemuInfo(a), io = await qemuInfo(b);
  assert.equal(io['virtual-size'], iq['virtual-size'], `${c.name}: virtual size`);
  assert.deepEqual(io['format-specific'], iq['format-specific'], `${c.name}: format-specific info`);
  assert.deepEqual(io['snapshots'], iq['snapshots'], `${c.name}: snapshots`);
  assert.deepEqual(await qemuMap(b), await qemuMap(a), `${c.name}: block status`);
  if (c.identical) {
    assert.equal(fs.statSync(b).size, fs.statSync(a).size, `${c.name}: file length`);
    assert.ok(fs.readFileSync(a).equals(fs.readFileSync(b)), `${c.name}: files differ`);
  }
}

const W = ['write -P 1 0 1M', 'write -P 2 3M 1M', 'write -P 3 7M 512K'];
const cases: Case[] = [
  { name: 'grow 4k clusters across many L2 tables', create: 'cluster_size=4096', size: '8M', writes: W, args: ['FILE', '20M'], identical: true },
  { name: 'grow relative', create: 'cluster_size=4096', size: '8M', writes: W, args: ['FILE', '+12M'], identical: true },
  { name: 'shrink into an L2 table', create: 'cluster_size=4096', size: '8M', writes: W, args: ['--shrink', 'FILE', '3500K'], identical: true },
  { name: 'shrink to an L2 boundary', create: 'cluster_size=4096', size: '8M', writes: W, args: ['--shrink', 'FILE', '2M'], identical: true },
  { name: 'shrink relative, unaligned end', create: 'cluster_size=4096', size: '8M', writes: W, args: ['--shrink', 'FILE', '-5119K'], identical: true },
  { name: 'shrink over compressed clusters', create: 'cluster_size=4096', size: '8M', writes: ['write -P 1 0 1M', 'write -c -P 2 3M 1M', 'write -P 3 7M 512K'], args: ['--shrink', 'FILE', '3073K'], identical: true },
  { name: 'grow 64k past one L2 table', create: 'cluster_size=65536', size: '100M', writes: ['write -P 1 0 1M', 'write -P 2 60M 1M'], args: ['FILE', '2G'], identical: true },
  { name: 'shrink 64k across L2 tables', create: 'cluster_size=65536', size: '2G', writes: ['write -P 1 0 1M', 'write -P 2 600M 1M', 'write -P 3 1500M 1M'], args: ['--shrink', 'FILE', '700M'], identical: true },
  { name: 'shrink extended L2', create: 'cluster_size=65536,extended_l2=on', size: '2G', writes: ['write -P 1 0 1M', 'write -P 2 600M 5k', 'write -P 3 1500M 1M'], args: ['--shrink', 'FILE', '600M'], identical: true },
  { name: 'grow extended L2', create: 'cluster_size=32768,extended_l2=on', size: '1000K', writes: ['write -P 1 0 3k'], args: ['FILE', '300M'], identical: true },
  { name: 'shrink v2', create: 'compat=0.10', size: '8M', writes: ['write -P 1 0 1M', 'write -P 3 7M 512K'], args: ['--shrink', 'FILE', '2M'], identical: true },
  { name: 'grow v2', create: 'compat=0.10', size: '8M', writes: ['write -P 1 0 1M', 'write -P 3 7M 512K'], args: ['FILE', '1G'], identical: true },
  { name: 'grow 512-byte clusters', create: 'cluster_size=512', size: '1M', writes: ['write -P 1 0 100K', 'write -P 3 900K 100K'], args: ['FILE', '10M'], identical: true },
  { name: 'shrink 512-byte clusters', create: 'cluster_size=512', size: '1M', writes: ['write -P 1 0 100K', 'write -P 3 900K 100K'], args: ['--shrink', 'FILE', '50K'], identical: true },
  { name: 'shrink 2M clusters', create: 'cluster_size=2M', size: '10M', writes: ['write -P 1 0 3M'], args: ['--shrink', 'FILE', '3M'], identical: true },
  { name: 'grow 2M clusters to 1T', create: 'cluster_size=2M', size: '10M', writes: ['write -P 1 0 3M'], args: ['FILE', '1T'], identical: true },
  { name: 'shrink with an internal snapshot', create: 'cluster_size=4096', size: '8M', writes: ['write -P 1 0 6M'], snapshot: true, args: ['--shrink', 'FILE', '3M'], identical: true },
  { name: 'grow with an internal snapshot', create: 'cluster_size=4096', size: '8M', writes: ['write -P 1 0 6M'], snapshot: true, args: ['FILE', '30M'], identical: true },
  { name: 'v2 with a snapshot', create: 'compat=0.10', size: '1M', writes: [], snapshot: true, args: ['FILE', '2M'], identical: true },
  { name: 'preallocation=metadata', create: 'cluster_size=65536', size: '1M', writes: ['write -P 1 0 64k'], args: ['--preallocation=metadata', 'FILE', '5M'] },
  { name: 'preallocation=metadata extended L2', create: 'cluster_size=65536,extended_l2=on', size: '1M', writes: ['write -P 1 0 64k'], args: ['--preallocation=metadata', 'FILE', '5M'] },
  { name: 'preallocation=falloc', create: 'cluster_size=65536', size: '1M', writes: ['write -P 1 0 64k'], args: ['--preallocation=falloc', 'FILE', '5M'] },
  { name: 'preallocation=full', create: 'cluster_size=4096', size: '1M', writes: ['write -P 1 0 64k'], args: ['--preallocation=full', 'FILE', '5M'] },
  { name: 'not a multiple of 512', create: 'cluster_size=65536', size: '1M', writes: [], args: ['--shrink', 'FILE', '1000'], identical: true },
  { name: 'shrink without --shrink', create: 'cluster_size=65536', size: '1M', writes: [], args: ['FILE', '512K'], identical: true },
  { name: 'negative size', create: 'cluster_size=65536', size: '1M', writes: [], args: ['FILE', '--', '-5M'], identical: true },
  { name: 'zero size', create: 'cluster_size=65536', size: '1M', writes: [], args: ['FILE', '0'], identical: true },
  { name: 'bad size', create: 'cluster_size=65536', size: '1M', writes: [], args: ['FILE', 'foo'], identical: true },
  { name: 'L1 too large', create: 'cluster_size=65536', size: '1M', writes: [], args: ['FILE', '4E'], identical: true },
  { name: 'preallocation when shrinking', create: 'cluster_size=65536', size: '1M', writes: [], args: ['--preallocation=full', '--shrink', 'FILE', '512K'], identical: true },
  { name: 'bad preallocation mode', create: 'cluster_size=65536', size: '1M', writes: [], args: ['--preallocation=bogus', 'FILE', '2M'], identical: true },
  { name: 'quiet', create: 'cluster_size=65536', size: '1M', writes: [], args: ['-q', 'FILE', '2M'], identical: true },
  { name: 'not enough arguments', create: 'cluster_size=65536', size: '1M', writes: [], args: ['FILE'], identical: true },
  { name: 'extra argument', create: 'cluster_size=65536', size: '1M', writes: [], args: ['FILE', '1M', '2M'], identical: true },
  { name: 'unknown option', create: 'cluster_size=65536', size: '1M', writes: [], args: ['-x', 'FILE', '2M'], identical: true },
];

for (const c of cases) {
  test(`resize qcow2: ${c.name}`, oracle(), async () => {
    const { a, b } = await prepare(c);
    await sameResult(c, a, b);
  });
}

test('resize qcow2 over a longer backing file zeroes the new area (v3, extended L2) or fails (v2)', oracle(), async () => {
  const base = path.join(dir, 'base.qcow2');
  assert.equal((await qemuImg(['create', '-q', '-f', 'qcow2', base, '4M'])).code, 0);
  assert.equal((await qemuIo(['-c', 'write -P 9 0 4M', base])).code, 0);
  const bk = `backing_file=${base},backing_fmt=qcow2`;
  for (const c of [
    { name: 'v3 backing', create: bk, size: '1M', writes: ['write -P 1 0 64k'], args: ['FILE', '6M'], identical: true },
    { name: 'v3 backing, grow inside it', create: bk, size: '1M', writes: [], args: ['FILE', '3M'], identical: true },
    { name: 'extended L2 backing, unaligned old end', create: `${bk},cluster_size=32768,extended_l2=on`, size: '1000K', writes: ['write -P 1 0 64k'], args: ['FILE', '6M'], identical: true },
    { name: 'v2 backing', create: `${bk},compat=0.10`, size: '1M', writes: ['write -P 1 0 64k'], args: ['FILE', '6M'], identical: true },
    { name: 'shrink with backing', create: bk, size: '2M', writes: ['write -P 1 0 64k'], args: ['--shrink', 'FILE', '1M'], identical: true },
  ] as Case[]) {
    const { a, b } = await prepare(c);
    await sameResult(c, a, b);
  }
});

test('resize raw like qemu-img (shrink, grow, preallocation, unaligned sizes)', oracle(), async () => {
  const a = path.join(dir, 'q.raw'), b = path.join(dir, 'o.raw');
  const init = Buffer.alloc(1024 * 1024);
  for (let i = 0; i < init.length; i += 4096) init[i] = (i / 4096) & 0xff;
  fs.writeFileSync(a, init);
  fs.writeFileSync(b, init);
  for (const args of [
    ['-f', 'raw', 'FILE', '1000'], ['-f', 'raw', '--shrink', 'FILE', '1000'], ['-f', 'raw', 'FILE', '1500'],
    ['-f', 'raw', '--preallocation=metadata', 'FILE', '2M'], ['-f', 'raw', '--preallocation=full', 'FILE', '3M'],
    ['-f', 'raw', '--preallocation=falloc', 'FILE', '4M'], ['-f', 'raw', '--shrink', 'FILE', '--', '-1M'], ['FILE', '+1k'],
    ['-f', 'qcow2', 'FILE', '5M'],
  ]) {
    const q = await qemuImg(['resize', ...args.map((x) => (x === 'FILE' ? a : x))]);
    const o = await qchain(['img', 'resize', ...args.map((x) => (x === 'FILE' ? b : x))]);
    const what = args.join(' ');
    assert.equal(o.stderr.replaceAll(b, a), q.stderr, what);
    assert.equal(o.stdout, q.stdout, what);
    assert.equal(o.code, q.code, what);
    assert.equal(fs.statSync(b).size, fs.statSync(a).size, what);
    assert.ok(fs.readFileSync(a).equals(fs.readFileSync(b)), `${what}: contents`);
  }
});

test('qemu-io truncate side by side with qemu-io', oracle(), async () => {
  const a = path.join(dir, 'io-q.qcow2'), b = path.join(dir, 'io-o.qcow2');
  assert.equal((await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', a, '4M'])).code, 0);
  fs.copyFileSync(a, b);
  const cmds = ['write -P 1 0 3M', 'truncate 1M', 'read -P 1 0 1M', 'truncate 1000', 'truncate 8M', 'read -P 0 1M 7M',
    'truncate -m metadata 4M', 'truncate -m full 12M', 'truncate -m bogus 12M', 'truncate 5E', 'length',
    'truncate -m falloc 16M', 'length', 'write -P 2 15M 1M', 'truncate 2M', 'length'];
  const args = cmds.flatMap((c) => ['-c', c]);
  const q = await qemuIo([...args, a]);
  const o = await qchain(['io', ...args, b]);
  assert.equal(filterTiming(o.stdout), filterTiming(q.stdout));
  assert.equal(o.stderr, q.stderr);
  assert.equal(o.code, q.code);
  await assertQemuCheckClean(b, 'io truncate');
  const cmp = await qemuImg(['compare', a, b]);
  assert.equal(cmp.stdout, 'Images are identical.\n');
  assert.equal((await qemuInfo(b))['virtual-size'], (await qemuInfo(a))['virtual-size']);
});
