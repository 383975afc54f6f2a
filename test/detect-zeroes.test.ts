/**
 * detect-zeroes=on|unmap on a qcow2 node: a guest write whose buffer is all zeroes becomes a
 * zero write (deallocating with unmap). The same image and guest writes over NBD go to
 * qemu-storage-daemon and `qchain daemon`; `qemu-img map --output=json` of the results (zero
 * flags, allocation) and the node listings' detect_zeroes must match.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { oracle, qemuImg, qemuIo, scratch } from './helpers/qemu.js';
import { QSD, guest, onBoth, quit, serve, withDaemon } from './helpers/live-qmp.js';
import { isZero } from '../src/util/zero.js';

const K = 1024, M = 1024 * K;

test('isZero tells zero buffers from others at any length and offset', () => {
  for (const n of [0, 1, 7, 8, 4095, 64 * K, 64 * K + 1, 200 * K + 3]) {
    const b = Buffer.alloc(n + 5).subarray(3, 3 + n);
    assert.equal(isZero(b), true, `zeros ${n}`);
    for (const at of n ? [0, n - 1, Math.floor(n / 2), Math.min(n - 1, 64 * K)] : []) {
      b[at] = 1;
      assert.equal(isZero(b), false, `byte ${at} of ${n}`);
      b[at] = 0;
    }
  }
});

/** Data first (offline), then zero writes over data, over unallocated clusters, partial and whole. */
const PREFILL = ['write -P 0x11 1M 256k', 'write -P 0x22 2M 64k', 'write -P 0x33 4M 64k'];
const GUEST = [
  'write -P 0 0 128k', // unallocated, whole clusters
  'write -P 0 1M 128k', // data, whole clusters
  'write -P 0 2M 4k', // data, head of a cluster: written as data
  'write -P 0 3M 4k', // unallocated, part of a cluster: the cluster is zeroed whole
  'write -P 0 4M 32k', // data, half a cluster
  'write -P 0x44 5M 64k', // not zeroes
  'write -P 0 6M 1M', // unallocated, a larger request
];

interface MapEntry { start: number; length: number; zero: boolean; data: boolean; present: boolean; offset?: number }

/** A map without host offsets (a job's parallel copies place clusters in any order), runs merged. */
function guestMap(map: MapEntry[]): MapEntry[] {
  const out: MapEntry[] = [];
  for (const { start, length, zero, data, present } of map) {
    const last = out[out.length - 1];
    if (last && last.zero === zero && last.data === data && last.present === present) last.length += length;
    else out.push({ start, length, zero, data, present });
  }
  return out;
}

async function session(tool: 'qemu' | 'qchain', dir: string, opts: string, fileOpts = ''): Promise<{ map: unknown; listing: unknown; size: number }> {
  fs.mkdirSync(dir, { recursive: true });
  assert.equal((await qemuImg(['create', '-q', '-f', 'qcow2', 'd.qcow2', '16M'], dir)).code, 0);
  assert.equal((await qemuIo(PREFILL.flatMap((c) => ['-c', c]).concat(['d.qcow2']), dir)).code, 0);
  const args = ['--blockdev', `driver=file,node-name=d-file,filename=d.qcow2${fileOpts}`, '--blockdev', `driver=qcow2,node-name=d,file=d-file${opts}`, ...serve('d')];
  const listing = await withDaemon(tool, dir, args, async (d) => {
    await d.q.execute('qmp_capabilities');
    await guest(dir, GUEST);
    const r = await d.q.execute('query-named-block-nodes');
    await quit(d);
    return (r.return as Array<Record<string, unknown>>).map((n) => [n['node-name'], n.detect_zeroes]);
  });
  const map = await qemuImg(['map', '--output=json', 'd.qcow2'], dir);
  assert.equal(map.code, 0, map.stderr);
  const check = await qemuImg(['check', 'd.qcow2'], dir);
  assert.equal(check.code, 0, check.stdout + check.stderr);
  return { map: JSON.parse(map.stdout), listing, size: fs.statSync(`${dir}/d.qcow2`).size };
}

for (const [mode, opts] of [['on', ',detect-zeroes=on'], ['unmap', ',detect-zeroes=unmap,discard=unmap'], ['off', '']] as const) {
  test(`detect-zeroes=${mode}: the image a zero-writing guest leaves is qemu-storage-daemon's`, { skip: oracle().skip ?? (fs.existsSync(QSD) ? undefined : 'no qemu-storage-daemon'), timeout: 60000 }, async () => {
    const { qemu, qchain } = await onBoth(scratch(`qchain-dz-${mode}-`), (tool, dir) => session(tool, dir, opts));
    assert.deepEqual(qchain.map, qemu.map);
    assert.deepEqual(qchain.listing, qemu.listing);
    assert.deepEqual(qemu.listing, [['d', mode], ['d-file', 'off']]);
  });
}

test('detect-zeroes=on on the protocol node: the qcow2 driver\'s zero host writes leave qemu-storage-daemon\'s file and map', { skip: oracle().skip ?? (fs.existsSync(QSD) ? undefined : 'no qemu-storage-daemon'), timeout: 60000 }, async () => {
  const { qemu, qchain } = await onBoth(scratch('qchain-dz-file-'), (tool, dir) => session(tool, dir, '', ',detect-zeroes=on'));
  assert.deepEqual(qchain, qemu);
  assert.deepEqual(qemu.listing, [['d', 'off'], ['d-file', 'on']]);
});

test('detect-zeroes applies to the writes of a job into the node too (backup target)', { skip: oracle().skip ?? (fs.existsSync(QSD) ? undefined : 'no qemu-storage-daemon'), timeout: 60000 }, async () => {
  const { qemu, qchain } = await onBoth(scratch('qchain-dz-job-'), async (tool, dir) => {
    fs.mkdirSync(dir, { recursive: true });
    assert.equal((await qemuImg(['create', '-q', '-f', 'qcow2', 's.qcow2', '8M'], dir)).code, 0);
    assert.equal((await qemuImg(['create', '-q', '-f', 'qcow2', 't.qcow2', '8M'], dir)).code, 0);
    // Zeroes stored as data in the source (all of it allocated): a plain copy allocates them in the target.
    assert.equal((await qemuIo(['-c', 'write -P 0 0 1M', '-c', 'write -P 5 1M 5M', '-c', 'write -P 0 6M 2M', 's.qcow2'], dir)).code, 0);
    const args = ['--blockdev', 'driver=file,node-name=s-file,filename=s.qcow2', '--blockdev', 'driver=qcow2,node-name=s,file=s-file',
      '--blockdev', 'driver=file,node-name=t-file,filename=t.qcow2', '--blockdev', 'driver=qcow2,node-name=t,file=t-file,detect-zeroes=on', ...serve('s')];
    await withDaemon(tool, dir, args, async (d) => {
      await d.q.execute('qmp_capabilities');
      const r = await d.q.execute('blockdev-backup', { 'job-id': 'j', device: 's', target: 't', sync: 'full' });
      assert.ok('return' in r, JSON.stringify(r));
      await d.q.waitFor((m) => m.event === 'BLOCK_JOB_COMPLETED');
      await quit(d);
    });
    const map = await qemuImg(['map', '--output=json', 't.qcow2'], dir);
    assert.equal(map.code, 0, map.stderr);
    return guestMap(JSON.parse(map.stdout) as MapEntry[]);
  });
  assert.deepEqual(qchain, qemu);
  assert.deepEqual(qemu[0], { start: 0, length: M, zero: true, data: false, present: true });
});
