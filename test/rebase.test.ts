/**
 * `qchain img rebase` against `qemu-img rebase` on copies of the same chains: guest views of
 * every file, headers byte for byte, the seeds' chain-shortening recipes, messages and exit codes.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { oracle, qemuImg, qemuImgSync, rng, scratch } from './helpers/qemu.js';
import { differingRuns } from '../src/ops/rebase.js';
import { backingOf, buildChain, check, copyDir, letters, mapShape, qchainImg, sameViews, seedChain, sideBySideDirs, views, type Layer } from './helpers/chains.js';

type Run = { code: number; stdout: string; stderr: string };

const CHAIN = seedChain('active.qcow2');
const NAMES = CHAIN.map((l) => l.name);

/** Build the chain once, then run the same command lists with qemu-img (q/) and qchain (c/). */
async function sideBySide(layers: Layer[], steps: string[][]): Promise<{ src: string; q: string; c: string; rq: Run[]; rc: Run[] }> {
  const { src, q, c } = sideBySideDirs(layers);
  const rq: Run[] = [], rc: Run[] = [];
  for (const s of steps) {
    rq.push(await qemuImg(s, q));
    rc.push(await qchainImg(s, c));
  }
  return { src, q, c, rq, rc };
}

function sameResults(rq: Run[], rc: Run[]): void {
  rq.forEach((r, i) => {
    assert.equal(rc[i].stderr, r.stderr, `stderr of step ${i}`);
    assert.equal(rc[i].code, r.code, `status of step ${i}`);
    assert.equal(rc[i].stdout, r.stdout, `stdout of step ${i}`);
  });
}

test('partial flatten: base ← sn1 ← sn2 ← active becomes base ← active, views kept, sn1/sn2 still valid', oracle(), async () => {
  const { src, q, c, rq, rc } = await sideBySide(CHAIN, [['rebase', '-b', 'base.qcow2', '-F', 'qcow2', 'active.qcow2']]);
  sameResults(rq, rc);
  const before = await views(src, NAMES);
  const v = await sameViews(q, c, NAMES);
  for (const n of NAMES) assert.ok(v.get(n)?.equals(before.get(n) as Buffer), `${n} view unchanged`);
  assert.equal(letters(v.get('active.qcow2') as Buffer), 'DABBBCCCDD--');
  assert.equal(await backingOf(path.join(c, 'active.qcow2')), 'base.qcow2');
  // Headers byte for byte (the data clusters may be laid out in another order).
  const head = (d: string): Buffer => fs.readFileSync(path.join(d, 'active.qcow2')).subarray(0, 65536);
  assert.ok(head(c).equals(head(q)), 'header cluster identical');
  assert.equal((await check(path.join(c, 'active.qcow2'))).code, 0);
  for (const n of ['sn1.qcow2', 'sn2.qcow2']) assert.ok(fs.readFileSync(path.join(c, n)).equals(fs.readFileSync(path.join(src, n))), `${n} untouched`);
});

test('deleting sn2 (seed recipe 1): commit sn2 into sn1, then rebase -u sn3 onto sn1', oracle(), async () => {
  const layers: Layer[] = [...CHAIN.slice(0, 3), { name: 'sn3.qcow2', row: 'D-------DD--' }];
  const names = layers.map((l) => l.name);
  const { src, q, c, rq, rc } = await sideBySide(layers, [['commit', 'sn2.qcow2'], ['rebase', '-u', '-b', 'sn1.qcow2', '-F', 'qcow2', 'sn3.qcow2']]);
  sameResults(rq, rc);
  const before = await views(src, ['sn3.qcow2']);
  const v = await sameViews(q, c, names);
  assert.ok(v.get('sn3.qcow2')?.equals(before.get('sn3.qcow2') as Buffer), 'top view kept');
  assert.equal(await backingOf(path.join(c, 'sn3.qcow2')), 'sn1.qcow2');
  assert.ok(fs.readFileSync(path.join(c, 'sn3.qcow2')).equals(fs.readFileSync(path.join(q, 'sn3.qcow2'))), 'top identical to qemu-img\'s');
  for (const n of names) assert.equal((await check(path.join(c, n))).code, 0, n);
});

test('deleting sn2 (seed recipe 2): safe rebase of sn3 onto sn1 pulls only what sn2 held', oracle(), async () => {
  const layers: Layer[] = [...CHAIN.slice(0, 3), { name: 'sn3.qcow2', row: 'D-------DD--' }];
  const names = layers.map((l) => l.name);
  const { src, q, c, rq, rc } = await sideBySide(layers, [['rebase', '-b', 'sn1.qcow2', '-F', 'qcow2', 'sn3.qcow2']]);
  sameResults(rq, rc);
  const before = await views(src, names);
  const v = await sameViews(q, c, names);
  for (const n of names) assert.ok(v.get(n)?.equals(before.get(n) as Buffer), `${n} view kept`);
  assert.deepEqual(mapShape(c, 'sn3.qcow2'), mapShape(q, 'sn3.qcow2'), 'same clusters allocated in sn3');
});

test('rebase -b "" flattens in place; safe rebase onto an unrelated image copies differences', oracle(), async () => {
  const layers: Layer[] = [{ name: 'base.qcow2', row: 'AAAA0000----' }, { name: 'top.qcow2', row: '-B--0-B-0---' }];
  const other: Layer[] = [{ name: 'other.qcow2', row: 'AXAX--XX----' }];
  const dir = scratch();
  const src = path.join(dir, 'src');
  fs.mkdirSync(src);
  buildChain(src, layers);
  buildChain(src, other);
  for (const steps of [[['rebase', '-b', '', 'top.qcow2']], [['rebase', '-b', 'other.qcow2', '-F', 'qcow2', 'top.qcow2']], [['rebase', '-p', '-b', '', 'top.qcow2']]]) {
    const q = fs.mkdtempSync(path.join(dir, 'q')), c = fs.mkdtempSync(path.join(dir, 'c'));
    copyDir(src, q);
    copyDir(src, c);
    const rq = await qemuImg(steps[0], q), rc = await qchainImg(steps[0], c);
    if (steps[0].includes('-p')) {
      for (const out of [rq.stdout, rc.stdout]) assert.ok(out.startsWith('    (0.00/100%)\r') && out.endsWith('    (100.00/100%)\r\n'), JSON.stringify(out));
    } else sameResults([rq], [rc]);
    const before = await views(src, ['top.qcow2']);
    const v = await sameViews(q, c, ['top.qcow2', 'base.qcow2', 'other.qcow2']);
    assert.ok(v.get('top.qcow2')?.equals(before.get('top.qcow2') as Buffer), `top view kept by ${steps[0].join(' ')}`);
    assert.equal(await backingOf(path.join(c, 'top.qcow2')), steps[0].includes('other.qcow2') ? 'other.qcow2' : null);
    assert.deepEqual(mapShape(c, 'top.qcow2'), mapShape(q, 'top.qcow2'), `map after ${steps[0].join(' ')}`);
    assert.equal((await check(path.join(c, 'top.qcow2'))).code, 0);
  }
});

test('rebase -u rewrites only the header, byte-identical to qemu-img for every header layout', oracle(), async () => {
  const dir = scratch();
  const variants = [[], ['-o', 'compat=0.10'], ['-o', 'cluster_size=512'], ['-o', 'extended_l2=on'], ['-o', 'compression_type=zstd']];
  const long = 'x'.repeat(1100);
  const cases = [['-b', 'newname.qcow2', '-F', 'qcow2'], ['-b', ''], ['-b', 'dir/with/a/rather/long/name.qcow2', '-F', 'raw'], ['-b', 'x', '-F', 'vmdk'], ['-F', 'qcow2'],
    ['-b', long, '-F', 'qcow2'], ['-b', 'y'.repeat(480), '-F', 'qcow2'], ['-b', 'base.qcow2']];
  for (const [i, o] of variants.entries()) {
    qemuImgSync(['create', '-q', '-f', 'qcow2', ...o, '-u', '-b', 'old.qcow2', '-F', 'raw', `v${i}.qcow2`, '1M'], dir);
    for (const c of cases) {
      fs.copyFileSync(path.join(dir, `v${i}.qcow2`), path.join(dir, 'a.qcow2'));
      fs.copyFileSync(path.join(dir, `v${i}.qcow2`), path.join(dir, 'b.qcow2'));
      const rq = await qemuImg(['rebase', '-u', ...c, 'a.qcow2'], dir);
      const rc = await qchainImg(['rebase', '-u', ...c, 'b.qcow2'], dir);
      const what = `${o.join(' ')} rebase -u ${c.join(' ').slice(0, 40)}`;
      assert.equal(rc.code, rq.code, `${what}: ${rc.stderr}`);
      assert.equal(rc.stderr.replace('b.qcow2', 'a.qcow2'), rq.stderr, what);
      assert.ok(fs.readFileSync(path.join(dir, 'a.qcow2')).equals(fs.readFileSync(path.join(dir, 'b.qcow2'))), `file bytes after ${what}`);
    }
  }
});

test('safe rebase without -F copies first, then fails like qemu-img (view intact, old pointer kept)', oracle(), async () => {
  const { src, q, c, rq, rc } = await sideBySide(CHAIN, [['rebase', '-b', 'base.qcow2', 'active.qcow2']]);
  sameResults(rq, rc);
  assert.equal(rc[0].code, 1);
  const before = await views(src, ['active.qcow2']);
  const v = await sameViews(q, c, NAMES);
  assert.ok(v.get('active.qcow2')?.equals(before.get('active.qcow2') as Buffer));
  assert.equal(await backingOf(path.join(c, 'active.qcow2')), 'sn2.qcow2');
  assert.deepEqual(mapShape(c, 'active.qcow2'), mapShape(q, 'active.qcow2'));
});

test('rebase errors: message and exit status as qemu-img', oracle(), async () => {
  const dir = scratch();
  fs.mkdirSync(path.join(dir, 'd'));
  buildChain(path.join(dir, 'd'), [{ name: 'base.qcow2', row: 'A-' }, { name: 'mid.qcow2', row: '-B' }, { name: 'top.qcow2', row: 'C-' }]);
  qemuImgSync(['create', '-q', '-f', 'raw', 'r.raw', '1M'], dir);
  fs.writeFileSync(path.join(dir, 'd/z.raw'), Buffer.alloc(65536));
  qemuImgSync(['create', '-q', '-f', 'qcow2', '-u', '-b', 'gone.qcow2', '-F', 'qcow2', 'orphan.qcow2', '1M'], dir);
  qemuImgSync(['create', '-q', '-f', 'qcow2', '-u', '-b', 'gone.qcow2', '-F', 'qcow2', 'd/nb.qcow2', '1M'], dir);
  const cases = [
    ['d/top.qcow2'], ['-b', 'nonexist.qcow2', '-F', 'qcow2', 'd/top.qcow2'], ['-b', 'd/base.qcow2', '-F', 'qcow2', 'd/top.qcow2'],
    ['-b', 'base.qcow2', '-F', 'foo', 'd/top.qcow2'], ['-b', 'base.qcow2', 'd/top.qcow2'], ['-u', '-b', 'base.qcow2', 'd/top.qcow2'],
    ['-t', 'bogus', '-b', 'base.qcow2', '-F', 'qcow2', 'd/top.qcow2'], ['-T', 'bogus', '-b', 'base.qcow2', '-F', 'qcow2', 'd/top.qcow2'],
    ['-b', 'base.qcow2', '-F', 'qcow2', 'nofile.qcow2'], ['-b', 'x', '-F', 'qcow2'], ['-b', 'x', '-F', 'qcow2', 'a', 'b'],
    ['-f', 'raw', '-b', 'base.qcow2', '-F', 'qcow2', 'r.raw'], ['-u', '-f', 'raw', '-b', 'x', '-F', 'qcow2', 'r.raw'], ['-c', '-b', 'x', '-F', 'qcow2', 'r.raw'],
    ['-b', 'z.raw', '-F', 'qcow2', 'd/top.qcow2'], ['-b', 'nb.qcow2', '-F', 'qcow2', 'd/top.qcow2'], ['-b', 'd/base.qcow2', '-F', 'qcow2', 'orphan.qcow2'],
    ['-p', '-b', 'nonexist.qcow2', '-F', 'qcow2', 'd/top.qcow2'], ['-f', 'foo', '-b', 'x', '-F', 'qcow2', 'd/top.qcow2'], ['-b'],
  ];
  for (const c of cases) {
    const rq = await qemuImg(['rebase', ...c], dir);
    const rc = await qchainImg(['rebase', ...c], dir);
    assert.equal(rc.stderr, rq.stderr, `stderr for rebase ${c.join(' ')}`);
    assert.equal(rc.code, rq.code, `status for rebase ${c.join(' ')}`);
    assert.equal(rc.stdout, rq.stdout, `stdout for rebase ${c.join(' ')}`);
  }
  // Rebasing onto a layer of the chain named relative to the overlay (QEMU finds it in the chain
  // and writes the given format unchecked).
  const w = scratch();
  buildChain(w, [{ name: 'base.qcow2', row: 'A-' }, { name: 'mid.qcow2', row: '-B' }, { name: 'top.qcow2', row: 'C-' }]);
  const rc = await qchainImg(['rebase', '-b', 'base.qcow2', '-F', 'raw', 'top.qcow2'], w);
  assert.equal(rc.code, 0, rc.stderr);
  const j = JSON.parse(qemuImgSync(['info', '--output=json', 'top.qcow2'], w)) as Record<string, string>;
  assert.equal(j['backing-filename-format'], 'raw');
});

test('differingRuns: every differing sector is covered; spans start and end on differing sectors of one unit', () => {
  const r = rng(5);
  for (let iter = 0; iter < 200; iter++) {
    const n = 512 * (1 + Math.floor(r() * 400)) - (r() < 0.2 ? 100 : 0);
    const x = Buffer.alloc(n, 1), y = Buffer.alloc(n, 1);
    for (let k = Math.floor(r() * 6); k > 0; k--) {
      const a = Math.floor(r() * n), len = Math.min(n - a, 1 + Math.floor(r() * 20000));
      y.fill(2, a, a + len);
    }
    const unit = [512, 4096, 65536, 2 * 1024 * 1024][Math.floor(r() * 4)];
    const runs = differingRuns(x, y, unit);
    const differs = (s: number): boolean => !x.subarray(s, Math.min(n, s + 512)).equals(y.subarray(s, Math.min(n, s + 512)));
    const covered = (s: number): boolean => runs.some(([a, b]) => a <= s && s < b);
    for (let s = 0; s < n; s += 512) if (differs(s)) assert.ok(covered(s), `sector ${s} not covered (unit ${unit})`);
    const u = Math.min(65536, unit);
    for (const [a, b] of runs) {
      // Each run is a union of per-unit spans, each from a differing sector to a differing sector.
      for (let ua = Math.floor(a / u) * u; ua < b; ua += u) {
        const s = Math.max(a, ua), e = Math.min(b, ua + u);
        assert.ok(differs(s), `span start ${s} does not differ`);
        assert.ok(differs(Math.floor((e - 1) / 512) * 512), `span end ${e} does not differ`);
      }
    }
  }
});
