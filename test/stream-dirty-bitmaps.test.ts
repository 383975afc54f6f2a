/**
 * block-stream copies by copy-on-read, which QEMU writes below the node's request path: no dirty
 * bit is set in the streamed node's bitmaps, persistent or in memory (an incremental backup
 * after a blockpull holds only what the guest wrote). Both streams (into the active layer, and
 * intermediate into a backing node) run against qemu-storage-daemon and `qchain daemon` alike;
 * the bitmaps' counts afterwards, while running and once stored (qemu-img info), must match.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { oracle, qemuImg, qemuIo, scratch } from './helpers/qemu.js';
import { chainArgs, guest, jobEvent, onBoth, quit, withDaemon, type Tool } from './helpers/live-qmp.js';

async function session(tool: Tool, dir: string): Promise<unknown[]> {
  fs.mkdirSync(dir, { recursive: true });
  const ok = async (p: Promise<{ code: number; stderr: string }>): Promise<void> => { const r = await p; assert.equal(r.code, 0, r.stderr); };
  await ok(qemuImg(['create', '-q', '-f', 'qcow2', 'base.qcow2', '16M'], dir));
  await ok(qemuIo(['-c', 'write -P 1 0 2M', '-c', 'write -z 4M 1M', 'base.qcow2'], dir));
  await ok(qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'mid.qcow2'], dir));
  await ok(qemuIo(['-c', 'write -P 2 1M 2M', 'mid.qcow2'], dir));
  await ok(qemuImg(['bitmap', '--add', 'mid.qcow2', 'pm'], dir));
  await ok(qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', 'top.qcow2'], dir));
  await ok(qemuImg(['bitmap', '--add', 'top.qcow2', 'pt'], dir));
  const out: unknown[] = [];
  await withDaemon(tool, dir, chainArgs(), async (d) => {
    const x = async (cmd: string, args?: Record<string, unknown>): Promise<void> => { out.push(await d.q.execute(cmd, args, out.length)); };
    await x('qmp_capabilities');
    await x('block-dirty-bitmap-add', { node: 'top', name: 'mt' });
    await x('block-dirty-bitmap-add', { node: 'mid', name: 'mm' });
    await guest(dir, ['write -P 3 8M 64k']);
    // Intermediate: mid takes what base holds.
    await x('block-stream', { 'job-id': 's1', device: 'mid' });
    await d.q.waitFor(jobEvent('s1', 'null'), 60000);
    // Into the active layer: top takes everything.
    await x('block-stream', { 'job-id': 's2', device: 'top' });
    await d.q.waitFor(jobEvent('s2', 'null'), 60000);
    const r = await d.q.execute('query-named-block-nodes', { flat: true }, 'nodes');
    for (const n of r.return as Array<Record<string, unknown>>) {
      if (n['node-name'] === 'top' || n['node-name'] === 'mid') out.push([n['node-name'], n['dirty-bitmaps']]);
    }
    await quit(d);
  });
  for (const f of ['top', 'mid']) {
    const info = await qemuImg(['info', '--output=json', `${f}.qcow2`], dir);
    out.push(JSON.parse(info.stdout)['format-specific']?.data?.bitmaps);
    const c = await qemuImg(['check', `${f}.qcow2`], dir);
    assert.equal(c.code, 0, c.stdout);
  }
  return out;
}

test('block-stream sets no dirty bit in the streamed node\'s bitmaps, as qemu-storage-daemon', oracle(), async () => {
  const r = await onBoth(scratch(), session);
  assert.deepEqual(r.qchain, r.qemu);
  // Only the guest's 64 KiB is dirty in top's bitmaps; mid's stay clean.
  const top = (r.qemu.find((e) => Array.isArray(e) && e[0] === 'top') as [string, Array<{ name: string; count: number }>])[1];
  assert.deepEqual(top.map((b) => [b.name, b.count]), [['mt', 65536], ['pt', 65536]]);
});
