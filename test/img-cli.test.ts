/**
 * `qchain img` against `qemu-img` on the same inputs: create (byte-identical files), info and map
 * (identical JSON except actual-size), check output and exit codes, convert results.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { oracle, qchain, qemuImg, qemuImgSync, qemuIoSync, scratch } from './helpers/qemu.js';

const dropActual = (s: string): unknown => {
  const v = JSON.parse(s) as unknown;
  const strip = (o: Record<string, unknown>): Record<string, unknown> => {
    const c = { ...o };
    delete c['actual-size'];
    return c;
  };
  return Array.isArray(v) ? v.map((o) => strip(o as Record<string, unknown>)) : strip(v as Record<string, unknown>);
};

test('create: byte-identical to qemu-img create across options', oracle(), async () => {
  const dir = scratch();
  const cases: string[][] = [
    ['-f', 'qcow2', '%', '100M'],
    ['-f', 'qcow2', '%', '1000'],
    ['-f', 'qcow2', '-o', 'compat=0.10', '%', '10M'],
    ['-f', 'qcow2', '-o', 'cluster_size=512', '%', '3M'],
    ['-f', 'qcow2', '-o', 'cluster_size=2M', '%', '1G'],
    ['-f', 'qcow2', '-o', 'cluster_size=4k,refcount_bits=1', '%', '64M'],
    ['-f', 'qcow2', '-o', 'refcount_bits=64,lazy_refcounts=on', '%', '64M'],
    ['-f', 'qcow2', '-o', 'extended_l2=on,compression_type=zstd', '%', '64M'],
    ['-f', 'qcow2', '-o', 'preallocation=metadata', '%', '5M'],
    ['-f', 'qcow2', '-o', 'preallocation=metadata,cluster_size=4k,compat=0.10', '%', '5M'],
    ['-f', 'qcow2', '-o', 'preallocation=metadata,extended_l2=on', '%', '3M'],
    ['-f', 'qcow2', '%', '5T'],
    ['-f', 'raw', '%', '1M'],
    ['-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', '%'],
    ['-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', '-o', 'compat=0.10', '%', '200M'],
    ['-f', 'qcow2', '-u', '-b', 'missing.qcow2', '-F', 'qcow2', '%', '1G'],
  ];
  qemuImgSync(['create', '-q', '-f', 'qcow2', 'base.qcow2', '64M'], dir);
  for (const [i, c] of cases.entries()) {
    const q = c.map((a) => (a === '%' ? `q${i}.img` : a));
    const ours = c.map((a) => (a === '%' ? `c${i}.img` : a));
    const rq = await qemuImg(['create', ...q], dir);
    const rc = await qchain(['img', 'create', ...ours], dir);
    assert.equal(rc.code, rq.code, `exit status for ${c.join(' ')}: ${rc.stderr}`);
    assert.equal(rc.stdout.replace(`c${i}.img`, `q${i}.img`), rq.stdout, `stdout for ${c.join(' ')}`);
    const a = fs.readFileSync(path.join(dir, `q${i}.img`)), b = fs.readFileSync(path.join(dir, `c${i}.img`));
    assert.equal(b.length, a.length, `file size for ${c.join(' ')}`);
    assert.ok(a.equals(b), `bytes differ for ${c.join(' ')}`);
  }
});

test('create: preallocation=full/falloc allocate every cluster (qemu-img check clean, same map shape)', oracle(), async () => {
  const dir = scratch();
  for (const mode of ['full', 'falloc']) {
    const r = await qchain(['img', 'create', '-q', '-f', 'qcow2', '-o', `preallocation=${mode}`, `${mode}.qcow2`, '3M'], dir);
    assert.equal(r.code, 0, r.stderr);
    assert.equal((await qemuImg(['check', `${mode}.qcow2`], dir)).code, 0);
    qemuImgSync(['create', '-q', '-f', 'qcow2', '-o', `preallocation=${mode}`, `q${mode}.qcow2`, '3M'], dir);
    const strip = (s: string): string => s.replace(/, "offset": \d+/g, '');
    assert.equal(strip((await qemuImg(['map', '--output=json', `${mode}.qcow2`], dir)).stdout), strip((await qemuImg(['map', '--output=json', `q${mode}.qcow2`], dir)).stdout));
    assert.equal(fs.statSync(path.join(dir, `${mode}.qcow2`)).size, fs.statSync(path.join(dir, `q${mode}.qcow2`)).size);
  }
});

test('create: refusals match qemu-img (message and status)', oracle(), async () => {
  const dir = scratch();
  qemuImgSync(['create', '-q', '-f', 'qcow2', 'base.qcow2', '64M'], dir);
  const cases: string[][] = [
    ['-f', 'qcow2', '-b', 'base.qcow2', 'x.qcow2'],
    ['-f', 'qcow2', '-b', 'nothere.qcow2', '-F', 'qcow2', 'x.qcow2'],
    ['-f', 'qcow2', '-o', 'cluster_size=3000', 'x.qcow2', '1M'],
    ['-f', 'qcow2', '-o', 'refcount_bits=3', 'x.qcow2', '1M'],
    ['-f', 'qcow2', '-o', 'compat=0.10,lazy_refcounts=on', 'x.qcow2', '1M'],
    ['-f', 'qcow2', '-o', 'extended_l2=on,cluster_size=4k', 'x.qcow2', '1M'],
    ['-f', 'qcow2', '-b', 'x.qcow2', '-F', 'qcow2', 'x.qcow2'],
    ['-f', 'qcow2', 'x.qcow2', '1Q'],
    ['-f', 'qcow2', 'x.qcow2'],
  ];
  for (const c of cases) {
    const rq = await qemuImg(['create', ...c], dir);
    const rc = await qchain(['img', 'create', ...c], dir);
    assert.equal(rc.code, rq.code, `status for ${c.join(' ')}`);
    assert.equal(rc.stderr, rq.stderr, `stderr for ${c.join(' ')}`);
    assert.equal(rc.stdout, rq.stdout, `stdout for ${c.join(' ')}`);
    fs.rmSync(path.join(dir, 'x.qcow2'), { force: true });
  }
});

/** A 3-layer chain with data, zero clusters and a raw-free mix, written by QEMU. */
function buildChain(dir: string, extra: string[] = []): string {
  qemuImgSync(['create', '-q', '-f', 'qcow2', ...extra, 'base.qcow2', '4M'], dir);
  qemuIoSync(['-c', 'write -P 0xaa 0 128k', '-c', 'write -P 0xbb 1M 64k', '-c', 'write -P 0x11 3M 512k', 'base.qcow2'], dir);
  qemuImgSync(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'mid.qcow2'], dir);
  qemuIoSync(['-c', 'write -P 0xcc 64k 64k', '-c', 'write -z 1M 64k', '-c', 'write -P 0x22 3M 64k', 'mid.qcow2'], dir);
  qemuImgSync(['create', '-q', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', 'top.qcow2'], dir);
  qemuIoSync(['-c', 'write -P 0xdd 2M 64k', '-c', 'write -P 0xee 70000 1000', '-c', 'discard 3M 64k', 'top.qcow2'], dir);
  return 'top.qcow2';
}

test('info: JSON and human output equal qemu-img (chain, snapshots, v2, options)', oracle(), async () => {
  const dir = scratch();
  buildChain(dir);
  qemuImgSync(['snapshot', '-c', 'first', 'base.qcow2'], dir);
  qemuImgSync(['create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', 'v2.qcow2', '1G'], dir);
  qemuImgSync(['create', '-q', '-f', 'qcow2', '-o', 'lazy_refcounts=on,refcount_bits=8,extended_l2=on,compression_type=zstd', 'opts.qcow2', '7M'], dir);
  qemuImgSync(['create', '-q', '-f', 'raw', 'r.img', '1000'], dir);
  fs.mkdirSync(path.join(dir, 'sub'));
  qemuImgSync(['create', '-q', '-f', 'qcow2', '-b', '../base.qcow2', '-F', 'qcow2', 'sub/ov.qcow2'], dir);
  for (const args of [['top.qcow2'], ['--backing-chain', 'top.qcow2'], ['base.qcow2'], ['v2.qcow2'], ['opts.qcow2'], ['r.img'], ['-f', 'raw', 'base.qcow2'], ['sub/ov.qcow2'], ['--backing-chain', 'sub/ov.qcow2']]) {
    const q = await qemuImg(['info', '--output=json', ...args], dir);
    const c = await qchain(['img', 'info', '--output=json', ...args], dir);
    assert.equal(c.code, q.code, c.stderr);
    assert.deepEqual(dropActual(c.stdout), dropActual(q.stdout), `info --output=json ${args.join(' ')}`);
    // Key order too (scripts diff the text).
    assert.deepEqual(JSON.stringify(dropActual(c.stdout)), JSON.stringify(dropActual(q.stdout)));
    const qh = await qemuImg(['info', ...args], dir);
    const ch = await qchain(['img', 'info', ...args], dir);
    const noDisk = (s: string): string => s.replace(/^disk size: .*$/gm, 'disk size: X');
    assert.equal(noDisk(ch.stdout), noDisk(qh.stdout), `info ${args.join(' ')}`);
  }
});

test('map: JSON and human output equal qemu-img, including offsets windows', oracle(), async () => {
  const dir = scratch();
  const top = buildChain(dir);
  for (const args of [[top], ['mid.qcow2'], ['base.qcow2'], ['--start-offset=70000', '--max-length=100000', top], ['--start-offset', '1M', top]]) {
    const q = await qemuImg(['map', '--output=json', ...args], dir);
    const c = await qchain(['img', 'map', '--output=json', ...args], dir);
    assert.equal(c.code, q.code, c.stderr);
    assert.equal(c.stdout, q.stdout, `map --output=json ${args.join(' ')}`);
    const qh = await qemuImg(['map', ...args], dir);
    const ch = await qchain(['img', 'map', ...args], dir);
    assert.equal(ch.stdout, qh.stdout, `map ${args.join(' ')}`);
  }
  // Compressed clusters: JSON has no offset; human map refuses.
  qemuImgSync(['convert', '-c', '-O', 'qcow2', top, 'comp.qcow2'], dir);
  const q = await qemuImg(['map', '--output=json', 'comp.qcow2'], dir);
  const c = await qchain(['img', 'map', '--output=json', 'comp.qcow2'], dir);
  assert.equal(c.stdout, q.stdout);
  const qh = await qemuImg(['map', 'comp.qcow2'], dir);
  const ch = await qchain(['img', 'map', 'comp.qcow2'], dir);
  assert.equal(ch.code, qh.code);
  assert.equal(ch.stderr, qh.stderr);
});

test('check: clean, leaked and corrupted images report like qemu-img', oracle(), async () => {
  const dir = scratch();
  buildChain(dir);
  qemuImgSync(['convert', '-c', '-O', 'qcow2', 'top.qcow2', 'comp.qcow2'], dir);
  // A leak: raise the refcount of an unused cluster inside the file.
  qemuImgSync(['create', '-q', '-f', 'qcow2', 'leak.qcow2', '4M'], dir);
  qemuIoSync(['-c', 'write 0 64k', '-c', 'write 1M 64k', '-c', 'discard 1M 64k', 'leak.qcow2'], dir);
  const leak = fs.openSync(path.join(dir, 'leak.qcow2'), 'r+');
  const b = Buffer.alloc(2);
  b.writeUInt16BE(1);
  fs.writeSync(leak, b, 0, 2, 0x20000 + 2 * 6);
  fs.closeSync(leak);
  // A corruption: drop the refcount of the L2 table.
  fs.copyFileSync(path.join(dir, 'base.qcow2'), path.join(dir, 'bad.qcow2'));
  const bad = fs.openSync(path.join(dir, 'bad.qcow2'), 'r+');
  b.writeUInt16BE(0);
  fs.writeSync(bad, b, 0, 2, 0x20000 + 2 * 4);
  fs.closeSync(bad);
  for (const f of ['top.qcow2', 'base.qcow2', 'comp.qcow2', 'leak.qcow2', 'bad.qcow2']) {
    for (const out of ['human', 'json']) {
      const q = await qemuImg(['check', `--output=${out}`, f], dir);
      const c = await qchain(['img', 'check', `--output=${out}`, f], dir);
      assert.equal(c.code, q.code, `check ${f}: ${c.stderr}`);
      assert.equal(c.stdout, q.stdout, `check --output=${out} ${f}`);
      assert.equal(c.stderr, q.stderr, `check stderr ${f}`);
    }
  }
  // Repairing the leak: same report, and the image is clean afterwards.
  fs.copyFileSync(path.join(dir, 'leak.qcow2'), path.join(dir, 'leak2.qcow2'));
  const q = await qemuImg(['check', '-r', 'leaks', 'leak.qcow2'], dir);
  const c = await qchain(['img', 'check', '-r', 'leaks', 'leak2.qcow2'], dir);
  assert.equal(c.code, q.code);
  assert.equal(c.stdout, q.stdout);
  assert.equal((await qemuImg(['check', 'leak2.qcow2'], dir)).code, 0);
});

test('convert: flattening equals qemu-img (bytes, map, -B top-only copy, raw)', oracle(), async () => {
  const dir = scratch();
  const top = buildChain(dir);
  for (const extra of [[], ['-O', 'raw'], ['-O', 'qcow2', '-o', 'cluster_size=4k,compat=0.10'], ['-O', 'qcow2', '-B', 'mid.qcow2', '-F', 'qcow2'], ['-O', 'qcow2', '-S', '0']]) {
    const fmt = extra.includes('raw') ? 'raw' : 'qcow2';
    const args = extra.includes('-O') ? extra : ['-O', 'qcow2', ...extra];
    fs.rmSync(path.join(dir, 'q.out'), { force: true });
    fs.rmSync(path.join(dir, 'c.out'), { force: true });
    const rq = await qemuImg(['convert', ...args, top, 'q.out'], dir);
    const rc = await qchain(['img', 'convert', ...args, top, 'c.out'], dir);
    assert.equal(rc.code, rq.code, rc.stderr);
    assert.equal(rc.stdout, rq.stdout);
    const cmp = await qemuImg(['compare', '-f', fmt, '-F', fmt, 'q.out', 'c.out'], dir);
    assert.equal(cmp.code, 0, `${extra.join(' ')}: ${cmp.stdout}`);
    if (fmt === 'qcow2') {
      assert.equal((await qemuImg(['check', 'c.out'], dir)).code, 0);
      const mq = await qemuImg(['map', '--output=json', 'q.out'], dir);
      const mc = await qemuImg(['map', '--output=json', 'c.out'], dir);
      assert.equal(mc.stdout, mq.stdout, `map after convert ${extra.join(' ')}`);
    }
  }
});

test('seed: a full copy is not a union mount (AAACBBBBCCCC…)', oracle(), async () => {
  // base: AAABBBBB…; snap1 writes C over sector 3 and 8..11; the copy has no backing file.
  const dir = scratch();
  const S = 65536;
  qemuImgSync(['create', '-q', '-f', 'qcow2', 'base.qcow2', `${16 * S}`], dir);
  qemuIoSync(['-c', `write -P 0x41 0 ${3 * S}`, '-c', `write -P 0x42 ${3 * S} ${5 * S}`, 'base.qcow2'], dir);
  await qchain(['img', 'create', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'snap1.qcow2'], dir);
  qemuIoSync(['-c', `write -P 0x43 ${3 * S} ${S}`, '-c', `write -P 0x43 ${8 * S} ${4 * S}`, 'snap1.qcow2'], dir);
  const r = await qchain(['img', 'convert', '-O', 'qcow2', 'snap1.qcow2', 'copy.qcow2'], dir);
  assert.equal(r.code, 0, r.stderr);
  const info = JSON.parse((await qchain(['img', 'info', '--output=json', 'copy.qcow2'], dir)).stdout) as Record<string, unknown>;
  assert.equal(info['backing-filename'], undefined, 'the copy has no backing file');
  const raw = path.join(dir, 'copy.raw');
  qemuImgSync(['convert', '-O', 'raw', 'copy.qcow2', raw], dir);
  const bytes = fs.readFileSync(raw);
  let picture = '';
  for (let i = 0; i < 16; i++) picture += bytes[i * S] ? String.fromCharCode(bytes[i * S]) : 'X';
  assert.equal(picture, 'AAACBBBBCCCCXXXX');
});
