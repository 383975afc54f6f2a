/**
 * Incremental backups under concurrent guest writes (qchain daemon; QEMU's tools judge the
 * images): on a three-layer chain, a full backup and a bitmap in one transaction, random guest
 * writes, then an incremental backup into an overlay of the full backup while random writes (8 in
 * flight) keep coming. The overlay must show the disk as it was when the incremental started; the
 * bitmap then holds the writes made during it, and a second incremental shows the final disk.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { oracle, qemuImg, qemuIo, qemuRawView, scratch } from './helpers/qemu.js';
import { M, chainArgs, firstDiff, guest, ok, quit, withDaemon } from './helpers/live-qmp.js';
import { CHAIN_SIZE, buildChain, randomWrites } from './helpers/guest-load.js';

/** Random guest writes over the chain, up to 128 KiB each, 8 in flight. */
const writesFor = (seed: number, n: number): string[] => randomWrites(seed, n, { size: CHAIN_SIZE, maxBlocks: 32, batch: 8 });

describe('incremental backup under concurrent guest writes (qchain daemon)', oracle(), () => {
  test('the incremental shows the disk at its start; the next one shows the final disk', async () => {
    const root = scratch('qchain-inc-live-');
    const dir = path.join(root, 'live'), ref = path.join(root, 'ref');
    await buildChain(dir);
    fs.cpSync(dir, ref, { recursive: true });
    const w1 = writesFor(21, 64), w2 = writesFor(22, 120);
    for (const w of [w1, w2]) {
      const r = await qemuIo([...w.flatMap((c) => ['-c', c]), 'top.qcow2'], ref);
      assert.equal(r.code, 0, r.stderr);
      if (w === w1) fs.cpSync(path.join(ref, 'top.qcow2'), path.join(ref, 'top-at-inc.qcow2'));
    }
    const atInc = await qemuRawView(path.join(ref, 'top-at-inc.qcow2'));
    const final = await qemuRawView(path.join(ref, 'top.qcow2'));
    await withDaemon('qchain', dir, chainArgs(), async (d) => {
      const { q } = d;
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
      await guest(dir, w1);
      for (const [name, backing] of [['inc1', 'full'], ['inc2', 'inc1']]) {
        const c = await qemuImg(['create', '-q', '-f', 'qcow2', '-b', `${backing}.qcow2`, '-F', 'qcow2', `${name}.qcow2`], dir);
        assert.equal(c.code, 0, c.stderr);
      }
      ok(await q.execute('drive-backup', {
        device: 'top', target: path.join(dir, 'inc1.qcow2'), sync: 'incremental', bitmap: 'bm', format: 'qcow2', mode: 'existing', 'job-id': 'inc1', speed: 2 * M,
      }));
      await guest(dir, w2);
      ok(await q.execute('block-job-set-speed', { device: 'inc1', speed: 0 }));
      await done('inc1');
      ok(await q.execute('drive-backup', {
        device: 'top', target: path.join(dir, 'inc2.qcow2'), sync: 'incremental', bitmap: 'bm', format: 'qcow2', mode: 'existing', 'job-id': 'inc2',
      }));
      await done('inc2');
      ok(await quit(d));
    });
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
