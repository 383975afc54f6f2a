/**
 * `qchain img convert` and the target's backing file, against qemu-img 7.2: `-o backing_file=…`
 * acts as `-B` (top-only copy), `-B`/`-F` override `-o backing_file`/`backing_fmt`, and the
 * refusals (raw target with a backing file, concatenation with a backing file, a backing format
 * without a file, `-n` into a smaller target, `--target-is-zero` with a backing file) print
 * qemu-img's messages with its exit status, in its order (after the sources are opened).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { oracle, qchain, qemuImg, qemuImgSync, qemuIoSync, scratch } from './helpers/qemu.js';

function buildChain(dir: string): void {
  qemuImgSync(['create', '-q', '-f', 'qcow2', 'base.qcow2', '4M'], dir);
  qemuIoSync(['-c', 'write -P 0xaa 0 128k', '-c', 'write -P 0xbb 1M 64k', 'base.qcow2'], dir);
  qemuImgSync(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'mid.qcow2'], dir);
  qemuIoSync(['-c', 'write -P 0xcc 64k 64k', '-c', 'write -z 1M 64k', 'mid.qcow2'], dir);
  qemuImgSync(['create', '-q', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', 'top.qcow2'], dir);
  qemuIoSync(['-c', 'write -P 0xdd 2M 64k', '-c', 'discard 0 64k', 'top.qcow2'], dir);
  qemuImgSync(['create', '-q', '-f', 'raw', 'small.raw', '1M'], dir);
}

test('convert: refusals about the target backing file match qemu-img', oracle(), async () => {
  const dir = scratch();
  buildChain(dir);
  const cases: string[][] = [
    ['-O', 'qcow2', '-B', 'mid.qcow2', '-F', 'qcow2', 'top.qcow2', 'base.qcow2', 'x.qcow2'],
    ['-O', 'qcow2', '-B', 'mid.qcow2', 'top.qcow2', 'base.qcow2', 'x.qcow2'],
    ['-O', 'qcow2', '-o', 'backing_file=mid.qcow2', 'top.qcow2', 'base.qcow2', 'x.qcow2'],
    ['-O', 'qcow2', '-o', 'backing_file=mid.qcow2', 'top.qcow2', 'x.qcow2'],
    ['-O', 'qcow2', '-B', 'mid.qcow2', 'nothere.qcow2', 'x.qcow2'],
    ['-O', 'qcow2', '-o', 'foo=bar', 'nothere.qcow2', 'x.qcow2'],
    ['-O', 'raw', '-B', 'mid.qcow2', '-F', 'qcow2', 'top.qcow2', 'x.raw'],
    ['-O', 'raw', '-B', 'mid.qcow2', 'top.qcow2', 'x.raw'],
    ['-O', 'raw', '-F', 'qcow2', 'top.qcow2', 'x.raw'],
    ['-O', 'raw', '-B', 'mid.qcow2', '-F', 'qcow2', 'top.qcow2', 'base.qcow2', 'x.raw'],
    ['-O', 'qcow2', '-o', 'backing_fmt=qcow2', 'top.qcow2', 'x.qcow2'],
    ['-O', 'qcow2', '-F', 'qcow2', 'top.qcow2', 'x.qcow2'],
    ['-n', '-O', 'raw', 'top.qcow2', 'small.raw'],
    // qemu-img 7.2 prints this refusal and exits with status 0.
    ['-n', '-O', 'raw', '-B', 'mid.qcow2', '--target-is-zero', 'top.qcow2', 'small.raw'],
  ];
  for (const c of cases) {
    const rq = await qemuImg(['convert', ...c], dir);
    const qLeft = ['x.qcow2', 'x.raw'].filter((f) => fs.existsSync(path.join(dir, f)));
    for (const f of qLeft) fs.rmSync(path.join(dir, f));
    const rc = await qchain(['img', 'convert', ...c], dir);
    const cLeft = ['x.qcow2', 'x.raw'].filter((f) => fs.existsSync(path.join(dir, f)));
    for (const f of cLeft) fs.rmSync(path.join(dir, f));
    const what = c.join(' ');
    assert.ok(rq.stderr !== '', `qemu-img refuses ${what}`);
    assert.equal(rc.stderr, rq.stderr, `stderr for ${what}`);
    assert.equal(rc.code, rq.code, `status for ${what}`);
    assert.equal(rc.stdout, rq.stdout, `stdout for ${what}`);
    assert.deepEqual(cLeft, qLeft, `files left behind for ${what}`);
  }
});

test('convert: -o backing_file=… copies only the top layer, and -B/-F win over -o (as qemu-img)', oracle(), async () => {
  const dir = scratch();
  buildChain(dir);
  const cases: string[][] = [
    ['-O', 'qcow2', '-o', 'backing_file=mid.qcow2,backing_fmt=qcow2'],
    ['-O', 'qcow2', '-o', 'backing_file=mid.qcow2,backing_fmt=qcow2,cluster_size=4k'],
    ['-O', 'qcow2', '-B', 'base.qcow2', '-F', 'qcow2', '-o', 'backing_file=mid.qcow2,backing_fmt=raw'],
    ['-O', 'qcow2', '-B', 'mid.qcow2', '-o', 'backing_fmt=qcow2'],
  ];
  for (const c of cases) {
    const what = c.join(' ');
    const rq = await qemuImg(['convert', ...c, 'top.qcow2', 'q.qcow2'], dir);
    const rc = await qchain(['img', 'convert', ...c, 'top.qcow2', 'c.qcow2'], dir);
    assert.equal(rq.code, 0, rq.stderr);
    assert.equal(rc.code, 0, `${what}: ${rc.stderr}`);
    assert.equal(rc.stdout, rq.stdout, `stdout for ${what}`);
    const iq = JSON.parse((await qemuImg(['info', '--output=json', 'q.qcow2'], dir)).stdout) as Record<string, unknown>;
    const ic = JSON.parse((await qemuImg(['info', '--output=json', 'c.qcow2'], dir)).stdout) as Record<string, unknown>;
    for (const k of ['backing-filename', 'backing-filename-format', 'cluster-size', 'virtual-size']) assert.equal(ic[k], iq[k], `${k} for ${what}`);
    const mq = await qemuImg(['map', '--output=json', 'q.qcow2'], dir);
    const mc = await qemuImg(['map', '--output=json', 'c.qcow2'], dir);
    assert.equal(mc.stdout, mq.stdout, `map (only the top layer copied) for ${what}`);
    const cmp = await qemuImg(['compare', 'q.qcow2', 'c.qcow2'], dir);
    assert.equal(cmp.code, 0, `${what}: ${cmp.stdout}`);
    assert.equal((await qemuImg(['check', 'c.qcow2'], dir)).code, 0);
    fs.rmSync(path.join(dir, 'q.qcow2'));
    fs.rmSync(path.join(dir, 'c.qcow2'));
  }
});
