/**
 * cache.no-flush=on: flushes of the node do not reach the disk (QEMU's BDRV_O_NO_FLUSH). What
 * syncs is the protocol node's option: a file node's own, inherited by a file given inline (and
 * by backing nodes opened from the header); a qcow2 node with no-flush over a file node without it
 * still syncs (QEMU's bdrv_co_flush flushes the children). strace watches both daemons, and
 * the fdatasync/fsync calls that guest flushes over NBD cause are counted per export; the node
 * listings' cache objects (and detect_zeroes) must be qemu-storage-daemon's.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { oracle, qemuImg, qemuIo, scratch, which } from './helpers/qemu.js';
import { MONITOR, QSD, connectQmp, exited, killIfRunning, nbdUri, onBoth, quit, spawnDaemon, type Tool } from './helpers/live-qmp.js';
import { waitForSocket } from './helpers/qmp-client.js';

const STRACE = which('strace');
const skip = oracle().skip ?? (fs.existsSync(QSD) ? undefined : 'no qemu-storage-daemon') ?? (STRACE ? undefined : 'no strace');

const ARGS = [
  // a: no-flush on the qcow2 node only; its file node syncs.
  '--blockdev', 'driver=file,node-name=a-file,filename=a.qcow2', '--blockdev', 'driver=qcow2,node-name=a,file=a-file,cache.no-flush=on',
  // b: no-flush on the file node.
  '--blockdev', 'driver=file,node-name=b-file,filename=b.qcow2,cache.no-flush=on', '--blockdev', 'driver=qcow2,node-name=b,file=b-file',
  // c: an inline file inherits the qcow2 node's no-flush; so do the backing node and its file.
  '--blockdev', 'driver=qcow2,node-name=c,cache.no-flush=on,file.driver=file,file.filename=c.qcow2,file.detect-zeroes=on',
  // e: nothing set.
  '--blockdev', 'driver=file,node-name=e-file,filename=e.qcow2', '--blockdev', 'driver=qcow2,node-name=e,file=e-file',
  '--nbd-server', 'addr.type=unix,addr.path=nbd.sock',
  ...['a', 'b', 'c', 'e'].flatMap((n) => ['--export', `type=nbd,id=x${n},node-name=${n},name=${n},writable=on`]),
  ...MONITOR,
];

const syncs = (trace: string): number => fs.readFileSync(trace, 'utf8').split('\n').filter((l) => /\b(fdatasync|fsync)\(/.test(l)).length;

async function session(tool: Tool, dir: string): Promise<{ flushes: Record<string, boolean>; cache: unknown }> {
  fs.mkdirSync(dir, { recursive: true });
  for (const f of ['a', 'b', 'e', 'cb']) assert.equal((await qemuImg(['create', '-q', '-f', 'qcow2', `${f}.qcow2`, '16M'], dir)).code, 0);
  assert.equal((await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'cb.qcow2', '-F', 'qcow2', 'c.qcow2'], dir)).code, 0);
  const trace = path.join(dir, 'trace.txt');
  const child = spawnDaemon(tool, dir, ARGS);
  // Attached to the daemon (all its threads, and those it starts): it ends with the daemon.
  const tracer = spawn(STRACE as string, ['-f', '-qq', '-e', 'trace=fdatasync,fsync', '-o', trace, '-p', String(child.pid)], { stdio: 'ignore' });
  try {
    await waitForSocket(path.join(dir, 'nbd.sock'), child);
    const q = await connectQmp(dir, child);
    await q.execute('qmp_capabilities');
    while (!fs.existsSync(trace)) await new Promise((res) => setTimeout(res, 20));
    await new Promise((res) => setTimeout(res, 200));
    const flushes: Record<string, boolean> = {};
    for (const n of ['a', 'b', 'c', 'e']) {
      const before = syncs(trace);
      const r = await qemuIo(['-f', 'raw', '-c', 'write -P 1 0 64k', '-c', 'flush', '-c', 'write -P 2 1M 64k', '-c', 'flush', nbdUri(dir, n)]);
      assert.equal(r.code, 0, r.stderr);
      assert.doesNotMatch(r.stdout + r.stderr, /failed|error/i);
      // Sync calls go out from the daemons' worker threads; give the trace a moment.
      await new Promise((res) => setTimeout(res, 200));
      flushes[n] = syncs(trace) > before;
    }
    const list = await q.execute('query-named-block-nodes', { flat: true });
    const cache = (list.return as Array<Record<string, unknown>>).map((x) => [String(x['node-name']).replace(/#block\d+/, '#block'), x.cache, x.detect_zeroes]);
    await quit({ child, q });
    // The data is there after all.
    for (const n of ['a', 'b', 'c', 'e']) {
      const v = await qemuIo(['-c', 'read -P 2 1M 64k', `${n}.qcow2`], dir);
      assert.equal(v.code, 0, v.stderr);
      assert.doesNotMatch(v.stdout, /Pattern verification failed/);
    }
    return { flushes, cache };
  } finally {
    killIfRunning(child);
    await exited(child);
    await exited(tracer);
  }
}

test('cache.no-flush=on: guest flushes sync the disk exactly where qemu-storage-daemon\'s do; the listings\' cache objects match', { skip, timeout: 60000 }, async () => {
  const { qemu, qchain } = await onBoth(scratch('qchain-noflush-'), session);
  assert.deepEqual(qemu.flushes, { a: true, b: false, c: false, e: true });
  assert.deepEqual(qchain.flushes, qemu.flushes);
  assert.deepEqual(qchain.cache, qemu.cache);
  // The inline file of c: its own detect-zeroes, c's no-flush.
  assert.equal((qemu.cache as unknown[][]).filter((x) => x[2] === 'on' && (x[1] as Record<string, unknown>)['no-flush'] === true).length, 1);
});
