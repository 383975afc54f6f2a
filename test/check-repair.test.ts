/**
 * `check -r` against qemu-img 7.2 on damaged snapshot tables and leaked clusters: the same report
 * (stdout, stderr, exit status) and the same repaired file, byte for byte. Each tool repairs its
 * own copy of the image.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { oracle, qchain, qemuImg, qemuImgSync, scratch } from './helpers/qemu.js';
import * as craft from './helpers/craft.js';

/** A 1 MiB image with one 64 KiB data cluster (L2 at 0x40000, data at 0x50000), patched. */
function image(dir: string, patch: (f: string) => void, snapshot = false): string {
  const f = craft.makeQcow2(dir, 'img.qcow2', { writes: ['write -P 0xaa 0 64k'] });
  if (snapshot) qemuImgSync(['snapshot', '-c', 's1', f]);
  patch(f);
  return f;
}

async function sameRepair(name: string, build: (dir: string) => string, args: string[]): Promise<void> {
  const base = scratch('qchain-check-repair-');
  const q = path.join(base, 'q'), m = path.join(base, 'm');
  fs.mkdirSync(q);
  fs.mkdirSync(m);
  const src = build(base);
  fs.copyFileSync(src, path.join(q, 'img.qcow2'));
  fs.copyFileSync(src, path.join(m, 'img.qcow2'));
  const qr = await qemuImg(['check', ...args, 'img.qcow2'], q);
  const mr = await qchain(['img', 'check', ...args, 'img.qcow2'], m);
  assert.equal(mr.stderr, qr.stderr, `${name}: stderr`);
  assert.equal(mr.stdout, qr.stdout, `${name}: stdout`);
  assert.equal(mr.code, qr.code, `${name}: exit status`);
  assert.ok(fs.readFileSync(path.join(m, 'img.qcow2')).equals(fs.readFileSync(path.join(q, 'img.qcow2'))), `${name}: repaired files differ`);
}

test('check -r all rewrites a snapshot table with incomplete entries as qemu-img does', oracle(), async () => {
  // Entry 1 of 2 is read from the zeros after the real table: "snapshot table entry 1 is incomplete".
  await sameRepair('nb_snapshots 2', (d) => image(d, (f) => craft.patchHeader(f, { nbSnapshots: 2 }), true), ['-r', 'all']);
  // The table lies past EOF: the old one cannot be freed ("qcow2_free_clusters failed").
  await sameRepair('table past EOF', (d) => image(d, (f) => craft.patchHeader(f, { nbSnapshots: 1, snapshotsOffset: 0x100000 })), ['-r', 'all']);
  // 65536 entries read as zeros past EOF: the new table would overwrite the old one's (uncounted)
  // clusters; QEMU's overlap check marks the image corrupt and the check fails.
  await sameRepair('65536 entries past EOF', (d) => image(d, (f) => craft.patchHeader(f, { nbSnapshots: 65536, snapshotsOffset: 0x60000 })), ['-r', 'all']);
  // Without a repair mode nothing changes and the entries are reported as errors.
  await sameRepair('no repair', (d) => image(d, (f) => craft.patchHeader(f, { nbSnapshots: 2 }), true), []);
});

test('check -r all drops too much extra data in a snapshot table entry as qemu-img does', oracle(), async () => {
  await sameRepair('extra_data_size 2048', (d) => image(d, (f) => craft.patchU32(f, craft.readHeader(f).snapshotsOffset + 36, 2048), true), ['-r', 'all']);
});

test('check -r reports each repaired cluster twice (found, then repaired), as qemu-img does', oracle(), async () => {
  // Cluster 6 (appended) has refcount 1 and no reference.
  const leak = (d: string): string => image(d, (f) => {
    fs.truncateSync(f, 7 * 65536);
    craft.patchBytes(f, Number(craft.getRefcountTableEntry(f, 0)) + 2 * 6, Buffer.from([0, 1]));
  });
  await sameRepair('-r leaks', leak, ['-r', 'leaks']);
  // And a refcount without its reference plus a reference without its refcount: -r leaks gives up.
  await sameRepair('-r leaks, rebuild needed', (d) => image(d, (f) => {
    fs.truncateSync(f, 7 * 65536);
    const rb = Number(craft.getRefcountTableEntry(f, 0));
    craft.patchBytes(f, rb + 2 * 6, Buffer.from([0, 1]));
    craft.patchBytes(f, rb + 2 * 5, Buffer.from([0, 0]));
  }), ['-r', 'leaks']);
});

test('check -r all rebuilds refcounts where qemu-img does (first free clusters) and repairs the old structure', oracle(), async () => {
  const refblock = (f: string): number => Number(craft.getRefcountTableEntry(f, 0));
  // The L2 table's refcount dropped to 0.
  await sameRepair('L2 refcount 0', (d) => image(d, (f) => craft.patchBytes(f, refblock(f) + 2 * 4, Buffer.from([0, 0]))), ['-r', 'all']);
  // No refcount block at all.
  await sameRepair('reftable entry 0', (d) => image(d, (f) => craft.setRefcountTableEntry(f, 0, 0)), ['-r', 'all']);
  // A leak next to a missing refcount.
  await sameRepair('leak + missing refcount', (d) => image(d, (f) => {
    fs.truncateSync(f, 7 * 65536);
    craft.patchBytes(f, refblock(f) + 2 * 6, Buffer.from([0, 1]));
    craft.patchBytes(f, refblock(f) + 2 * 5, Buffer.from([0, 0]));
  }), ['-r', 'all']);
  // 512-byte clusters, 1-bit refcounts: several refcount blocks.
  await sameRepair('narrow refcounts', (d) => {
    const f = craft.makeQcow2(d, 'img.qcow2', { options: 'cluster_size=512,refcount_bits=1', writes: ['write -P 0xaa 0 300k'] });
    craft.patchBytes(f, refblock(f), Buffer.from([0]));
    return f;
  }, ['-r', 'all']);
});
