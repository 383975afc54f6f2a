/**
 * A rate-limited mirror paces itself as qemu-storage-daemon 7.2's does: each iteration copies a
 * whole batch (up to 16 MiB of consecutive dirty data) at once and then sleeps for what the
 * batch costs at the set speed (100 ms slices), zeroed ranges charged like data unless the
 * target writes zeros by unmapping; a set-speed that does not raise the speed leaves the sleep
 * alone. query-block-jobs' progress at fixed times, well away from the batch boundaries, must
 * match QSD's.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { oracle, qemuImg, qemuIo, scratch } from './helpers/qemu.js';
import { jobEvent, ok, qcow2Node, quit, serve, withDaemon, onBoth, type Tool } from './helpers/live-qmp.js';
import { RateLimit } from '../src/jobs/ratelimit.js';

const M = 1024 * 1024;
const SPEED = 8 * M;
/** Sample times (ms after blockdev-mirror returned); batches go out at 0, 2 s, 4 s (16 MiB at 8 MiB/s each). */
const AT = [500, 1500, 2700, 3500, 4600];

async function session(tool: Tool, dir: string): Promise<string[]> {
  fs.mkdirSync(dir, { recursive: true });
  await qemuImg(['create', '-q', '-f', 'qcow2', 'top.qcow2', '64M'], dir);
  await qemuIo(['-c', 'write -q -P 1 0 32M', 'top.qcow2'], dir);
  await qemuImg(['create', '-q', '-f', 'qcow2', 'tgt.qcow2', '64M'], dir);
  const out: string[] = [];
  await withDaemon(tool, dir, [...qcow2Node('top'), ...qcow2Node('tgt'), ...serve('top')], async (d) => {
    ok(await d.q.execute('qmp_capabilities'));
    ok(await d.q.execute('blockdev-mirror', { 'job-id': 'm', device: 'top', target: 'tgt', sync: 'full', speed: SPEED }));
    const t0 = Date.now();
    for (const at of AT) {
      await new Promise((r) => setTimeout(r, Math.max(0, t0 + at - Date.now())));
      const j = ((await d.q.execute('query-block-jobs')).return as Array<{ offset: number; len: number }>)[0];
      out.push(`${at}ms ${j.offset / M}/${j.len / M} MiB`);
      // The same speed again: no wake-up, the job sleeps on.
      if (at === 500) ok(await d.q.execute('block-job-set-speed', { device: 'm', speed: SPEED }));
    }
    ok(await d.q.execute('job-cancel', { id: 'm' }));
    await d.q.waitFor(jobEvent('m', 'null'));
    ok(await quit(d));
  });
  return out;
}

test('rate-limited blockdev-mirror: progress at fixed times as qemu-storage-daemon', oracle(), async () => {
  const { qemu: want, qchain: got } = await onBoth(scratch(), session);
  // The oracle really shows batches: all of the first 16 MiB at once, then nothing until it is paid for.
  assert.deepEqual(want.map((l) => l.split(' ')[1]), ['16/64', '16/64', '32/64', '32/64', '48/64']);
  assert.deepEqual(got, want);
});

test('RateLimit: a batch goes out whole, the delay is what it costs; a new slice starts afresh', () => {
  const r = new RateLimit();
  r.setSpeed(M); // 102.4 KiB per 100 ms slice
  assert.equal(r.delay(64 * 1024, 1000), 0, 'within the first slice quota');
  assert.equal(r.delay(15 * M + 960 * 1024, 1001), 17000 - 1001, 'the 16 MiB batch costs 16 s from the slice start');
  assert.equal(r.delay(0, 17001), 0, 'after the extended slice, accounting restarts');
  r.setSpeed(0);
  assert.equal(r.delay(100 * M, 17002), 0, 'no limit');
});
