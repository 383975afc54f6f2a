/**
 * Power loss with the writeback metadata cache. A workload of allocating writes, overwrites of
 * clusters shared with an internal snapshot, zero writes (with and without unmap), discards and
 * flushes runs on a container that "loses power" after its N-th write: what survives is the
 * contents at the last completed flush plus a random subset of the writes issued after it (a
 * disk may persist unsynced writes in any order). For many N, qemu-img judges the result:
 * - `check` finds no errors (leaked clusters are allowed: a crash may leak, never corrupt);
 * - every range no request touched after the last completed flush reads as it was then;
 * - the internal snapshot reads exactly as when it was taken.
 * This proves the write-back order (refcounts, sync, L2 tables, sync, refcount drops).
 */
import { describe, test, before } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';

import { QEMU_IMG, oracle, qemuImgSync, qemuIoSync, rng, scratch } from './helpers/qemu.js';
import { MemoryStorage } from '../src/storage/memory.js';
import { StorageError, type Storage } from '../src/storage/storage.js';
import { Qcow2Image } from '../src/qcow2/image.js';

const K = 1024;
const SIZE = 8 * K * K;

/** A container that dies after `limit` writes; durable() is what a power cut leaves. */
class PowerLossStorage implements Storage {
  readonly name = 'power-loss';
  readonly readOnly = false;
  writes = 0;
  private readonly mem: MemoryStorage;
  /** Contents at the last completed flush. */
  private synced: Buffer;
  /** Writes since then, in issue order (a truncate is recorded as a null buffer). */
  private unsynced: Array<{ offset: number; data: Buffer | null; length: number }> = [];

  constructor(initial: Buffer, private readonly limit = Infinity) {
    this.mem = new MemoryStorage('power-loss', initial);
    this.synced = Buffer.from(initial);
  }

  /** The power went: every later write or flush fails. */
  dead = false;

  private check(): void {
    if (this.writes >= this.limit) this.dead = true;
    if (this.dead) throw new StorageError('simulated power loss', 'EIO');
  }

  /** The synced contents plus each unsynced write kept with probability 1/2. */
  durable(r: () => number): Buffer {
    let out = Buffer.from(this.synced);
    for (const w of this.unsynced) {
      if (r() < 0.5) continue;
      if (w.data === null) {
        out = w.length <= out.length ? Buffer.from(out.subarray(0, w.length)) : Buffer.concat([out, Buffer.alloc(w.length - out.length)]);
        continue;
      }
      if (w.offset + w.data.length > out.length) out = Buffer.concat([out, Buffer.alloc(w.offset + w.data.length - out.length)]);
      w.data.copy(out, w.offset);
    }
    return out;
  }

  read(buf: Buffer, offset: number): Promise<void> { return this.mem.read(buf, offset); }
  async write(buf: Buffer, offset: number): Promise<void> {
    this.check();
    this.writes++;
    this.unsynced.push({ offset, data: Buffer.from(buf), length: buf.length });
    await this.mem.write(buf, offset);
  }
  async writev(bufs: Buffer[], offset: number): Promise<void> {
    await this.write(Buffer.concat(bufs), offset);
  }
  async truncate(length: number): Promise<void> {
    this.check();
    this.writes++;
    this.unsynced.push({ offset: 0, data: null, length });
    await this.mem.truncate(length);
  }
  async flush(): Promise<void> {
    this.check();
    this.synced = this.mem.contents();
    this.unsynced = [];
  }
  size(): Promise<number> { return this.mem.size(); }
  allocatedSize(): Promise<number> { return this.mem.size(); }
  close(): Promise<void> { return Promise.resolve(); }
}

type Op =
  | { kind: 'write'; offset: number; length: number; value: number }
  | { kind: 'zero'; offset: number; length: number; unmap: boolean }
  | { kind: 'discard'; offset: number; length: number }
  | { kind: 'flush' };

/** A fixed random workload (4 KiB clusters: many L2 entries and refcounts change). */
function workload(seed: number): Op[] {
  const r = rng(seed);
  const ops: Op[] = [];
  const span = (): { offset: number; length: number } => {
    const offset = Math.floor(r() * (SIZE / 512 - 64)) * 512;
    return { offset, length: (1 + Math.floor(r() * 48)) * 512 };
  };
  for (let i = 0; i < 120; i++) {
    const p = r();
    if (p < 0.6) ops.push({ kind: 'write', ...span(), value: 1 + Math.floor(r() * 254) });
    else if (p < 0.72) ops.push({ kind: 'zero', ...span(), unmap: r() < 0.5 });
    else if (p < 0.8) {
      // Discard whole clusters only: a partial discard leaves the data as it is (QEMU too).
      const offset = Math.floor(r() * (SIZE / 4096 - 16)) * 4096;
      ops.push({ kind: 'discard', offset, length: (1 + Math.floor(r() * 8)) * 4096 });
    } else ops.push({ kind: 'flush' });
  }
  return ops;
}

interface Run {
  /** Guest view at the last completed flush. */
  flushed: Buffer;
  /** Byte ranges requests touched after that flush (including the one that failed). */
  touched: Array<[number, number]>;
}

/** Applies the workload; stops at the first storage error (the power cut). */
async function run(st: PowerLossStorage, img: Qcow2Image, ops: Op[], initial: Buffer): Promise<Run> {
  const model = Buffer.from(initial);
  let flushed = Buffer.from(initial);
  let touched: Array<[number, number]> = [];
  try {
    for (const op of ops) {
      if (op.kind === 'flush') {
        await img.flush();
        flushed = Buffer.from(model);
        touched = [];
        continue;
      }
      touched.push([op.offset, op.offset + op.length]);
      if (op.kind === 'write') {
        await img.write(Buffer.alloc(op.length, op.value), op.offset);
        model.fill(op.value, op.offset, op.offset + op.length);
      } else if (op.kind === 'zero') {
        await img.writeZeroes(op.offset, op.length, { mayUnmap: op.unmap });
        model.fill(0, op.offset, op.offset + op.length);
      } else {
        await img.discard(op.offset, op.length);
        model.fill(0, op.offset, op.offset + op.length); // no backing file: discarded reads as zeros
      }
    }
    await img.flush();
    flushed = Buffer.from(model);
    touched = [];
  } catch (e) {
    if (!st.dead) throw e;
  }
  return { flushed, touched };
}

/** The complement in [0, SIZE) of a list of ranges. */
function untouched(ranges: Array<[number, number]>): Array<[number, number]> {
  const out: Array<[number, number]> = [];
  let pos = 0;
  for (const [a, b] of [...ranges].sort((x, y) => x[0] - y[0])) {
    if (a > pos) out.push([pos, a]);
    pos = Math.max(pos, b);
  }
  if (pos < SIZE) out.push([pos, SIZE]);
  return out;
}

describe('power loss with the writeback metadata cache', oracle(), () => {
  let dir = '';
  let image = Buffer.alloc(0);
  let guest = Buffer.alloc(0);
  let snap = Buffer.alloc(0);

  before(() => {
    dir = scratch('qchain-wbcrash-');
    const f = path.join(dir, 'base.qcow2');
    qemuImgSync(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', f, String(SIZE)]);
    qemuIoSync(['-c', 'write -q -P 0x5a 0 3M', '-c', 'write -q -P 0x6b 5M 1M', '-c', 'write -q -c -P 0x7c 7M 64k', f]);
    qemuImgSync(['snapshot', '-c', 's1', f]);
    image = fs.readFileSync(f);
    qemuImgSync(['convert', '-O', 'raw', f, path.join(dir, 'guest.raw')]);
    guest = fs.readFileSync(path.join(dir, 'guest.raw'));
    snap = guest; // s1 was just taken: same view
  });

  test('every crash point: check clean but for leaks, flushed data and the snapshot intact', async () => {
    assert.ok(QEMU_IMG);
    const ops = workload(7);
    // A full run counts the writes and must itself be clean.
    const full = new PowerLossStorage(image);
    const img = await Qcow2Image.open(full);
    assert.ok(img.writeback, 'the writeback cache is the default');
    const done = await run(full, img, ops, guest);
    await img.close();
    assert.equal(done.touched.length, 0);
    const total = full.writes;
    assert.ok(total > 100, `the workload makes enough writes to crash between (${total})`);

    const r = rng(99);
    const points = new Set<number>();
    while (points.size < Math.min(60, total)) points.add(1 + Math.floor(r() * total));
    let withUnsynced = 0;
    for (const limit of [...points].sort((a, b) => a - b)) {
      const st = new PowerLossStorage(image, limit);
      const res = await run(st, await Qcow2Image.open(st), ops, guest);
      const after = st.durable(r);
      const f = path.join(dir, `crash-${limit}.qcow2`);
      fs.writeFileSync(f, after);
      const ctx = `crash after write ${limit} of ${total}`;
      const chk = spawnSync(QEMU_IMG, ['check', f], { encoding: 'utf8' });
      assert.ok(chk.status === 0 || chk.status === 3, `${ctx}: qemu-img check exit ${chk.status}\n${chk.stdout}${chk.stderr}`);
      assert.doesNotMatch(chk.stdout, /ERROR/, `${ctx}: ${chk.stdout}`);
      const raw = path.join(dir, 'view.raw');
      qemuImgSync(['convert', '-O', 'raw', f, raw]);
      const view = fs.readFileSync(raw);
      // Compare everything outside the ranges touched after the last completed flush.
      if (res.touched.length) withUnsynced++;
      for (const [a, b] of untouched(res.touched)) {
        if (!view.subarray(a, b).equals(res.flushed.subarray(a, b))) assert.fail(`${ctx}: [${a}, ${b}) differs from the flushed data`);
      }
      qemuImgSync(['convert', '-O', 'raw', '-l', 'snapshot.name=s1', f, raw]);
      assert.ok(fs.readFileSync(raw).equals(snap), `${ctx}: snapshot s1 changed`);
      fs.rmSync(f);
    }
    assert.ok(withUnsynced > 10, `enough crash points fall between flushes (${withUnsynced})`);
  });
});
