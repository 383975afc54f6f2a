/**
 * `qchain io -c "write -z …"` on a partial cluster of an overlay: as QEMU's qcow2 is_zero(), the
 * rest of the cluster counts as zero when the layers below read zero by their metadata (zero
 * clusters, unallocated down to the bottom, past a shorter backing file), and the cluster then
 * gets the zero flag instead of a copy-on-write data cluster. The files must be byte-identical to
 * qemu-io's on the same sequence (v3 64k, 4k clusters, extended L2; chains 2 and 3 deep).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { spawnSync } from 'node:child_process';
import { filterTiming, oracle, qchain, qemuImg, qemuImgSync, qemuIo, qemuIoSync, scratch } from './helpers/qemu.js';

/** base (4M): data, a zero range; mid (3M, shorter): whole-cluster data and a zero cluster. */
function build(dir: string, topOpts: string[]): void {
  qemuImgSync(['create', '-q', '-f', 'qcow2', 'b.qcow2', '4M'], dir);
  qemuIoSync(['-c', 'write -P 1 0 256k', '-c', 'write -z 512k 128k', '-c', 'write -P 2 1M 64k', 'b.qcow2'], dir);
  qemuImgSync(['create', '-q', '-f', 'qcow2', '-b', 'b.qcow2', '-F', 'qcow2', 'm.qcow2', '3M'], dir);
  qemuIoSync(['-c', 'write -P 3 1152k 64k', '-c', 'write -z 64k 64k', 'm.qcow2'], dir);
  qemuImgSync(['create', '-q', '-f', 'qcow2', ...topOpts, '-b', 'm.qcow2', '-F', 'qcow2', 't.qcow2', '4M'], dir);
}

const K = 1024;
/** Partial zero writes: over unallocated-to-the-bottom, zero clusters, past mid's end, data below, and straddling. */
const OPS = [
  `write -z ${2048 * K} 8k`, `write -z ${2560 * K + 512} 4k`, `write -z ${520 * K} 4k`, `write -z ${64 * K + 4096} 4k`,
  `write -z ${3072 * K + 1024} 8k`, `write -z ${3100 * K} 100k`, `write -z ${8 * K} 4k`, `write -z ${1160 * K} 4k`,
  `write -z ${1020 * K} 8k`, `write -z ${3068 * K} 8k`, `write -z ${700 * K} 512`, `write -P 9 ${710 * K} 512`,
  `write -z ${705 * K} 512`,
];

for (const [name, opts] of [['64k clusters', []], ['4k clusters', ['-o', 'cluster_size=4k']], ['extended L2', ['-o', 'extended_l2=on']]] as Array<[string, string[]]>) {
  test(`write -z of partial clusters over a backing chain: same file as qemu-io (${name})`, oracle(), async () => {
    const root = scratch();
    const q = path.join(root, 'q'), c = path.join(root, 'c');
    fs.mkdirSync(q);
    build(q, opts);
    fs.cpSync(q, c, { recursive: true });
    const args = OPS.flatMap((o) => ['-c', o]);
    const rq = await qemuIo([...args, 't.qcow2'], q);
    const rc = await qchain(['io', ...args, 't.qcow2'], c);
    assert.equal(rq.code, 0, rq.stderr);
    assert.equal(rc.code, 0, rc.stderr);
    const mq = await qemuImg(['map', '--output=json', 't.qcow2'], q);
    const mc = await qemuImg(['map', '--output=json', 't.qcow2'], c);
    assert.equal(mc.stdout, mq.stdout, 'map of the top layer');
    assert.ok(fs.readFileSync(path.join(c, 't.qcow2')).equals(fs.readFileSync(path.join(q, 't.qcow2'))), 'byte-identical top layer');
    assert.equal((await qemuImg(['check', 't.qcow2'], c)).code, 0);
  });
}

test('write -z of a partial cluster over a backing whose data clusters have holes in the file: same file as qemu-io', oracle(), async () => {
  // A small QEMU-made backing copied sparse is what QEMU treats as metadata-preallocated: the
  // holes of its file inside data clusters read as zero for is_zero(), so the cluster is zeroed whole.
  const root = scratch();
  const src = path.join(root, 'src');
  fs.mkdirSync(src);
  qemuImgSync(['create', '-q', '-f', 'qcow2', 'b.qcow2', '4M'], src);
  qemuIoSync(['-c', 'write -P 1 0 256k', 'b.qcow2'], src);
  qemuImgSync(['create', '-q', '-f', 'qcow2', '-b', 'b.qcow2', '-F', 'qcow2', 'm.qcow2'], src);
  qemuIoSync(['-c', `write -P 3 ${1100 * K} 4k`, '-c', `write -P 4 ${2000 * K} 4k`, 'm.qcow2'], src);
  qemuImgSync(['create', '-q', '-f', 'qcow2', '-b', 'm.qcow2', '-F', 'qcow2', 't.qcow2'], src);
  const ops = [`write -z ${1100 * K} 4k`, `write -z ${2000 * K} 8k`, `write -z ${1090 * K} 4k`];
  const args = ops.flatMap((o) => ['-c', o]);
  for (const sparse of [false, true]) {
    const q = path.join(root, `q${sparse}`), c = path.join(root, `c${sparse}`);
    for (const d of [q, c]) {
      fs.mkdirSync(d);
      for (const f of ['b.qcow2', 'm.qcow2', 't.qcow2']) {
        const r = spawnSync('cp', [`--sparse=${sparse ? 'always' : 'never'}`, path.join(src, f), path.join(d, f)]);
        assert.equal(r.status, 0, String(r.stderr));
      }
    }
    const rq = await qemuIo([...args, 't.qcow2'], q);
    const rc = await qchain(['io', ...args, 't.qcow2'], c);
    assert.equal(rq.code, 0, rq.stderr);
    assert.equal(rc.code, 0, rc.stderr);
    assert.ok(fs.readFileSync(path.join(c, 't.qcow2')).equals(fs.readFileSync(path.join(q, 't.qcow2'))), `byte-identical top layer (sparse copy: ${sparse})`);
  }
});

test('write -z -n (no fallback) over a backing with holes in its data clusters: same answer as qemu-io', oracle(), async () => {
  const root = scratch();
  const src = path.join(root, 'src');
  fs.mkdirSync(src);
  qemuImgSync(['create', '-q', '-f', 'qcow2', 'b.qcow2', '4M'], src);
  qemuImgSync(['create', '-q', '-f', 'qcow2', '-b', 'b.qcow2', '-F', 'qcow2', 'm.qcow2'], src);
  qemuIoSync(['-c', `write -P 3 ${1100 * K} 4k`, 'm.qcow2'], src);
  qemuImgSync(['create', '-q', '-f', 'qcow2', '-b', 'm.qcow2', '-F', 'qcow2', 't.qcow2'], src);
  for (const sparse of [false, true]) {
    const q = path.join(root, `q${sparse}`), c = path.join(root, `c${sparse}`);
    for (const d of [q, c]) {
      fs.mkdirSync(d);
      for (const f of ['b.qcow2', 'm.qcow2', 't.qcow2']) {
        assert.equal(spawnSync('cp', [`--sparse=${sparse ? 'always' : 'never'}`, path.join(src, f), path.join(d, f)]).status, 0);
      }
    }
    const args = ['-c', `write -z -n ${1100 * K} 4k`, 't.qcow2'];
    const rq = await qemuIo(args, q);
    const rc = await qchain(['io', ...args], c);
    assert.equal(rc.code, rq.code, `status (sparse copy: ${sparse})`);
    assert.equal(filterTiming(rc.stdout + rc.stderr), filterTiming(rq.stdout + rq.stderr), `output (sparse copy: ${sparse})`);
    assert.ok(fs.readFileSync(path.join(c, 't.qcow2')).equals(fs.readFileSync(path.join(q, 't.qcow2'))), `byte-identical (sparse copy: ${sparse})`);
  }
});
