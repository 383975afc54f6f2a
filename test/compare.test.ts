/**
 * `qchain img compare` side by side with `qemu-img compare` on the same inputs: stdout, stderr and
 * exit status equal, over images with data, zero clusters, holes, backing chains, small clusters
 * (block status answers end at L2 table ends), extended L2, compressed clusters and size mismatches.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { qchainImgInProcess } from './helpers/inproc.js';
import { oracle, qchain, qemuImg, qemuImgSync, qemuIoSync, scratch } from './helpers/qemu.js';

async function same(dir: string, args: string[], fresh = false): Promise<void> {
  const q = await qemuImg(['compare', ...args], dir);
  const c = fresh ? await qchain(['img', 'compare', ...args], dir) : await qchainImgInProcess(['compare', ...args], dir);
  assert.deepEqual({ code: c.code, stdout: c.stdout, stderr: c.stderr }, { code: q.code, stdout: q.stdout, stderr: q.stderr }, `compare ${args.join(' ')}`);
}

function img(dir: string, name: string, create: string[], ...io: string[]): string {
  const size = create.includes('-b') ? [] : ['1M'];
  qemuImgSync(['create', '-q', ...create, name, ...size], dir);
  if (io.length) qemuIoSync(['-f', create[create.indexOf('-f') + 1], ...io.flatMap((c) => ['-c', c]), name], dir);
  return name;
}

test('compare: identical / mismatch offsets / strict status, all pairs of a set of images', oracle(), async () => {
  const dir = scratch();
  const q = ['-f', 'qcow2'];
  const names = [
    img(dir, 'a.qcow2', [...q, '-o', 'cluster_size=65536'], 'write -P 1 0 128k'),
    img(dir, 'mid.qcow2', [...q], 'write -P 1 0 128k', 'write -P 2 70001 1'),
    img(dir, 'zero.qcow2', [...q], 'write -P 1 0 128k', 'write -z 64k 64k'),
    img(dir, 'zalloc.qcow2', [...q], 'write -P 1 0 128k', 'write -P 0 64k 64k', 'write -z 64k 64k'),
    img(dir, 'disc.qcow2', [...q], 'write -P 1 0 128k', 'discard 64k 64k'),
    img(dir, 'frag.qcow2', [...q], 'write -P 1 512k 512k', 'write -P 1 0 512k'),
    img(dir, 'full.qcow2', [...q], 'write -P 1 0 1M'),
    img(dir, 'c512.qcow2', [...q, '-o', 'cluster_size=512'], 'write -P 1 0 1M'),
    img(dir, 'c512b.qcow2', [...q, '-o', 'cluster_size=512'], 'write -P 1 0 1M', 'write -P 9 1048000 1'),
    img(dir, 'ext.qcow2', [...q, '-o', 'extended_l2=on'], 'write -P 1 0 100k', 'write -z 8k 8k'),
    img(dir, 'tail.qcow2', [...q], 'write -P 1 0 128k', 'write -P 5 1000k 1'),
    img(dir, 'empty.qcow2', [...q]),
    // Fully allocated raw file (no holes: see the todo test below for sparse raw files).
    img(dir, 'raw.img', ['-f', 'raw', '-o', 'preallocation=full'], 'write -P 1 0 128k'),
  ];
  names.push(img(dir, 'big.qcow2', [...q], 'write -P 1 0 128k'));
  qemuImgSync(['resize', '-q', 'big.qcow2', '2M'], dir);
  names.push(img(dir, 'bigtail.qcow2', [...q], 'write -P 1 0 128k'));
  qemuImgSync(['resize', '-q', 'bigtail.qcow2', '2M'], dir);
  qemuIoSync(['-c', 'write -P 1 1536k 512', 'bigtail.qcow2'], dir);
  qemuImgSync(['convert', '-c', '-O', 'qcow2', 'full.qcow2', 'comp.qcow2'], dir);
  names.push('comp.qcow2');
  // A chain: the overlay takes most of its data from a shorter backing file.
  img(dir, 'base.qcow2', [...q], 'write -P 1 0 128k');
  qemuImgSync(['resize', '-q', '--shrink', 'base.qcow2', '512k'], dir);
  names.push(img(dir, 'ov.qcow2', [...q, '-b', 'base.qcow2', '-F', 'qcow2'], 'write -P 1 0 4k'));
  qemuImgSync(['resize', '-q', 'ov.qcow2', '1M'], dir);
  // Each unordered pair once per mode, alternating the order.
  const jobs: string[][] = [];
  names.forEach((x, i) => names.forEach((y, j) => {
    if (j < i) return;
    jobs.push((i + j) % 2 ? [x, y] : [y, x], ['-s', ...((i + j) % 2 ? [y, x] : [x, y])]);
  }));
  for (const a of jobs) await same(dir, a);
});

test('compare: progress, quiet, bad operands, open errors (exit 2)', oracle(), async () => {
  const dir = scratch();
  img(dir, 'a.qcow2', ['-f', 'qcow2']);
  img(dir, 'b.qcow2', ['-f', 'qcow2']);
  fs.writeFileSync(path.join(dir, 'r.img'), Buffer.alloc(8 * 1024 * 1024, 0));
  qemuImgSync(['resize', '-q', 'a.qcow2', '8M'], dir);
  qemuImgSync(['resize', '-q', 'b.qcow2', '8M'], dir);
  qemuIoSync(['-c', 'write -P 1 0 3M', 'a.qcow2'], dir);
  qemuIoSync(['-c', 'write -P 1 0 3M', '-c', 'write -P 2 5M 1', 'b.qcow2'], dir);
  const cases = [
    ['-p', 'a.qcow2', 'b.qcow2'], ['-p', 'a.qcow2', 'a.qcow2'], ['-p', '-s', 'a.qcow2', 'r.img'], ['-q', 'a.qcow2', 'b.qcow2'],
    ['-q', '-p', 'a.qcow2', 'b.qcow2'], ['-p', 'r.img', 'a.qcow2'],
    ['a.qcow2'], [], ['a.qcow2', 'b.qcow2', 'r.img'], ['-f', 'foo', 'a.qcow2', 'b.qcow2'], ['-T', 'bogus', 'a.qcow2', 'b.qcow2'],
    ['-f', 'qcow2', 'r.img', 'a.qcow2'], ['-F', 'raw', 'a.qcow2', 'a.qcow2'], ['-f', 'raw', 'a.qcow2', 'a.qcow2'], ['nothere', 'a.qcow2'],
    ['a.qcow2', 'nothere'], ['-p', 'nothere', 'a.qcow2'], ['-x', 'a.qcow2', 'b.qcow2'], ['-U', '-T', 'none', 'a.qcow2', 'b.qcow2'],
  ];
  for (const c of cases) await same(dir, c, true);
});

test('compare: random chains against flattened copies, first mismatch found with reads in flight', oracle(), async () => {
  const dir = scratch();
  let seed = 7;
  const rnd = (n: number): number => {
    seed = (seed * 1103515245 + 12345) % 2147483648;
    return seed % n;
  };
  img(dir, 'base.qcow2', ['-f', 'qcow2', '-o', 'cluster_size=4k']);
  qemuImgSync(['resize', '-q', 'base.qcow2', '20M'], dir);
  qemuIoSync(['-c', 'write -P 3 0 20M', 'base.qcow2'], dir);
  qemuImgSync(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'top.qcow2', '24M'], dir);
  const ops: string[] = [];
  for (let i = 0; i < 40; i++) {
    const off = rnd(24 * 1024) * 1024, len = (1 + rnd(256)) * 512;
    if (off + len > 24 * 1024 * 1024) continue;
    ops.push(rnd(3) === 0 ? `write -z ${off} ${len}` : `write -P ${1 + rnd(200)} ${off} ${len}`);
  }
  qemuIoSync(['-f', 'qcow2', ...ops.flatMap((c) => ['-c', c]), 'top.qcow2'], dir);
  qemuImgSync(['convert', '-O', 'raw', 'top.qcow2', 'flat.raw'], dir);
  qemuImgSync(['convert', '-O', 'qcow2', 'top.qcow2', 'flat.qcow2'], dir);
  await same(dir, ['top.qcow2', 'flat.raw']);
  await same(dir, ['-s', 'top.qcow2', 'flat.qcow2']);
  // Change single bytes at random places in the flat copy: the report must name the same sector.
  const fd = fs.openSync(path.join(dir, 'flat.raw'), 'r+');
  try {
    for (let i = 0; i < 6; i++) {
      const at = rnd(24 * 1024 * 1024);
      const b = Buffer.alloc(1);
      fs.readSync(fd, b, 0, 1, at);
      b[0] ^= 0x5a;
      fs.writeSync(fd, b, 0, 1, at);
      await same(dir, ['top.qcow2', 'flat.raw']);
      await same(dir, ['flat.raw', 'top.qcow2']);
      b[0] ^= 0x5a;
      fs.writeSync(fd, b, 0, 1, at);
    }
  } finally {
    fs.closeSync(fd);
  }
});

test('compare -s: holes in sparse raw files count as zero, as QEMU finds them with SEEK_HOLE', oracle(), async () => {
  const dir = scratch();
  img(dir, 'a.qcow2', ['-f', 'qcow2'], 'write -P 1 0 128k');
  img(dir, 'r.img', ['-f', 'raw'], 'write -P 1 0 128k');
  img(dir, 'r2.img', ['-f', 'raw'], 'write -P 1 4k 124k', 'write -P 1 700k 4k');
  fs.writeFileSync(path.join(dir, 't.img'), '');
  fs.truncateSync(path.join(dir, 't.img'), 1024 * 1024);
  qemuIoSync(['-f', 'raw', '-c', 'write -P 1 8k 120k', 't.img'], dir);
  for (const [x, y] of [['a.qcow2', 'r.img'], ['r.img', 'r2.img'], ['t.img', 'r.img'], ['t.img', 'a.qcow2'], ['r2.img', 't.img']]) {
    await same(dir, ['-s', x, y]);
    await same(dir, [x, y]);
  }
});
