/**
 * qcow2 cache options (l2-cache-size, refcount-cache-size, cache-size): QEMU's resolution rules,
 * blockdev-add's checks side by side with qemu-storage-daemon, and a daemon whose L2 cache is far
 * smaller than the image's tables serving correct data.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { resolveCacheSizes } from '../src/qcow2/cache-sizes.js';
import { oracle, qemuImg, qemuIo, scratch } from './helpers/qemu.js';
import { MONITOR, QSD, blockdevAddReplies, nbdUri, onBoth, quit, withDaemon } from './helpers/live-qmp.js';

const K = 1024, M = 1024 * K, G = 1024 * M;

test('cache sizes resolve as QEMU resolves them', () => {
  const c64 = 64 * K;
  // Defaults: the caller's L2 default, 256 refcount blocks.
  assert.deepEqual(resolveCacheSizes({}, G, c64, 8), { l2Bytes: 32 * M, refcountBlocks: 256 });
  assert.deepEqual(resolveCacheSizes({}, G, c64, 8, 16 * M), { l2Bytes: 16 * M, refcountBlocks: 256 });
  assert.equal(resolveCacheSizes({ l2CacheBytes: M }, G, c64, 8).l2Bytes, M);
  assert.equal(resolveCacheSizes({ refcountCacheBytes: M }, G, c64, 8).refcountBlocks, 16);
  // cache-size alone: L2 gets what the whole image needs (1 GiB: 128 KiB of entries) when that fits beside 4 clusters.
  assert.deepEqual(resolveCacheSizes({ cacheSize: 4 * M }, G, c64, 8), { l2Bytes: 128 * K, refcountBlocks: 62 });
  // ... else everything but the 4-cluster refcount minimum.
  assert.deepEqual(resolveCacheSizes({ cacheSize: M }, 1024 * G, c64, 8), { l2Bytes: M - 256 * K, refcountBlocks: 4 });
  // Extended L2 entries are 16 bytes.
  assert.equal(resolveCacheSizes({ cacheSize: 4 * M }, G, c64, 16).l2Bytes, 256 * K);
  // With one of the others, cache-size minus it.
  assert.deepEqual(resolveCacheSizes({ cacheSize: 4 * M, l2CacheBytes: M }, G, c64, 8), { l2Bytes: M, refcountBlocks: 48 });
  assert.deepEqual(resolveCacheSizes({ cacheSize: 4 * M, refcountCacheBytes: M }, G, c64, 8), { l2Bytes: 3 * M, refcountBlocks: 16 });
  assert.throws(() => resolveCacheSizes({ cacheSize: M, l2CacheBytes: 2 * M }, G, c64, 8), { message: 'l2-cache-size may not exceed cache-size' });
  assert.throws(() => resolveCacheSizes({ cacheSize: M, refcountCacheBytes: 2 * M }, G, c64, 8), /refcount-cache-size may not exceed cache-size/);
  assert.throws(() => resolveCacheSizes({ cacheSize: 3, l2CacheBytes: 1, refcountCacheBytes: 1 }, G, c64, 8),
    /cache-size, l2-cache-size and refcount-cache-size may not be set at the same time/);
  assert.throws(() => resolveCacheSizes({ l2CacheBytes: -1 }, G, c64, 8), /Parameter 'l2-cache-size' expects a non-negative number below 2\^64/);
});

const ADDS: Array<Record<string, unknown>> = [
  { 'l2-cache-size': 2 * M, 'cache-size': M },
  { 'cache-size': 4 * M },
  { 'l2-cache-size': -1 },
  { 'l2-cache-size': 'x' },
  { 'l2-cache-size': 1000 },
  { 'l2-cache-size': 1, 'cache-size': 2, 'refcount-cache-size': 1 },
  { 'refcount-cache-size': 2 * M, 'cache-size': M },
  { 'l2-cache-size': 0 },
  { 'refcount-cache-size': 256 * K },
];

test('blockdev-add cache options: the same replies as qemu-storage-daemon', { skip: oracle().skip ?? (fs.existsSync(QSD) ? undefined : 'no qemu-storage-daemon'), timeout: 60000 }, async () => {
  const root = scratch('qchain-cacheopt-');
  const { qemu, qchain } = await onBoth(root, (tool, dir) => blockdevAddReplies(tool, dir, ADDS));
  assert.deepEqual(qchain, qemu);
  assert.ok(qemu.some((r) => 'error' in (r as object)) && qemu.some((r) => 'return' in (r as object)));
});

test('a daemon node with a tiny L2 cache serves every table correctly (QEMU reads the result)', { skip: oracle().skip, timeout: 60000 }, async () => {
  const dir = scratch('qchain-tinyl2-');
  // 4 KiB clusters: one L2 table maps 2 MiB, so 48 MiB spans 24 tables against a cache of 16.
  assert.equal((await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', 'd.qcow2', '48M'], dir)).code, 0);
  const args = ['--blockdev', 'driver=file,node-name=f,filename=d.qcow2', '--blockdev', 'driver=qcow2,node-name=d,file=f,l2-cache-size=4k,refcount-cache-size=16k',
    '--nbd-server', 'addr.type=unix,addr.path=nbd.sock', '--export', 'type=nbd,id=e,node-name=d,name=vda,writable=on', ...MONITOR];
  await withDaemon('qchain', dir, args, async (d) => {
    await d.q.execute('qmp_capabilities');
    const writes: string[] = [];
    const reads: string[] = [];
    // Twice over every table, in an order that evicts between visits.
    for (let pass = 0; pass < 2; pass++) {
      for (let t = 0; t < 24; t++) {
        const off = ((t * 7) % 24) * 2 * M + pass * 64 * K;
        writes.push('-c', `write -q -P ${1 + ((t + pass) % 250)} ${off} 8k`);
        reads.push('-c', `read -q -P ${1 + ((t + pass) % 250)} ${off} 8k`);
      }
    }
    const w = await qemuIo(['-f', 'raw', ...writes, nbdUri(dir)], dir);
    assert.equal(w.code, 0, w.stderr + w.stdout);
    const r = await qemuIo(['-f', 'raw', ...reads, nbdUri(dir)], dir);
    assert.equal(r.code, 0, r.stderr + r.stdout);
    assert.equal(r.stdout.includes('Pattern verification failed'), false, r.stdout);
    await quit(d);
  });
  const c = await qemuImg(['check', path.join(dir, 'd.qcow2')]);
  assert.equal(c.code, 0, c.stdout + c.stderr);
  const r = await qemuIo(['-c', `read -q -P ${1 + ((5 + 1) % 250)} ${((5 * 7) % 24) * 2 * M + 64 * K} 8k`, path.join(dir, 'd.qcow2')]);
  assert.equal(r.code, 0, r.stderr);
  assert.equal(r.stdout.includes('Pattern verification failed'), false, r.stdout);
});
