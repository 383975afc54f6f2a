/**
 * `qchain img create -f qcow2` refusals that depend on the order of qcow2_co_create's checks
 * (several bad options at once: the first failing check is the one reported), a backing format
 * without a backing file, and a backing file with preallocation — compared with qemu-img 7.2.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { oracle, qchain, qemuImg, qemuImgSync, scratch } from './helpers/qemu.js';

test('create: combined bad options report the check qemu-img reports first', oracle(), async () => {
  const dir = scratch();
  qemuImgSync(['create', '-q', '-f', 'qcow2', 'b.qcow2', '1M'], dir);
  const cases: string[][] = [
    ['-o', 'backing_fmt=qcow2'],
    ['-F', 'qcow2'],
    ['-o', 'backing_fmt=qcow2,compat=0.10,lazy_refcounts=on'],
    ['-o', 'backing_fmt=qcow2,refcount_bits=3'],
    ['-o', 'backing_fmt=qcow2,cluster_size=3000'],
    ['-o', 'compat=0.10,lazy_refcounts=on,refcount_bits=3'],
    ['-o', 'compat=0.10,lazy_refcounts=on,refcount_bits=8'],
    ['-o', 'extended_l2=on,compat=0.10,cluster_size=3000'],
    ['-o', 'extended_l2=on,cluster_size=3000'],
    ['-o', 'data_file_raw=on,compat=0.10,lazy_refcounts=on'],
    ['-o', 'data_file_raw=on'],
    ['-o', 'backing_file=b.qcow2,backing_fmt=qcow2,preallocation=metadata'],
    ['-o', 'backing_file=b.qcow2,backing_fmt=qcow2,preallocation=full,compat=0.10,lazy_refcounts=on'],
    ['-b', 'b.qcow2', '-F', 'qcow2', '-o', 'preallocation=falloc'],
  ];
  for (const c of cases) {
    const args = ['create', '-f', 'qcow2', ...c, 'x.qcow2', '1M'];
    const rq = await qemuImg(args, dir);
    const qLeft = fs.existsSync(path.join(dir, 'x.qcow2'));
    fs.rmSync(path.join(dir, 'x.qcow2'), { force: true });
    const rc = await qchain(['img', ...args], dir);
    const cLeft = fs.existsSync(path.join(dir, 'x.qcow2'));
    fs.rmSync(path.join(dir, 'x.qcow2'), { force: true });
    const what = c.join(' ');
    assert.notEqual(rq.code, 0, `qemu-img refuses ${what}`);
    assert.equal(rc.code, rq.code, `status for ${what}: ${rc.stderr}`);
    assert.equal(rc.stderr, rq.stderr, `stderr for ${what}`);
    assert.equal(rc.stdout, rq.stdout, `stdout for ${what}`);
    assert.equal(cLeft, qLeft, `file left behind for ${what}`);
  }
});

test('create: a backing file with preallocation is allowed with extended_l2=on (as qemu-img)', oracle(), async () => {
  const dir = scratch();
  qemuImgSync(['create', '-q', '-f', 'qcow2', 'b.qcow2', '1M'], dir);
  const args = ['create', '-f', 'qcow2', '-b', 'b.qcow2', '-F', 'qcow2', '-o', 'preallocation=metadata,extended_l2=on', 'x.qcow2'];
  const rq = await qemuImg(args, dir);
  fs.renameSync(path.join(dir, 'x.qcow2'), path.join(dir, 'q.qcow2'));
  const rc = await qchain(['img', ...args], dir);
  assert.equal(rc.code, rq.code, rc.stderr);
  assert.equal(rc.stdout, rq.stdout);
  assert.ok(fs.readFileSync(path.join(dir, 'x.qcow2')).equals(fs.readFileSync(path.join(dir, 'q.qcow2'))), 'byte-identical to qemu-img');
});

test('create: raw with preallocation=metadata leaves the empty file qemu-img leaves', oracle(), async () => {
  const dir = scratch();
  for (const existing of [false, true]) {
    for (const side of ['q.raw', 'c.raw']) {
      fs.rmSync(path.join(dir, side), { force: true });
      if (existing) fs.writeFileSync(path.join(dir, side), Buffer.alloc(5000, 7));
    }
    const rq = await qemuImg(['create', '-f', 'raw', '-o', 'preallocation=metadata', 'q.raw', '1M'], dir);
    const rc = await qchain(['img', 'create', '-f', 'raw', '-o', 'preallocation=metadata', 'c.raw', '1M'], dir);
    assert.equal(rc.code, rq.code, rc.stderr);
    assert.equal(rc.stderr, rq.stderr.replace('q.raw', 'c.raw'));
    assert.equal(rc.stdout, rq.stdout.replace('q.raw', 'c.raw'));
    assert.equal(fs.statSync(path.join(dir, 'c.raw')).size, fs.statSync(path.join(dir, 'q.raw')).size, `file size (existing file: ${existing})`);
  }
});
