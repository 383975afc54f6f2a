/**
 * A sync=full mirror's initial work, as qemu-storage-daemon 7.2 sizes it: a drive-mirror image
 * it creates reads as zeros, so only what the source chain holds is copied (an all-unallocated
 * source gives a job of length 0); a blockdev-mirror target is copied whole, unless it was
 * opened with discard=unmap, when it is zeroed first (uncounted) and only what the chain holds
 * follows; what the chain does not hold is zeroed on the target (QEMU's MIRROR_METHOD_ZERO), so
 * stale target data does not survive. Job lengths, READY/COMPLETED events, and the target's map
 * and content after the pivot are compared with QSD's, for an empty source, data in the backing
 * file, and zero clusters.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { oracle, qemuImg, qemuIo, scratch } from './helpers/qemu.js';
import { jobEvent, norm, ok, qcow2Node, quit, serve, withDaemon, type Tool } from './helpers/live-qmp.js';

type Source = 'empty' | 'backing' | 'zero';
type How = 'blockdev' | 'blockdev-unmap' | 'drive';

async function session(tool: Tool, dir: string, src: Source, how: How): Promise<unknown[]> {
  fs.rmSync(dir, { recursive: true, force: true });
  fs.mkdirSync(dir, { recursive: true });
  await qemuImg(['create', '-q', '-f', 'qcow2', 'base.qcow2', '4M'], dir);
  if (src === 'backing') await qemuIo(['-c', 'write -q -P 1 0 1M', 'base.qcow2'], dir);
  await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'top.qcow2'], dir);
  if (src === 'zero') await qemuIo(['-c', 'write -q -z 0 1M', '-c', 'write -q -P 3 2M 64k', 'top.qcow2'], dir);
  // Stale data in the pre-made target: the mirror must leave it reading as zeros.
  await qemuImg(['create', '-q', '-f', 'qcow2', 'tgt.qcow2', '4M'], dir);
  await qemuIo(['-c', 'write -q -P 9 3M 128k', 'tgt.qcow2'], dir);
  const tgt = how === 'blockdev-unmap' ? ',discard=unmap' : '';
  const out: unknown[] = [];
  await withDaemon(tool, dir, [...qcow2Node('base'), ...qcow2Node('top', ',backing=base'), ...qcow2Node('tgt', tgt), ...serve('top')], async (d) => {
    const x = async (cmd: string, args?: Record<string, unknown>): Promise<void> => { out.push(norm(await d.q.execute(cmd, args, out.length), false)); };
    await x('qmp_capabilities');
    if (how === 'drive') await x('drive-mirror', { 'job-id': 'm', device: 'top', target: 'new.qcow2', format: 'qcow2', sync: 'full' });
    else await x('blockdev-mirror', { 'job-id': 'm', device: 'top', target: 'tgt', sync: 'full' });
    await d.q.waitFor(jobEvent('m', 'ready'));
    await x('query-block-jobs');
    await x('job-complete', { id: 'm' });
    await d.q.waitFor(jobEvent('m', 'null'));
    ok(await quit(d));
    out.push(...d.q.received.filter((m) => typeof m.event === 'string' && m.event.startsWith('BLOCK_JOB')).map((m) => norm(m, false)));
  });
  const file = how === 'drive' ? 'new.qcow2' : 'tgt.qcow2';
  const map = await qemuImg(['map', '--output=json', file], dir);
  assert.equal(map.code, 0, map.stderr);
  // Host offsets left out: in cache=writeback qchain reuses clusters a zeroing freed only after a
  // flush, QEMU at once; which clusters hold the data is not what this test is about.
  out.push(map.stdout.replace(/, "offset": \d+/g, ''));
  const cmp = await qemuImg(['compare', '-f', 'qcow2', '-F', 'qcow2', 'top.qcow2', file], dir);
  out.push(cmp.stdout.trim());
  return out;
}

for (const src of ['empty', 'backing', 'zero'] as const) {
  for (const how of ['blockdev', 'blockdev-unmap', 'drive'] as const) {
    test(`sync=full ${how} of a source with ${src}: job length and target as qemu-storage-daemon`, oracle(), async () => {
      const root = scratch();
      const want = await session('qemu', path.join(root, 'qemu'), src, how);
      const got = await session('qchain', path.join(root, 'qchain'), src, how);
      assert.equal(want[want.length - 1], 'Images are identical.');
      assert.deepEqual(got, want);
    });
  }
}
