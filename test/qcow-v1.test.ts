/**
 * qcow (version 1) images, read-only, against qemu-img/qemu-io 7.2: info (human and JSON), map,
 * check, reads and convert print and produce what QEMU does, hostile headers fail with QEMU's
 * messages, and the image is never probed as raw (a write fails and leaves the file alone).
 */
import { test, before } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { spawnSync } from 'node:child_process';
import { QEMU_IMG, oracle, qchain, qemuImg, qemuImgSync, qemuIoSync, qemuIo, scratch, filterTiming } from './helpers/qemu.js';

let dir: string;

/** A copy of v1.qcow with `bytes` written at `off`. */
function patched(name: string, off: number, bytes: number[]): string {
  const b = fs.readFileSync(path.join(dir, 'v1.qcow'));
  Buffer.from(bytes).copy(b, off);
  fs.writeFileSync(path.join(dir, name), b);
  return name;
}

before(() => {
  if (oracle().skip) return;
  dir = scratch('qchain-qcow-v1-');
  qemuImgSync(['create', '-q', '-f', 'qcow', 'v1.qcow', '1M'], dir);
  qemuIoSync(['-f', 'qcow', '-c', 'write -P 0x11 0 4k', '-c', 'write -P 0x22 600k 70k', 'v1.qcow'], dir);
  qemuImgSync(['create', '-q', '-f', 'qcow', '-b', 'v1.qcow', '-F', 'qcow', 'over.qcow'], dir);
  qemuIoSync(['-f', 'qcow', '-c', 'write -P 0x33 2k 1k', 'over.qcow'], dir);
  qemuImgSync(['create', '-q', '-f', 'raw', 'r.raw', '1M'], dir);
  qemuIoSync(['-f', 'raw', '-c', 'write -P 0x61 0 256k', '-c', 'write -P 0x62 512k 100k', 'r.raw'], dir);
  // qemu-img 7.2 exits 1 after writing a compressed qcow image in full (the content is right).
  spawnSync(QEMU_IMG ?? 'qemu-img', ['convert', '-c', '-O', 'qcow', 'r.raw', 'comp.qcow'], { cwd: dir });
  patched('enc.qcow', 36, [0, 0, 0, 1]);
  patched('l2bits.qcow', 33, [15]);
  patched('cbits.qcow', 32, [17]);
  patched('crypt2.qcow', 36, [0, 0, 0, 2]);
  patched('size1.qcow', 24, [0, 0, 0, 0, 0, 0, 0, 1]);
  patched('huge.qcow', 24, [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
  patched('backlong.qcow', 8, [0, 0, 0, 0, 0, 0, 0, 0x30, 0, 0, 4, 0]);
  fs.writeFileSync(path.join(dir, 'tiny.qcow'), Buffer.from([0x51, 0x46, 0x49, 0xfb, 0, 0, 0, 1]));
});

async function same(args: string[]): Promise<void> {
  const q = await qemuImg(args, dir);
  const m = await qchain(['img', ...args], dir);
  assert.deepEqual({ code: m.code, stdout: m.stdout, stderr: m.stderr }, { code: q.code, stdout: q.stdout, stderr: q.stderr }, args.join(' '));
}

const IMAGES = ['v1.qcow', 'over.qcow', 'comp.qcow'];
const BAD = ['enc.qcow', 'l2bits.qcow', 'cbits.qcow', 'crypt2.qcow', 'size1.qcow', 'huge.qcow', 'backlong.qcow', 'tiny.qcow'];

test('qcow v1: info, info --output=json, map, map --output=json and check as qemu-img', oracle(), async () => {
  for (const f of [...IMAGES, ...BAD]) {
    for (const args of [['info'], ['info', '--output=json'], ['map'], ['map', '--output=json'], ['check']]) {
      // An encrypted image opens for info only (reads need the key, as in QEMU).
      await same([...args, f]);
    }
  }
  await same(['info', '--backing-chain', 'over.qcow']);
  await same(['info', '-f', 'qcow', 'v1.qcow']);
});

test('qcow v1: a qcow2 image opened with -f qcow is refused with QEMU\'s hint', oracle(), async () => {
  qemuImgSync(['create', '-q', '-f', 'qcow2', 'x.qcow2', '1M'], dir);
  await same(['info', '-f', 'qcow', 'x.qcow2']);
});

test('qcow v1: convert to raw gives qemu-img\'s bytes (plain, backing chain, compressed clusters)', oracle(), async () => {
  for (const f of IMAGES) {
    await qemuImg(['convert', '-O', 'raw', f, `${f}.q.raw`], dir);
    const m = await qchain(['img', 'convert', '-O', 'raw', f, `${f}.m.raw`], dir);
    assert.equal(m.code, 0, m.stderr);
    assert.ok(fs.readFileSync(path.join(dir, `${f}.m.raw`)).equals(fs.readFileSync(path.join(dir, `${f}.q.raw`))), f);
  }
  const m = await qchain(['img', 'convert', '-O', 'qcow2', 'comp.qcow', 'comp.qcow2'], dir);
  assert.equal(m.code, 0, m.stderr);
  assert.equal((await qemuImg(['compare', 'comp.qcow', 'comp.qcow2'], dir)).code, 0);
});

test('qcow v1: qemu-io reads match (patterns, backing data, compressed clusters)', oracle(), async () => {
  const cmds = ['read -P 0x11 0 2k', 'read -P 0x33 2k 1k', 'read -P 0x22 600k 70k', 'read -P 0 500k 4k', 'read -v 1020 8'];
  for (const f of ['v1.qcow', 'over.qcow']) {
    const args = [...cmds.flatMap((c) => ['-c', c]), f];
    const q = await qemuIo(args, dir);
    const m = await qchain(['io', ...args], dir);
    assert.equal(filterTiming(m.stdout), filterTiming(q.stdout), f);
    assert.equal(m.stderr, q.stderr, f);
  }
  const args = ['-c', 'read -P 0x61 0 256k', '-c', 'read -P 0x62 512k 100k', '-c', 'read -P 0 300k 4k', 'comp.qcow'];
  const q = await qemuIo(args, dir);
  const m = await qchain(['io', ...args], dir);
  assert.equal(filterTiming(m.stdout), filterTiming(q.stdout));
  const e = await qchain(['io', '-c', 'read 0 512', 'enc.qcow'], dir);
  assert.equal(e.stderr, (await qemuIo(['-c', 'read 0 512', 'enc.qcow'], dir)).stderr);
});

test('qcow v1 is never probed as raw: a write fails and the file is unchanged', oracle(), async () => {
  const before = fs.readFileSync(path.join(dir, 'v1.qcow'));
  const m = await qchain(['io', '-c', 'write -P 0x55 0 4k', 'v1.qcow'], dir);
  assert.match(m.stdout + m.stderr, /write failed: Operation not supported/);
  assert.ok(fs.readFileSync(path.join(dir, 'v1.qcow')).equals(before));
  const c = await qchain(['img', 'create', '-f', 'qcow', 'new.qcow', '1M'], dir);
  assert.equal(c.code, 1);
  assert.match(c.stderr, /does not write them/);
  assert.ok(!fs.existsSync(path.join(dir, 'new.qcow')));
});
