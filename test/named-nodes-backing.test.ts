/**
 * query-named-block-nodes (default, `flat: false`, `flat: true`) and query-block over backing
 * chains, as qemu-storage-daemon 7.2 answers them: the same command line and QMP script go to
 * QSD and `qchain daemon` side by side, and every reply must match field for field and in member
 * order (the JSON text, not only the parsed value). Covered: a lone qcow2 node and a raw node; a
 * 3-layer chain opened from one --blockdev (implicit backing nodes); a chain linked with explicit
 * backing= node names; each after blockdev-snapshot-sync, a finished block-commit and a finished
 * block-stream (and, for the implicit chain, a finished active commit of the snapshot overlay);
 * a dirty bitmap on a node with a backing file; invalid arguments; nodes whose
 * attached backing is not the one their header names (another node, none, a subfolder's node
 * named by a header-relative string, a header rewritten with a different string), which QEMU
 * shows under a json:{...} pseudo-filename, with `backing_file` naming the node attached.
 *
 * Normalised: implicit node names ('#blockNNN' -> '#block', by `norm`), since QEMU numbers every
 * node it ever created and which number a node gets is not part of the interface; command ids
 * (each step has its own); `actual-size` within 64 KiB of QSD's counts as QSD's. actual-size is
 * the file's st_blocks, which includes the file system's own metadata: once a commit or stream
 * has written a file in more than four pieces, ext4 adds a 4 KiB extent-tree block, and how many
 * pieces the same bytes at the same offsets land in depends on the order concurrent writes reach
 * the disk (seen: identical files, 3 vs 5 extents). Every other field, sizes included, is exact.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { oracle, qemuImg, qemuIo, scratch } from './helpers/qemu.js';
import { MONITOR, chainArgs, jobEvent, norm, onBoth, qcow2Node, quit, serve, withDaemon, type Daemon, type Tool } from './helpers/live-qmp.js';
import type { QmpMessage } from './helpers/qmp-client.js';

type Step = (x: (cmd: string, args?: Record<string, unknown>) => Promise<QmpMessage>, d: Daemon) => Promise<void>;

/**
 * base.qcow2 <- mid.qcow2 <- top.qcow2 (16 MiB), each with data of its own; a 4 MiB raw image;
 * o1.qcow2 and o2.qcow2 over base.qcow2; sub/b.qcow2 <- sub/t.qcow2 and sub/c.qcow2 <- sub/s.qcow2
 * (headers name their backing relative to sub/).
 */
async function images(dir: string): Promise<void> {
  fs.mkdirSync(path.join(dir, 'sub'), { recursive: true });
  const img = async (args: string[]): Promise<void> => assert.equal((await qemuImg(args, dir)).code, 0);
  await img(['create', '-q', '-f', 'qcow2', 'base.qcow2', '16M']);
  await img(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'mid.qcow2']);
  await img(['create', '-q', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', 'top.qcow2']);
  await img(['create', '-q', '-f', 'raw', 'disk.raw', '4M']);
  for (const o of ['o1', 'o2']) await img(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', `${o}.qcow2`]);
  for (const [b, t] of [['b', 't'], ['c', 's']]) {
    await img(['create', '-q', '-f', 'qcow2', `sub/${b}.qcow2`, '8M']);
    await img(['create', '-q', '-f', 'qcow2', '-b', `${b}.qcow2`, '-F', 'qcow2', `sub/${t}.qcow2`]);
  }
  for (const [f, off] of [['base.qcow2', 0], ['mid.qcow2', 4], ['top.qcow2', 8]] as const) {
    const r = await qemuIo(['-f', 'qcow2', '-c', `write -q -P ${off + 1} ${off}M 2M`, f], dir);
    assert.equal(r.code, 0, r.stderr);
  }
}

/** All three listings and query-block. */
const QUERIES: Step = async (x) => {
  await x('query-named-block-nodes');
  await x('query-named-block-nodes', { flat: false });
  await x('query-named-block-nodes', { flat: true });
  await x('query-block');
};

/** Run a job command and wait until the job has gone (auto-dismissed). */
const job = (cmd: string, args: Record<string, unknown>): Step => async (x, d) => {
  await x(cmd, { 'job-id': 'j', ...args });
  await d.q.waitFor(jobEvent('j', 'null'), 30000);
  d.q.received.length = 0;
};

/** An active commit of `device`: wait until ready, complete, wait until the job has gone. */
const activeCommit = (device: string): Step => async (x, d) => {
  await x('block-commit', { 'job-id': 'j', device });
  await d.q.waitFor((m) => m.event === 'BLOCK_JOB_READY', 30000);
  await x('job-complete', { id: 'j' });
  await d.q.waitFor(jobEvent('j', 'null'), 30000);
  d.q.received.length = 0;
};

/** The script's replies (normalised, ids dropped) as JSON text, one line per command. */
async function session(tool: Tool, dir: string, args: string[], steps: Step[]): Promise<string[]> {
  await images(dir);
  return withDaemon(tool, dir, args, async (d) => {
    const out: string[] = [];
    const x = async (cmd: string, a?: Record<string, unknown>): Promise<QmpMessage> => {
      const r = await d.q.execute(cmd, a, out.length);
      const n = norm(r, false);
      delete n.id;
      out.push(`${cmd} ${JSON.stringify(a ?? {})} -> ${JSON.stringify(n)}`);
      return r;
    };
    await x('qmp_capabilities');
    for (const s of steps) await s(x, d);
    await quit(d);
    return out;
  });
}

/** File-system metadata blocks st_blocks may count on one side only (see the header). */
const FS_SLACK = 64 * 1024;

/** `ours` with every actual-size within FS_SLACK of the one at the same place in `want` replaced by that one. */
function settleSizes(ours: unknown, want: unknown): unknown {
  if (Array.isArray(ours) && Array.isArray(want)) return ours.map((o, i) => settleSizes(o, want[i]));
  if (!ours || !want || typeof ours !== 'object' || typeof want !== 'object') return ours;
  const w = want as Record<string, unknown>;
  return Object.fromEntries(Object.entries(ours).map(([k, v]) => {
    const close = k === 'actual-size' && typeof v === 'number' && typeof w[k] === 'number' && Math.abs(v - w[k]) <= FS_SLACK;
    return [k, close ? w[k] : settleSizes(v, w[k])];
  }));
}

/** Run the script on both daemons; the replies must be the same, down to member order. Returns QSD's replies. */
async function same(args: string[], steps: Step[]): Promise<Array<Record<string, unknown>>> {
  const root = scratch();
  const res = await onBoth(root, (tool, dir) => session(tool, dir, args, steps));
  assert.equal(res.qchain.length, res.qemu.length);
  const want = res.qemu.map((l) => JSON.parse(l.slice(l.indexOf(' -> ') + 4)) as Record<string, unknown>);
  const got = res.qchain.map((l, i) => `${l.slice(0, l.indexOf(' -> '))} -> ${JSON.stringify(settleSizes(JSON.parse(l.slice(l.indexOf(' -> ') + 4)), want[i]))}`);
  assert.deepEqual(got.map((l) => JSON.parse(l.slice(l.indexOf(' -> ') + 4)) as unknown), want);
  assert.deepEqual(got, res.qemu, 'same member order');
  return want;
}

interface Entry { 'node-name': string; drv: string; backing_file_depth: number; backing_file?: string; file: string; image: Image }
interface Image { filename: string; 'backing-filename'?: string; 'backing-image'?: Image }

const listing = (r: Record<string, unknown>): Entry[] => r.return as Entry[];
const byName = (r: Record<string, unknown>, name: string): Entry => {
  const e = listing(r).find((n) => n['node-name'] === name);
  assert.ok(e, `node ${name} listed`);
  return e;
};
/** The file names down an entry's nested image info, top first. */
function nested(e: Entry): string[] {
  const out: string[] = [];
  for (let i: Image | undefined = e.image; i; i = i['backing-image']) out.push(i.filename);
  return out;
}

test('named nodes: a lone qcow2 node and a raw node; invalid arguments', oracle(), async () => {
  const args = [...qcow2Node('disk', '', 'base.qcow2'),
    '--blockdev', 'driver=file,node-name=r-file,filename=disk.raw', '--blockdev', 'driver=raw,node-name=r,file=r-file', ...MONITOR];
  const r = await same(args, [QUERIES, async (x) => {
    await x('query-named-block-nodes', { flat: 'yes' });
    await x('query-named-block-nodes', { deep: true });
    await x('query-block', { flat: true });
  }]);
  assert.deepEqual(listing(r[1]).map((n) => `${n['node-name']}:${n.drv}`), ['r:raw', 'r-file:file', 'disk:qcow2', 'disk-file:file']);
  assert.deepEqual(nested(byName(r[1], 'disk')), ['base.qcow2']);
  assert.deepEqual(r[4], { return: [] });
  assert.ok('error' in r[5] && 'error' in r[6] && 'error' in r[7]);
});

test('named nodes: a 3-layer chain from one --blockdev, after commit, snapshot, stream and active commit', oracle(), async () => {
  const args = ['--blockdev', 'driver=qcow2,node-name=top,file.driver=file,file.filename=top.qcow2', ...serve('top')];
  const r = await same(args, [
    QUERIES,
    // An intermediate commit by file names (the nodes between are implicit).
    job('block-commit', { device: 'top', top: 'mid.qcow2', base: 'base.qcow2' }), QUERIES,
    async (x) => void await x('blockdev-snapshot-sync', { 'node-name': 'top', 'snapshot-file': 'snap.qcow2', 'snapshot-node-name': 'snap', format: 'qcow2' }),
    QUERIES,
    job('block-stream', { device: 'snap', base: 'base.qcow2' }), QUERIES,
    activeCommit('snap'), QUERIES,
  ]);
  // Before: top nests mid and base; the implicit mid nests base; flat listings nest nothing.
  assert.deepEqual(nested(byName(r[1], 'top')), ['top.qcow2', 'mid.qcow2', 'base.qcow2']);
  assert.equal(byName(r[1], 'top').backing_file_depth, 2);
  assert.equal(byName(r[3], 'top').backing_file_depth, 0);
  assert.deepEqual(nested(byName(r[3], 'top')), ['top.qcow2']);
  assert.deepEqual(listing(r[1]).filter((n) => n.drv === 'qcow2').map((n) => n.backing_file_depth), [0, 1, 2]);
  // After the commit: top over base; after the snapshot: snap over top over base; after the stream: snap over base.
  assert.deepEqual(nested(byName(r[6], 'top')), ['top.qcow2', 'base.qcow2']);
  assert.deepEqual(nested(byName(r[11], 'snap')), ['snap.qcow2', 'top.qcow2', 'base.qcow2']);
  assert.deepEqual(nested(byName(r[16], 'snap')), ['snap.qcow2', 'base.qcow2']);
  assert.equal(byName(r[16], 'snap').backing_file, 'base.qcow2');
  assert.deepEqual(r[19], { return: [] });
  // After the active commit snap has gone (the snapshot made it, nobody else holds it); top stays (the
  // command line added it), still over base, which is now the exported node.
  assert.deepEqual(listing(r[22]).map((n) => `${n['node-name']}:${n.drv}:${n.file}:${n.backing_file_depth}`),
    ['#block:qcow2:base.qcow2:0', '#block:file:base.qcow2:0', 'top:qcow2:top.qcow2:1', '#block:file:top.qcow2:0']);
});

test('named nodes: a chain linked by backing= node names, with a bitmap, after commit, snapshot and stream', oracle(), async () => {
  const r = await same(chainArgs(), [
    QUERIES,
    async (x) => void await x('block-dirty-bitmap-add', { node: 'top', name: 'bm', persistent: true }),
    QUERIES,
    job('block-commit', { device: 'top', 'top-node': 'mid', 'base-node': 'base' }), QUERIES,
    async (x) => void await x('blockdev-snapshot-sync', { 'node-name': 'top', 'snapshot-file': 'snap.qcow2', 'snapshot-node-name': 'snap', format: 'qcow2' }),
    QUERIES,
    job('block-stream', { device: 'snap', 'base-node': 'base' }), QUERIES,
  ]);
  assert.deepEqual(listing(r[1]).map((n) => `${n['node-name']}:${n.backing_file_depth}`), ['top:2', 'top-file:0', 'mid:1', 'mid-file:0', 'base:0', 'base-file:0']);
  assert.deepEqual(nested(byName(r[1], 'top')), ['top.qcow2', 'mid.qcow2', 'base.qcow2']);
  assert.ok('dirty-bitmaps' in byName(r[6], 'top'));
  // The committed-from node stays (it was added by name) but is no longer in top's chain.
  assert.deepEqual(nested(byName(r[11], 'top')), ['top.qcow2', 'base.qcow2']);
  assert.deepEqual(nested(byName(r[11], 'mid')), ['mid.qcow2', 'base.qcow2']);
  assert.deepEqual(nested(byName(r[16], 'snap')), ['snap.qcow2', 'top.qcow2', 'base.qcow2']);
  assert.deepEqual(nested(byName(r[21], 'snap')), ['snap.qcow2', 'base.qcow2']);
});

test('named nodes: backing nodes other than the header names show json: pseudo-filenames', oracle(), async () => {
  const args = [...qcow2Node('base'), ...qcow2Node('mid', ',backing=base'), ...qcow2Node('top', ',backing=mid'),
    '--blockdev', 'driver=file,node-name=r-file,filename=disk.raw', '--blockdev', 'driver=raw,node-name=r,file=r-file',
    ...qcow2Node('b', '', 'sub/b.qcow2'), ...qcow2Node('t', ',backing=b', 'sub/t.qcow2'),
    '--blockdev', 'driver=qcow2,node-name=s,file.driver=file,file.filename=sub/s.qcow2', ...MONITOR];
  const r = await same(args, [
    QUERIES,
    async (x) => {
      await x('blockdev-add', { driver: 'qcow2', 'node-name': 'o1', file: { driver: 'file', filename: 'o1.qcow2' }, backing: null });
      await x('blockdev-add', { driver: 'qcow2', 'node-name': 'o2', file: { driver: 'file', filename: 'o2.qcow2' }, backing: 'r' });
    },
    QUERIES,
    job('block-commit', { device: 'top', 'top-node': 'mid', 'base-node': 'base', 'backing-file': './base.qcow2' }), QUERIES,
    job('block-stream', { device: 't' }), QUERIES,
  ]);
  // A header-relative backing string opened from the header: plain names, backing_file the node's.
  assert.equal(byName(r[1], 's').file, 'sub/s.qcow2');
  assert.equal(byName(r[1], 's').backing_file, 'sub/c.qcow2');
  assert.equal(byName(r[1], 's').image['backing-filename'], 'c.qcow2');
  // The same string with the node named by backing=: overridden.
  assert.match(byName(r[1], 't').file, /^json:\{"backing": \{"driver": "qcow2", "file": \{"driver": "file", "filename": "sub\/b.qcow2"\}\}/);
  assert.equal(byName(r[1], 't').backing_file, 'sub/b.qcow2');
  assert.equal(byName(r[1], 'top').file, 'top.qcow2');
  assert.equal(byName(r[7], 'o1').file, 'json:{"backing": null, "driver": "qcow2", "file": {"driver": "file", "filename": "o1.qcow2"}}');
  assert.ok(!('backing_file' in byName(r[7], 'o1')));
  assert.equal(byName(r[7], 'o2').backing_file, 'disk.raw');
  assert.deepEqual(nested(byName(r[7], 'o2')).slice(1), ['disk.raw']);
  // A commit writing another string than the base's name.
  assert.match(byName(r[12], 'top').file, /^json:/);
  assert.equal(byName(r[12], 'top').image['backing-filename'], './base.qcow2');
  // A full stream leaves no backing: plain again.
  assert.equal(byName(r[17], 't').file, 'sub/t.qcow2');
  assert.ok(!('backing_file' in byName(r[17], 't')));
});
