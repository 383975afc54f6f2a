/**
 * The pipelined copy (convert without -W): a job's turn ends once its clusters are allocated
 * (`onPlaced`), so the next job allocates while the data is in flight, yet the target is laid out
 * in guest order and every byte arrives. Also the small pieces it relies on: the counting
 * semaphore and the LRU's most-recently-used shortcut (the allocator's hint: alloc-fast-path).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { MemoryStorage } from '../src/storage/memory.js';
import { createQcow2 } from '../src/qcow2/create.js';
import { Qcow2Image } from '../src/qcow2/image.js';
import { RawImage } from '../src/raw/raw.js';
import { Lru } from '../src/util/lru.js';
import { Semaphore } from '../src/util/mutex.js';
import { copyChains } from '../src/ops/copy.js';
import { Chain } from '../src/chain/chain.js';

const KiB = 1024, MiB = 1024 * KiB;

/** Memory storage whose large (data) writes finish only when released, in any order. */
class GatedStorage extends MemoryStorage {
  readonly held: Array<{ offset: number; release: () => void }> = [];
  gate = true;
  override async write(buf: Buffer, offset: number): Promise<void> {
    // Larger than a (64 KiB) cluster: metadata writes pass, data writes wait.
    if (this.gate && buf.length > 64 * KiB) {
      await new Promise<void>((r) => this.held.push({ offset, release: r }));
    }
    return super.write(buf, offset);
  }
}

const tick = (): Promise<void> => new Promise((r) => setImmediate(r));

test('qcow2 write: onPlaced fires once, after allocation and before the data is written', async () => {
  const st = new GatedStorage();
  st.gate = false;
  const img = await createQcow2(st, { size: 16 * MiB });
  st.gate = true;
  let placed = 0;
  let done = false;
  const w = img.write(Buffer.alloc(256 * KiB, 0xaa), 1 * MiB, { onPlaced: () => placed++ }).then(() => { done = true; });
  for (let i = 0; i < 20 && st.held.length === 0; i++) await tick();
  assert.equal(placed, 1, 'placed while the data write is still held');
  assert.equal(done, false);
  assert.equal(st.held.length, 1, 'one data write for a contiguous run');
  // A second write allocates right behind the first one although its data is not written yet.
  const w2 = img.write(Buffer.alloc(128 * KiB, 0xbb), 4 * MiB, { onPlaced: () => placed++ });
  for (let i = 0; i < 20 && st.held.length < 2; i++) await tick();
  assert.equal(placed, 2);
  assert.equal(st.held[1].offset, st.held[0].offset + 256 * KiB, 'host layout follows issue order');
  for (const h of st.held.splice(0)) h.release();
  st.gate = false;
  await Promise.all([w, w2]);
  assert.equal(placed, 2, 'called exactly once per write');
  const back = Buffer.alloc(256 * KiB);
  await img.readOwn(back, 1 * MiB);
  assert.ok(back.equals(Buffer.alloc(256 * KiB, 0xaa)));
  await img.close();
});

test('raw write: placed at once (the layout is the guest\'s)', async () => {
  const st = new GatedStorage();
  st.gate = false;
  await st.write(Buffer.alloc(MiB), 0);
  st.gate = true;
  const img = await RawImage.open(st);
  let placed = false;
  const w = img.write(Buffer.alloc(128 * KiB, 1), 0, { onPlaced: () => { placed = true; } });
  for (let i = 0; i < 20 && st.held.length === 0; i++) await tick();
  assert.equal(placed, true);
  st.held.splice(0).forEach((h) => h.release());
  await w;
});

test('copyChains in order: next job allocates while data is in flight; layout in guest order; bytes exact', async () => {
  const srcSt = new MemoryStorage();
  const src = await createQcow2(srcSt, { size: 8 * MiB });
  // Data at every other 512 KiB, patterns by position.
  const expect = Buffer.alloc(8 * MiB);
  for (let off = 0; off < 8 * MiB; off += MiB) {
    const b = Buffer.alloc(512 * KiB, 0x10 + off / MiB);
    await src.write(b, off);
    b.copy(expect, off);
  }
  const chain = new Chain([{ driver: src, filename: 'src' }]);
  const dstSt = new GatedStorage();
  dstSt.gate = false;
  const dst = await createQcow2(dstSt, { size: 8 * MiB });
  dstSt.gate = true;
  let copied = false as boolean;
  // Count placements as the copy engine sees them.
  let placements = 0;
  const counted = Object.create(dst) as typeof dst;
  counted.write = (buf, off, o) => dst.write(buf, off, { ...o, onPlaced: () => { placements++; o?.onPlaced?.(); } });
  const copy = copyChains([chain], counted, { chunkSize: MiB, targetIsZero: true }).then(() => { copied = true; });
  // Two data writes in flight at a time (buffered target: the second waits in the thread pool).
  const held = (): number => dstSt.held.length;
  for (let i = 0; i < 50 && held() < 2; i++) await tick();
  assert.equal(held(), 2);
  for (let i = 0; i < 50 && placements < 3; i++) await tick();
  assert.ok(placements >= 3, 'the next job allocated while two jobs\' data is in flight');
  assert.equal(held(), 2, 'no third write goes out');
  for (let n = 0; !copied; n++) {
    assert.ok(n < 200, 'copy finished');
    for (let i = 0; i < 10 && held() === 0 && !copied; i++) await tick();
    assert.ok(held() <= 2, 'in-order copy keeps at most two data writes in flight');
    dstSt.held.splice(0).forEach((h) => h.release());
    await tick();
  }
  await copy;
  const back = Buffer.alloc(8 * MiB);
  await dst.readOwn(back, 0);
  assert.ok(back.equals(expect), 'target reads the source view');
  // Guest order: host offsets of the data extents increase with guest offset.
  const exts = (await dst.blockStatus(0, 8 * MiB)).filter((x) => x.kind === 'data');
  assert.equal(exts.length, 8);
  for (let i = 1; i < exts.length; i++) assert.ok(exts[i].hostOffset! > exts[i - 1].hostOffset!, `extent ${i} after extent ${i - 1}`);
  await dst.close();
  await src.close();
});

test('Semaphore: at most N holders, FIFO hand-over, double release is harmless', async () => {
  const s = new Semaphore(2);
  const order: number[] = [];
  const r1 = await s.acquire();
  const r2 = await s.acquire();
  const p3 = s.acquire().then((r) => { order.push(3); return r; });
  const p4 = s.acquire().then((r) => { order.push(4); return r; });
  await tick();
  assert.deepEqual(order, []);
  r1();
  r1();
  const r3 = await p3;
  await tick();
  assert.deepEqual(order, [3], 'a repeated release does not free a second slot');
  r2();
  const r4 = await p4;
  assert.deepEqual(order, [3, 4]);
  r3();
  r4();
  const again = await Promise.all([s.acquire(), s.acquire()]);
  again.forEach((r) => r());
});

test('Lru: second chance — a hit spares an entry from the next eviction, without reordering on hits', () => {
  const evicted: string[] = [];
  const l = new Lru<string, number>(3, (k) => evicted.push(k));
  l.set('a', 1);
  l.set('b', 2);
  l.set('c', 3);
  assert.equal(l.get('a'), 1); // a is used: skipped once by eviction
  l.set('d', 4); // oldest unused is b
  assert.deepEqual(evicted, ['b']);
  l.set('e', 5); // a lost its bit when passed over, c is older and unused
  assert.deepEqual(evicted, ['b', 'c']);
  l.set('f', 6); // order now d, a, e: d is unused
  assert.deepEqual(evicted, ['b', 'c', 'd']);
  l.set('a', 10); // an update counts as a use
  l.set('g', 7); // a passed over again, e evicted
  assert.deepEqual(evicted, ['b', 'c', 'd', 'e']);
  assert.equal(l.get('a'), 10);
  l.delete('f');
  assert.equal(l.get('f'), undefined);
  assert.equal(l.size, 2);
  l.clear();
  assert.equal(l.get('a'), undefined);
  assert.equal(l.size, 0);
});

test('copyChains -W: writes may overlap and all bytes still arrive', async () => {
  const srcSt = new MemoryStorage();
  const src = await createQcow2(srcSt, { size: 4 * MiB });
  const expect = Buffer.alloc(4 * MiB);
  for (let off = 0; off < 4 * MiB; off += 256 * KiB) {
    const b = Buffer.alloc(256 * KiB, 1 + off / (256 * KiB));
    await src.write(b, off);
    b.copy(expect, off);
  }
  const dstSt = new GatedStorage();
  dstSt.gate = false;
  const dst = await createQcow2(dstSt, { size: 4 * MiB });
  dstSt.gate = true;
  let copied = false as boolean;
  const copy = copyChains([new Chain([{ driver: src, filename: 'src' }])], dst, { chunkSize: 512 * KiB, targetIsZero: true, outOfOrder: true, parallel: 4 }).then(() => { copied = true; });
  let maxHeld = 0;
  for (let n = 0; !copied; n++) {
    assert.ok(n < 200, 'copy finished');
    for (let i = 0; i < 10; i++) await tick();
    maxHeld = Math.max(maxHeld, dstSt.held.length);
    dstSt.held.splice(0).forEach((h) => h.release());
  }
  await copy;
  assert.ok(maxHeld > 1, `several writes in flight with -W (saw ${maxHeld})`);
  const back = Buffer.alloc(4 * MiB);
  await dst.readOwn(back, 0);
  assert.ok(back.equals(expect));
  await dst.close();
  await src.close();
});
