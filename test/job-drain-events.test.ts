/**
 * The pause/resume events QEMU's drained sections give running and ready jobs, as
 * qemu-storage-daemon 7.2 emits them: every transaction (empty, aborted, and the commands QEMU
 * runs as one: blockdev-snapshot-sync, blockdev-snapshot, blockdev-backup, drive-backup) first
 * drains all (each running job paused → running, each ready one standby → ready, in job
 * order); an external snapshot also drains the node it covers (and is refused on a mirror's
 * source); block-export-del drains the export's node twice; a plain bitmap command drains
 * nothing. One script against QSD and qchain, the transcripts compared whole (progress aside,
 * and the order of the jobs within one drain, which varies in QSD).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { oracle, qemuImg, qemuIo, scratch } from './helpers/qemu.js';
import { MONITOR, jobEvent, norm, ok, qcow2Node, quit, repliesThenEvents, withDaemon, onBoth, type Tool } from './helpers/live-qmp.js';

const NODES = ['a', 'ta', 'b', 'tb', 'c', 'tc', 'd', 'e'];

async function session(tool: Tool, dir: string): Promise<unknown[]> {
  fs.mkdirSync(dir, { recursive: true });
  for (const n of [...NODES, 'oe']) await qemuImg(['create', '-q', '-f', 'qcow2', `${n}.qcow2`, n === 'a' || n === 'ta' ? '256M' : '16M'], dir);
  await qemuIo(['-c', 'write -q -P 1 0 32M', 'a.qcow2'], dir);
  const received = await withDaemon(tool, dir, [...NODES.flatMap((n) => qcow2Node(n)), '--nbd-server', 'addr.type=unix,addr.path=nbd.sock',
    '--export', 'type=nbd,id=eb,node-name=b,name=b', '--export', 'type=nbd,id=ed,node-name=d,name=d,writable=on', ...MONITOR], async (d) => {
    /** Each command once no job is busy with I/O (the polls are left out of the transcript). */
    let n = 0;
    const x = async (cmd: string, args?: Record<string, unknown>): Promise<void> => {
      for (let i = 0; ; i++) {
        const jobs = (await d.q.execute('query-block-jobs', undefined, 'poll')).return as Array<{ busy: boolean }>;
        if (jobs.every((j) => !j.busy) || i > 200) break;
        await new Promise((r) => setTimeout(r, 20));
      }
      await d.q.execute(cmd, args, `${cmd}-${++n}`);
    };
    ok(await d.q.execute('qmp_capabilities', undefined, 'caps'));
    // m1 runs (rate-limited: 16 batches of 16 MiB, one each time a drain ends its sleep); m2 is ready.
    await x('blockdev-mirror', { 'job-id': 'm1', device: 'a', target: 'ta', sync: 'full', speed: 1024 });
    await x('blockdev-mirror', { 'job-id': 'm2', device: 'b', target: 'tb', sync: 'top' });
    await d.q.waitFor(jobEvent('m2', 'ready'));
    await x('transaction', { actions: [{ type: 'block-dirty-bitmap-add', data: { node: 'c', name: 'bm' } }] });
    await x('transaction', { actions: [] });
    await x('transaction', { actions: [{ type: 'abort', data: {} }] });
    await x('block-dirty-bitmap-add', { node: 'c', name: 'bm2' });
    await x('blockdev-backup', { 'job-id': 'bk', device: 'c', target: 'tc', sync: 'full' });
    await d.q.waitFor(jobEvent('bk', 'null'));
    await x('blockdev-snapshot-sync', { 'node-name': 'd', 'snapshot-file': 'sd.qcow2', 'snapshot-node-name': 'sd', format: 'qcow2' });
    await x('blockdev-snapshot-sync', { 'node-name': 'a', 'snapshot-file': 'sa.qcow2', 'snapshot-node-name': 'sa', format: 'qcow2' });
    await x('blockdev-add', { driver: 'qcow2', 'node-name': 'oe', file: { driver: 'file', filename: 'oe.qcow2' }, backing: null });
    await x('blockdev-snapshot', { node: 'e', overlay: 'oe' });
    await x('block-export-del', { id: 'eb' });
    await x('block-export-del', { id: 'ed' });
    await x('block-export-del', { id: 'nosuch' });
    ok(await quit(d, 'quit'));
    return d.q.received;
  });
  return sortDrainRuns(repliesThenEvents(received.filter((m) => m.id !== 'poll').map((m) => norm(m, true))));
}

const PAUSE = ['paused', 'standby'], RESUME = ['running', 'ready'];

/**
 * Within one drain, the order in which QSD's jobs reach their pause points varies from run to
 * run (which of two sleeping jobs is entered first); each run of consecutive pause (resume)
 * events is compared sorted by job.
 */
function sortDrainRuns(msgs: Array<Record<string, unknown>>): Array<Record<string, unknown>> {
  const kind = (m: Record<string, unknown>): string | null => {
    if (m.event !== 'JOB_STATUS_CHANGE') return null;
    const s = (m.data as { status: string }).status;
    return PAUSE.includes(s) ? 'pause' : RESUME.includes(s) ? 'resume' : null;
  };
  const out: Array<Record<string, unknown>> = [];
  for (let i = 0; i < msgs.length;) {
    const k = kind(msgs[i]);
    let j = i + 1;
    while (k && j < msgs.length && kind(msgs[j]) === k) j++;
    const id = (m: Record<string, unknown>): string => (m.data as { id: string }).id;
    out.push(...(k ? msgs.slice(i, j).sort((a, b) => id(a).localeCompare(id(b))) : msgs.slice(i, j)));
    i = j;
  }
  return out;
}

test('drained sections pause and resume jobs as in qemu-storage-daemon', oracle(), async () => {
  const { qemu: want, qchain: got } = await onBoth(scratch(), session);
  // The oracle really pauses: the empty transaction alone gives m1 paused/running and m2 standby/ready.
  const statuses = want.filter((m) => (m as { event?: string }).event === 'JOB_STATUS_CHANGE').map((m) => {
    const data = (m as { data: { id: string; status: string } }).data;
    return `${data.id}:${data.status}`;
  });
  assert.ok(statuses.filter((s) => s === 'm2:standby').length >= 8, statuses.join(' '));
  if (process.env.DEBUG_DRAIN) for (const [k, v] of Object.entries({ want, got })) console.log(k, v.map((m) => JSON.stringify(m)).join('\n'));
  assert.deepEqual(got, want);
});
