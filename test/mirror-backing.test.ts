/**
 * The mirror target's backing after the pivot, against qemu-storage-daemon: it differs by
 * command (QEMU's MirrorBackingMode). blockdev-mirror leaves it as added (here none: the guest
 * then sees the top layer alone); drive-mirror absolute-paths creates the target over the
 * source's backing (sync=top) or over the source itself (sync=none) and links it so;
 * drive-mirror mode=existing opens the chain its header names (test/seed-recipes-live.test.ts).
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { oracle, qemuImg, qemuIo, scratch } from './helpers/qemu.js';
import { backingChain, daemonArgs, exportView, jobEvent, letters, onBoth, put, quit, transcript, withDaemon, type Tool } from './helpers/live-qmp.js';

type Variant = 'blockdev-top' | 'drive-top' | 'drive-none';
const VARIANTS: Record<Variant, string> = { 'blockdev-top': '--B-', 'drive-top': 'A-B-', 'drive-none': 'A-B-' };

async function backingMode(tool: Tool, dir: string, v: Variant): Promise<{ log: unknown[]; view: string; chain: string }> {
  fs.mkdirSync(dir, { recursive: true });
  await qemuImg(['create', '-q', '-f', 'qcow2', 'b.qcow2', '4M'], dir);
  await qemuIo(['-c', put('A', 0, 1), 'b.qcow2'], dir);
  await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'b.qcow2', '-F', 'qcow2', 't.qcow2'], dir);
  await qemuIo(['-c', put('B', 2, 1), 't.qcow2'], dir);
  await qemuImg(['create', '-q', '-f', 'qcow2', 'tgt.qcow2', '4M'], dir);
  const { q, view } = await withDaemon(tool, dir, daemonArgs('t.qcow2', 't'), async (d) => {
    const { q } = d;
    await q.execute('qmp_capabilities', undefined, 'c0');
    if (v === 'blockdev-top') {
      await q.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'tgt', file: { driver: 'file', filename: 'tgt.qcow2' }, backing: null }, 'a1');
      await q.execute('blockdev-mirror', { 'job-id': 'j', device: 't', target: 'tgt', sync: 'top' }, 'm1');
    } else {
      await q.execute('drive-mirror', { 'job-id': 'j', device: 't', target: 'tgt.qcow2', format: 'qcow2', sync: v === 'drive-top' ? 'top' : 'none' }, 'm1');
    }
    await q.waitFor(jobEvent('j', 'ready'));
    await q.execute('job-complete', { id: 'j' }, 'm2');
    await q.waitFor(jobEvent('j', 'null'));
    const view = letters(await exportView(dir));
    await quit(d, 'q');
    return { q, view };
  });
  const chain = await backingChain(dir, 'tgt.qcow2');
  return { log: transcript(q), view, chain };
}

describe('the mirror target\'s backing at the pivot, as in QSD', oracle(), () => {
  for (const v of Object.keys(VARIANTS) as Variant[]) {
    test(`${v}: the guest sees ${VARIANTS[v]}; same chain, replies and events`, async () => {
      const root = scratch('qchain-mirror-backing-');
      const res = await onBoth(root, async (tool, dir) => {
        const r = await backingMode(tool, dir, v);
        assert.equal(r.view, VARIANTS[v], `${tool}: guest view after the pivot`);
        return r;
      });
      assert.equal(res.qchain.chain, res.qemu.chain);
      assert.deepEqual(res.qchain.log, res.qemu.log);
    });
  }
});
