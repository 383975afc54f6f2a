/**
 * block-set-write-threshold and BLOCK_WRITE_THRESHOLD side by side with qemu-storage-daemon:
 * the command's replies (argument checks, unknown node), write_threshold in the node listing,
 * and the events guest writes over NBD and a job's writes fire — on a format node (guest
 * offsets: writes, zero writes, discards) and on the qcow2 file's protocol node (the host
 * writes the qcow2 driver makes as the file grows, libvirt's use).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { oracle, qemuImg, qemuIo, scratch } from './helpers/qemu.js';
import { QSD, guest, norm, onBoth, qcow2Node, quit, serve, withDaemon, type Daemon } from './helpers/live-qmp.js';

const skip = oracle().skip ?? (fs.existsSync(QSD) ? undefined : 'no qemu-storage-daemon');
const K = 1024;

/** Thresholds (node names of each listing with their write_threshold), ids the step numbers. */
async function thresholds(d: Daemon): Promise<Array<[unknown, unknown]>> {
  const r = await d.q.execute('query-named-block-nodes');
  return (r.return as Array<Record<string, unknown>>).map((n) => [String(n['node-name']).replace(/#block\d+/, '#block'), n.write_threshold]);
}

/** The BLOCK_WRITE_THRESHOLD events so far, normalised. */
function events(d: Daemon): unknown[] {
  return d.q.received.filter((m) => m.event === 'BLOCK_WRITE_THRESHOLD').map((m) => norm(m, false));
}

test('block-set-write-threshold: replies, listing and the events of guest writes', { skip, timeout: 60000 }, async () => {
  const { qemu, qchain } = await onBoth(scratch('qchain-wthr-'), async (tool, dir) => {
    fs.mkdirSync(dir, { recursive: true });
    assert.equal((await qemuImg(['create', '-q', '-f', 'qcow2', 'd.qcow2', '64M'], dir)).code, 0);
    return withDaemon(tool, dir, [...qcow2Node('d', ',discard=unmap'), ...serve('d')], async (d) => {
      const out: unknown[] = [];
      const x = async (cmd: string, args?: Record<string, unknown>): Promise<void> => {
        out.push(norm(await d.q.execute(cmd, args, out.length), false));
      };
      await x('qmp_capabilities');
      await x('block-set-write-threshold', { 'node-name': 'nope', 'write-threshold': 1 });
      await x('block-set-write-threshold', { 'node-name': 'd' });
      await x('block-set-write-threshold', { 'write-threshold': 1 });
      await x('block-set-write-threshold', { 'node-name': 'd', 'write-threshold': 'x' });
      await x('block-set-write-threshold', { 'node-name': 'd', 'write-threshold': 1.5 });
      await x('block-set-write-threshold', { 'node-name': 'd', 'write-threshold': 1, extra: 1 });
      await x('block-set-write-threshold', { 'node-name': 'd', 'write-threshold': -1 });
      out.push(await thresholds(d));
      await x('block-set-write-threshold', { 'node-name': 'd', 'write-threshold': 0 });
      // A write ending exactly at the threshold does not pass it.
      await x('block-set-write-threshold', { 'node-name': 'd', 'write-threshold': 64 * K });
      // The file: header, refcount table and block, L1 take 256 KiB; the first L2 table and
      // data clusters follow.
      await x('block-set-write-threshold', { 'node-name': 'd-file', 'write-threshold': 300000 });
      out.push(await thresholds(d));
      await guest(dir, ['write -P 1 0 64k']);
      out.push(await thresholds(d), events(d));
      await guest(dir, ['write -P 2 64k 4k']);
      out.push(await thresholds(d), events(d));
      // Once fired, no more events until armed again; zero writes and discards count too.
      await guest(dir, ['write -P 3 1M 64k']);
      await x('block-set-write-threshold', { 'node-name': 'd', 'write-threshold': 2 * 1024 * K });
      await guest(dir, ['write -z 2047k 8k']);
      await x('block-set-write-threshold', { 'node-name': 'd', 'write-threshold': 3 * 1024 * K });
      await guest(dir, ['discard 3M 128k']);
      // Unchanged by a threshold below what the file already holds, until the next write.
      await x('block-set-write-threshold', { 'node-name': 'd-file', 'write-threshold': 4096 });
      out.push(await thresholds(d));
      await guest(dir, ['write -P 4 0 4k']);
      out.push(await thresholds(d), events(d));
      await quit(d);
      return out;
    });
  });
  assert.deepEqual(qchain, qemu);
  const evs = qemu[qemu.length - 1] as Array<{ data: Record<string, unknown> }>;
  assert.deepEqual(evs.map((e) => e.data['node-name']), ['d-file', 'd', 'd', 'd', 'd-file']);
});

test('the threshold counts a job\'s writes into the node (commit into the base), on the node and its file', { skip, timeout: 60000 }, async () => {
  const { qemu, qchain } = await onBoth(scratch('qchain-wthr-job-'), async (tool, dir) => {
    fs.mkdirSync(dir, { recursive: true });
    assert.equal((await qemuImg(['create', '-q', '-f', 'qcow2', 'base.qcow2', '16M'], dir)).code, 0);
    assert.equal((await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'mid.qcow2'], dir)).code, 0);
    assert.equal((await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', 'top.qcow2'], dir)).code, 0);
    assert.equal((await qemuIo(['-c', 'write -P 7 1M 64k', '-c', 'write -P 8 8M 64k', 'mid.qcow2'], dir)).code, 0);
    const args = [...qcow2Node('base'), ...qcow2Node('mid', ',backing=base'), ...qcow2Node('top', ',backing=mid'), ...serve('top')];
    return withDaemon(tool, dir, args, async (d) => {
      await d.q.execute('qmp_capabilities');
      const out: unknown[] = [];
      for (const [node, t] of [['base', 1024 * K + 16 * K], ['base-file', 0x48000]] as const) {
        out.push(norm(await d.q.execute('block-set-write-threshold', { 'node-name': node, 'write-threshold': t }, out.length), false));
      }
      out.push(norm(await d.q.execute('block-commit', { 'job-id': 'j', device: 'top', 'top-node': 'mid', 'base-node': 'base' }, 'commit'), false));
      await d.q.waitFor((m) => m.event === 'BLOCK_JOB_COMPLETED');
      out.push(await thresholds(d), events(d));
      await quit(d);
      return out;
    });
  });
  assert.deepEqual(qchain, qemu);
  assert.equal((qemu[qemu.length - 1] as unknown[]).length, 2);
});

test('thresholds stay on a node across its reopens (snapshot, then active commit back into it)', { skip, timeout: 60000 }, async () => {
  const { qemu, qchain } = await onBoth(scratch('qchain-wthr-reopen-'), async (tool, dir) => {
    fs.mkdirSync(dir, { recursive: true });
    assert.equal((await qemuImg(['create', '-q', '-f', 'qcow2', 'd.qcow2', '16M'], dir)).code, 0);
    return withDaemon(tool, dir, [...qcow2Node('d'), ...serve('d')], async (d) => {
      const out: unknown[] = [];
      const x = async (cmd: string, args?: Record<string, unknown>): Promise<void> => {
        out.push(norm(await d.q.execute(cmd, args, out.length), false));
      };
      await x('qmp_capabilities');
      // The file ends after its first data cluster (0x50000..0x60000); the next one crosses.
      await guest(dir, ['write -P 1 0 64k']);
      await x('block-set-write-threshold', { 'node-name': 'd', 'write-threshold': 1024 * K + 16 * K });
      await x('block-set-write-threshold', { 'node-name': 'd-file', 'write-threshold': 0x68000 });
      await x('blockdev-snapshot-sync', { 'node-name': 'd', 'snapshot-file': 'ov.qcow2', 'snapshot-node-name': 'ov', format: 'qcow2' });
      await guest(dir, ['write -P 2 1M 64k']);
      out.push(await thresholds(d), events(d));
      await x('block-commit', { 'job-id': 'j', device: 'ov' });
      await d.q.waitFor((m) => m.event === 'BLOCK_JOB_READY');
      await x('job-complete', { id: 'j' });
      await d.q.waitFor((m) => m.event === 'BLOCK_JOB_COMPLETED');
      out.push(await thresholds(d), events(d));
      await quit(d);
      return out;
    });
  });
  assert.deepEqual(qchain, qemu);
  assert.equal((qemu[qemu.length - 1] as unknown[]).length, 2);
});

test('block-stream\'s copy-on-read writes pass below the top\'s threshold (its file\'s counts) and write zero buffers as zeroes', { skip, timeout: 60000 }, async () => {
  const { qemu, qchain } = await onBoth(scratch('qchain-wthr-stream-'), async (tool, dir) => {
    fs.mkdirSync(dir, { recursive: true });
    assert.equal((await qemuImg(['create', '-q', '-f', 'qcow2', 'base.qcow2', '16M'], dir)).code, 0);
    assert.equal((await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'top.qcow2'], dir)).code, 0);
    assert.equal((await qemuIo(['-c', 'write -P 7 1M 64k', '-c', 'write -P 0 4M 64k', 'base.qcow2'], dir)).code, 0);
    const evs = await withDaemon(tool, dir, [...qcow2Node('base'), ...qcow2Node('top', ',backing=base'), ...serve('top')], async (d) => {
      await d.q.execute('qmp_capabilities');
      await d.q.execute('block-set-write-threshold', { 'node-name': 'top', 'write-threshold': 1024 * K + 4 * K });
      await d.q.execute('block-set-write-threshold', { 'node-name': 'top-file', 'write-threshold': 0x48000 });
      assert.ok('return' in await d.q.execute('block-stream', { 'job-id': 'j', device: 'top' }));
      await d.q.waitFor((m) => m.event === 'BLOCK_JOB_COMPLETED');
      const e = events(d);
      await quit(d);
      return e;
    });
    const map = await qemuImg(['map', '--output=json', 'top.qcow2'], dir);
    assert.equal(map.code, 0, map.stderr);
    return { evs, map: JSON.parse(map.stdout) as unknown };
  });
  assert.deepEqual(qchain, qemu);
  assert.equal(qemu.evs.length, 1);
});
