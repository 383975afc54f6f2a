/**
 * Write coalescing (the daemon's file writes): writes of one event-loop turn that are contiguous
 * in the file go out as one vector write; each resolves only when its bytes are written; errors
 * reach every write of the failed run; overlapping writes keep their issue order; and a file
 * written through coalescing ends up byte-identical to one written plainly.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { WriteBatcher, type BatchSink } from '../src/storage/write-batcher.js';
import { FileStorage } from '../src/storage/file.js';
import { rng, scratch } from './helpers/qemu.js';

/** A sink recording calls; each call completes when released (or at once when `auto`). */
class Sink implements BatchSink {
  calls: Array<{ kind: 'write' | 'writev'; offset: number; lengths: number[]; release: (e?: Error) => void }> = [];
  file = Buffer.alloc(1 << 20);
  auto = true;
  private call(kind: 'write' | 'writev', bufs: Buffer[], offset: number): Promise<void> {
    return new Promise((resolve, reject) => {
      const release = (e?: Error): void => {
        if (e) return reject(e);
        let at = offset;
        for (const b of bufs) { b.copy(this.file, at); at += b.length; }
        resolve();
      };
      this.calls.push({ kind, offset, lengths: bufs.map((b) => b.length), release });
      if (this.auto) release();
    });
  }
  write(buf: Buffer, offset: number): Promise<void> { return this.call('write', [buf], offset); }
  writev(bufs: Buffer[], offset: number): Promise<void> { return this.call('writev', bufs, offset); }
}

test('contiguous writes of one turn become one vector write; the rest stay single', async () => {
  const sink = new Sink();
  const b = new WriteBatcher(sink);
  const K = 4096;
  // Issued out of order: 2, 0, 1 are contiguous; 10 stands alone.
  await Promise.all([
    b.write(Buffer.alloc(K, 2), 2 * K),
    b.write(Buffer.alloc(K, 0xa), 10 * K),
    b.write(Buffer.alloc(K, 0), 0),
    b.write(Buffer.alloc(K, 1), K),
  ]);
  assert.deepEqual(sink.calls.map((c) => [c.kind, c.offset, c.lengths]), [
    ['writev', 0, [K, K, K]],
    ['write', 10 * K, [K]],
  ]);
  for (let i = 0; i < 3; i++) assert.equal(sink.file[i * K], i);
  assert.equal(sink.file[10 * K], 0xa);
  // A later turn starts a new batch.
  await b.write(Buffer.alloc(K, 3), 3 * K);
  assert.equal(sink.calls.length, 3);
});

test('a write resolves only when its run is written; a failed run rejects all of its writes', async () => {
  const sink = new Sink();
  sink.auto = false;
  const b = new WriteBatcher(sink);
  let resolved = 0;
  const ps = [b.write(Buffer.alloc(512), 0), b.write(Buffer.alloc(512), 512)].map((p) => p.then(() => { resolved++; }));
  const lone = b.write(Buffer.alloc(512), 8192);
  await new Promise((r) => setImmediate(r));
  await new Promise((r) => setImmediate(r));
  assert.equal(sink.calls.length, 2);
  assert.equal(resolved, 0);
  sink.calls[0].release(new Error('EIO'));
  for (const p of ps) await assert.rejects(p, /EIO/);
  sink.calls[1].release();
  await lone;
});

test('overlapping writes keep their issue order, even across turns', async () => {
  const sink = new Sink();
  sink.auto = false;
  const b = new WriteBatcher(sink);
  const first = b.write(Buffer.alloc(4096, 1), 0);
  await new Promise((r) => setImmediate(r));
  assert.equal(sink.calls.length, 1);
  const second = b.write(Buffer.alloc(1024, 2), 1024); // overlaps the first, still in flight
  await new Promise((r) => setImmediate(r));
  await new Promise((r) => setImmediate(r));
  assert.equal(sink.calls.length, 1, 'the overlapping write waits for the first');
  sink.calls[0].release();
  await first;
  for (let i = 0; i < 5 && sink.calls.length < 2; i++) await new Promise((r) => setImmediate(r));
  assert.equal(sink.calls.length, 2);
  sink.calls[1].release();
  await second;
  assert.equal(sink.file[0], 1);
  assert.equal(sink.file[1024], 2);
  assert.equal(sink.file[2047], 2);
  assert.equal(sink.file[2048], 1);
});

test('FileStorage with coalescing: random concurrent writes give the same file as plain writes', async () => {
  const dir = scratch('qchain-batcher-');
  const r = rng(7);
  const ops: Array<{ off: number; len: number; fill: number }> = [];
  for (let i = 0; i < 400; i++) {
    const len = [512, 4096, 65536, 200_000][Math.floor(r() * 4)];
    ops.push({ off: Math.floor(r() * 64) * 65536 + Math.floor(r() * 8) * 512, len, fill: 1 + Math.floor(r() * 250) });
  }
  const files: string[] = [];
  for (const coalesce of [false, true]) {
    const f = path.join(dir, `f-${coalesce}`);
    const st = await FileStorage.open(f, { create: true, coalesceWrites: coalesce });
    // Batches of non-overlapping writes issued together (as the engine does), batches in order.
    for (let i = 0; i < ops.length; i += 16) {
      const batch: typeof ops = [];
      for (const o of ops.slice(i, i + 16)) if (!batch.some((x) => x.off < o.off + o.len && o.off < x.off + x.len)) batch.push(o);
      await Promise.all(batch.map((o) => st.write(Buffer.alloc(o.len, o.fill), o.off)));
    }
    await st.close();
    files.push(f);
  }
  assert.ok(fs.readFileSync(files[0]).equals(fs.readFileSync(files[1])));
});

test('a turn with many writes issues them in batches of 16 without waiting for the turn to end', async () => {
  const sink = new Sink();
  const b = new WriteBatcher(sink);
  const ps: Array<Promise<void>> = [];
  for (let i = 0; i < 16; i++) ps.push(b.write(Buffer.alloc(512, i), i * 512));
  assert.equal(sink.calls.length, 1, 'issued at the 16th write, before the turn ended');
  assert.deepEqual(sink.calls[0].lengths.length, 16);
  for (let i = 16; i < 20; i++) ps.push(b.write(Buffer.alloc(512, i), i * 512));
  assert.equal(sink.calls.length, 1, 'the rest waits for the end of the turn');
  await Promise.all(ps);
  assert.equal(sink.calls.length, 2);
  for (let i = 0; i < 20; i++) assert.equal(sink.file[i * 512], i);
});
