/**
 * Job corner cases side by side with qemu-storage-daemon 7.2 (test/helpers/job-script.ts runs
 * the same script on both daemons and compares every reply, timing masked):
 * - a block-stream of a backup's source, and a second backup of it, run beside the backup (QEMU
 *   blocks the backup's filter, not its source); the guest view, the streamed top and both
 *   backups end up as QSD's (qemu-img compare). A backup's filter above a lower layer stops a
 *   stream through it (named in the refusal); a backup or mirror into a backing node is refused
 *   where QEMU's permissions or op blockers refuse it;
 * - commands naming a job's filter node: the busy refusals, "Need a root block node", exports of
 *   a filter (they serve its child; query-block-exports names the filter, and an export of the
 *   filtered node names it too while the job runs);
 * - blockdev-mirror into a target of another size: the job starts and fails (BLOCK_JOB_COMPLETED
 *   with the error); granularity out of range, not a power of two, or of the wrong type;
 * - an incremental backup's successor bitmap, listed on the source while the backup runs, in
 *   creation order among the named bitmaps.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { oracle, qemuImg, qemuIo } from './helpers/qemu.js';
import { exportView, guest, jobEvent, nbdUri, put } from './helpers/live-qmp.js';
import { replyOf, same, type Step, type X } from './helpers/job-script.js';

/** Cancel job `id` (force: a ready mirror too) and wait until it has gone. */
const cancelled = async (x: X, d: Parameters<Step>[1], id: string): Promise<void> => {
  const gone = jobEvent(id, 'null');
  const before = d.q.received.filter(gone).length;
  const r = await x('block-job-cancel', { device: id, force: true });
  if ('return' in r) await d.q.waitFor(() => d.q.received.filter(gone).length > before, 30000);
};

/** The flat listing, with the filters' and nodes' bitmaps. */
const listing = (x: X): Promise<unknown> => x('query-named-block-nodes', { flat: true });

test('a stream and a second backup of a backup\'s source run beside it; images as QSD\'s', oracle(), async () => {
  const { root } = await same([async (x, d, dir) => {
    await x('blockdev-backup', { 'job-id': 'b1', device: 'top', target: 'tgt', sync: 'full', speed: 1 });
    await guest(dir, [put('A', 0, 1), put('B', 9, 1)]);
    await x('blockdev-backup', { 'job-id': 'b2', device: 'top', target: 'tgt2', sync: 'full', speed: 1 });
    await x('block-stream', { 'job-id': 's', device: 'top', speed: 1 });
    await listing(x);
    await x('query-named-block-nodes');
    await x('query-block-exports');
    // Busy while the stream runs: a third backup of the top, a backup of a streamed layer.
    await x('blockdev-backup', { 'job-id': 'b3', device: 'top', target: 'small', sync: 'full' });
    await x('blockdev-backup', { 'job-id': 'b3', device: 'mid', target: 'small', sync: 'full' });
    await guest(dir, [put('C', 2, 1), put('D', 5, 2)]);
    await x('block-job-set-speed', { device: 's', speed: 0 });
    await d.q.waitFor(jobEvent('s', 'null'), 30000);
    await listing(x);
    await guest(dir, [put('E', 4, 1), put('F', 15, 1)]);
    for (const b of ['b1', 'b2']) await x('block-job-set-speed', { device: b, speed: 0 });
    for (const b of ['b1', 'b2']) await d.q.waitFor(jobEvent(b, 'null'), 30000);
    await listing(x);
    await x('query-block-exports');
  }]);
  const dirs = { qemu: path.join(root, 'qemu'), qchain: path.join(root, 'qchain') };
  // The backups hold the disk as it was at each start; the top stands alone after the stream.
  for (const f of ['tgt.qcow2', 'tgt2.qcow2', 'top.qcow2']) {
    const r = await qemuImg(['compare', '-f', 'qcow2', '-F', 'qcow2', path.join(dirs.qemu, f), path.join(dirs.qchain, f)]);
    assert.equal(r.code, 0, `${f}: ${r.stdout}${r.stderr}`);
  }
  const info = await qemuImg(['info', path.join(dirs.qchain, 'top.qcow2')]);
  assert.doesNotMatch(info.stdout, /backing file/);
  const r = await qemuImg(['compare', '-f', 'qcow2', '-F', 'qcow2', path.join(dirs.qchain, 'tgt.qcow2'), path.join(dirs.qchain, 'tgt2.qcow2')]);
  assert.equal(r.code, 1, 'the second backup started after the guest wrote');
});

test('a backup\'s filter above a lower layer stops a stream through it; backups and mirrors into backing nodes', oracle(), async () => {
  await same([async (x, d) => {
    await x('blockdev-backup', { 'job-id': 'b', device: 'mid', target: 'tgt', sync: 'full', speed: 1 });
    await x('block-stream', { 'job-id': 's', device: 'top', speed: 1 });
    await x('block-stream', { 'job-id': 's', device: 'top', 'base-node': 'mid', speed: 1 });
    await x('block-stream', { 'job-id': 's', device: 'top', 'base-node': 'base', speed: 1, 'filter-node-name': 'sf' });
    // The backup's own source streams.
    await x('block-stream', { 'job-id': 's', device: 'mid', speed: 1 });
    await listing(x);
    await cancelled(x, d, 's');
    await cancelled(x, d, 'b');
    // A named filter is named in the refusal.
    await x('blockdev-backup', { 'job-id': 'b', device: 'mid', target: 'tgt', sync: 'full', speed: 1, 'filter-node-name': 'bf' });
    await x('block-stream', { 'job-id': 's', device: 'top', speed: 1 });
    await cancelled(x, d, 'b');
    // Into a backing node: a backup may write it unless a backup reads through its overlay; a mirror never.
    await x('blockdev-backup', { 'job-id': 'b', device: 'tgt', target: 'base', sync: 'full', speed: 1 });
    await cancelled(x, d, 'b');
    await x('blockdev-mirror', { 'job-id': 'm', device: 'tgt', target: 'mid', sync: 'full', speed: 1 });
    await x('blockdev-mirror', { 'job-id': 'm', device: 'tgt', target: 'mid', sync: 'full', speed: 1, granularity: 1000 });
    await x('blockdev-backup', { 'job-id': 'b2', device: 'top', target: 'tgt2', sync: 'full', speed: 1 });
    await x('blockdev-backup', { 'job-id': 'b', device: 'tgt', target: 'mid', sync: 'full', speed: 1 });
    await x('blockdev-backup', { 'job-id': 'b', device: 'tgt', target: 'mid', sync: 'full', speed: 1, 'filter-node-name': 'nf' });
    await cancelled(x, d, 'b2');
  }]);
});

/** Commands naming a job's filter node `f`. */
const aimedAt = (f: string, backup = true): Step => async (x) => {
  await x('block-stream', { 'job-id': 'k', device: f });
  if (backup) await x('blockdev-backup', { 'job-id': 'k', device: f, target: 'tgt2', sync: 'full', speed: 1 });
  await x('blockdev-mirror', { 'job-id': 'k', device: f, target: 'tgt2', sync: 'full', speed: 1 });
  await x('block-commit', { 'job-id': 'k', device: f });
  await x('blockdev-snapshot', { node: f, overlay: 'small' });
  await x('blockdev-snapshot-sync', { 'node-name': f, 'snapshot-file': 'sn.qcow2', format: 'qcow2' });
  await x('block_resize', { 'node-name': f, size: 1048576 });
  await x('blockdev-backup', { 'job-id': 'k', device: 'tgt2', target: f, sync: 'full' });
  await x('blockdev-mirror', { 'job-id': 'k', device: 'tgt2', target: f, sync: 'full' });
  await x('block-stream', { 'job-id': 'k', device: 'top', 'base-node': f });
  await x('block-commit', { 'job-id': 'k', device: 'top', 'base-node': f });
  await x('block-commit', { 'job-id': 'k', device: 'top', 'top-node': f });
  await x('query-jobs');
};

/** A job with filter `f`, the commands aimed at it, exports of it, cancel, exports again. */
const filterRun = (cmd: string, args: Record<string, unknown>, f: string): Step => async (x, d, dir) => {
  await x(cmd, { 'job-id': 'j', speed: 1, 'filter-node-name': f, ...args });
  await aimedAt(f)(x, d, dir);
  await x('block-export-add', { type: 'nbd', id: `w-${f}`, 'node-name': f, name: `w-${f}`, writable: true });
  await x('block-export-add', { type: 'nbd', id: `r-${f}`, 'node-name': f, name: `r-${f}` });
  // (Not during an active commit: it unshares consistent read on the layers it commits.)
  if (cmd !== 'block-commit') await x('block-export-add', { type: 'nbd', id: `t-${f}`, 'node-name': 'top', name: `t-${f}` });
  await x('query-block-exports');
  await x('job-cancel', { id: 'j' });
  await d.q.waitFor(jobEvent('j', 'null'), 30000);
  await x('query-block-exports');
  for (const e of ['w', 'r', 't']) await x('block-export-del', { id: `${e}-${f}` });
  d.q.received.length = 0;
};

test('commands naming a job\'s filter node: refusals and exports', oracle(), async () => {
  await same([
    filterRun('blockdev-backup', { device: 'top', target: 'tgt', sync: 'full' }, 'bf'),
    filterRun('blockdev-mirror', { device: 'top', target: 'tgt', sync: 'full' }, 'mf'),
    filterRun('block-commit', { device: 'top' }, 'af'),
    filterRun('block-stream', { device: 'top' }, 'sf'),
    // An intermediate commit's commit_top: its blockdev-backup (which QSD starts) is left out.
    async (x, d, dir) => {
      await x('block-commit', { 'job-id': 'j', speed: 1, 'filter-node-name': 'cf', device: 'top', 'top-node': 'mid' });
      await aimedAt('cf', false)(x, d, dir);
      await x('block-export-add', { type: 'nbd', id: 'w-cf', 'node-name': 'cf', name: 'w-cf', writable: true });
      await x('block-export-add', { type: 'nbd', id: 'r-cf', 'node-name': 'cf', name: 'r-cf' });
      await x('query-block-exports');
      await x('job-cancel', { id: 'j' });
      await d.q.waitFor(jobEvent('j', 'null'), 30000);
      await x('query-block-exports');
    },
  ]);
});

test('an export of a backup\'s filter reads what the filtered node shows; guest writes through it reach the backup first', oracle(), async () => {
  const { lines, root } = await same([async (x, d, dir) => {
    await x('blockdev-backup', { 'job-id': 'j', device: 'top', target: 'tgt', sync: 'full', speed: 1, 'filter-node-name': 'bf' });
    await x('block-export-add', { type: 'nbd', id: 'e1', 'node-name': 'bf', name: 'viaf', writable: true });
    // What the filter's export reads is the top's view.
    assert.deepEqual(await exportView(dir, 'viaf'), await exportView(dir, 'vda'));
    const w = await qemuIo(['-f', 'raw', '-c', put('G', 3, 1), nbdUri(dir, 'viaf')]);
    assert.equal(w.code, 0, w.stderr);
    await x('block-job-set-speed', { device: 'j', speed: 0 });
    await d.q.waitFor(jobEvent('j', 'null'), 30000);
    await x('query-block-exports');
  }], async (dir) => {
    const r = await qemuImg(['compare', '-f', 'qcow2', '-F', 'qcow2', 'tgt.qcow2', 'top.qcow2'], dir);
    return [`compare tgt top: ${r.code}`];
  });
  assert.equal(lines[lines.length - 1], 'compare tgt top: 1');
  const r = await qemuImg(['compare', '-f', 'qcow2', '-F', 'qcow2', path.join(root, 'qemu', 'tgt.qcow2'), path.join(root, 'qchain', 'tgt.qcow2')]);
  assert.equal(r.code, 0, `the backups: ${r.stdout}${r.stderr}`);
});

test('blockdev-mirror into a target of another size: the job fails; granularity checks', oracle(), async () => {
  await same([async (x, d, dir) => {
    for (const g of [256, 511, 512, 1000, 64 * 1024 * 1024, 128 * 1024 * 1024, 3 * 65536, -1, 0, 2 ** 32, 1.5, '4096']) {
      await x('blockdev-mirror', { 'job-id': 'g', device: 'top', target: 'tgt', sync: 'full', granularity: g, speed: 1 });
      await cancelled(x, d, 'g');
    }
    for (const [i, g] of [256, 1000, 2 ** 32, 'x'].entries()) {
      await x('drive-mirror', { 'job-id': 'g', device: 'top', target: `dm${i}.qcow2`, sync: 'full', granularity: g, format: 'qcow2' });
      await cancelled(x, d, 'g');
    }
    // The order of the checks: sync's value and granularity's type first, then the node lookups,
    // busy nodes and the granularity's value, then the rest.
    await x('blockdev-mirror', { 'job-id': '1', device: 'nosuch', target: 'top', sync: 'bad', granularity: 1000 });
    await x('blockdev-mirror', { 'job-id': '1', device: 'nosuch', target: 'top', sync: 'full', granularity: 'x' });
    await x('blockdev-mirror', { 'job-id': 'g', device: 'top', target: 'top', sync: 'full', granularity: 1000 });
    await x('blockdev-mirror', { 'job-id': 'g', device: 'top', target: 'small', sync: 'full', granularity: 1000 });
    await x('blockdev-mirror', { 'job-id': '1', device: 'top', target: 'tgt', sync: 'full', granularity: 1000 });
    await x('blockdev-mirror', { 'job-id': 'g', device: 'top', target: 'tgt', sync: 'full', granularity: 1000, speed: -1 });
    await x('blockdev-mirror', { 'job-id': 'g', device: 'top', target: 'tgt', sync: 'full', 'buf-size': -1 });
    await x('blockdev-mirror', { 'job-id': 'g', device: 'top', target: 'top', sync: 'full', 'buf-size': -1 });
    await x('blockdev-backup', { 'job-id': 'b', device: 'tgt2', target: 'tgt', sync: 'full', speed: 1 });
    await x('blockdev-mirror', { 'job-id': 'g', device: 'top', target: 'tgt', sync: 'full', granularity: 1000 });
    await cancelled(x, d, 'b');
    d.q.received.length = 0;
    // Another size: created, running, then the error.
    await x('blockdev-mirror', { 'job-id': 'e1', device: 'top', target: 'small', sync: 'full' });
    await d.q.waitFor(jobEvent('e1', 'null'), 30000);
    await x('blockdev-mirror', { 'job-id': 'e2', device: 'top', target: 'small', sync: 'top', 'auto-dismiss': false, 'auto-finalize': false, 'filter-node-name': 'ff', speed: 1 });
    await d.q.waitFor(jobEvent('e2', 'concluded'), 30000);
    await listing(x);
    await x('query-jobs');
    await x('query-block-jobs');
    await x('job-dismiss', { id: 'e2' });
    assert.equal((await qemuImg(['create', '-q', '-f', 'qcow2', 'ex.qcow2', '16M'], dir)).code, 0);
    await x('drive-mirror', { 'job-id': 'e3', device: 'small', target: 'ex.qcow2', sync: 'full', mode: 'existing', format: 'qcow2' });
    await d.q.waitFor(jobEvent('e3', 'null'), 30000);
  }]);
});

test('an incremental backup\'s successor bitmap is listed on its source, in creation order', oracle(), async () => {
  const { lines } = await same([async (x, d, dir) => {
    await x('block-dirty-bitmap-add', { node: 'top', name: 'bm0' });
    await x('block-dirty-bitmap-add', { node: 'top', name: 'bm1', persistent: true });
    await guest(dir, [put('A', 0, 1), put('B', 9, 1)]);
    await x('blockdev-backup', { 'job-id': 'b', device: 'top', target: 'tgt', sync: 'incremental', bitmap: 'bm0', speed: 1 });
    await listing(x);
    await guest(dir, [put('C', 2, 1)]);
    await listing(x);
    await x('query-named-block-nodes');
    await x('block-dirty-bitmap-add', { node: 'top', name: 'bm2', disabled: true });
    // Something to copy, so that the second backup runs until it is let go.
    await x('block-dirty-bitmap-add', { node: 'top', name: 'bm3' });
    await guest(dir, [put('E', 12, 2)]);
    await x('blockdev-backup', { 'job-id': 'b2', device: 'top', target: 'tgt2', sync: 'bitmap', bitmap: 'bm3', 'bitmap-mode': 'always', speed: 1 });
    await x('block-dirty-bitmap-remove', { node: 'top', name: 'bm2' });
    await x('block-dirty-bitmap-add', { node: 'top', name: 'bm4' });
    await guest(dir, [put('D', 3, 1)]);
    await listing(x);
    await cancelled(x, d, 'b');
    await listing(x);
    await x('block-job-set-speed', { device: 'b2', speed: 0 });
    await d.q.waitFor(jobEvent('b2', 'null'), 30000);
    await listing(x);
    await x('blockdev-backup', { 'job-id': 'b9', device: 'top', target: 'tgt', sync: 'incremental', bitmap: 'bm0' });
    await d.q.waitFor(jobEvent('b9', 'null'), 30000);
    await listing(x);
  }]);
  const during = replyOf(lines.find((l) => l.startsWith('query-named-block-nodes')) as string).return as Array<Record<string, unknown>>;
  const top = during.find((n) => n['node-name'] === 'top') as { 'dirty-bitmaps': Array<Record<string, unknown>> };
  assert.deepEqual(top['dirty-bitmaps'].map((b) => b.name ?? (b.recording ? 'successor' : 'copy')), ['copy', 'successor', 'bm1', 'bm0']);
});
