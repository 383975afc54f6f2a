/** The NBD reply queue: order, in-place reservations, and slab reuse only after the socket took the bytes. */
import test from 'node:test';
import assert from 'node:assert/strict';
import type { Socket } from 'node:net';
import { ReplyQueue } from '../src/nbd/reply-queue.js';

/** A socket stand-in that records writes and completes them when told to. */
class FakeSocket {
  writes: Buffer[] = [];
  /** Snapshot of each write's bytes at the time it was written. */
  copies: Buffer[] = [];
  held: Array<() => void> = [];
  hold = false;
  corks = 0;
  destroyed = false;
  writableLength = 0;
  cork(): void { this.corks++; }
  uncork(): void {}
  write(b: Buffer, cb?: () => void): boolean {
    this.writes.push(b);
    this.copies.push(Buffer.from(b));
    if (cb) {
      if (this.hold) this.held.push(cb);
      else cb();
    }
    return true;
  }
  release(): void {
    const h = this.held;
    this.held = [];
    for (const cb of h) cb();
  }
  get bytes(): Buffer { return Buffer.concat(this.writes); }
}

const turn = (): Promise<void> => new Promise((r) => setImmediate(r));

test('a turn\'s replies leave in order; small ones are joined, large ones passed by reference', async () => {
  const s = new FakeSocket();
  const q = new ReplyQueue(s as unknown as Socket);
  const big = Buffer.alloc(64 * 1024, 7);
  q.push(Buffer.from('head1'));
  const r = q.reserve(4) as Buffer;
  r.write('abcd');
  q.push2(Buffer.from('H2'), big);
  q.push(Buffer.from('tail'));
  assert.equal(q.unsent, 5 + 4 + 2 + big.length + 4);
  assert.equal(s.writes.length, 0, 'nothing is written before the turn ends');
  await turn();
  assert.deepEqual(s.bytes, Buffer.concat([Buffer.from('head1abcdH2'), big, Buffer.from('tail')]));
  assert.equal(s.writes.length, 3, 'slab part, the large buffer, slab part');
  assert.equal(s.writes[1], big, 'the large buffer is not copied');
  assert.equal(s.corks, 1);
  assert.equal(q.unsent, 0);
});

test('reserve and unreserve: an abandoned reservation leaves nothing behind', async () => {
  const s = new FakeSocket();
  const q = new ReplyQueue(s as unknown as Socket);
  q.push(Buffer.from('one'));
  const r = q.reserve(100) as Buffer;
  r.fill(1);
  q.unreserve(100);
  q.push(Buffer.from('two'));
  await turn();
  assert.deepEqual(s.bytes, Buffer.from('onetwo'));
  assert.equal(q.reserve(1024 * 1024), null, 'too large for a slab');
});

test('a slab is refilled only after the socket completed every write of it', async () => {
  const s = new FakeSocket();
  s.hold = true;
  const q = new ReplyQueue(s as unknown as Socket);
  const fill = (v: number): void => { (q.reserve(4096) as Buffer).fill(v); };
  // Fill more than two slabs (256 KiB each) with distinct bytes, one turn per 16 KiB.
  for (let i = 0; i < 160; i++) {
    fill(i & 0xff);
    if (i % 4 === 3) await turn();
  }
  await turn();
  // Every write still holds the bytes it was given: no slab was reused while writes were held.
  s.writes.forEach((w, i) => assert.deepEqual(w, s.copies[i], `write ${i} unchanged`));
  const firstSlab = s.writes[0].buffer;
  s.release();
  // Now the first slabs are free again; new reservations come from one of them.
  for (let i = 0; i < 200; i++) fill(0xee);
  await turn();
  const reused = s.writes.slice(-3).some((w) => w.buffer === firstSlab || s.writes.slice(0, 40).some((o) => o.buffer === w.buffer));
  assert.ok(reused, 'a written-out slab is used again');
});
