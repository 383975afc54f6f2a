/**
 * Live jobs under guest load: while a client keeps writing through the NBD export, a stream,
 * an active commit and a mirror run to completion (with pivot). The final active image must
 * show exactly the original guest view plus every acknowledged write (the same writes applied
 * offline by qemu-io to a copy give the reference), and pass `qemu-img check`.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { QCHAIN, oracle, qemuImg, qemuIo, qemuRawView, rng, scratch } from './helpers/qemu.js';
import { QmpClient, type QmpMessage, waitForSocket } from './helpers/qmp-client.js';

const M = 1024 * 1024;


async function buildChain(dir: string): Promise<void> {
  fs.mkdirSync(dir, { recursive: true });
  await qemuImg(['create', '-q', '-f', 'qcow2', 'base.qcow2', '32M'], dir);
  await qemuIo(['-c', 'write -P 0xaa 0 8M', '-c', 'write -P 0xab 20M 4M', 'base.qcow2'], dir);
  await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'mid.qcow2'], dir);
  await qemuIo(['-c', 'write -P 0xbb 4M 8M', '-c', 'write -z 21M 1M', 'mid.qcow2'], dir);
  await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', 'top.qcow2'], dir);
  await qemuIo(['-c', 'write -P 0xcc 10M 4M', 'top.qcow2'], dir);
}

/**
 * Random guest writes in batches of 8 in flight, each batch ended by a flush. Writes within a
 * batch never overlap: neither NBD nor QEMU orders overlapping requests in flight (the offline
 * reference would itself race), so only the flush boundaries define the expected result.
 */
function randomWrites(seed: number, n: number): string[] {
  const r = rng(seed);
  const cmds: string[] = [];
  let batch: Array<[number, number]> = [];
  for (let i = 0; i < n; i++) {
    let off: number, len: number;
    do {
      len = (1 + Math.floor(r() * 64)) * 4096;
      off = Math.floor(r() * (32 * M - len) / 512) * 512;
    } while (batch.some(([o, l]) => o < off + len && off < o + l));
    batch.push([off, len]);
    cmds.push(r() < 0.1 ? `aio_write -z ${off} ${len}` : `aio_write -P 0x${(1 + Math.floor(r() * 254)).toString(16)} ${off} ${len}`);
    if (i % 8 === 7) {
      cmds.push('aio_flush');
      batch = [];
    }
  }
  cmds.push('aio_flush');
  return cmds;
}

const ARGS = [
  '--blockdev', 'driver=file,node-name=base-file,filename=base.qcow2',
  '--blockdev', 'driver=qcow2,node-name=base,file=base-file',
  '--blockdev', 'driver=file,node-name=mid-file,filename=mid.qcow2',
  '--blockdev', 'driver=qcow2,node-name=mid,file=mid-file,backing=base',
  '--blockdev', 'driver=file,node-name=top-file,filename=top.qcow2',
  '--blockdev', 'driver=qcow2,node-name=top,file=top-file,backing=mid',
  '--nbd-server', 'addr.type=unix,addr.path=nbd.sock',
  '--export', 'type=nbd,id=exp0,node-name=top,name=vda,writable=on',
  '--chardev', 'socket,id=qmp0,path=qmp.sock,server=on,wait=off',
  '--monitor', 'chardev=qmp0',
];

const jobEvent = (id: string, status: string) => (m: QmpMessage): boolean =>
  m.event === 'JOB_STATUS_CHANGE' && (m.data as { id: string }).id === id && (m.data as { status: string }).status === status;

interface Case {
  name: string;
  /** Known problem, reported but not failing the suite. */
  todo?: string;
  start: (q: QmpClient, dir: string) => Promise<void>;
  ready: boolean;
  /** The file holding the active image at the end. */
  result: string;
}

const CASES: Case[] = [
  {
    name: 'stream of mid into top (base stays)',
    start: async (q) => { await q.execute('block-stream', { 'job-id': 'j', device: 'top', 'base-node': 'base', speed: 8 * M }); },
    ready: false, result: 'top.qcow2',
  },
  {
    name: 'active commit of top and mid into base, then pivot',
    start: async (q) => { await q.execute('block-commit', { 'job-id': 'j', device: 'top', 'base-node': 'base', speed: 8 * M }); },
    ready: true, result: 'base.qcow2',
  },
  {
    name: 'mirror (sync full) to a new target, then pivot',
    start: async (q, dir) => {
      await qemuImg(['create', '-q', '-f', 'qcow2', 'tgt.qcow2', '32M'], dir);
      await q.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'tgt', file: { driver: 'file', filename: 'tgt.qcow2' }, backing: null });
      await q.execute('blockdev-mirror', { 'job-id': 'j', device: 'top', target: 'tgt', sync: 'full', speed: 8 * M });
    },
    ready: true, result: 'tgt.qcow2',
  },
];

describe('live jobs under guest writes (qchain daemon)', oracle(), () => {
  CASES.forEach((c, k) => {
    test(c.name, c.todo && !process.env.QCHAIN_NO_TODO ? { todo: c.todo } : {}, async () => {
      const root = scratch('qchain-live-');
      const dir = path.join(root, 'live'), ref = path.join(root, 'ref');
      await buildChain(dir);
      fs.cpSync(dir, ref, { recursive: true });
      const writes = randomWrites(100 + k, 120);
      // Reference: the same writes, applied offline.
      const r = await qemuIo([...writes.flatMap((w) => ['-c', w]), 'top.qcow2'], ref);
      assert.equal(r.code, 0, r.stderr);
      const expect = await qemuRawView(path.join(ref, 'top.qcow2'));

      const child = spawn(process.execPath, [QCHAIN, 'daemon', ...ARGS], { cwd: dir, stdio: 'ignore' });
      try {
        await waitForSocket(path.join(dir, 'qmp.sock'), child);
        const q = await QmpClient.connect(path.join(dir, 'qmp.sock'));
        await q.waitFor((m) => 'QMP' in m);
        await q.execute('qmp_capabilities');
        await c.start(q, dir);
        const w = await qemuIo(['-f', 'raw', ...writes.flatMap((x) => ['-c', x]), `nbd+unix:///vda?socket=${path.join(dir, 'nbd.sock')}`]);
        assert.equal(w.code, 0, w.stderr);
        assert.doesNotMatch(w.stdout + w.stderr, /failed/, 'every guest request succeeded');
        await q.execute('block-job-set-speed', { device: 'j', speed: 0 });
        if (c.ready) {
          await q.waitFor(jobEvent('j', 'ready'), 60000);
          // More writes while READY, then complete.
          const w2 = await qemuIo(['-f', 'raw', '-c', 'write -P 0x5a 30M 64k', `nbd+unix:///vda?socket=${path.join(dir, 'nbd.sock')}`]);
          assert.equal(w2.code, 0);
          await q.execute('job-complete', { id: 'j' });
        }
        await q.waitFor(jobEvent('j', 'null'), 60000);
        const after = await qemuIo(['-f', 'raw', '-c', 'read -P 0x5a 30M 64k', `nbd+unix:///vda?socket=${path.join(dir, 'nbd.sock')}`]);
        if (c.ready) assert.doesNotMatch(after.stdout, /verification failed/);
        await q.execute('quit');
        await new Promise((res) => child.once('exit', res));
      } finally {
        if (child.exitCode === null) child.kill('SIGKILL');
      }
      const got = await qemuRawView(path.join(dir, c.result));
      if (c.ready) expect.fill(0x5a, 30 * M, 30 * M + 65536);
      if (!got.equals(expect)) {
        const diffs: string[] = [];
        for (let i = 0; i < got.length && diffs.length < 8; i += 512) {
          if (!got.subarray(i, i + 512).equals(expect.subarray(i, i + 512))) diffs.push(`${i}: got ${got[i]} want ${expect[i]}`);
        }
        assert.fail(`final guest view != original + every write; differing sectors: ${diffs.join(', ')}`);
      }
      for (const f of fs.readdirSync(dir).filter((x) => x.endsWith('.qcow2'))) {
        const ck = await qemuImg(['check', path.join(dir, f)]);
        assert.equal(ck.code, 0, `${f}: ${ck.stdout}`);
      }
    });
  });
});

describe('point-in-time backup under guest writes (qchain daemon)', oracle(), () => {
  for (const sync of ['full', 'top'] as const) {
    test(`drive-backup sync=${sync}: the target shows the disk as it was at the start; the guest keeps every write`, async () => {
      const root = scratch('qchain-backup-');
      const dir = path.join(root, 'live'), ref = path.join(root, 'ref');
      await buildChain(dir);
      fs.cpSync(dir, ref, { recursive: true });
      const before = await qemuRawView(path.join(ref, 'top.qcow2'));
      const writes = randomWrites(7, 150);
      const r = await qemuIo([...writes.flatMap((w) => ['-c', w]), 'top.qcow2'], ref);
      assert.equal(r.code, 0, r.stderr);
      const expectActive = await qemuRawView(path.join(ref, 'top.qcow2'));
      const child = spawn(process.execPath, [QCHAIN, 'daemon', ...ARGS], { cwd: dir, stdio: 'ignore' });
      try {
        await waitForSocket(path.join(dir, 'qmp.sock'), child);
        const q = await QmpClient.connect(path.join(dir, 'qmp.sock'));
        await q.waitFor((m) => 'QMP' in m);
        await q.execute('qmp_capabilities');
        const ret = await q.execute('drive-backup', { 'job-id': 'j', device: 'top', target: 'backup.qcow2', format: 'qcow2', sync, speed: 4 * M });
        assert.ok('return' in ret, JSON.stringify(ret));
        const w = await qemuIo(['-f', 'raw', ...writes.flatMap((x) => ['-c', x]), `nbd+unix:///vda?socket=${path.join(dir, 'nbd.sock')}`]);
        assert.equal(w.code, 0, w.stderr);
        assert.doesNotMatch(w.stdout + w.stderr, /failed/, 'every guest request succeeded');
        await q.execute('block-job-set-speed', { device: 'j', speed: 0 });
        const done = await q.waitFor((m) => m.event === 'BLOCK_JOB_COMPLETED', 60000);
        assert.equal((done.data as { error?: string }).error, undefined);
        await q.execute('quit');
        await new Promise((res) => child.once('exit', res));
      } finally {
        if (child.exitCode === null) child.kill('SIGKILL');
      }
      assert.ok((await qemuRawView(path.join(dir, 'top.qcow2'))).equals(expectActive), 'the guest kept every write');
      // sync=full: the whole point-in-time view; sync=top: only the top layer, over the same backing chain.
      const backup = await qemuRawView(path.join(dir, 'backup.qcow2'));
      if (!backup.equals(before)) {
        let i = 0;
        while (i < backup.length && backup[i] === before[i]) i++;
        assert.fail(`the backup is not the point-in-time view: first difference at ${i} (${backup[i]} vs ${before[i]}), lengths ${backup.length}/${before.length}`);
      }
      const ck = await qemuImg(['check', path.join(dir, 'backup.qcow2')]);
      assert.equal(ck.code, 0, ck.stdout);
    });
  }
});
