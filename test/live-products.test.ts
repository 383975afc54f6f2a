/**
 * More live operations under guest load, each checked against a model of what the guest wrote
 * (the same writes applied offline by qemu-io): a live external snapshot taken between two rounds
 * of random writes (the old active image must hold the guest view at the snapshot, the new
 * overlay the view after both rounds); an intermediate commit (mid into base, top stays active)
 * and a shallow mirror (sync=top onto a target backed by mid) with writes during the job and
 * while READY. Every file passes qemu-img check.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { oracle, qemuImg, qemuIo, qemuRawView, scratch } from './helpers/qemu.js';
import { M, chainArgs, guest, jobEvent, nbdUri, quit, withDaemon } from './helpers/live-qmp.js';
import { CHAIN_SIZE, buildChain, randomWrites } from './helpers/guest-load.js';

const writesFor = (seed: number, n: number): string[] => randomWrites(seed, n, { size: CHAIN_SIZE, maxBlocks: 64, batch: 8 });

/** The guest view of `file` in `dir` after applying `rounds` of qemu-io commands offline to a copy of `dir`. */
async function modelAfter(dir: string, root: string, name: string, rounds: string[][]): Promise<Buffer[]> {
  const ref = path.join(root, name);
  fs.cpSync(dir, ref, { recursive: true });
  const views: Buffer[] = [];
  for (const w of rounds) {
    const r = await qemuIo([...w.flatMap((x) => ['-c', x]), 'top.qcow2'], ref);
    assert.equal(r.code, 0, r.stderr);
    views.push(await qemuRawView(path.join(ref, 'top.qcow2')));
  }
  return views;
}

function sameView(got: Buffer, want: Buffer, what: string): void {
  if (got.equals(want)) return;
  let i = 0;
  while (i < got.length && got[i] === want[i]) i++;
  assert.fail(`${what}: differs first at byte ${i} (got ${got[i]}, want ${want[i]})`);
}

async function allClean(dir: string): Promise<void> {
  for (const f of fs.readdirSync(dir).filter((x) => x.endsWith('.qcow2'))) {
    const ck = await qemuImg(['check', path.join(dir, f)]);
    assert.equal(ck.code, 0, `${f}: ${ck.stdout}`);
  }
}

describe('point-in-time products and more jobs under guest writes (qchain daemon)', oracle(), () => {
  test('live snapshot between two rounds of writes: the old active image is the guest view at the snapshot', async () => {
    const root = scratch('qchain-live-snap-');
    const dir = path.join(root, 'live');
    await buildChain(dir);
    const w1 = writesFor(301, 80), w2 = writesFor(302, 80);
    const [atSnap, atEnd] = await modelAfter(dir, root, 'ref', [w1, w2]);
    await withDaemon('qchain', dir, chainArgs(), async (d) => {
      await d.q.execute('qmp_capabilities');
      await guest(dir, w1);
      const r = await d.q.execute('blockdev-snapshot-sync', { 'node-name': 'top', 'snapshot-file': 'snap.qcow2', 'snapshot-node-name': 'snap', format: 'qcow2' });
      assert.ok('return' in r, JSON.stringify(r));
      await guest(dir, w2);
      await quit(d);
    });
    sameView(await qemuRawView(path.join(dir, 'top.qcow2')), atSnap, 'top.qcow2 (the snapshot)');
    sameView(await qemuRawView(path.join(dir, 'snap.qcow2')), atEnd, 'snap.qcow2 (the active overlay)');
    await allClean(dir);
  });

  test('intermediate commit of mid into base while the guest writes to top', async () => {
    const root = scratch('qchain-live-icommit-');
    const dir = path.join(root, 'live');
    await buildChain(dir);
    const w = writesFor(303, 120);
    const [want] = await modelAfter(dir, root, 'ref', [w]);
    await withDaemon('qchain', dir, chainArgs(), async (d) => {
      await d.q.execute('qmp_capabilities');
      const r = await d.q.execute('block-commit', { 'job-id': 'j', device: 'top', 'top-node': 'mid', 'base-node': 'base', speed: 4 * M });
      assert.ok('return' in r, JSON.stringify(r));
      await guest(dir, w);
      await d.q.execute('block-job-set-speed', { device: 'j', speed: 0 });
      await d.q.waitFor(jobEvent('j', 'null'), 60000);
      await quit(d);
    });
    sameView(await qemuRawView(path.join(dir, 'top.qcow2')), want, 'top.qcow2 after the commit');
    const info = await qemuImg(['info', '--output=json', path.join(dir, 'top.qcow2')]);
    assert.equal((JSON.parse(info.stdout) as { 'backing-filename': string })['backing-filename'], 'base.qcow2');
    await allClean(dir);
  });

  test('shallow mirror (sync=top) onto a target backed by mid, writes during the copy and while READY, pivot', async () => {
    const root = scratch('qchain-live-mtop-');
    const dir = path.join(root, 'live');
    await buildChain(dir);
    const w = writesFor(304, 120);
    const [want] = await modelAfter(dir, root, 'ref', [w]);
    await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', 'tgt.qcow2'], dir);
    await withDaemon('qchain', dir, chainArgs(), async (d) => {
      await d.q.execute('qmp_capabilities');
      let r = await d.q.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'tgt', file: { driver: 'file', filename: 'tgt.qcow2' }, backing: 'mid' });
      assert.ok('return' in r, JSON.stringify(r));
      r = await d.q.execute('blockdev-mirror', { 'job-id': 'j', device: 'top', target: 'tgt', sync: 'top', speed: 4 * M });
      assert.ok('return' in r, JSON.stringify(r));
      await guest(dir, w);
      await d.q.execute('block-job-set-speed', { device: 'j', speed: 0 });
      await d.q.waitFor(jobEvent('j', 'ready'), 60000);
      const w2 = await qemuIo(['-f', 'raw', '-c', 'write -P 0x5a 30M 64k', nbdUri(dir)]);
      assert.equal(w2.code, 0, w2.stderr);
      await d.q.execute('job-complete', { id: 'j' });
      await d.q.waitFor(jobEvent('j', 'null'), 60000);
      await quit(d);
    });
    want.fill(0x5a, 30 * M, 30 * M + 64 * 1024);
    sameView(await qemuRawView(path.join(dir, 'tgt.qcow2')), want, 'tgt.qcow2 (the active image after the pivot)');
    await allClean(dir);
  });

  test('mirror sync=none onto a copy of the source made before the writes: only new writes are copied; after the pivot the view is the model', async () => {
    const root = scratch('qchain-live-mnone-');
    const dir = path.join(root, 'live');
    await buildChain(dir);
    const w = writesFor(305, 120);
    const [want] = await modelAfter(dir, root, 'ref', [w]);
    // The target already holds what the source holds (same backing); the job copies what changes.
    fs.copyFileSync(path.join(dir, 'top.qcow2'), path.join(dir, 'tgt.qcow2'));
    await withDaemon('qchain', dir, chainArgs(), async (d) => {
      await d.q.execute('qmp_capabilities');
      let r = await d.q.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'tgt', file: { driver: 'file', filename: 'tgt.qcow2' }, backing: 'mid' });
      assert.ok('return' in r, JSON.stringify(r));
      r = await d.q.execute('blockdev-mirror', { 'job-id': 'j', device: 'top', target: 'tgt', sync: 'none' });
      assert.ok('return' in r, JSON.stringify(r));
      await guest(dir, w);
      await d.q.waitFor(jobEvent('j', 'ready'), 60000);
      await d.q.execute('job-complete', { id: 'j' });
      await d.q.waitFor(jobEvent('j', 'null'), 60000);
      await quit(d);
    });
    sameView(await qemuRawView(path.join(dir, 'tgt.qcow2')), want, 'tgt.qcow2 (the active image after the pivot)');
    await allClean(dir);
  });
});
