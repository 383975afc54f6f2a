/**
 * query-named-block-nodes lists protocol (file) nodes whether or not a format node sits on them,
 * in qemu-storage-daemon's order and shape: the same command line and QMP sequence go to QSD and
 * `qchain daemon`, and the replies (listings included, whole) must match.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { oracle, qemuImg, scratch } from './helpers/qemu.js';
import { start, norm, onBoth, type Tool } from './helpers/live-qmp.js';

const ARGS = [
  '--blockdev', 'driver=file,node-name=lone,filename=lone.raw',
  '--blockdev', 'driver=file,node-name=disk-file,filename=disk.qcow2',
  '--blockdev', 'driver=qcow2,node-name=disk,file=disk-file',
  '--blockdev', 'driver=file,node-name=ro-file,filename=ro.qcow2,read-only=on',
  '--nbd-server', 'addr.type=unix,addr.path=nbd.sock',
  '--chardev', 'socket,id=qmp0,path=qmp.sock,server=on,wait=off',
  '--monitor', 'chardev=qmp0',
];

async function session(tool: Tool, dir: string): Promise<unknown[]> {
  fs.mkdirSync(dir, { recursive: true });
  await qemuImg(['create', '-q', '-f', 'qcow2', 'disk.qcow2', '16M'], dir);
  await qemuImg(['create', '-q', '-f', 'qcow2', 'ro.qcow2', '8M'], dir);
  await qemuImg(['create', '-q', '-f', 'qcow2', 'rw.qcow2', '8M'], dir);
  await qemuImg(['create', '-q', '-f', 'qcow2', 'base.qcow2', '8M'], dir);
  await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'mid.qcow2'], dir);
  await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', 'top.qcow2'], dir);
  await qemuImg(['create', '-q', '-f', 'qcow2', 'inline.qcow2', '8M'], dir);
  // Not a whole number of sectors: file-posix reports the length rounded up to 512.
  fs.writeFileSync(path.join(dir, 'lone.raw'), Buffer.alloc(70000, 7));
  fs.writeFileSync(path.join(dir, 'other.raw'), Buffer.alloc(4096, 1));
  const { child, q } = await start(tool, dir, ARGS);
  const out: unknown[] = [];
  const x = async (cmd: string, args?: Record<string, unknown>): Promise<void> => {
    out.push(norm(await q.execute(cmd, args, out.length), false));
  };
  try {
    await x('qmp_capabilities');
    await x('query-named-block-nodes');
    await x('blockdev-add', { driver: 'file', 'node-name': 'missing', filename: 'nosuch.raw' });
    await x('blockdev-add', { driver: 'file', 'node-name': 'f2', filename: 'other.raw' });
    await x('blockdev-add', { driver: 'file', 'node-name': 'f3', filename: 'other.raw', 'read-only': true });
    await x('blockdev-add', { driver: 'qcow2', 'node-name': 'rodisk', file: 'ro-file', 'read-only': true });
    // A read-only format node over a read-write file node: the file node keeps its own mode.
    await x('blockdev-add', { driver: 'file', 'node-name': 'f4', filename: 'rw.qcow2' });
    await x('blockdev-add', { driver: 'qcow2', 'node-name': 'rod2', file: 'f4', 'read-only': true });
    await x('query-named-block-nodes', { flat: true });
    await x('blockdev-add', { driver: 'raw', 'node-name': 'r2', file: 'f2' });
    await x('query-named-block-nodes');
    // Protocol nodes QEMU creates itself: under a format node given a file name, and under each
    // backing node opened from a header (read-only as their format node).
    await x('blockdev-add', { driver: 'qcow2', 'node-name': 'inl', file: { driver: 'file', filename: 'inline.qcow2' } });
    await x('blockdev-add', { driver: 'qcow2', 'node-name': 'top', file: { driver: 'file', filename: 'top.qcow2' } });
    await x('query-named-block-nodes', { flat: true });
    await x('blockdev-del', { 'node-name': 'inl' });
    await x('blockdev-del', { 'node-name': 'top' });
    await x('blockdev-del', { 'node-name': 'f3' });
    await x('blockdev-del', { 'node-name': 'f2' });
    await x('blockdev-del', { 'node-name': 'r2' });
    await x('blockdev-del', { 'node-name': 'lone' });
    await x('query-named-block-nodes');
    await x('quit');
    await new Promise((r) => (child.exitCode !== null ? r(null) : child.on('exit', r)));
  } finally {
    q.close();
    child.kill();
  }
  return out;
}

test('query-named-block-nodes lists lone file nodes as qemu-storage-daemon does', oracle(), async () => {
  const { qemu: want, qchain: got } = await onBoth(scratch(), session);
  // The listings really contain the protocol nodes (not just equal because both are empty).
  const names = (want[1] as { return: Array<{ 'node-name': string }> }).return.map((n) => n['node-name']);
  assert.deepEqual(names, ['ro-file', 'disk', 'disk-file', 'lone']);
  assert.deepEqual(got, want);
});
