/**
 * Job filter nodes as qemu-storage-daemon 7.2 shows them, side by side with `qchain daemon`:
 * while a job runs QEMU lists a filter node above its top (blockdev-mirror, drive-mirror and
 * active commit "mirror_top", intermediate commit "commit_top" between the top and its overlay,
 * block-stream "copy-on-read", backup "copy-before-write"), named by `filter-node-name` or
 * implicitly; query-block stays empty; the filter is gone once the job has ended. The same
 * script runs against both daemons: the listings (flat and nested) and query-block during each
 * job and after it, blockdev-del of every node the job touches, a second job on them, and the
 * refusals of a bad or taken filter-node-name (with the job events they cause) must match.
 *
 * Normalised: implicit node names ('#blockNNN' -> '#block'); command ids; job progress and state
 * fields of query-block-jobs/query-jobs (offset, len, busy, status, ready, paused: the jobs are
 * rate limited, how far they got is timing); `actual-size` values (files the jobs write grow by
 * as much as they copied before the query), and protocol nodes' `virtual-size` (the file's
 * length, which grows likewise); the `count` of a job's anonymous dirty bitmaps (how
 * much is left to copy, timing again).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { oracle, qemuImg, qemuIo, scratch } from './helpers/qemu.js';
import { MONITOR, jobEvent, norm, onBoth, qcow2Node, quit, withDaemon, type Daemon, type Tool } from './helpers/live-qmp.js';
import type { QmpMessage } from './helpers/qmp-client.js';
import { firstDiff } from './helpers/job-script.js';

type X = (cmd: string, args?: Record<string, unknown>) => Promise<QmpMessage>;
type Step = (x: X, d: Daemon) => Promise<void>;

/** base.qcow2 <- mid.qcow2 <- top.qcow2 (16 MiB, 4 MiB of data each) and an empty tgt.qcow2. */
async function images(dir: string): Promise<void> {
  fs.mkdirSync(dir, { recursive: true });
  const img = async (args: string[]): Promise<void> => assert.equal((await qemuImg(args, dir)).code, 0);
  await img(['create', '-q', '-f', 'qcow2', 'base.qcow2', '16M']);
  await img(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'mid.qcow2']);
  await img(['create', '-q', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', 'top.qcow2']);
  await img(['create', '-q', '-f', 'qcow2', 'tgt.qcow2', '16M']);
  for (const [f, off] of [['base.qcow2', 0], ['mid.qcow2', 4], ['top.qcow2', 8]] as const) {
    const r = await qemuIo(['-f', 'qcow2', '-c', `write -q -P ${off + 1} ${off}M 4M`, f], dir);
    assert.equal(r.code, 0, r.stderr);
  }
}

/** base <- mid <- top linked by node name, and tgt, each over its own protocol node. */
const ARGS = [...qcow2Node('base'), ...qcow2Node('mid', ',backing=base'), ...qcow2Node('top', ',backing=mid'), ...qcow2Node('tgt'), ...MONITOR];
/** The nodes blockdev-del is tried on while a job runs (tgt only where the job uses it). */
const NODES = ['top', 'mid', 'base', 'top-file'];

/** Job progress and state: timing (see the header). */
const JOB_TIMING = ['offset', 'len', 'busy', 'status', 'ready', 'paused', 'current-progress', 'total-progress'];

/** A reply with the timing-dependent values masked (see the header). */
function masked(r: QmpMessage, jobQuery: boolean): Record<string, unknown> {
  const n = norm(r, false);
  delete n.id;
  const walk = (o: unknown): void => {
    if (Array.isArray(o)) o.forEach(walk);
    else if (o && typeof o === 'object') {
      const rec = o as Record<string, unknown>;
      if ('actual-size' in rec) rec['actual-size'] = 'N';
      // A protocol node's size is its file's, which grows as the job writes it.
      if (rec.format === 'file') rec['virtual-size'] = 'N';
      const bitmaps = rec['dirty-bitmaps'];
      if (Array.isArray(bitmaps)) for (const b of bitmaps as Array<Record<string, unknown>>) if (!('name' in b)) b.count = 'N';
      if (jobQuery) for (const k of JOB_TIMING) if (k in rec) rec[k] = 'N';
      Object.values(rec).forEach(walk);
    }
  };
  walk(n.return);
  return n;
}

/** The listings and query-block. */
const QUERIES: Step = async (x) => {
  await x('query-named-block-nodes');
  await x('query-named-block-nodes', { flat: true });
  await x('query-block');
};

/** While job `j` runs: the listings, the job queries, blockdev-del of each node and of the filter, a second job on the device. */
const during = (filter: string | null, nodes: string[], backup: boolean): Step => async (x) => {
  await QUERIES(x, undefined as never);
  await x('query-block-jobs');
  await x('query-jobs');
  for (const n of [...nodes, ...(filter ? [filter] : [])]) await x('blockdev-del', { 'node-name': n });
  // Not during a backup: QEMU starts a stream or a second backup of a backup's source (the
  // backup blocks its filter, not the source); job-limits-live.test.ts runs those.
  if (!backup) await x('block-stream', { 'job-id': 'k', device: 'top' });
  await x('blockdev-mirror', { 'job-id': 'k', device: 'top', target: 'tgt', sync: 'full' });
  if (!backup) await x('blockdev-backup', { 'job-id': 'k', device: 'top', target: 'tgt', sync: 'full' });
  await x('block-commit', { 'job-id': 'k', device: 'top' });
};

/** Cancel job `j`, wait until it has gone, list again. */
const after: Step = async (x, d) => {
  await x('job-cancel', { id: 'j' });
  await d.q.waitFor(jobEvent('j', 'null'), 30000);
  await QUERIES(x, d);
};

/** One job, started by `cmd` (rate limited), looked at while it runs and after it has gone. */
const jobRun = (cmd: string, args: Record<string, unknown>, filter: string | null = null): Step => async (x, d) => {
  // Only this run's events count (an earlier job 'j' sent its null already).
  d.q.received.length = 0;
  await x(cmd, { 'job-id': 'j', speed: 1, ...args, ...(filter ? { 'filter-node-name': filter } : {}) });
  await during(filter, [...NODES, ...(args.target === 'tgt' ? ['tgt'] : args['node-name'] ? [args['node-name'] as string] : [])], cmd.endsWith('-backup'))(x, d);
  await after(x, d);
};

/** The script's replies, masked, one line per command; then the job events of jobs named e*. */
async function session(tool: Tool, dir: string, steps: Step[]): Promise<string[]> {
  await images(dir);
  return withDaemon(tool, dir, ARGS, async (d) => {
    const out: string[] = [];
    const x: X = async (cmd, a) => {
      const r = await d.q.execute(cmd, a, out.length);
      out.push(`${cmd} ${JSON.stringify(a ?? {})} -> ${JSON.stringify(masked(r, cmd === 'query-block-jobs' || cmd === 'query-jobs'))}`);
      return r;
    };
    await x('qmp_capabilities');
    for (const s of steps) await s(x, d);
    await quit(d);
    const events = d.q.received.filter((m) => m.event === 'JOB_STATUS_CHANGE' && /^e/.test((m.data as { id: string }).id));
    return [...out, ...events.map((m) => JSON.stringify(norm(m, false)))];
  });
}

/** Run the script on both daemons: the same lines, member order included. */
async function same(steps: Step[]): Promise<string[]> {
  const res = await onBoth(scratch(), (tool, dir) => session(tool, dir, steps));
  assert.deepEqual(res.qchain.map((l) => l.split(' -> ')[0]), res.qemu.map((l) => l.split(' -> ')[0]));
  for (let i = 0; i < res.qemu.length; i++) {
    if (res.qchain[i] !== res.qemu[i]) {
      if (process.env.QCHAIN_DEBUG) for (const t of ['qemu', 'qchain'] as const) console.log(t, res[t].slice(0, i + 1).map((l) => (l.startsWith('query-named') ? `${l.split(' -> ')[0]} ${drivers(l).join(' ')}` : l.slice(0, 300))).join('\n'));
      assert.fail(`line ${i} (${res.qemu[i].split(' -> ')[0]}): ${firstDiff(reply(res.qchain[i]), reply(res.qemu[i]), '')}`);
    }
  }
  return res.qemu;
}

const reply = (line: string): unknown => (line.includes(' -> ') ? JSON.parse(line.slice(line.indexOf(' -> ') + 4)) : JSON.parse(line));

/** The drivers of the nodes a listing line names, in order. */
function drivers(line: string): string[] {
  const r = JSON.parse(line.slice(line.indexOf(' -> ') + 4)) as { return: Array<{ 'node-name': string; drv: string }> };
  return r.return.map((n) => `${n['node-name']}:${n.drv}`);
}

test('job filters: blockdev-mirror (mirror_top), implicit and named', oracle(), async () => {
  const lines = await same([
    jobRun('blockdev-mirror', { device: 'top', target: 'tgt', sync: 'full' }),
    jobRun('blockdev-mirror', { device: 'top', target: 'tgt', sync: 'top' }, 'mf'),
  ]);
  const flat = lines.filter((l) => l.startsWith('query-named-block-nodes {"flat":true}'));
  assert.equal(drivers(flat[0])[0], '#block:mirror_top');
  assert.equal(drivers(flat[2])[0], 'mf:mirror_top');
  assert.ok(!drivers(flat[1]).some((n) => n.endsWith(':mirror_top')), 'gone after the job');
});

test('job filters: active commit (mirror_top) and intermediate commit (commit_top), implicit and named', oracle(), async () => {
  const lines = await same([
    jobRun('block-commit', { device: 'top' }),
    jobRun('block-commit', { device: 'top' }, 'af'),
    jobRun('block-commit', { device: 'top', 'top-node': 'mid' }),
    jobRun('block-commit', { device: 'top', 'top-node': 'mid' }, 'cf'),
  ]);
  const flat = lines.filter((l) => l.startsWith('query-named-block-nodes {"flat":true}'));
  assert.deepEqual(flat.map((l) => drivers(l)[0]), ['#block:mirror_top', 'tgt:qcow2', 'af:mirror_top', 'tgt:qcow2', '#block:commit_top', 'tgt:qcow2', 'cf:commit_top', 'tgt:qcow2']);
});

test('job filters: block-stream (copy-on-read) and backup (copy-before-write), implicit and named', oracle(), async () => {
  const lines = await same([
    jobRun('block-stream', { device: 'top' }),
    jobRun('block-stream', { device: 'top', 'base-node': 'base' }, 'sf'),
    jobRun('blockdev-backup', { device: 'top', target: 'tgt', sync: 'full' }),
    jobRun('blockdev-backup', { device: 'top', target: 'tgt', sync: 'top' }, 'bf'),
  ]);
  const flat = lines.filter((l) => l.startsWith('query-named-block-nodes {"flat":true}'));
  assert.deepEqual(flat.map((l) => drivers(l)[0]), ['#block:copy-on-read', 'tgt:qcow2', 'sf:copy-on-read', 'tgt:qcow2', '#block:copy-before-write', 'tgt:qcow2', 'bf:copy-before-write', 'tgt:qcow2']);
});

test('job filters: drive-mirror (implicit only) and drive-backup with a named filter', oracle(), async () => {
  await same([
    async (x) => { await x('drive-mirror', { 'job-id': 'j', device: 'top', target: 'dm.qcow2', sync: 'full', 'filter-node-name': 'x' }); },
    jobRun('drive-mirror', { device: 'top', target: 'dm.qcow2', sync: 'full', 'node-name': 'dm' }),
    jobRun('drive-backup', { device: 'top', target: 'db.qcow2', sync: 'full' }, 'dbf'),
  ]);
});

test('job filters: a filter-node-name that is taken or malformed, before and after the job ID check', oracle(), async () => {
  const bad = ['tgt', '1x', '#block5', ''];
  await same([async (x, d) => {
    for (const name of bad) {
      const f = { 'filter-node-name': name };
      await x('blockdev-mirror', { 'job-id': 'e1', device: 'top', target: 'tgt', sync: 'full', ...f });
      await x('block-commit', { 'job-id': 'e2', device: 'top', ...f });
      await x('block-commit', { 'job-id': 'e3', device: 'top', 'top-node': 'mid', ...f });
      await x('block-stream', { 'job-id': 'e4', device: 'top', ...f });
      await x('blockdev-backup', { 'job-id': 'e5', device: 'top', target: 'tgt', sync: 'full', ...f });
    }
    // An invalid job ID or speed with a taken name: which is refused first.
    for (const more of [{ 'job-id': '1' }, { 'job-id': 'e6', speed: -1 }]) {
      const f = { 'filter-node-name': 'tgt', ...more };
      await x('blockdev-mirror', { device: 'top', target: 'tgt', sync: 'full', ...f });
      await x('block-commit', { device: 'top', ...f });
      await x('block-commit', { device: 'top', 'top-node': 'mid', ...f });
      await x('block-stream', { device: 'top', ...f });
      await x('blockdev-backup', { device: 'top', target: 'tgt', sync: 'full', ...f });
    }
    await x('blockdev-mirror', { 'job-id': 'e7', device: 'top', target: 'tgt', sync: 'full', 'filter-node-name': 5 });
    // A filter's name is taken while its job runs.
    await x('block-stream', { 'job-id': 'j', device: 'top', speed: 1, 'filter-node-name': 'sf' });
    await x('blockdev-add', { driver: 'qcow2', 'node-name': 'sf', file: 'tgt-file' });
    await x('query-jobs');
    await after(x, d);
  }]);
});

test('job filters: still listed while a job waits for job-finalize, gone once it has concluded', oracle(), async () => {
  await same([async (x, d) => {
    await x('blockdev-mirror', { 'job-id': 'm', device: 'top', target: 'tgt', sync: 'full', 'auto-finalize': false, 'auto-dismiss': false, 'filter-node-name': 'mf' });
    await d.q.waitFor((m) => m.event === 'BLOCK_JOB_READY', 30000);
    await x('job-complete', { id: 'm' });
    await d.q.waitFor(jobEvent('m', 'pending'), 30000);
    await QUERIES(x, d);
    await x('blockdev-del', { 'node-name': 'mf' });
    await x('job-finalize', { id: 'm' });
    await d.q.waitFor(jobEvent('m', 'concluded'), 30000);
    await QUERIES(x, d);
    await x('job-dismiss', { id: 'm' });
    // A stream and a backup run to their end. (QSD 7.2 segfaults on query-named-block-nodes while
    // a finished stream waits for job-dismiss, so that one is dismissed at once.)
    await x('block-stream', { 'job-id': 's', device: 'mid' });
    await d.q.waitFor(jobEvent('s', 'null'), 30000);
    await QUERIES(x, d);
    await x('blockdev-backup', { 'job-id': 'b', device: 'top', target: 'tgt', sync: 'full', 'auto-dismiss': false });
    await d.q.waitFor(jobEvent('b', 'concluded'), 30000);
    await QUERIES(x, d);
  }]);
});
