/**
 * `qchain img commit` against `qemu-img commit` on copies of the same chains: guest views of
 * every file, the emptied top byte for byte, progress, messages and exit codes; the library's
 * deletion-cost planner against the layers' maps.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { oracle, qchain, qemuImg, qemuImgSync, qemuIoSync, scratch } from './helpers/qemu.js';
import { CLUSTER, backingOf, buildChain, check, letters, mapShape, qchainImg, sameViews, seedChain, sideBySideDirs, views, type Layer } from './helpers/chains.js';
import { openChain } from '../src/chain/open.js';
import { deletionCost } from '../src/ops/plan.js';
import { Qcow2Image } from '../src/qcow2/image.js';

const SEED = seedChain('cur.qcow2');
const FILES = SEED.map((l) => l.name);

/** Build `layers` in a fresh folder, run `args` with qemu-img in q/ and with qchain in c/. */
async function sideBySide(layers: Layer[], args: string[]): Promise<{ q: string; c: string; rq: { code: number; stdout: string; stderr: string }; rc: { code: number; stdout: string; stderr: string } }> {
  const { q, c } = sideBySideDirs(layers);
  const rq = await qemuImg(args, q);
  const rc = await qchainImg(args, c);
  return { q, c, rq, rc };
}

test('commit -b base: the seed table (base gets DABBBCCCDD--, sn1/sn2 change, top and pointers stay)', oracle(), async () => {
  const { q, c, rq, rc } = await sideBySide(SEED, ['commit', '-b', 'base.qcow2', 'cur.qcow2']);
  assert.equal(rq.code, 0, rq.stderr);
  assert.equal(rc.code, 0, rc.stderr);
  assert.equal(rc.stdout, rq.stdout);
  assert.equal(rc.stdout, 'Image committed.\n');
  const v = await sameViews(q, c, FILES);
  assert.equal(letters(v.get('base.qcow2') as Buffer), 'DABBBCCCDD--');
  // The intermediates are untouched files, so their views now mix old and new data.
  assert.equal(letters(v.get('sn1.qcow2') as Buffer), 'DABBBBCCDD--');
  assert.equal(letters(v.get('sn2.qcow2') as Buffer), 'DABBBCCCCD--');
  assert.equal(letters(v.get('cur.qcow2') as Buffer), 'DABBBCCCDD--');
  // -b implies -d: the top keeps its clusters and its backing pointer.
  assert.equal(await backingOf(path.join(c, 'cur.qcow2')), 'sn2.qcow2');
  assert.ok(fs.readFileSync(path.join(c, 'cur.qcow2')).equals(fs.readFileSync(path.join(q, 'cur.qcow2'))), 'top unchanged');
  for (const n of ['sn1.qcow2', 'sn2.qcow2']) assert.ok(fs.readFileSync(path.join(c, n)).equals(fs.readFileSync(path.join(q, n))), `${n} untouched`);
  assert.equal((await check(path.join(c, 'base.qcow2'))).code, 0);
});

test('commit without -b: into the backing file, top emptied byte-identically to qemu-img', oracle(), async () => {
  const { q, c, rq, rc } = await sideBySide(SEED, ['commit', 'cur.qcow2']);
  assert.equal(rq.code, 0, rq.stderr);
  assert.equal(rc.code, 0, rc.stderr);
  const v = await sameViews(q, c, FILES);
  assert.equal(letters(v.get('sn2.qcow2') as Buffer), 'DABBBCCCDD--');
  assert.equal(letters(v.get('cur.qcow2') as Buffer), 'DABBBCCCDD--');
  const top = fs.readFileSync(path.join(c, 'cur.qcow2'));
  assert.ok(top.equals(fs.readFileSync(path.join(q, 'cur.qcow2'))), 'emptied top identical to qemu-img\'s');
  assert.equal(top.length, 4 * CLUSTER);
  for (const n of ['cur.qcow2', 'sn2.qcow2']) assert.equal((await check(path.join(c, n))).code, 0, n);
  assert.equal(await backingOf(path.join(c, 'cur.qcow2')), 'sn2.qcow2');
});

test('commit -d keeps the top; zero clusters in the top become zeros in the base; v2 and small clusters', oracle(), async () => {
  const layers: Layer[] = [
    { name: 'base.qcow2', row: 'AAAAAAAA', opts: ['-o', 'cluster_size=4k'] },
    { name: 'mid.qcow2', row: '-BB-----', opts: ['-o', 'compat=0.10'] },
    { name: 'top.qcow2', row: '00-C--0-' },
  ];
  const names = layers.map((l) => l.name);
  for (const args of [['commit', '-d', 'top.qcow2'], ['commit', '-b', 'base.qcow2', 'top.qcow2'], ['commit', 'top.qcow2']]) {
    const { q, c, rq, rc } = await sideBySide(layers, args);
    assert.equal(rc.code, rq.code, `${args.join(' ')}: ${rc.stderr}`);
    const v = await sameViews(q, c, names);
    assert.equal(letters(v.get('top.qcow2') as Buffer), '--BCAA-A', args.join(' '));
    for (const n of names) assert.equal((await check(path.join(c, n))).code, 0, `${args.join(' ')}: ${n}`);
  }
});

test('commit of a v2 top uses the discard path (view and check as qemu-img)', oracle(), async () => {
  const layers: Layer[] = [
    { name: 'base.qcow2', row: 'AAAA' },
    { name: 'top.qcow2', row: '-BB-', opts: ['-o', 'compat=0.10'] },
  ];
  const { q, c, rq, rc } = await sideBySide(layers, ['commit', 'top.qcow2']);
  assert.equal(rc.code, rq.code, rc.stderr);
  await sameViews(q, c, ['base.qcow2', 'top.qcow2']);
  assert.deepEqual(mapShape(c, 'top.qcow2'), mapShape(q, 'top.qcow2'));
  assert.equal((await check(path.join(c, 'top.qcow2'))).code, 0);
});

test('commit into a raw base', oracle(), async () => {
  const layers: Layer[] = [{ name: 'base.raw', row: 'AAAAAA', fmt: 'raw' }, { name: 'top.qcow2', row: '-B0-B-' }];
  const { q, c, rq, rc } = await sideBySide(layers, ['commit', 'top.qcow2']);
  assert.equal(rc.code, rq.code, rc.stderr);
  const v = await sameViews(q, c, ['base.raw', 'top.qcow2']);
  assert.equal(letters(v.get('base.raw') as Buffer), 'AB-ABA');
});

test('commit grows a smaller base to the top\'s size', { ...oracle(), todo: typeof (Qcow2Image.prototype as { resize?: unknown }).resize === 'function' ? undefined : 'needs the qcow2 driver resize' }, async () => {
  const { q, c } = sideBySideDirs([{ name: 'base.qcow2', row: 'AAAA' }], (src) => {
    qemuImgSync(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'top.qcow2', `${8 * CLUSTER}`], src);
    qemuIoSync(['-c', `write -P 0x45 ${2 * CLUSTER} ${4 * CLUSTER}`, 'top.qcow2'], src);
  });
  assert.equal((await qemuImg(['commit', 'top.qcow2'], q)).code, 0);
  const rc = await qchainImg(['commit', 'top.qcow2'], c);
  assert.equal(rc.code, 0, rc.stderr);
  const v = await sameViews(q, c, ['base.qcow2', 'top.qcow2']);
  assert.equal(letters(v.get('base.qcow2') as Buffer), 'AAEEEE--');
});

test('commit -p prints qemu-img\'s progress lines; -q prints nothing; -r limits the rate', oracle(), async () => {
  const { rq, rc } = await sideBySide(SEED, ['commit', '-p', '-b', 'base.qcow2', 'cur.qcow2']);
  assert.equal(rc.code, 0, rc.stderr);
  for (const out of [rq.stdout, rc.stdout]) {
    assert.ok(out.startsWith('    (0.00/100%)\r'), JSON.stringify(out));
    assert.ok(out.endsWith('    (100.00/100%)\r\nImage committed.\n'), JSON.stringify(out));
  }
  const quiet = await sideBySide(SEED, ['commit', '-q', '-p', 'cur.qcow2']);
  assert.equal(quiet.rc.stdout, quiet.rq.stdout);
  assert.equal(quiet.rc.stdout, '');
  // 8 MiB at 8 MiB/s: the second 4 MiB request waits about half a second.
  const dir = scratch();
  buildChain(dir, [{ name: 'b.qcow2', row: '-'.repeat(128) }]);
  qemuImgSync(['create', '-q', '-f', 'qcow2', '-b', 'b.qcow2', '-F', 'qcow2', 't.qcow2'], dir);
  qemuIoSync(['-c', 'write -P 0x33 0 8M', 't.qcow2'], dir);
  const t0 = Date.now();
  const r = await qchain(['img', 'commit', '-r', '8M', 't.qcow2'], dir);
  assert.equal(r.code, 0, r.stderr);
  assert.ok(Date.now() - t0 >= 400, `rate-limited commit took ${Date.now() - t0} ms`);
  assert.equal(letters((await views(dir, ['b.qcow2'])).get('b.qcow2') as Buffer).slice(0, 128), '3'.repeat(128));
});

test('commit errors: message and exit status as qemu-img', oracle(), async () => {
  const dir = scratch();
  fs.mkdirSync(path.join(dir, 'd'));
  buildChain(path.join(dir, 'd'), [{ name: 'base.qcow2', row: 'A-' }, { name: 'mid.qcow2', row: '-B' }, { name: 'top.qcow2', row: 'C-' }]);
  qemuImgSync(['create', '-q', '-f', 'raw', 'r.raw', '1M'], dir);
  qemuImgSync(['create', '-q', '-f', 'qcow2', '-u', '-b', 'gone.qcow2', '-F', 'qcow2', 'orphan.qcow2', '1M'], dir);
  const cases = [
    ['d/base.qcow2'], ['-f', 'raw', 'r.raw'], ['-b', 'nonexist.qcow2', 'd/top.qcow2'], ['-b', 'top.qcow2', 'd/top.qcow2'],
    ['-b', 'd/base.qcow2', 'd/top.qcow2'], ['-t', 'bogus', 'd/top.qcow2'], ['-r', 'abc', 'd/top.qcow2'], ['-r', '1Q', 'd/top.qcow2'],
    ['nofile'], [], ['a', 'b'], ['-f', 'foo', 'd/top.qcow2'], ['-x', 'd/top.qcow2'], ['-b'], ['orphan.qcow2'],
  ];
  for (const c of cases) {
    const rq = await qemuImg(['commit', ...c], dir);
    const rc = await qchainImg(['commit', ...c], dir);
    assert.equal(rc.stderr, rq.stderr, `stderr for commit ${c.join(' ')}`);
    assert.equal(rc.code, rq.code, `status for commit ${c.join(' ')}`);
    assert.equal(rc.stdout, rq.stdout, `stdout for commit ${c.join(' ')}`);
  }
});

test('deletionCost: pulling B into C vs committing C into B, from the layers\' maps', oracle(), async () => {
  const dir = scratch();
  buildChain(dir, SEED);
  const chain = await openChain(path.join(dir, 'cur.qcow2'), { readOnly: true });
  try {
    // Delete the point in time between sn1 (B, depth 2) and sn2 (C, depth 1).
    const cost = await deletionCost(chain, 2);
    // What QEMU's maps say: clusters each layer holds itself.
    const own = (f: string): Set<number> => {
      const s = new Set<number>();
      const m = JSON.parse(qemuImgSync(['map', '--output=json', f], dir)) as Array<{ start: number; length: number; depth: number }>;
      for (const e of m) if (e.depth === 0) for (let p = e.start; p < e.start + e.length; p += CLUSTER) s.add(p / CLUSTER);
      return s;
    };
    const b = own('sn1.qcow2'), c = own('sn2.qcow2');
    assert.equal(cost.pullBytes, [...b].filter((x) => !c.has(x)).length * CLUSTER);
    assert.equal(cost.commitBytes, c.size * CLUSTER);
    assert.deepEqual(cost, { pullBytes: 3 * CLUSTER, commitBytes: 4 * CLUSTER, cheaper: 'pull' });
    // Between sn2 (B) and cur (C): pulling copies CCCC minus cur's clusters, committing copies cur's 3.
    assert.deepEqual(await deletionCost(chain, 1), { pullBytes: 3 * CLUSTER, commitBytes: 3 * CLUSTER, cheaper: 'equal' });
  } finally {
    await chain.close();
  }
});

test('commit of a top with an internal snapshot: discard path, snapshot kept (as qemu-img)', oracle(), async () => {
  const { q, c } = sideBySideDirs([{ name: 'base.qcow2', row: 'AAAA' }, { name: 'top.qcow2', row: 'BB--' }], (src) => {
    qemuImgSync(['snapshot', '-c', 's1', 'top.qcow2'], src);
    qemuIoSync(['-c', `write -P 0x43 ${CLUSTER / 2} ${CLUSTER * 2}`, 'top.qcow2'], src);
  });
  assert.equal((await qemuImg(['commit', 'top.qcow2'], q)).code, 0);
  const rc = await qchainImg(['commit', 'top.qcow2'], c);
  assert.equal(rc.code, 0, rc.stderr);
  await sameViews(q, c, ['base.qcow2', 'top.qcow2']);
  assert.deepEqual(mapShape(c, 'top.qcow2'), mapShape(q, 'top.qcow2'));
  assert.equal((await check(path.join(c, 'top.qcow2'))).code, 0);
  const snap = async (d: string): Promise<Buffer> => {
    const out = path.join(d, 's1.raw');
    assert.equal((await qemuImg(['convert', '-l', 's1', '-O', 'raw', 'top.qcow2', out], d)).code, 0);
    return fs.readFileSync(out);
  };
  assert.ok((await snap(c)).equals(await snap(q)), 'snapshot s1 content kept');
});
