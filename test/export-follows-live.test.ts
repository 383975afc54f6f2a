/**
 * One NBD connection kept open through a whole reshaping of the chain: external snapshot,
 * active commit with pivot, mirror with pivot, intermediate stream. The client writes and
 * flushes between and during the steps (requests in flight while each graph change happens) and
 * never reconnects; every reply succeeds, the same connection reads back the model of what it
 * wrote, and the final active image (and every file) agrees, as qemu-img sees it.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { oracle, qemuImg, qemuRawView, rng, scratch } from './helpers/qemu.js';
import { CMD, FLAG_FUA, RawNbd } from './helpers/nbd-raw.js';
import { M, chainArgs, jobEvent, ok, quit, withDaemon } from './helpers/live-qmp.js';
import { CHAIN_SIZE, buildChain } from './helpers/guest-load.js';

test('an export follows snapshot, commit pivot, mirror pivot and stream on one live connection', oracle(), async () => {
  const dir = scratch('qchain-follow-');
  await buildChain(dir);
  const model = await qemuRawView(path.join(dir, 'top.qcow2'));
  await withDaemon('qchain', dir, chainArgs(), async (d) => {
    const { q } = d;
    await q.execute('qmp_capabilities');
    const c = await RawNbd.open(path.join(dir, 'nbd.sock'), 'vda');
    const r = rng(4242);
    /**
     * `n` writes of 4-64 KiB, 8 in flight (never two overlapping, so the order the server applies
     * them in does not matter), each applied to the model once acknowledged.
     */
    const burst = async (n: number): Promise<void> => {
      const pending: Array<{ p: Promise<void>; off: number; len: number }> = [];
      for (let i = 0; i < n; i++) {
        const len = (1 + Math.floor(r() * 16)) * 4096;
        let off: number;
        do off = Math.floor(r() * ((CHAIN_SIZE - len) / 4096)) * 4096;
        while (pending.some((x) => off < x.off + x.len && x.off < off + len));
        const b = Buffer.alloc(len, 1 + Math.floor(r() * 250));
        pending.push({ off, len, p: c.request(CMD.WRITE, r() < 0.3 ? FLAG_FUA : 0, off, len, b).then((rep) => {
          assert.equal(rep.error, 0, `write ${off}+${len}`);
          b.copy(model, off);
        }) });
        if (pending.length >= 8) await pending.shift()?.p;
      }
      await Promise.all(pending.map((x) => x.p));
      assert.equal((await c.request(CMD.FLUSH, 0, 0, 0)).error, 0);
    };
    const verify = async (step: string): Promise<void> => {
      for (let off = 0; off < CHAIN_SIZE; off += M) {
        const rep = await c.request(CMD.READ, 0, off, M);
        assert.equal(rep.error, 0);
        if (!rep.data?.equals(model.subarray(off, off + M))) {
          let i = 0;
          while (rep.data?.[i] === model[off + i]) i++;
          assert.fail(`${step}: read back differs at ${off + i}: got ${rep.data?.[i]} want ${model[off + i]}`);
        }
      }
    };
    await verify('start');
    await burst(40);
    await verify('first burst');
    // External snapshot with writes in flight.
    const load1 = burst(40);
    ok(await q.execute('blockdev-snapshot-sync', { 'node-name': 'top', 'snapshot-file': 'snap.qcow2', 'snapshot-node-name': 'snap', format: 'qcow2' }));
    await load1;
    await verify('snapshot');
    // Active commit of snap into top, pivot with writes in flight.
    ok(await q.execute('block-commit', { 'job-id': 'c', device: 'snap', 'base-node': 'top' }));
    await burst(30);
    await q.waitFor(jobEvent('c', 'ready'), 60000);
    const load2 = burst(40);
    ok(await q.execute('job-complete', { id: 'c' }));
    await load2;
    await q.waitFor(jobEvent('c', 'null'), 60000);
    await verify('commit');
    // Mirror of top (active again, over mid) into a new image, pivot with writes in flight.
    assert.equal((await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', 'm.qcow2', String(CHAIN_SIZE)], dir)).code, 0);
    ok(await q.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'm', file: { driver: 'file', filename: 'm.qcow2' }, backing: 'mid' }));
    ok(await q.execute('blockdev-mirror', { 'job-id': 'mi', device: 'top', target: 'm', sync: 'top' }));
    await burst(30);
    await verify('mirror running');
    await q.waitFor(jobEvent('mi', 'ready'), 60000);
    const load3 = burst(40);
    ok(await q.execute('job-complete', { id: 'mi' }));
    await load3;
    await q.waitFor(jobEvent('mi', 'null'), 60000);
    await verify('mirror');
    const ex = await q.execute('query-block-exports');
    assert.equal((ex.return as Array<{ 'node-name': string }>)[0]['node-name'], 'm');
    // Pull mid and base into m with writes in flight (m's backing is mid after the pivot).
    const load4 = burst(40);
    ok(await q.execute('block-stream', { 'job-id': 's', device: 'm' }));
    await load4;
    await q.waitFor(jobEvent('s', 'null'), 60000);
    // The same connection reads back the model.
    for (let off = 0; off < CHAIN_SIZE; off += M) {
      const rep = await c.request(CMD.READ, 0, off, M);
      assert.equal(rep.error, 0);
      assert.ok(rep.data?.equals(model.subarray(off, off + M)), `read back at ${off}`);
    }
    c.socket.destroy();
    await quit(d);
  });
  const got = await qemuRawView(path.join(dir, 'm.qcow2'));
  assert.ok(got.equals(model), 'the final active image holds every write');
  const info = await qemuImg(['info', '--output=json', path.join(dir, 'm.qcow2')]);
  assert.equal((JSON.parse(info.stdout) as { 'backing-filename'?: string })['backing-filename'], undefined, 'streamed: standalone');
  for (const f of ['base', 'mid', 'top', 'snap', 'm']) {
    const ck = await qemuImg(['check', path.join(dir, `${f}.qcow2`)]);
    assert.equal(ck.code, 0, `${f}: ${ck.stdout}`);
  }
});
