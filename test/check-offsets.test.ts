/**
 * check with host offsets beyond 2^31 (JavaScript's 32-bit bitwise range): a compressed cluster
 * moved to 3 GiB into a sparse file must be counted at its real place, as qemu-img check does.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { oracle, qchain, qemuImg, qemuIo, scratch } from './helpers/qemu.js';

const G = 1024 * 1024 * 1024;

test('check counts a compressed cluster at 3 GiB where it is (same report as qemu-img)', oracle(), async () => {
  const dir = scratch('qchain-check-offsets-');
  const f = path.join(dir, 'c.qcow2');
  assert.equal((await qemuImg(['create', '-q', '-f', 'qcow2', f, '1M'])).code, 0);
  assert.equal((await qemuIo(['-c', 'write -c -P 0x5c 0 64k', f])).code, 0);
  // Find the compressed entry: L1[0] -> L2, entry 0.
  const fd = fs.openSync(f, 'r+');
  try {
    const h = Buffer.alloc(72);
    fs.readSync(fd, h, 0, 72, 0);
    const l1Off = Number(h.readBigUInt64BE(40));
    const l1 = Buffer.alloc(8);
    fs.readSync(fd, l1, 0, 8, l1Off);
    const l2Off = Number(l1.readBigUInt64BE(0) & 0x00fffffffffffe00n);
    const ent = Buffer.alloc(8);
    fs.readSync(fd, ent, 0, 8, l2Off);
    const e = ent.readBigUInt64BE(0);
    const offBits = 62n - (16n - 8n);
    const coff = Number(e & ((1n << offBits) - 1n));
    const sectors = Number((e >> offBits) & 0xffn) + 1;
    const data = Buffer.alloc(sectors * 512);
    fs.readSync(fd, data, 0, data.length, coff - (coff % 512));
    // Move the compressed bytes to 3 GiB + the same sub-sector position (the file stays sparse).
    const moved = 3 * G + (coff % 512);
    fs.writeSync(fd, data, 0, data.length, 3 * G);
    const ne = (e & ~((1n << offBits) - 1n)) | BigInt(moved);
    const nb = Buffer.alloc(8);
    nb.writeBigUInt64BE(ne, 0);
    fs.writeSync(fd, nb, 0, 8, l2Off);
  } finally {
    fs.closeSync(fd);
  }
  // Let QEMU rebuild the refcounts for the new layout; then both checks must agree exactly.
  await qemuImg(['check', '-q', '-r', 'all', f]);
  const q = await qemuImg(['check', '--output=json', f]);
  const ours = await qchain(['img', 'check', '--output=json', f]);
  assert.equal(q.code, 0, q.stdout + q.stderr);
  assert.equal(ours.code, q.code, ours.stderr);
  assert.equal(ours.stdout, q.stdout);
  assert.equal(ours.stderr, q.stderr);
  const read = await qchain(['io', '-c', 'read -P 0x5c 0 64k', f]);
  assert.doesNotMatch(read.stdout, /fail/, 'the moved cluster still reads back');
});
