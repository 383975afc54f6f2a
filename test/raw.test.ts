/** The raw driver: hole punching on discard and zero writes, as QEMU's file driver does. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { oracle, qchain, qemuIo, qemuImg, scratch } from './helpers/qemu.js';
import { MemoryStorage } from '../src/storage/memory.js';
import { RawImage } from '../src/raw/raw.js';

const MiB = 1024 * 1024;

test('raw discard and zero writes read back as zeros on memory storage', async () => {
  const st = new MemoryStorage('m', Buffer.alloc(4 * MiB, 7));
  const img = await RawImage.open(st);
  await img.discard(MiB + 100, 1000);
  await img.writeZeroes(3 * MiB, 4096);
  const b = Buffer.alloc(4 * MiB);
  await img.readOwn(b, 0);
  const expect = Buffer.alloc(4 * MiB, 7);
  expect.fill(0, MiB + 100, MiB + 1100);
  expect.fill(0, 3 * MiB, 3 * MiB + 4096);
  assert.ok(b.equals(expect));
});

test('raw discard and write -z -u give space back like qemu-io, contents equal', oracle(), async () => {
  const dir = scratch();
  const cmds = ['write -P 1 0 8M', 'discard 1M 2M', 'write -z -u 4M 1M', 'discard 6M 12345', 'write -z 7M 4096'];
  const sizes: number[] = [];
  for (const tool of ['qemu', 'qchain'] as const) {
    const f = path.join(dir, `${tool}.raw`);
    assert.equal((await qemuImg(['create', '-q', '-f', 'raw', f, '8M'])).code, 0);
    const args = ['-f', 'raw', ...cmds.flatMap((c) => ['-c', c]), f];
    const r = tool === 'qemu' ? await qemuIo(args) : await qchain(['io', ...args]);
    assert.equal(r.code, 0, r.stderr);
    sizes.push(fs.statSync(f).blocks * 512);
  }
  const cmp = await qemuImg(['compare', '-f', 'raw', '-F', 'raw', path.join(dir, 'qemu.raw'), path.join(dir, 'qchain.raw')]);
  assert.equal(cmp.stdout.trim(), 'Images are identical.');
  // Both gave back the discarded and unmapped megabytes (QEMU keeps the zero-written 4 KiB allocated).
  assert.ok(sizes[1] <= 5 * MiB, `qchain left ${sizes[1]} bytes allocated`);
  assert.ok(Math.abs(sizes[0] - sizes[1]) <= 64 * 1024, `allocated ${sizes[0]} vs ${sizes[1]}`);
});

test('raw map reports holes as zero runs, as qemu-img map does', oracle(), async () => {
  const dir = scratch();
  const f = path.join(dir, 'sparse.raw');
  assert.equal((await qemuImg(['create', '-q', '-f', 'raw', f, '64M'])).code, 0);
  assert.equal((await qemuIo(['-f', 'raw', '-c', 'write -P 1 0 1M', '-c', 'write -P 2 5M 3M', '-c', 'write 63M 4k', f])).code, 0);
  for (const extra of [[], ['--output=json'], ['--output=json', '--start-offset=2M', '--max-length=5M']]) {
    const q = await qemuImg(['map', '-f', 'raw', ...extra, f]);
    const m = await qchain(['img', 'map', '-f', 'raw', ...extra, f]);
    assert.equal(m.stdout, q.stdout, extra.join(' '));
    assert.equal(m.code, q.code);
  }
  // A raw base under a qcow2 overlay: holes resolve through the chain.
  const top = path.join(dir, 'top.qcow2');
  assert.equal((await qemuImg(['create', '-q', '-f', 'qcow2', '-b', f, '-F', 'raw', top])).code, 0);
  const q = await qemuImg(['map', '--output=json', top]);
  const m = await qchain(['img', 'map', '--output=json', top]);
  assert.equal(m.stdout, q.stdout);
});
