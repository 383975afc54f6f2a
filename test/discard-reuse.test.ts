/**
 * Reuse of freed host clusters inside one `qchain io` session, against `qemu-io` 7.2, file bytes
 * compared (so host offsets and the file length too): a refcount dropping to 0 moves QEMU's free
 * cluster index down to that cluster at once (update_refcount), so the next allocation of the
 * session takes it. Frees come from discards, unmapping zero writes (and v2 zero writes without
 * a backing file), and writes replacing a compressed or snapshot-shared cluster; covered across
 * cluster sizes, refcount widths, v2, extended L2, backing files, internal snapshots (shared
 * clusters only lose a reference) and compressed clusters (qcow2_alloc_bytes goes on in a freed
 * partly used cluster while it is still free).
 * A compressed write after its partly used cluster was freed and taken by a data write is the
 * one deliberate difference: QEMU 7.2 packs the stream into the data cluster (qemu-img check
 * reports it, the data is damaged); qchain starts a new cluster.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { oracle, qchain, qemuImg, qemuImgSync, qemuIo, qemuIoSync, scratch } from './helpers/qemu.js';

interface Case {
  name: string;
  /** qemu-img create options for the image (8 MiB unless `size`). */
  create?: string[];
  size?: string;
  /** Over a fully written 8 MiB backing file. */
  backing?: boolean;
  /** Setup with qemu-io commands; `snapshot NAME` creates an internal snapshot with qemu-img. */
  setup?: string[];
  /** The session run by both tools. */
  cmds: string[];
}

const cases: Case[] = [
  { name: 'discard, then a write elsewhere', cmds: ['write -P 1 0 1M', 'discard 0 1M', 'write -P 2 4M 256k'] },
  { name: '4k clusters', create: ['-o', 'cluster_size=4k'], cmds: ['write -P 1 0 1M', 'discard 0 1M', 'write -P 2 4M 256k'] },
  { name: '4k clusters, the write longer than the hole', create: ['-o', 'cluster_size=4k'], cmds: ['write -P 1 0 1M', 'discard 0 1M', 'write -P 2 1M 2M'] },
  { name: '512 B clusters (many refcount blocks)', create: ['-o', 'cluster_size=512'], cmds: ['write -P 1 0 256k', 'discard 0 256k', 'write -P 2 4M 64k'] },
  { name: '512 B clusters, repeated', create: ['-o', 'cluster_size=512'], setup: ['write -P 1 0 1M'],
    cmds: ['discard 0 1M', 'write -P 3 4M 1M', 'discard 4M 512k', 'write -P 4 6M 512k'] },
  { name: '2 MiB clusters', create: ['-o', 'cluster_size=2M'], cmds: ['write -P 1 0 4M', 'discard 0 2M', 'write -P 2 4M 2M'] },
  { name: '1-bit refcounts', create: ['-o', 'refcount_bits=1'], cmds: ['write -P 1 0 1M', 'discard 0 1M', 'write -P 2 4M 256k'] },
  { name: '64-bit refcounts, 512 B clusters', create: ['-o', 'cluster_size=512,refcount_bits=64'],
    cmds: ['write -P 1 0 1M', 'discard 0 512k', 'write -P 2 4M 1M', 'discard 4M 1M', 'write -P 3 6M 1M'] },
  { name: 'lazy refcounts', create: ['-o', 'lazy_refcounts=on'], cmds: ['write -P 1 0 1M', 'discard 0 1M', 'write -P 2 4M 256k'] },
  { name: 'partial discards', cmds: ['write -P 1 0 1M', 'discard 100k 300k', 'write -P 2 4M 512k', 'discard 128k 256k', 'write -P 3 5M 256k'] },
  { name: 'single clusters, one after another', cmds: ['write -P 1 0 1M', 'discard 0 64k', 'write -P 2 4M 64k', 'discard 64k 64k', 'write -P 3 5M 64k', 'write -P 4 6M 128k'] },
  { name: 'two discards, then one write over both holes', cmds: ['write -P 1 0 1M', 'discard 0 512k', 'discard 512k 512k', 'write -P 2 4M 1M'] },
  { name: 'discard, then the same range again', cmds: ['write -P 1 0 1M', 'discard 0 1M', 'write -P 2 0 64k', 'write -P 3 1M 64k'] },
  { name: 'discard past the written part', cmds: ['write -P 1 0 1M', 'discard 0 8M', 'write -P 2 1M 512k'] },
  { name: 'flush between', cmds: ['write -P 1 0 1M', 'discard 0 1M', 'flush', 'write -P 2 4M 256k'] },
  { name: 'zero write without unmap keeps its clusters', cmds: ['write -P 1 0 1M', 'write -z 0 512k', 'write -P 2 4M 256k'] },
  { name: 'zero write with unmap', cmds: ['write -P 1 0 1M', 'write -z -u 0 512k', 'write -P 2 4M 256k'] },
  { name: 'zero writes with unmap, small holes', cmds: ['write -P 1 0 1M', 'write -z -u 64k 64k', 'write -z -u 256k 128k', 'write -P 2 4M 320k', 'write -P 3 5M 64k'] },
  { name: 'v2 discard', create: ['-o', 'compat=0.10'], cmds: ['write -P 1 0 1M', 'discard 0 1M', 'write -P 2 4M 256k'] },
  { name: 'v2 zero write (deallocates without a backing file)', create: ['-o', 'compat=0.10'], cmds: ['write -P 1 0 1M', 'write -z 0 512k', 'write -P 2 4M 256k'] },
  { name: 'extended L2 discard', create: ['-o', 'extended_l2=on'], cmds: ['write -P 1 0 1M', 'discard 0 1M', 'write -P 2 4M 256k'] },
  { name: 'extended L2 zero writes', create: ['-o', 'extended_l2=on'], cmds: ['write -P 1 0 1M', 'write -z -u 0 512k', 'write -z -u 512k 16k', 'write -P 2 4M 256k'] },
  { name: 'overlay discard', backing: true, cmds: ['write -P 1 0 1M', 'discard 0 1M', 'write -P 2 4M 256k'] },
  { name: 'overlay zero writes', backing: true, cmds: ['write -P 1 0 1M', 'write -z -u 0 1M', 'write -P 2 2M 64k', 'write -z 3M 1M', 'write -P 3 5M 64k'] },
  { name: 'compressed clusters discarded', cmds: ['write -c -P 1 0 64k', 'write -c -P 2 64k 64k', 'discard 0 128k', 'write -P 4 1M 128k'] },
  { name: 'compressed cluster replaced by a write', cmds: ['write -c -P 1 0 64k', 'write -c -P 2 64k 64k', 'write -P 3 0 64k', 'write -P 3 64k 64k', 'write -P 4 1M 128k'] },
  { name: 'compressed cluster unmapped', cmds: ['write -c -P 1 0 64k', 'write -z -u 0 64k', 'write -P 3 1M 64k'] },
  { name: 'compressed cluster zeroed', cmds: ['write -c -P 1 0 64k', 'write -z 0 64k', 'write -P 3 1M 64k'] },
  { name: 'compressed write into a freed partly used cluster', cmds: ['write -c -P 1 0 64k', 'discard 0 64k', 'write -c -P 2 64k 64k', 'write -P 3 1M 64k'] },
  { name: 'compressed write after a flush', cmds: ['write -c -P 1 0 64k', 'discard 0 64k', 'flush', 'write -c -P 2 64k 64k', 'write -P 3 1M 64k'] },
  { name: 'compressed writes after a discard', cmds: ['write -P 1 0 1M', 'discard 0 1M', 'write -c -P 5 2M 64k', 'write -c -P 6 3M 64k'] },
  { name: 'snapshot: discarding shared clusters frees nothing', setup: ['write -P 1 0 1M', 'snapshot sn'], cmds: ['discard 0 1M', 'write -P 2 4M 256k'] },
  { name: 'snapshot: copied clusters freed', setup: ['write -P 1 0 1M', 'snapshot sn'], cmds: ['write -P 2 0 256k', 'discard 0 1M', 'write -P 3 4M 512k'] },
  { name: 'snapshot: own and shared clusters', setup: ['write -P 1 0 1M', 'snapshot sn', 'write -P 2 0 512k'], cmds: ['discard 0 1M', 'write -P 3 4M 512k'] },
  { name: 'snapshot: unmapping zero write', setup: ['write -P 1 0 1M', 'snapshot sn', 'write -P 2 0 512k'], cmds: ['write -z -u 0 1M', 'write -P 3 4M 512k'] },
  { name: 'snapshot: zero write', setup: ['write -P 1 0 1M', 'snapshot sn', 'write -P 2 0 512k'], cmds: ['write -z 0 1M', 'write -P 3 4M 512k'] },
  { name: 'snapshot: v2', create: ['-o', 'compat=0.10'], setup: ['write -P 1 0 1M', 'snapshot sn', 'write -P 2 0 512k'], cmds: ['discard 0 1M', 'write -P 3 4M 512k'] },
  { name: 'snapshot: extended L2', create: ['-o', 'extended_l2=on'], setup: ['write -P 1 0 1M', 'snapshot sn', 'write -P 2 0 512k'], cmds: ['discard 0 1M', 'write -P 3 4M 512k'] },
  { name: 'snapshot: two, 2-bit refcounts', create: ['-o', 'cluster_size=4k,refcount_bits=2'], setup: ['write -P 1 0 1M', 'snapshot a', 'snapshot b'], cmds: ['discard 0 1M', 'write -P 3 4M 1M'] },
  { name: 'snapshot: compressed clusters', setup: ['write -c -P 1 0 64k', 'write -c -P 2 64k 64k', 'snapshot sn'], cmds: ['write -P 3 0 64k', 'discard 64k 64k', 'write -P 4 1M 128k'] },
  // One discard over a whole L2 table's clusters (8192): this once stalled the session.
  { name: 'a whole L2 table discarded', size: '640M', create: ['-o', 'preallocation=metadata'], cmds: ['discard 0 512M', 'write -P 1 600M 1M'] },
];

function build(c: Case, dir: string): void {
  const size = c.size ?? '8M';
  if (c.backing) {
    qemuImgSync(['create', '-q', '-f', 'qcow2', 'base.qcow2', size], dir);
    qemuIoSync(['-c', `write -P 0x33 0 ${size}`, 'base.qcow2'], dir);
    qemuImgSync(['create', '-q', '-f', 'qcow2', ...(c.create ?? []), '-b', 'base.qcow2', '-F', 'qcow2', 'i.qcow2'], dir);
  } else {
    qemuImgSync(['create', '-q', '-f', 'qcow2', ...(c.create ?? []), 'i.qcow2', size], dir);
  }
  for (const cmd of c.setup ?? []) {
    if (cmd.startsWith('snapshot ')) qemuImgSync(['snapshot', '-c', cmd.slice(9), 'i.qcow2'], dir);
    else qemuIoSync(['-c', cmd, 'i.qcow2'], dir);
  }
}

/** Whether two files hold the same bytes (read in pieces: some are large and sparse). */
function sameBytes(a: string, b: string): boolean {
  if (fs.statSync(a).size !== fs.statSync(b).size) return false;
  const fa = fs.openSync(a, 'r'), fb = fs.openSync(b, 'r');
  try {
    const ba = Buffer.alloc(8 << 20), bb = Buffer.alloc(8 << 20);
    for (let pos = 0; ; pos += ba.length) {
      const na = fs.readSync(fa, ba, 0, ba.length, pos), nb = fs.readSync(fb, bb, 0, bb.length, pos);
      if (na !== nb || !ba.subarray(0, na).equals(bb.subarray(0, nb))) return false;
      if (na === 0) return true;
    }
  } finally {
    fs.closeSync(fa);
    fs.closeSync(fb);
  }
}

async function map(dir: string): Promise<string> {
  const r = await qemuImg(['map', '--output=json', 'i.qcow2'], dir);
  assert.equal(r.code, 0, r.stderr);
  return r.stdout;
}

for (const c of cases) {
  test(`freed clusters are reused as qemu-io does: ${c.name}`, oracle(), async () => {
    const root = scratch();
    const q = path.join(root, 'q'), ch = path.join(root, 'c');
    fs.mkdirSync(q);
    build(c, q);
    fs.cpSync(q, ch, { recursive: true });
    const args = c.cmds.flatMap((x) => ['-c', x]);
    const rq = await qemuIo([...args, 'i.qcow2'], q);
    const rc = await qchain(['io', ...args, 'i.qcow2'], ch);
    assert.equal(rq.code, 0, rq.stdout + rq.stderr);
    assert.equal(rc.code, 0, rc.stdout + rc.stderr);
    assert.equal(rc.stderr, rq.stderr);
    const fq = path.join(q, 'i.qcow2'), fc = path.join(ch, 'i.qcow2');
    if (!sameBytes(fc, fq)) {
      assert.equal(await map(ch), await map(q), 'qemu-img map --output=json');
      assert.equal(fs.statSync(fc).size, fs.statSync(fq).size, 'file size');
      assert.fail('the files differ (same map and size)');
    }
    const chk = await qemuImg(['check', 'i.qcow2'], ch);
    assert.equal(chk.code, 0, chk.stdout + chk.stderr);
  });
}

test('a compressed write after its partly used cluster was freed and reused: a new cluster (QEMU 7.2 overwrites the data)', oracle(), async () => {
  const dir = scratch();
  qemuImgSync(['create', '-q', '-f', 'qcow2', 'i.qcow2', '8M'], dir);
  const cmds = ['write -c -P 1 0 64k', 'discard 0 64k', 'write -P 3 1M 64k', 'write -c -P 2 64k 64k', 'read -P 3 1M 64k', 'read -P 2 64k 64k'];
  const r = await qchain(['io', ...cmds.flatMap((x) => ['-c', x]), 'i.qcow2'], dir);
  assert.equal(r.code, 0, r.stderr);
  assert.doesNotMatch(r.stdout, /Pattern verification failed/);
  const chk = await qemuImg(['check', 'i.qcow2'], dir);
  assert.equal(chk.code, 0, chk.stdout + chk.stderr);
  const again = await qemuIo(['-c', 'read -P 3 1M 64k', '-c', 'read -P 2 64k 64k', 'i.qcow2'], dir);
  assert.doesNotMatch(again.stdout, /Pattern verification failed/);
});
