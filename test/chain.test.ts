/** Backing-chain opening rules: resolution, formats, loops, depth, the gate; chain reads and status. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { openChain } from '../src/chain/open.js';
import { combinePath, plainBackingName } from '../src/chain/resolve.js';
import { FileStorage } from '../src/storage/file.js';
import { createQcow2 } from '../src/qcow2/create.js';
import { scratch } from './helpers/qemu.js';

async function mk(file: string, size: number, backing?: string, backingFormat = 'qcow2'): Promise<void> {
  const st = await FileStorage.open(file, { create: true });
  const img = await createQcow2(st, { size, backingFile: backing ?? null, backingFormat: backing ? backingFormat : null });
  await img.close();
}

test('relative backing names join the overlay directory lexically (QEMU path_combine)', () => {
  assert.equal(combinePath('qi/sub/ov.qcow2', '../base.qcow2'), 'qi/sub/../base.qcow2');
  assert.equal(combinePath('ov.qcow2', 'base.qcow2'), 'base.qcow2');
  assert.equal(combinePath('/a/b/ov.qcow2', '/abs/base.qcow2'), '/abs/base.qcow2');
  assert.equal(plainBackingName('file:base.qcow2'), 'base.qcow2');
  assert.throws(() => plainBackingName('nbd:localhost:10809'), /Unknown protocol 'nbd'/);
  assert.throws(() => plainBackingName('json:{"driver":"raw"}'), /json:/);
  assert.equal(plainBackingName('./a:b.qcow2'), './a:b.qcow2');
});

test('a chain opened from another directory resolves backing files next to the overlay', async () => {
  const dir = scratch();
  fs.mkdirSync(path.join(dir, 'sub'));
  await mk(path.join(dir, 'base.qcow2'), 1 << 20);
  await mk(path.join(dir, 'sub/ov.qcow2'), 1 << 20, '../base.qcow2');
  const chain = await openChain(path.join(dir, 'sub/ov.qcow2'), { readOnly: true });
  assert.equal(chain.depth, 2);
  assert.equal(chain.layers[1].filename, `${dir}/sub/../base.qcow2`);
  await chain.close();
});

test('backing loops are refused with QEMU\'s message', async () => {
  const dir = scratch();
  await mk(path.join(dir, 'a.qcow2'), 1 << 20, 'b.qcow2');
  await mk(path.join(dir, 'b.qcow2'), 1 << 20, 'a.qcow2');
  await assert.rejects(openChain(path.join(dir, 'a.qcow2')), /Backing file 'a.qcow2' creates an infinite loop\./);
});

test('chain depth is limited and the gate can refuse implicit opens', async () => {
  const dir = scratch();
  await mk(path.join(dir, 'l0.qcow2'), 1 << 20);
  for (let i = 1; i < 5; i++) await mk(path.join(dir, `l${i}.qcow2`), 1 << 20, `l${i - 1}.qcow2`);
  await assert.rejects(openChain(path.join(dir, 'l4.qcow2'), { maxDepth: 3 }), /deeper than 3 images/);
  const ok = await openChain(path.join(dir, 'l4.qcow2'), { maxDepth: 5, readOnly: true });
  assert.equal(ok.depth, 5);
  await ok.close();
  const outside = scratch();
  await mk(path.join(outside, 'secret.qcow2'), 1 << 20);
  await mk(path.join(dir, 'evil.qcow2'), 1 << 20, path.join(outside, 'secret.qcow2'));
  const allow = (p: string): boolean => p.startsWith(dir + path.sep);
  await assert.rejects(openChain(path.join(dir, 'evil.qcow2'), { allowBacking: allow }), /outside the allowed directories/);
  const inside = await openChain(path.join(dir, 'l4.qcow2'), { allowBacking: allow, readOnly: true });
  await inside.close();
});

test('missing backing file: nested error text as qemu-img prints it', async () => {
  const dir = scratch();
  await mk(path.join(dir, 'ov.qcow2'), 1 << 20, 'gone.qcow2');
  const top = path.join(dir, 'ov.qcow2');
  await assert.rejects(openChain(top), (e: Error) => e.message === `Could not open '${top}': Could not open backing file: Could not open '${path.join(dir, 'gone.qcow2')}': No such file or directory`);
});

test('reads take each cluster from the first layer that holds it; zero stops the search', async () => {
  const dir = scratch();
  const C = 65536;
  await mk(path.join(dir, 'b.qcow2'), 8 * C);
  let ch = await openChain(path.join(dir, 'b.qcow2'));
  await ch.write(Buffer.alloc(4 * C, 0xaa), 0);
  await ch.close();
  await mk(path.join(dir, 'm.qcow2'), 8 * C, 'b.qcow2');
  ch = await openChain(path.join(dir, 'm.qcow2'));
  await ch.write(Buffer.alloc(C, 0xbb), C);
  await ch.writeZeroes(2 * C, C);
  await ch.close();
  await mk(path.join(dir, 't.qcow2'), 10 * C, 'm.qcow2'); // larger than its backing
  ch = await openChain(path.join(dir, 't.qcow2'));
  await ch.write(Buffer.alloc(100, 0xcc), 3 * C + 10);
  const view = Buffer.alloc(10 * C);
  await ch.read(view, 0);
  const first = [0, 1, 2, 3, 4, 8, 9].map((i) => view[i * C]);
  assert.deepEqual(first, [0xaa, 0xbb, 0, 0xaa, 0, 0, 0]);
  assert.equal(view[3 * C + 10], 0xcc);
  assert.equal(view[3 * C + 110], 0xaa, 'partial write copied the rest of the cluster from below');
  const st = await ch.blockStatus(0, 10 * C);
  const depthAt = (o: number): number => (st.find((x) => x.offset <= o && o < x.offset + x.length) as { depth: number }).depth;
  assert.deepEqual([0, C, 2 * C, 3 * C, 5 * C].map(depthAt), [2, 1, 1, 0, 2]);
  await ch.close();
});
