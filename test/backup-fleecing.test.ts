/**
 * Image fleecing over QMP, against qemu-storage-daemon and qchain: a qcow2 overlay whose backing
 * is the live source node, blockdev-backup sync=none into it, the overlay exported read-only over
 * NBD. The guest writes random non-overlapping batches to the source export; after each batch the
 * fleecing export (read with nbdcopy and qemu-img convert) must still show the disk as it was when
 * the job started. Then the job is cancelled. Replies, events and the overlay's own clusters must
 * match QSD's.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { oracle, qemuImg, qemuIo, qemuRawView, rng, scratch } from './helpers/qemu.js';
import type { QmpMessage } from './helpers/qmp-client.js';
import { daemonArgs, exportView, jobEvent, nbdUri, onBoth, quit, repliesThenEvents, withDaemon, type Tool } from './helpers/live-qmp.js';

const SIZE = 16 * 1024 * 1024;
const ARGS = daemonArgs('disk.qcow2', 'disk');

function norm(m: QmpMessage): Record<string, unknown> {
  const c = JSON.parse(JSON.stringify(m)) as Record<string, unknown>;
  delete c.timestamp;
  if ('QMP' in c) return { QMP: 'greeting' };
  return c;
}

/** Random non-overlapping guest writes: `batches` lists of qemu-io commands (4 KiB aligned). */
function writeBatches(seed: number, batches: number, perBatch: number): string[][] {
  const r = rng(seed);
  const used: Array<[number, number]> = [];
  const out: string[][] = [];
  for (let b = 0; b < batches; b++) {
    const cmds: string[] = [];
    while (cmds.length < perBatch) {
      const len = (1 + Math.floor(r() * 48)) * 4096;
      const off = Math.floor(r() * ((SIZE - len) / 4096)) * 4096;
      if (used.some(([a, e]) => off < e && a < off + len)) continue;
      used.push([off, off + len]);
      cmds.push(r() < 0.2 ? `write -q -z ${off} ${len}` : `write -q -P 0x${(0x40 + cmds.length + b * 16).toString(16)} ${off} ${len}`);
    }
    out.push(cmds);
  }
  return out;
}

async function setup(dir: string): Promise<void> {
  fs.mkdirSync(dir, { recursive: true });
  assert.equal((await qemuImg(['create', '-q', '-f', 'qcow2', 'disk.qcow2', '16M'], dir)).code, 0);
  assert.equal((await qemuImg(['create', '-q', '-f', 'qcow2', 'fleece.qcow2', '16M'], dir)).code, 0);
  const w = await qemuIo(['-c', 'write -q -P 0xaa 0 3M', '-c', 'write -q -z 4M 1M', '-c', 'write -q -P 0xab 8M 2M', '-c', 'write -q -P 0xac 13M 512k', 'disk.qcow2'], dir);
  assert.equal(w.code, 0, w.stderr);
}

async function session(tool: Tool, dir: string): Promise<unknown[]> {
  return withDaemon(tool, dir, ARGS, async (d) => {
    const { q } = d;
    await q.execute('qmp_capabilities', undefined, 'c0');
    const start = await exportView(dir, 'vda', 'qemu-img');
    await q.execute('blockdev-add', { driver: 'file', 'node-name': 'fl-file', filename: path.join(dir, 'fleece.qcow2') }, 'c1');
    await q.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'fleece', file: 'fl-file', backing: 'disk' }, 'c2');
    await q.execute('blockdev-backup', { 'job-id': 'fl', device: 'disk', target: 'fleece', sync: 'none' }, 'c3');
    await q.execute('block-export-add', { type: 'nbd', id: 'fexp', 'node-name': 'fleece', name: 'fleece' }, 'c4');
    // The fleecing view before any write.
    assert.ok((await exportView(dir, 'fleece', 'nbdcopy')).equals(start), `${tool}: fleecing view at start`);
    const batches = writeBatches(222, 3, 6);
    for (const [i, cmds] of batches.entries()) {
      const r = await qemuIo(['-f', 'raw', ...cmds.flatMap((c) => ['-c', c]), nbdUri(dir)]);
      assert.equal(r.code, 0, r.stderr);
      const how = i % 2 ? 'qemu-img' : 'nbdcopy';
      assert.ok((await exportView(dir, 'fleece', how)).equals(start), `${tool}: fleecing view after batch ${i} (${how})`);
      await q.execute('query-block-jobs', undefined, `j${i}`);
    }
    assert.ok(!(await exportView(dir, 'vda', 'qemu-img')).equals(start), 'the guest changed the disk');
    await q.execute('block-job-cancel', { device: 'fl' }, 'c5');
    await q.waitFor(jobEvent('fl', 'null'));
    await q.execute('query-block-jobs', undefined, 'c6');
    await q.execute('block-export-del', { id: 'fexp' }, 'c7');
    await q.waitFor((m) => m.event === 'BLOCK_EXPORT_DELETED');
    await q.execute('blockdev-del', { 'node-name': 'fleece' }, 'c8');
    await q.execute('blockdev-del', { 'node-name': 'fl-file' }, 'c9');
    await quit(d, 'q');
    return repliesThenEvents(q.received.map(norm));
  });
}

describe('image fleecing (blockdev-backup sync=none) vs qemu-storage-daemon', oracle(), () => {
  test('point-in-time view over NBD under random guest writes; cancel; same replies, events and overlay', async () => {
    const root = scratch('qchain-fleece-');
    const res = await onBoth(root, async (tool, dir) => {
      await setup(dir);
      const log = await session(tool, dir);
      const c = await qemuImg(['check', path.join(dir, 'fleece.qcow2')]);
      assert.equal(c.code, 0, `${tool}: ${c.stdout}`);
      return { log, overlay: await qemuRawView(path.join(dir, 'fleece.qcow2')), disk: await qemuRawView(path.join(dir, 'disk.qcow2')) };
    });
    assert.deepEqual(res.qchain.log, res.qemu.log);
    assert.ok(res.qchain.overlay.equals(res.qemu.overlay), 'the overlay holds the same copied clusters');
    assert.ok(res.qchain.disk.equals(res.qemu.disk), 'the disk ends the same');
  });
});

describe('image fleecing under concurrent reads and writes (qchain daemon)', oracle(), () => {
  test('reads of the fleecing export racing guest writes still show the point in time', async () => {
    const dir = path.join(scratch('qchain-fleece-race-'), 'd');
    await setup(dir);
    await withDaemon('qchain', dir, ARGS, async (d) => {
      const { q } = d;
      await q.execute('qmp_capabilities');
      const start = await exportView(dir, 'vda', 'qemu-img');
      await q.execute('blockdev-add', { driver: 'file', 'node-name': 'fl-file', filename: path.join(dir, 'fleece.qcow2') });
      await q.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'fleece', file: 'fl-file', backing: 'disk' });
      await q.execute('blockdev-backup', { 'job-id': 'fl', device: 'disk', target: 'fleece', sync: 'none' });
      await q.execute('block-export-add', { type: 'nbd', id: 'fexp', 'node-name': 'fleece', name: 'fleece' });
      // Guest batches (in flight together, never overlapping) while 4 KiB reads of the fleecing
      // export sweep the same ranges at the same time.
      const batches = writeBatches(333, 4, 8);
      for (const cmds of batches) {
        const writer = qemuIo(['-f', 'raw', ...cmds.flatMap((c) => ['-c', c.replace(/^write /, 'aio_write ')]), '-c', 'aio_flush', nbdUri(dir)]);
        const view = exportView(dir, 'fleece', 'nbdcopy');
        const [w, v] = await Promise.all([writer, view]);
        assert.equal(w.code, 0, w.stderr);
        if (!v.equals(start)) {
          let i = 0;
          while (i < v.length && v[i] === start[i]) i++;
          assert.fail(`the fleecing view changed at byte ${i} while the guest wrote`);
        }
      }
      assert.ok(!(await exportView(dir, 'vda', 'qemu-img')).equals(start), 'the guest changed the disk');
      await q.execute('block-job-cancel', { device: 'fl' });
      await q.waitFor(jobEvent('fl', 'null'));
      await quit(d);
    });
  });
});
