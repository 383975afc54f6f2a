/**
 * blockdev-backup / drive-backup details against qemu-storage-daemon 7.2, each with the same QMP
 * sequence on both: sync=full writes the source's unallocated areas as zeroes (zero clusters on a
 * qcow2 target); the copy granule is max(64 KiB, the target's cluster size) (job len/offset and
 * the target's layout); a protocol (file) node is accepted as target (written as raw);
 * drive-backup mode=existing may open a file another node already has open when that node does
 * not unshare write (a protocol node, a read-only raw node; a qcow2 node does, read-only or not). Each target must read
 * back the source as it was at job start, and its map kinds (data/zero/unallocated) must be QSD's.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { mapKinds, oracle, qemuImg, qemuIo, scratch } from './helpers/qemu.js';
import type { QmpMessage } from './helpers/qmp-client.js';
import { M, MONITOR, jobEvent, onBoth, qcow2Node, quit, withDaemon, type Tool } from './helpers/live-qmp.js';

/** Not a multiple of 64 KiB (nor 128 KiB): the last granule is partial. */
const SIZE = 16 * M + 40960;

/**
 * src.qcow2: data, a granule only partly data (4 KiB of 64 KiB, the rest unallocated), zero
 * clusters, a zeroed hole in data, data up to the unaligned end, the rest unallocated.
 */
async function source(dir: string): Promise<void> {
  fs.mkdirSync(dir, { recursive: true });
  assert.equal((await qemuImg(['create', '-q', '-f', 'qcow2', 'src.qcow2', String(SIZE)], dir)).code, 0);
  const w = await qemuIo(['-c', 'write -q -P 0x11 0 1M', '-c', `write -q -P 0x22 ${2 * M} 4k`, '-c', `write -q -P 0x23 ${3 * M + 65536 + 8192} 4k`,
    '-c', 'write -q -z 4M 1M', '-c', 'write -q -P 0x33 6M 2M', '-c', `write -q -z ${7 * M} 256k`,
    '-c', `write -q -P 0x44 ${16 * M - 65536} ${65536 + 40960}`, 'src.qcow2'], dir);
  assert.equal(w.code, 0, w.stderr);
}

function norm(m: QmpMessage): Record<string, unknown> {
  const c = JSON.parse(JSON.stringify(m)) as Record<string, unknown>;
  delete c.timestamp;
  // QEMU's implicit node names end in two random digits.
  return JSON.parse(JSON.stringify(c).replace(/#block\d+/g, '#blockN')) as Record<string, unknown>;
}

/** `qemu-img compare` of the source and a target (0: same contents). */
async function same(dir: string, target: string, fmt = 'qcow2'): Promise<string> {
  const c = await qemuImg(['compare', '-f', 'qcow2', '-F', fmt, 'src.qcow2', target], dir);
  return c.code === 0 ? 'same' : `${c.code}: ${c.stdout}${c.stderr}`;
}

/** Run blockdev-backups one after another; the replies and the BLOCK_JOB_COMPLETED events. */
async function backups(q: { execute: (c: string, a?: Record<string, unknown>, id?: unknown) => Promise<QmpMessage>; waitFor: (p: (m: QmpMessage) => boolean, t?: number) => Promise<QmpMessage>; received: QmpMessage[] },
  cmds: Array<[string, Record<string, unknown>]>): Promise<unknown[]> {
  const out: unknown[] = [];
  for (const [cmd, args] of cmds) {
    const r = await q.execute(cmd, args, args['job-id']);
    out.push(norm(r));
    if ('return' in r) await q.waitFor(jobEvent(String(args['job-id']), 'null'), 60000);
  }
  return [...out, ...q.received.filter((m) => m.event === 'BLOCK_JOB_COMPLETED').map(norm)];
}

describe('backup fidelity vs qemu-storage-daemon', oracle(), () => {
  test('sync=full writes unallocated areas as zeroes: QSD\'s replies, events and target map', async () => {
    const res = await onBoth(scratch('qchain-backup-fid-full-'), async (tool: Tool, dir: string) => {
      await source(dir);
      assert.equal((await qemuImg(['create', '-q', '-f', 'qcow2', 'tgt.qcow2', String(SIZE)], dir)).code, 0);
      return withDaemon(tool, dir, [...qcow2Node('src'), ...qcow2Node('tgt'), ...MONITOR], async (d) => {
        await d.q.execute('qmp_capabilities', undefined, 'caps');
        const msgs = await backups(d.q, [['blockdev-backup', { 'job-id': 'b', device: 'src', target: 'tgt', sync: 'full' }]]);
        await quit(d, 'quit');
        return { msgs, same: await same(dir, 'tgt.qcow2'), map: await mapKinds(dir, 'tgt.qcow2') };
      });
    });
    for (const tool of ['qemu', 'qchain'] as const) assert.equal(res[tool].same, 'same', tool);
    assert.deepEqual(res.qchain.msgs, res.qemu.msgs);
    assert.deepEqual(res.qchain.map, res.qemu.map);
  });

  test('the copy granule is max(64 KiB, the target\'s cluster size): job len/offset and target maps as QSD\'s', async () => {
    const res = await onBoth(scratch('qchain-backup-fid-cs-'), async (tool: Tool, dir: string) => {
      await source(dir);
      for (const [f, cs] of [['big.qcow2', '262144'], ['small.qcow2', '4096']]) {
        assert.equal((await qemuImg(['create', '-q', '-f', 'qcow2', '-o', `cluster_size=${cs}`, f, String(SIZE)], dir)).code, 0);
      }
      return withDaemon(tool, dir, [...qcow2Node('src'), ...qcow2Node('big'), ...qcow2Node('small'), ...MONITOR], async (d) => {
        await d.q.execute('qmp_capabilities', undefined, 'caps');
        const msgs = await backups(d.q, [['blockdev-backup', { 'job-id': 'big', device: 'src', target: 'big', sync: 'full' }],
          ['blockdev-backup', { 'job-id': 'small', device: 'src', target: 'small', sync: 'full' }]]);
        await quit(d, 'quit');
        return { msgs, same: [await same(dir, 'big.qcow2'), await same(dir, 'small.qcow2')], maps: [await mapKinds(dir, 'big.qcow2'), await mapKinds(dir, 'small.qcow2')] };
      });
    });
    for (const tool of ['qemu', 'qchain'] as const) assert.deepEqual(res[tool].same, ['same', 'same'], tool);
    assert.deepEqual(res.qchain.msgs, res.qemu.msgs);
    assert.deepEqual(res.qchain.maps, res.qemu.maps);
  });
  test('a protocol (file) node as target: written as raw, QSD\'s replies and map; one under raw taken, one under qcow2 refused, as QSD', async () => {
    const res = await onBoth(scratch('qchain-backup-fid-file-'), async (tool: Tool, dir: string) => {
      await source(dir);
      for (const f of ['tgt.raw', 'blk.raw']) assert.equal((await qemuImg(['create', '-q', '-f', 'raw', f, String(SIZE)], dir)).code, 0);
      for (const f of ['q.qcow2', 'p.qcow2']) assert.equal((await qemuImg(['create', '-q', '-f', 'qcow2', f, String(SIZE)], dir)).code, 0);
      // p.qcow2's file as long as the source's disk: the size check passes, the permissions do not.
      fs.truncateSync(`${dir}/p.qcow2`, SIZE);
      const args = [...qcow2Node('src'), '--blockdev', 'driver=file,node-name=tf,filename=tgt.raw',
        '--blockdev', 'driver=file,node-name=bf,filename=blk.raw', '--blockdev', 'driver=raw,node-name=braw,file=bf', ...qcow2Node('q'), ...qcow2Node('p'), ...MONITOR];
      return withDaemon(tool, dir, args, async (d) => {
        await d.q.execute('qmp_capabilities', undefined, 'caps');
        const msgs = await backups(d.q, [['blockdev-backup', { 'job-id': 'underq', device: 'src', target: 'q-file', sync: 'full' }],
          ['blockdev-backup', { 'job-id': 'underp', device: 'src', target: 'p-file', sync: 'full' }],
          ['blockdev-backup', { 'job-id': 'under', device: 'src', target: 'bf', sync: 'full' }],
          ['blockdev-backup', { 'job-id': 'f', device: 'src', target: 'tf', sync: 'full' }]]);
        // The job is gone: the file node can go too.
        msgs.push(norm(await d.q.execute('blockdev-del', { 'node-name': 'tf' }, 'del')));
        await quit(d, 'quit');
        return { msgs, same: [await same(dir, 'tgt.raw', 'raw'), await same(dir, 'blk.raw', 'raw')], map: await mapKinds(dir, 'tgt.raw', 'raw') };
      });
    });
    for (const tool of ['qemu', 'qchain'] as const) assert.deepEqual(res[tool].same, ['same', 'same'], tool);
    assert.deepEqual(res.qchain.msgs, res.qemu.msgs);
    assert.deepEqual(res.qchain.map, res.qemu.map);
  });
});

describe('drive-backup mode=existing on an open file vs qemu-storage-daemon', oracle(), () => {
  test('a file a qcow2 node has open (read-write or read-only) is refused with QSD\'s error; one a protocol node or a read-only raw node has open is taken', async () => {
    const res = await onBoth(scratch('qchain-backup-fid-open-'), async (tool: Tool, dir: string) => {
      await source(dir);
      for (const f of ['rw.qcow2', 'ro.qcow2', 'fo.qcow2', 'rr.qcow2']) assert.equal((await qemuImg(['create', '-q', '-f', 'qcow2', f, String(SIZE)], dir)).code, 0);
      // fo.qcow2 open as a protocol node only; rr.qcow2 as a read-only raw node over its file.
      const args = [...qcow2Node('src'), ...qcow2Node('rw'), ...qcow2Node('ro', ',read-only=on'), '--blockdev', 'driver=file,node-name=fo,filename=fo.qcow2',
        '--blockdev', 'driver=file,node-name=rr-file,filename=rr.qcow2', '--blockdev', 'driver=raw,node-name=rr,file=rr-file,read-only=on', ...MONITOR];
      return withDaemon(tool, dir, args, async (d) => {
        await d.q.execute('qmp_capabilities', undefined, 'caps');
        const msgs = await backups(d.q, [['drive-backup', { 'job-id': 'rw', device: 'src', target: 'rw.qcow2', format: 'qcow2', mode: 'existing', sync: 'full' }],
          ['drive-backup', { 'job-id': 'ro', device: 'src', target: 'ro.qcow2', format: 'qcow2', mode: 'existing', sync: 'full' }],
          ['drive-backup', { 'job-id': 'fo', device: 'src', target: 'fo.qcow2', format: 'qcow2', mode: 'existing', sync: 'full' }],
          ['drive-backup', { 'job-id': 'rr', device: 'src', target: 'rr.qcow2', format: 'qcow2', mode: 'existing', sync: 'full' }]]);
        await quit(d, 'quit');
        return { msgs, same: [await same(dir, 'fo.qcow2'), await same(dir, 'rr.qcow2')] };
      });
    });
    for (const tool of ['qemu', 'qchain'] as const) assert.deepEqual(res[tool].same, ['same', 'same'], tool);
    assert.deepEqual(res.qchain.msgs, res.qemu.msgs);
  });
});
