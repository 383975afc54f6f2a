/**
 * Incremental backups under concurrent guest writes (qchain daemon; QEMU's tools judge the
 * images): on a three-layer chain, a full backup and a bitmap in one transaction, random guest
 * writes, then an incremental backup into an overlay of the full backup while random writes (8 in
 * flight) keep coming. The overlay must show the disk as it was when the incremental started; the
 * bitmap then holds the writes made during it, and a second incremental shows the final disk.
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

/** Random writes in batches of 8 in flight (never overlapping within a batch), each batch ended by a flush. */
function randomWrites(seed: number, n: number): string[] {
  const r = rng(seed);
  const cmds: string[] = [];
  let batch: Array<[number, number]> = [];
  for (let i = 0; i < n; i++) {
    let off: number, len: number;
    do {
      len = (1 + Math.floor(r() * 32)) * 4096;
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

function ok(r: QmpMessage): void {
  assert.ok('return' in r, JSON.stringify(r));
}

function firstDiff(a: Buffer, b: Buffer): string {
  let i = 0;
  while (i < a.length && a[i] === b[i]) i++;
  return `first difference at ${i} (${a[i]} vs ${b[i]}), lengths ${a.length}/${b.length}`;
}

describe('incremental backup under concurrent guest writes (qchain daemon)', oracle(), () => {
  test('the incremental shows the disk at its start; the next one shows the final disk', async () => {
    const root = scratch('qchain-inc-live-');
    const dir = path.join(root, 'live'), ref = path.join(root, 'ref');
    await buildChain(dir);
    fs.cpSync(dir, ref, { recursive: true });
    const w1 = randomWrites(21, 64), w2 = randomWrites(22, 120);
    for (const w of [w1, w2]) {
      const r = await qemuIo([...w.flatMap((c) => ['-c', c]), 'top.qcow2'], ref);
      assert.equal(r.code, 0, r.stderr);
      if (w === w1) fs.cpSync(path.join(ref, 'top.qcow2'), path.join(ref, 'top-at-inc.qcow2'));
    }
    const atInc = await qemuRawView(path.join(ref, 'top-at-inc.qcow2'));
    const final = await qemuRawView(path.join(ref, 'top.qcow2'));
    const child = spawn(process.execPath, [QCHAIN, 'daemon', ...ARGS], { cwd: dir, stdio: 'ignore' });
    const uri = `nbd+unix:///vda?socket=${path.join(dir, 'nbd.sock')}`;
    const guest = async (w: string[]): Promise<void> => {
      const r = await qemuIo(['-f', 'raw', ...w.flatMap((c) => ['-c', c]), uri]);
      assert.equal(r.code, 0, r.stderr);
      assert.doesNotMatch(r.stdout + r.stderr, /failed/, 'every guest request succeeded');
    };
    try {
      await waitForSocket(path.join(dir, 'qmp.sock'), child);
      const q = await QmpClient.connect(path.join(dir, 'qmp.sock'));
      await q.waitFor((m) => 'QMP' in m);
      ok(await q.execute('qmp_capabilities'));
      const done = async (id: string): Promise<void> => {
        const m = await q.waitFor((x) => x.event === 'BLOCK_JOB_COMPLETED' && (x.data as { device: string }).device === id, 60000);
        assert.equal((m.data as { error?: string }).error, undefined);
      };
      ok(await q.execute('transaction', {
        actions: [
          { type: 'block-dirty-bitmap-add', data: { node: 'top', name: 'bm', persistent: true } },
          { type: 'drive-backup', data: { device: 'top', target: path.join(dir, 'full.qcow2'), sync: 'full', format: 'qcow2', 'job-id': 'full' } },
        ],
      }));
      await done('full');
      await guest(w1);
      for (const [name, backing] of [['inc1', 'full'], ['inc2', 'inc1']]) {
        const c = await qemuImg(['create', '-q', '-f', 'qcow2', '-b', `${backing}.qcow2`, '-F', 'qcow2', `${name}.qcow2`], dir);
        assert.equal(c.code, 0, c.stderr);
      }
      ok(await q.execute('drive-backup', {
        device: 'top', target: path.join(dir, 'inc1.qcow2'), sync: 'incremental', bitmap: 'bm', format: 'qcow2', mode: 'existing', 'job-id': 'inc1', speed: 2 * M,
      }));
      await guest(w2);
      ok(await q.execute('block-job-set-speed', { device: 'inc1', speed: 0 }));
      await done('inc1');
      ok(await q.execute('drive-backup', {
        device: 'top', target: path.join(dir, 'inc2.qcow2'), sync: 'incremental', bitmap: 'bm', format: 'qcow2', mode: 'existing', 'job-id': 'inc2',
      }));
      await done('inc2');
      ok(await q.execute('quit'));
      await new Promise((r) => child.once('exit', r));
    } finally {
      if (child.exitCode === null) child.kill('SIGKILL');
    }
    const inc1 = await qemuRawView(path.join(dir, 'inc1.qcow2'));
    assert.ok(inc1.equals(atInc), `inc1 is the disk at its start: ${firstDiff(inc1, atInc)}`);
    const inc2 = await qemuRawView(path.join(dir, 'inc2.qcow2'));
    assert.ok(inc2.equals(final), `inc2 is the final disk: ${firstDiff(inc2, final)}`);
    assert.ok((await qemuRawView(path.join(dir, 'top.qcow2'))).equals(final), 'the guest kept every write');
    for (const f of ['top.qcow2', 'full.qcow2', 'inc1.qcow2', 'inc2.qcow2']) {
      const ck = await qemuImg(['check', f], dir);
      assert.equal(ck.code, 0, `${f}: ${ck.stdout}${ck.stderr}`);
    }
    const info = await qemuImg(['info', '--output=json', 'top.qcow2'], dir);
    assert.deepEqual((JSON.parse(info.stdout) as { 'format-specific': { data: { bitmaps: unknown } } })['format-specific'].data.bitmaps,
      [{ flags: ['auto'], name: 'bm', granularity: 65536 }]);
  });
});
