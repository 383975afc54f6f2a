/**
 * Guest writes into a cluster whose L2 entry points at qcow2 metadata, against qemu-io 7.2: QEMU's
 * pre-write overlap check (qcow2_co_pwritev_task) refuses the write, marks the image corrupt and
 * stops all I/O ("No medium found"); the image then opens read-only only. The same command line
 * runs with qemu-io and with `qchain io` on two copies of one crafted image: stdout (timings
 * filtered), stderr, exit status and the resulting files (byte for byte) must be equal, and a
 * second read-write open must fail the same way.
 *
 * Issue 3: "the corrupt bit is set when a write would overlap metadata, and such an image then
 * opens read-only". Every structure QEMU's default (cached) check covers has a case, active L2
 * tables and refcount blocks included.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { QCHAIN, QEMU_IO, filterTiming, oracle, qemuImg, run, scratch } from './helpers/qemu.js';
import { getL1Entry, readBytes, readHeader, setL2Entry } from './helpers/craft.js';

const ROOT = scratch('qchain-overlap-');
const COPIED = 1n << 63n;
const OFFSET_MASK = 0x00fffffffffffe00n;
const BITMAPS_EXT = 0x23852875;

async function mustQemuImg(args: string[], cwd: string): Promise<void> {
  const r = await qemuImg(args, cwd);
  if (r.code !== 0) throw new Error(`qemu-img ${args.join(' ')}: ${r.stderr}`);
}

async function mustQemuIo(args: string[], cwd: string): Promise<void> {
  const r = await run('qemu-io', args, { cwd });
  if (r.code !== 0) throw new Error(`qemu-io ${args.join(' ')}: ${r.stdout}${r.stderr}`);
}

/** Offset of the bitmap directory, from the bitmaps header extension. */
function bitmapDirectoryOffset(file: string): number {
  const h = readHeader(file);
  const buf = readBytes(file, 0, h.clusterSize);
  for (let o = h.headerLength; o + 8 <= buf.length;) {
    const type = buf.readUInt32BE(o), len = buf.readUInt32BE(o + 4);
    if (type === 0) break;
    if (type === BITMAPS_EXT) return Number(buf.readBigUInt64BE(o + 8 + 16));
    o += 8 + Math.ceil(len / 8) * 8;
  }
  throw new Error('no bitmaps extension');
}

interface Case {
  name: string;
  /** Prepare t.img in `dir` (qemu-img/qemu-io), before the L2 entry of cluster 0 is redirected. */
  prepare: (dir: string) => Promise<void>;
  /** The host offset the L2 entry of guest cluster 0 is pointed at. */
  target: (file: string) => number;
}

const CASES: Case[] = [
  {
    name: 'refcount table',
    prepare: (d) => mustQemuIo(['-c', 'write 0 64k', 't.img'], d),
    target: (f) => readHeader(f).refcountTableOffset,
  },
  {
    name: 'active L1 table',
    prepare: (d) => mustQemuIo(['-c', 'write 0 64k', 't.img'], d),
    target: (f) => readHeader(f).l1TableOffset,
  },
  {
    name: 'snapshot table',
    prepare: async (d) => {
      await mustQemuImg(['snapshot', '-c', 's1', 't.img'], d);
      await mustQemuIo(['-c', 'write 0 64k', 't.img'], d);
    },
    target: (f) => readHeader(f).snapshotsOffset,
  },
  {
    name: 'inactive L1 table',
    prepare: async (d) => {
      await mustQemuIo(['-c', 'write 1M 64k', 't.img'], d);
      await mustQemuImg(['snapshot', '-c', 's1', 't.img'], d);
      await mustQemuIo(['-c', 'write 0 64k', 't.img'], d);
    },
    // The snapshot's L1 table offset: first entry of the snapshot table.
    target: (f) => Number(readBytes(f, readHeader(f).snapshotsOffset, 8).readBigUInt64BE(0)),
  },
  {
    name: 'bitmap directory',
    prepare: async (d) => {
      await mustQemuImg(['bitmap', '--add', 't.img', 'b0'], d);
      await mustQemuIo(['-c', 'write 0 64k', 't.img'], d);
    },
    target: bitmapDirectoryOffset,
  },
  {
    name: 'active L2 table',
    prepare: (d) => mustQemuIo(['-c', 'write 0 64k', 't.img'], d),
    target: (f) => Number(getL1Entry(f, 0) & OFFSET_MASK),
  },
  {
    name: 'refcount block',
    prepare: (d) => mustQemuIo(['-c', 'write 0 64k', 't.img'], d),
    // The first refcount table entry: the block describing the start of the file.
    target: (f) => Number(readBytes(f, readHeader(f).refcountTableOffset, 8).readBigUInt64BE(0)),
  },
];

async function runCase(k: Case, index: number): Promise<void> {
  const base = path.join(ROOT, `case${index}`);
  const a = path.join(base, 'qemu'), b = path.join(base, 'qchain');
  fs.mkdirSync(a, { recursive: true });
  await mustQemuImg(['create', '-q', '-f', 'qcow2', 't.img', '4M'], a);
  await k.prepare(a);
  const file = path.join(a, 't.img');
  const target = k.target(file);
  assert.ok(target > 0, 'target offset found');
  setL2Entry(file, 0, 0, COPIED | BigInt(target));
  fs.cpSync(a, b, { recursive: true });

  const args = ['-c', 'write -P 0x5a 512 512', '-c', 'read 0 512', 't.img'];
  const [qr, cr] = await Promise.all([run('qemu-io', args, { cwd: a }), run(process.execPath, [QCHAIN, 'io', ...args], { cwd: b })]);
  assert.equal(filterTiming(cr.stdout), filterTiming(qr.stdout), 'stdout');
  assert.equal(cr.stderr, qr.stderr, 'stderr');
  assert.equal(cr.code, qr.code, 'exit status');
  assert.match(qr.stderr, /Marking image as corrupt: Preventing invalid write on metadata/, 'QEMU refused the write');
  assert.ok(fs.readFileSync(path.join(a, 't.img')).equals(fs.readFileSync(path.join(b, 't.img'))), 'files identical');

  // The corrupt bit is set: a read-write open fails, a read-only one works.
  const again = ['-c', 'read 0 512', 't.img'];
  const [qr2, cr2] = await Promise.all([run('qemu-io', again, { cwd: a }), run(process.execPath, [QCHAIN, 'io', ...again], { cwd: b })]);
  assert.equal(cr2.stderr, qr2.stderr, 'stderr of the second open');
  assert.equal(cr2.code, qr2.code, 'exit status of the second open');
  const ro = ['-r', '-c', 'read 64k 512', 't.img'];
  const [qr3, cr3] = await Promise.all([run('qemu-io', ro, { cwd: a }), run(process.execPath, [QCHAIN, 'io', ...ro], { cwd: b })]);
  assert.equal(filterTiming(cr3.stdout), filterTiming(qr3.stdout), 'stdout of the read-only open');
  assert.equal(cr3.code, qr3.code, 'exit status of the read-only open');
}

describe('data writes over metadata mark the image corrupt, as qemu-io 7.2', { concurrency: 2, ...oracle() }, () => {
  if (!QEMU_IO) return;
  CASES.forEach((k, i) => {
    test(k.name, () => runCase(k, i));
  });
});
