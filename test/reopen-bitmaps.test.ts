/**
 * Bitmaps across reopen, against qemu-storage-daemon: a persistent bitmap (added offline) and an
 * in-memory one on the read-only base of an intermediate commit. The commit reopens the base
 * read-write (both bitmaps record what is committed into it) and read-only again; an active
 * commit then reopens it read-write and pivots to it, and guest writes to the base must still be
 * recorded. query-named-block-nodes' bitmaps along the way and the saved image (qemu-img info)
 * must match QSD's.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { oracle, qemuImg, qemuIo, scratch } from './helpers/qemu.js';
import type { QmpClient } from './helpers/qmp-client.js';
import { daemonArgs, jobEvent, nbdUri, onBoth, quit, repliesThenEvents, withDaemon, type Tool } from './helpers/live-qmp.js';

const ARGS = daemonArgs('top.qcow2', 'top');

async function setup(dir: string): Promise<void> {
  fs.mkdirSync(dir, { recursive: true });
  const ok = (r: { code: number; stderr: string }): void => assert.equal(r.code, 0, r.stderr);
  ok(await qemuImg(['create', '-q', '-f', 'qcow2', 'base.qcow2', '16M'], dir));
  ok(await qemuIo(['-c', 'write -q -P 0xaa 0 1M', 'base.qcow2'], dir));
  ok(await qemuImg(['bitmap', '--add', 'base.qcow2', 'pbm'], dir));
  ok(await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'mid.qcow2'], dir));
  ok(await qemuIo(['-c', 'write -q -P 0xbb 1M 2M', '-c', 'write -q -P 0xbc 6M 64k', 'mid.qcow2'], dir));
  ok(await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', 'top.qcow2'], dir));
}

/** The qcow2 nodes by file: read-only flag and bitmaps (node names of implicit nodes differ). */
async function nodes(q: QmpClient): Promise<unknown> {
  const r = await q.execute('query-named-block-nodes', { flat: true });
  return (r.return as Array<Record<string, unknown>>).filter((n) => n.drv === 'qcow2')
    .map((n) => ({ file: n.file, ro: n.ro, bitmaps: n['dirty-bitmaps'] ?? [] }))
    .sort((a, b) => String(a.file).localeCompare(String(b.file)));
}

async function baseName(q: QmpClient): Promise<string> {
  const r = await q.execute('query-named-block-nodes', { flat: true });
  const n = (r.return as Array<Record<string, unknown>>).find((x) => x.drv === 'qcow2' && x.file === 'base.qcow2');
  assert.ok(n, 'base node');
  return n['node-name'] as string;
}

async function session(tool: Tool, dir: string): Promise<unknown[]> {
  return withDaemon(tool, dir, ARGS, async (d) => {
    const { q } = d;
    await q.execute('qmp_capabilities', undefined, 'c0');
    const base = await baseName(q);
    const seen: unknown[] = [];
    await q.execute('block-dirty-bitmap-add', { node: base, name: 'mbm', granularity: 65536 }, 'c1');
    seen.push(await nodes(q));
    // Intermediate commit: base reopened read-write, then read-only again.
    await q.execute('block-commit', { 'job-id': 'cm', device: 'top', top: 'mid.qcow2', base: 'base.qcow2' }, 'c2');
    await q.waitFor(jobEvent('cm', 'null'));
    seen.push(await nodes(q));
    // Active commit into the base: reopened read-write, the export pivots to it.
    await q.execute('block-commit', { 'job-id': 'ac', device: 'top', base: 'base.qcow2' }, 'c3');
    await q.waitFor(jobEvent('ac', 'ready'));
    await q.execute('job-complete', { id: 'ac' }, 'c4');
    await q.waitFor(jobEvent('ac', 'null'));
    seen.push(await nodes(q));
    const w = await qemuIo(['-f', 'raw', '-c', 'write -q -P 0x77 8M 64k', '-c', 'write -q -P 0x78 12M 4k', nbdUri(dir)]);
    assert.equal(w.code, 0, w.stderr);
    seen.push(await nodes(q));
    await quit(d, 'q');
    const msgs = q.received.map((m) => {
      const c = { ...m };
      delete c.timestamp;
      return c;
    }).filter((m) => 'event' in m || (typeof m.id === 'string' && /^c\d+$/.test(m.id)));
    return [seen, ...repliesThenEvents(msgs)];
  });
}

describe('bitmaps across reopen (commit) vs qemu-storage-daemon', oracle(), () => {
  test('persistent and in-memory bitmaps on a commit base keep recording; saved image matches', async () => {
    const root = scratch('qchain-reopen-bm-');
    const res = await onBoth(root, async (tool, dir) => {
      await setup(dir);
      const log = await session(tool, dir);
      const c = await qemuImg(['check', 'base.qcow2'], dir);
      assert.equal(c.code, 0, `${tool}: ${c.stdout}`);
      const info = JSON.parse((await qemuImg(['info', '--output=json', 'base.qcow2'], dir)).stdout) as Record<string, unknown>;
      delete info['actual-size'];
      return { log, info };
    });
    assert.deepEqual(res.qchain.log, res.qemu.log);
    assert.deepEqual(res.qchain.info, res.qemu.info);
  });
});
