/**
 * Copy-before-write hooks, write watchers and write gates:
 * - a read through a lower layer whose writes run a copy-before-write hook (a fleecing target's
 *   backing, the live source) waits for that layer's write gate even when no mirror watcher is
 *   armed anywhere (the armed-hook count tracks the copy-before-write hooks);
 * - after a node is reopened (new driver handle) its hooks, watchers and gate are the ones armed
 *   before: guest writes through the new handle still copy first, are still seen, still gated,
 *   and disarming still works.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { Chain, beforeWrites, watchWrites, writeGate } from '../src/chain/chain.js';
import { MemoryStorage } from '../src/storage/memory.js';
import { FileStorage } from '../src/storage/file.js';
import { createQcow2 } from '../src/qcow2/create.js';
import { BlockGraph } from '../src/daemon/graph.js';
import { scratch } from './helpers/qemu.js';

const SIZE = 1 << 20;
const ticks = async (n = 20): Promise<void> => { for (let i = 0; i < n; i++) await new Promise((r) => setImmediate(r)); };

test('a read through a layer under copy-before-write waits for its write gate (no watcher armed)', async () => {
  const source = await createQcow2(new MemoryStorage('source'), { size: SIZE, version: 3 });
  const target = await createQcow2(new MemoryStorage('target'), { size: SIZE, version: 3 });
  await source.write(Buffer.alloc(65536, 0x61), 0);
  const fleece = new Chain([{ driver: target, filename: 'target' }, { driver: source, filename: 'source' }]);
  const disarm = beforeWrites(source, async () => {});
  try {
    // A guest write to the source is in flight (it holds the gate while its hook copies).
    const release = await writeGate(source).acquire(0, 65536);
    let done = false;
    const buf = Buffer.alloc(4096);
    const read = fleece.readFrom(0, buf, 0).then(() => { done = true; });
    await ticks();
    assert.equal(done, false, 'the read waits for the write in flight');
    release();
    await read;
    assert.equal(buf[0], 0x61);
  } finally {
    disarm();
  }
});

test('hooks, watchers and the write gate follow a node through reopens', async () => {
  const dir = scratch();
  const file = path.join(dir, 'disk.qcow2');
  const st = await FileStorage.open(file, { create: true });
  await (await createQcow2(st, { size: SIZE, version: 3 })).close();
  const graph = new BlockGraph();
  const node = await graph.addFormat({ name: 'disk', format: 'qcow2', file, fileIsNode: false, backing: null });
  const copied: number[] = [], seen: number[] = [];
  const disarm = beforeWrites(node.driver, async (off) => { copied.push(off); });
  const unwatch = watchWrites(node.driver, (off) => { seen.push(off); });
  const gate = writeGate(node.driver);
  const first = node.driver;
  await graph.reopen(node, true);
  await graph.reopen(node, false);
  assert.notEqual(node.driver, first, 'the node has a new handle');
  assert.equal(writeGate(node.driver), gate, 'the same gate');

  await graph.chain(node).write(Buffer.alloc(4096, 1), 65536);
  assert.deepEqual(copied, [65536], 'copy-before-write ran for a write through the new handle');
  assert.deepEqual(seen, [65536], 'the watcher saw it');

  // A job holding the gate (checking and filling a range) still excludes guest writes.
  const release = await gate.acquire(0, 65536);
  let written = false;
  const w = graph.chain(node).write(Buffer.alloc(4096, 2), 0).then(() => { written = true; });
  await ticks();
  assert.equal(written, false, 'the guest write waits for the gate');
  release();
  await w;

  disarm();
  unwatch();
  await graph.chain(node).write(Buffer.alloc(4096, 3), 131072);
  assert.deepEqual(copied, [65536, 0], 'disarmed: no copy for the last write');
  assert.deepEqual(seen, [65536, 0]);
  await graph.closeAll();
});
