/**
 * Job and bitmap command refusals against qemu-storage-daemon 7.2, side by side: drive-mirror's
 * sync=incremental/bitmap (accepted by the schema, refused by mirror_start), drive-backup's
 * bitmap/bitmap-mode combinations and compress on a raw target, job-pause of a paused job and
 * job-resume of a running one (job and legacy verbs), blockdev-create's progress and error when
 * its file node is another node's file, block-dirty-bitmap-merge finding its sources before
 * checking its busy target. Every reply and query-jobs must match.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { oracle, qemuImg, qemuIo, scratch } from './helpers/qemu.js';
import type { QmpMessage } from './helpers/qmp-client.js';
import { MONITOR, jobEvent, onBoth, qcow2Node, quit, withDaemon, type Tool } from './helpers/live-qmp.js';

const ARGS = [...qcow2Node('base'), ...qcow2Node('top', ',backing=base'),
  '--nbd-server', 'addr.type=unix,addr.path=nbd.sock',
  '--export', 'type=nbd,id=exp0,node-name=top,name=vda,writable=on,bitmaps.0=bm0',
  '--export', 'type=nbd,id=exp1,node-name=base,name=ro', ...MONITOR];

type Step = [string, Record<string, unknown>?] | ['wait', string, string];

const SCRIPT: Step[] = [
  ['drive-mirror', { device: 'top', target: 'm1.qcow2', sync: 'incremental', 'job-id': 'x' }],
  ['drive-mirror', { device: 'top', target: 'm2.qcow2', sync: 'bitmap', 'job-id': 'x' }],
  ['drive-mirror', { device: 'top', target: 'm3.qcow2', sync: 'full', granularity: 1000 }],
  ['drive-backup', { device: 'top', target: 'b1.qcow2', sync: 'bitmap', 'job-id': 'x' }],
  ['drive-backup', { device: 'top', target: 'b1.qcow2', sync: 'full', bitmap: 'bm0', 'job-id': 'x' }],
  ['drive-backup', { device: 'top', target: 'b1.qcow2', sync: 'full', 'bitmap-mode': 'never', 'job-id': 'x' }],
  ['drive-backup', { device: 'top', target: 'b1.qcow2', sync: 'incremental', bitmap: 'bm0', 'bitmap-mode': 'never', 'job-id': 'x' }],
  ['drive-backup', { device: 'top', target: 'b1.qcow2', sync: 'incremental', bitmap: 'nob', 'job-id': 'x' }],
  ['drive-backup', { device: 'top', target: 'b2.raw', sync: 'full', compress: true, 'job-id': 'x', format: 'raw' }],
  ['block-stream', { device: 'top', 'job-id': 's1', speed: 1 }],
  ['job-pause', { id: 's1' }],
  ['job-pause', { id: 's1' }],
  ['block-job-pause', { device: 's1' }],
  ['job-resume', { id: 's1' }],
  ['job-resume', { id: 's1' }],
  ['block-job-resume', { device: 's1' }],
  ['block-job-cancel', { device: 's1', force: true }],
  ['wait', 's1', 'null'],
  ['blockdev-create', { 'job-id': 'cr', options: { driver: 'qcow2', file: 'base-file', size: 1048576 } }],
  ['wait', 'cr', 'concluded'],
  ['query-jobs'],
  ['job-dismiss', { id: 'cr' }],
  ['block-dirty-bitmap-merge', { node: 'top', target: 'bm0', bitmaps: [{ node: 'base', name: 'zz' }] }],
  ['block-dirty-bitmap-merge', { node: 'top', target: 'bm0', bitmaps: ['zz'] }],
  ['block-dirty-bitmap-add', { node: 'top', name: 'free' }],
  ['block-dirty-bitmap-merge', { node: 'top', target: 'bm0', bitmaps: ['free'] }],
];

async function session(tool: Tool, dir: string): Promise<unknown[]> {
  fs.mkdirSync(dir, { recursive: true });
  const ok = async (p: Promise<{ code: number; stderr: string }>): Promise<void> => { const r = await p; assert.equal(r.code, 0, r.stderr); };
  await ok(qemuImg(['create', '-q', '-f', 'qcow2', 'base.qcow2', '16M'], dir));
  await ok(qemuIo(['-c', 'write -P 1 0 4M', 'base.qcow2'], dir));
  await ok(qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'top.qcow2'], dir));
  await ok(qemuImg(['bitmap', '--add', 'top.qcow2', 'bm0'], dir));
  return withDaemon(tool, dir, ARGS, async (d) => {
    const out: unknown[] = [];
    await d.q.execute('qmp_capabilities');
    for (const [i, step] of SCRIPT.entries()) {
      if (step[0] === 'wait') {
        await d.q.waitFor(jobEvent(step[1] as string, step[2] as string), 60000);
        continue;
      }
      const r: QmpMessage = await d.q.execute(step[0], step[1] as Record<string, unknown> | undefined, i);
      out.push([step[0], JSON.parse(JSON.stringify(r).replace(/#block\d+/g, '#block'))]);
    }
    await quit(d);
    return out;
  });
}

test('job and bitmap command refusals read as qemu-storage-daemon\'s', oracle(), async () => {
  const r = await onBoth(scratch(), session);
  assert.deepEqual(r.qchain, r.qemu);
  assert.ok(JSON.stringify(r.qemu).includes('Job is already paused'), JSON.stringify(r.qemu));
});
