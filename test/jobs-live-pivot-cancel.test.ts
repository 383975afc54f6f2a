/**
 * Two moments of the live jobs the other live tests leave out, under guest writes over NBD:
 * - guest writes racing job-complete of an active commit (in flight while the export pivots to
 *   the base): every acknowledged write is in the final image;
 * - a mirror cancelled after READY (block-job-cancel, no force): BLOCK_JOB_COMPLETED with no
 *   error and no pivot; the target is the guest view at the cancel, the source goes on taking
 *   writes.
 * The reference for each moment is the same writes applied offline by qemu-io; every file
 * passes qemu-img check.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { oracle, qemuImg, qemuIo, qemuRawView, scratch } from './helpers/qemu.js';
import { M, chainArgs, firstDiff, guest, jobEvent, ok, quit, withDaemon } from './helpers/live-qmp.js';
import { CHAIN_SIZE, buildChain, randomWrites } from './helpers/guest-load.js';

const writesFor = (seed: number, n: number): string[] => randomWrites(seed, n, { size: CHAIN_SIZE, maxBlocks: 64, batch: 8 });

/** The guest view after `writes` applied offline to a copy of the chain in `ref` (cumulative). */
async function reference(ref: string, writes: string[]): Promise<Buffer> {
  const r = await qemuIo([...writes.flatMap((w) => ['-c', w]), 'top.qcow2'], ref);
  assert.equal(r.code, 0, r.stderr);
  return qemuRawView(path.join(ref, 'top.qcow2'));
}

async function checkAll(dir: string): Promise<void> {
  for (const f of fs.readdirSync(dir).filter((x) => x.endsWith('.qcow2'))) {
    const ck = await qemuImg(['check', path.join(dir, f)]);
    assert.equal(ck.code, 0, `${f}: ${ck.stdout}`);
  }
}

test('guest writes racing job-complete of an active commit all land in the base', oracle(), async () => {
  const root = scratch('qchain-pivot-');
  const dir = path.join(root, 'live'), ref = path.join(root, 'ref');
  await buildChain(dir);
  fs.cpSync(dir, ref, { recursive: true });
  const w1 = writesFor(31, 60), w2 = writesFor(32, 120);
  const expect = await reference(ref, [...w1, ...w2]);
  await withDaemon('qchain', dir, chainArgs(), async (d) => {
    const { q } = d;
    await q.execute('qmp_capabilities');
    ok(await q.execute('block-commit', { 'job-id': 'j', device: 'top', 'base-node': 'base' }));
    await guest(dir, w1);
    await q.waitFor(jobEvent('j', 'ready'), 60000);
    // The second batch is under way when the pivot is asked for.
    const load = guest(dir, w2);
    await new Promise((r) => setTimeout(r, 30));
    ok(await q.execute('job-complete', { id: 'j' }));
    await load;
    await q.waitFor(jobEvent('j', 'null'), 60000);
    const done = q.received.find((m) => m.event === 'BLOCK_JOB_COMPLETED');
    assert.equal((done?.data as { error?: string } | undefined)?.error, undefined);
    await quit(d);
  });
  const got = await qemuRawView(path.join(dir, 'base.qcow2'));
  if (!got.equals(expect)) assert.fail(`base != original + every write: ${firstDiff(got, expect)}`);
  await checkAll(dir);
});

test('a mirror cancelled after READY leaves the guest view at the cancel; the source keeps every write', oracle(), async () => {
  const root = scratch('qchain-mcancel-');
  const dir = path.join(root, 'live'), ref = path.join(root, 'ref');
  await buildChain(dir);
  fs.cpSync(dir, ref, { recursive: true });
  const w1 = writesFor(41, 60), w2 = writesFor(42, 60), w3 = writesFor(43, 60);
  const atCancel = await reference(ref, [...w1, ...w2]);
  const atEnd = await reference(ref, w3);
  await withDaemon('qchain', dir, chainArgs(), async (d) => {
    const { q } = d;
    await q.execute('qmp_capabilities');
    assert.equal((await qemuImg(['create', '-q', '-f', 'qcow2', 'tgt.qcow2', String(CHAIN_SIZE)], dir)).code, 0);
    ok(await q.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'tgt', file: { driver: 'file', filename: 'tgt.qcow2' }, backing: null }));
    ok(await q.execute('blockdev-mirror', { 'job-id': 'j', device: 'top', target: 'tgt', sync: 'full', speed: 8 * M }));
    await guest(dir, w1);
    ok(await q.execute('block-job-set-speed', { device: 'j', speed: 0 }));
    await q.waitFor(jobEvent('j', 'ready'), 60000);
    await guest(dir, w2);
    ok(await q.execute('block-job-cancel', { device: 'j' }));
    const done = await q.waitFor((m) => m.event === 'BLOCK_JOB_COMPLETED' || m.event === 'BLOCK_JOB_CANCELLED', 60000);
    assert.equal(done.event, 'BLOCK_JOB_COMPLETED');
    assert.equal((done.data as { error?: string }).error, undefined);
    await q.waitFor(jobEvent('j', 'null'), 60000);
    // No pivot: the export still shows top.
    const ex = await q.execute('query-block-exports');
    assert.equal((ex.return as Array<{ 'node-name': string }>)[0]['node-name'], 'top');
    await guest(dir, w3);
    await quit(d);
  });
  const tgt = await qemuRawView(path.join(dir, 'tgt.qcow2'));
  if (!tgt.equals(atCancel)) assert.fail(`target != guest view at the cancel: ${firstDiff(tgt, atCancel)}`);
  const top = await qemuRawView(path.join(dir, 'top.qcow2'));
  if (!top.equals(atEnd)) assert.fail(`source != original + every write: ${firstDiff(top, atEnd)}`);
  await checkAll(dir);
});
