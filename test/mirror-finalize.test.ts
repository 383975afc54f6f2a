/**
 * A mirror (and an active commit) with auto-finalize off pivots at job-finalize, not at
 * job-complete, as qemu-storage-daemon 7.2's mirror_prepare: while the job is pending the export
 * still serves the source, guest writes then reach the source only, and a cancel in pending
 * leaves the graph as it was. Events, the export's node afterwards and both images' contents are
 * compared with QSD's. (While pending QSD's export shows its mirror filter node: not compared.)
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { oracle, qemuImg, qemuIo, scratch } from './helpers/qemu.js';
import { guest, jobEvent, norm, ok, qcow2Node, quit, repliesThenEvents, serve, withDaemon, type Tool } from './helpers/live-qmp.js';

type Kind = 'mirror' | 'commit';
type End = 'finalize' | 'cancel';

async function session(tool: Tool, dir: string, kind: Kind, end: End): Promise<unknown[]> {
  fs.mkdirSync(dir, { recursive: true });
  await qemuImg(['create', '-q', '-f', 'qcow2', 'base.qcow2', '4M'], dir);
  await qemuIo(['-c', 'write -q -P 1 0 1M', 'base.qcow2'], dir);
  await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'top.qcow2'], dir);
  await qemuIo(['-c', 'write -q -P 2 1M 1M', 'top.qcow2'], dir);
  await qemuImg(['create', '-q', '-f', 'qcow2', 'tgt.qcow2', '4M'], dir);
  let n = 0;
  const out: unknown[] = [];
  await withDaemon(tool, dir, [...qcow2Node('base'), ...qcow2Node('top', ',backing=base'), ...qcow2Node('tgt'), ...serve('top')], async (d) => {
    const x = async (cmd: string, args?: Record<string, unknown>): Promise<void> => { await d.q.execute(cmd, args, `${cmd}-${++n}`); };
    await x('qmp_capabilities');
    if (kind === 'mirror') await x('blockdev-mirror', { 'job-id': 'j', device: 'top', target: 'tgt', sync: 'full', 'auto-finalize': false });
    else await x('block-commit', { 'job-id': 'j', device: 'top', 'auto-finalize': false });
    await d.q.waitFor(jobEvent('j', 'ready'));
    await x('job-complete', { id: 'j' });
    await d.q.waitFor(jobEvent('j', 'pending'));
    await guest(dir, ['write -q -P 9 2M 64k']);
    await x(end === 'finalize' ? 'job-finalize' : 'job-cancel', { id: 'j' });
    await d.q.waitFor(jobEvent('j', 'null'));
    await x('query-block-exports');
    ok(await quit(d, 'quit'));
    out.push(...repliesThenEvents(d.q.received.map((m) => norm(m, true))));
  });
  for (const f of ['top.qcow2', kind === 'mirror' ? 'tgt.qcow2' : 'base.qcow2']) {
    const raw = path.join(dir, `${f}.raw`);
    const c = await qemuImg(['convert', '-O', 'raw', f, raw], dir);
    assert.equal(c.code, 0, c.stderr);
    out.push(fs.readFileSync(raw).toString('base64'));
  }
  return out;
}

for (const kind of ['mirror', 'commit'] as const) {
  for (const end of ['finalize', 'cancel'] as const) {
    test(`${kind} with auto-finalize off, ${end} in pending: as qemu-storage-daemon`, oracle(), async () => {
      const root = scratch();
      const want = await session('qemu', path.join(root, 'qemu'), kind, end);
      const got = await session('qchain', path.join(root, 'qchain'), kind, end);
      const exports = want.find((m) => (m as { id?: string }).id?.startsWith('query-block-exports')) as { return: Array<{ 'node-name': string }> };
      assert.equal(exports.return[0]['node-name'], end === 'cancel' ? 'top' : kind === 'mirror' ? 'tgt' : 'base');
      assert.deepEqual(got, want);
    });
  }
}
