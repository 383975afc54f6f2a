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
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { QCHAIN, oracle, qemuImg, qemuIo, qemuRawView, rng, run, scratch } from './helpers/qemu.js';
import { QmpClient, type QmpMessage, waitForSocket } from './helpers/qmp-client.js';

const QSD = '/usr/bin/qemu-storage-daemon';
const SIZE = 16 * 1024 * 1024;

const ARGS = [
  '--blockdev', 'driver=file,node-name=disk-file,filename=disk.qcow2',
  '--blockdev', 'driver=qcow2,node-name=disk,file=disk-file',
  '--nbd-server', 'addr.type=unix,addr.path=nbd.sock',
  '--export', 'type=nbd,id=exp0,node-name=disk,name=vda,writable=on',
  '--chardev', 'socket,id=qmp0,path=qmp.sock,server=on,wait=off',
  '--monitor', 'chardev=qmp0',
];


function norm(m: QmpMessage): Record<string, unknown> {
  const c = JSON.parse(JSON.stringify(m)) as Record<string, unknown>;
  delete c.timestamp;
  if ('QMP' in c) return { QMP: 'greeting' };
  return c;
}

function jobEvent(id: string, status: string): (m: QmpMessage) => boolean {
  return (m) => m.event === 'JOB_STATUS_CHANGE' && (m.data as { id: string }).id === id && (m.data as { status: string }).status === status;
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

async function readExport(uri: string, dir: string, how: 'nbdcopy' | 'qemu-img'): Promise<Buffer> {
  const out = path.join(dir, 'fleece-view.raw');
  const r = how === 'nbdcopy' ? await run('nbdcopy', [uri, out]) : await qemuImg(['convert', '-f', 'raw', '-O', 'raw', uri, out]);
  assert.equal(r.code, 0, r.stderr);
  const b = fs.readFileSync(out);
  fs.unlinkSync(out);
  return b;
}

async function setup(dir: string): Promise<void> {
  fs.mkdirSync(dir, { recursive: true });
  assert.equal((await qemuImg(['create', '-q', '-f', 'qcow2', 'disk.qcow2', '16M'], dir)).code, 0);
  assert.equal((await qemuImg(['create', '-q', '-f', 'qcow2', 'fleece.qcow2', '16M'], dir)).code, 0);
  const w = await qemuIo(['-c', 'write -q -P 0xaa 0 3M', '-c', 'write -q -z 4M 1M', '-c', 'write -q -P 0xab 8M 2M', '-c', 'write -q -P 0xac 13M 512k', 'disk.qcow2'], dir);
  assert.equal(w.code, 0, w.stderr);
}

async function session(tool: 'qemu' | 'qchain', dir: string): Promise<unknown[]> {
  const child = tool === 'qemu' ? spawn(QSD, ARGS, { cwd: dir, stdio: 'ignore' })
    : spawn(process.execPath, [QCHAIN, 'daemon', ...ARGS], { cwd: dir, stdio: 'ignore' });
  const uri = (name: string): string => `nbd+unix:///${name}?socket=${path.join(dir, 'nbd.sock')}`;
  try {
    await waitForSocket(path.join(dir, 'qmp.sock'), child);
    await waitForSocket(path.join(dir, 'nbd.sock'), child);
    const q = await QmpClient.connect(path.join(dir, 'qmp.sock'));
    await q.waitFor((m) => 'QMP' in m);
    await q.execute('qmp_capabilities', undefined, 'c0');
    const start = await readExport(uri('vda'), dir, 'qemu-img');
    await q.execute('blockdev-add', { driver: 'file', 'node-name': 'fl-file', filename: path.join(dir, 'fleece.qcow2') }, 'c1');
    await q.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'fleece', file: 'fl-file', backing: 'disk' }, 'c2');
    await q.execute('blockdev-backup', { 'job-id': 'fl', device: 'disk', target: 'fleece', sync: 'none' }, 'c3');
    await q.execute('block-export-add', { type: 'nbd', id: 'fexp', 'node-name': 'fleece', name: 'fleece' }, 'c4');
    // The fleecing view before any write.
    assert.ok((await readExport(uri('fleece'), dir, 'nbdcopy')).equals(start), `${tool}: fleecing view at start`);
    const batches = writeBatches(222, 3, 6);
    for (const [i, cmds] of batches.entries()) {
      const r = await qemuIo(['-f', 'raw', ...cmds.flatMap((c) => ['-c', c]), uri('vda')]);
      assert.equal(r.code, 0, r.stderr);
      const how = i % 2 ? 'qemu-img' : 'nbdcopy';
      assert.ok((await readExport(uri('fleece'), dir, how)).equals(start), `${tool}: fleecing view after batch ${i} (${how})`);
      await q.execute('query-block-jobs', undefined, `j${i}`);
    }
    assert.ok(!(await readExport(uri('vda'), dir, 'qemu-img')).equals(start), 'the guest changed the disk');
    await q.execute('block-job-cancel', { device: 'fl' }, 'c5');
    await q.waitFor(jobEvent('fl', 'null'));
    await q.execute('query-block-jobs', undefined, 'c6');
    await q.execute('block-export-del', { id: 'fexp' }, 'c7');
    await q.waitFor((m) => m.event === 'BLOCK_EXPORT_DELETED');
    await q.execute('blockdev-del', { 'node-name': 'fleece' }, 'c8');
    await q.execute('blockdev-del', { 'node-name': 'fl-file' }, 'c9');
    await q.execute('quit', undefined, 'q');
    await new Promise((r) => child.once('exit', r));
    const msgs = q.received.map(norm);
    return [...msgs.filter((m) => !('event' in m)), ...msgs.filter((m) => 'event' in m)];
  } finally {
    if (child.exitCode === null) child.kill('SIGKILL');
  }
}

describe('image fleecing (blockdev-backup sync=none) vs qemu-storage-daemon', oracle(), () => {
  test('point-in-time view over NBD under random guest writes; cancel; same replies, events and overlay', async () => {
    const root = scratch('qchain-fleece-');
    const logs: Record<string, unknown[]> = {};
    const overlay: Record<string, Buffer> = {};
    const disk: Record<string, Buffer> = {};
    for (const tool of ['qemu', 'qchain'] as const) {
      const dir = path.join(root, tool);
      await setup(dir);
      logs[tool] = await session(tool, dir);
      const c = await qemuImg(['check', path.join(dir, 'fleece.qcow2')]);
      assert.equal(c.code, 0, `${tool}: ${c.stdout}`);
      overlay[tool] = await qemuRawView(path.join(dir, 'fleece.qcow2'));
      disk[tool] = await qemuRawView(path.join(dir, 'disk.qcow2'));
    }
    assert.deepEqual(logs.qchain, logs.qemu);
    assert.ok(overlay.qchain.equals(overlay.qemu), 'the overlay holds the same copied clusters');
    assert.ok(disk.qchain.equals(disk.qemu), 'the disk ends the same');
  });
});

describe('image fleecing under concurrent reads and writes (qchain daemon)', oracle(), () => {
  test('reads of the fleecing export racing guest writes still show the point in time', async () => {
    const dir = path.join(scratch('qchain-fleece-race-'), 'd');
    await setup(dir);
    const child = spawn(process.execPath, [QCHAIN, 'daemon', ...ARGS], { cwd: dir, stdio: 'ignore' });
    const uri = (name: string): string => `nbd+unix:///${name}?socket=${path.join(dir, 'nbd.sock')}`;
    try {
      await waitForSocket(path.join(dir, 'qmp.sock'), child);
      await waitForSocket(path.join(dir, 'nbd.sock'), child);
      const q = await QmpClient.connect(path.join(dir, 'qmp.sock'));
      await q.waitFor((m) => 'QMP' in m);
      await q.execute('qmp_capabilities');
      const start = await readExport(uri('vda'), dir, 'qemu-img');
      await q.execute('blockdev-add', { driver: 'file', 'node-name': 'fl-file', filename: path.join(dir, 'fleece.qcow2') });
      await q.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'fleece', file: 'fl-file', backing: 'disk' });
      await q.execute('blockdev-backup', { 'job-id': 'fl', device: 'disk', target: 'fleece', sync: 'none' });
      await q.execute('block-export-add', { type: 'nbd', id: 'fexp', 'node-name': 'fleece', name: 'fleece' });
      // Guest batches (in flight together, never overlapping) while 4 KiB reads of the fleecing
      // export sweep the same ranges at the same time.
      const batches = writeBatches(333, 4, 8);
      for (const cmds of batches) {
        const writer = qemuIo(['-f', 'raw', ...cmds.flatMap((c) => ['-c', c.replace(/^write /, 'aio_write ')]), '-c', 'aio_flush', uri('vda')]);
        const view = readExport(uri('fleece'), dir, 'nbdcopy');
        const [w, v] = await Promise.all([writer, view]);
        assert.equal(w.code, 0, w.stderr);
        if (!v.equals(start)) {
          let i = 0;
          while (i < v.length && v[i] === start[i]) i++;
          assert.fail(`the fleecing view changed at byte ${i} while the guest wrote`);
        }
      }
      assert.ok(!(await readExport(uri('vda'), dir, 'qemu-img')).equals(start), 'the guest changed the disk');
      await q.execute('block-job-cancel', { device: 'fl' });
      await q.waitFor(jobEvent('fl', 'null'));
      await q.execute('quit');
      await new Promise((r) => child.once('exit', r));
    } finally {
      if (child.exitCode === null) child.kill('SIGKILL');
    }
  });
});
