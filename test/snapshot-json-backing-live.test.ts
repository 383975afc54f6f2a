/**
 * External snapshots of nodes QEMU names with a json:{...} pseudo-filename (their attached
 * backing is not their header's: another node, or none), against qemu-storage-daemon 7.2 side by
 * side. QSD writes the node's name as it shows it (bs->filename, so the json:{...} text) into the
 * new image's backing-file header: blockdev-snapshot-sync's overlay and drive-mirror's sync=none
 * target alike, and qchain does the same. That header reopens what the guest saw (the node over
 * its attached backing, not over its header's chain): qemu-io reads the overlay with the other
 * node's data below it. A plain file name there would silently put the node's header chain under
 * the overlay instead. blockdev-snapshot takes an overlay made beforehand (here by `qchain img
 * create -u -b 'json:{...}'`, byte for byte what qemu-img makes) and both daemons show it the same.
 * The full-backing-filename of a json: name is the name itself (QEMU's path_has_protocol), not
 * joined to the overlay's folder (the images are in sub/ to tell the two apart).
 *
 * qchain's own tools then read such an overlay as QEMU does (tested below; more in
 * json-filename.test.ts): the description is opened with its backing. QEMU 7.2's
 * `qemu-img info --backing-chain` fails on it (it opens each image without its backing, so the
 * described backing is an option nobody takes), and so does qchain's, with the same text.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { QCHAIN, oracle, qemuImg, qemuIo, run, scratch } from './helpers/qemu.js';
import { QSD, jobEvent, norm, onBoth, qcow2Node, quit, serve, withDaemon } from './helpers/live-qmp.js';

const skip = oracle().skip ?? (fs.existsSync(QSD) ? undefined : 'no qemu-storage-daemon');

/** sub/base.qcow2 (0x42 in [1M, 2M)), sub/other.qcow2 (0x41 in [0, 1M)), sub/top.qcow2 and sub/t3.qcow2 over base in their headers. */
async function images(dir: string): Promise<void> {
  fs.mkdirSync(path.join(dir, 'sub'), { recursive: true });
  const img = async (args: string[]): Promise<void> => assert.equal((await qemuImg(args, dir)).code, 0);
  await img(['create', '-q', '-f', 'qcow2', 'sub/base.qcow2', '16M']);
  await img(['create', '-q', '-f', 'qcow2', 'sub/other.qcow2', '16M']);
  for (const t of ['top', 't3']) await img(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', `sub/${t}.qcow2`]);
  for (const [f, cmd] of [['sub/base.qcow2', 'write -q -P 0x42 1M 1M'], ['sub/other.qcow2', 'write -q -P 0x41 0 1M']]) {
    assert.equal((await qemuIo(['-f', 'qcow2', '-c', cmd, f], dir)).code, 0);
  }
}

/** t3's name once attached with no backing (its header names base.qcow2). */
const T3_JSON = 'json:{"backing": null, "driver": "qcow2", "file": {"driver": "file", "filename": "sub/t3.qcow2"}}';
const TOP_JSON = 'json:{"backing": {"driver": "qcow2", "file": {"driver": "file", "filename": "sub/other.qcow2"}}, "driver": "qcow2", "file": {"driver": "file", "filename": "sub/top.qcow2"}}';

/** other, and top over it (not over its header's base), exported; t3 joins over QMP. */
const ARGS = [...qcow2Node('other', '', 'sub/other.qcow2'), ...qcow2Node('top', ',backing=other', 'sub/top.qcow2'), ...serve('top')];

/** The backing name fields of `qemu-img info` for a file. */
async function backingFields(dir: string, file: string): Promise<unknown> {
  const r = await qemuImg(['info', '-U', '--output=json', file], dir);
  assert.equal(r.code, 0, r.stderr);
  const i = JSON.parse(r.stdout) as Record<string, unknown>;
  return { 'backing-filename': i['backing-filename'], 'full-backing-filename': i['full-backing-filename'], 'backing-filename-format': i['backing-filename-format'] };
}

test('external snapshots of a json:{...} node write its json: name as the overlay\'s backing file, as QSD', { skip, timeout: 120000 }, async () => {
  const res = await onBoth(scratch('qchain-snapjson-'), async (tool, dir) => {
    await images(dir);
    // The blockdev-snapshot overlay, made in advance by qchain img create for both daemons.
    const c = await run(process.execPath, [QCHAIN, 'img', 'create', '-q', '-f', 'qcow2', '-u', '-b', T3_JSON, '-F', 'qcow2', 'sub/ov3.qcow2', '16M'], { cwd: dir });
    assert.equal(c.code, 0, c.stderr);
    const replies = await withDaemon(tool, dir, ARGS, async (d) => {
      const x = async (cmd: string, a?: Record<string, unknown>): Promise<unknown> => norm(await d.q.execute(cmd, a, cmd), false);
      const out: unknown[] = [await x('qmp_capabilities')];
      // t3 with no backing, exported so that its overlay stays in the graph.
      out.push(await x('blockdev-add', { driver: 'qcow2', 'node-name': 't3', file: { driver: 'file', filename: 'sub/t3.qcow2' }, backing: null }));
      out.push(await x('block-export-add', { type: 'nbd', id: 'exp1', 'node-name': 't3', name: 't3', writable: true }));
      out.push(await x('blockdev-snapshot-sync', { 'node-name': 'top', 'snapshot-file': 'sub/snap.qcow2', 'snapshot-node-name': 'snap', format: 'qcow2' }));
      out.push(await x('blockdev-add', { driver: 'qcow2', 'node-name': 'ov3', file: { driver: 'file', filename: 'sub/ov3.qcow2' }, backing: null }));
      out.push(await x('blockdev-snapshot', { node: 't3', overlay: 'ov3' }));
      out.push(await x('query-named-block-nodes'));
      out.push(await x('query-named-block-nodes', { flat: true }));
      await quit(d);
      return out;
    });
    // A sync=none mirror's target gets the source as backing file: the target is made, then the
    // job dropped (in a session of its own: qchain keeps a cancelled mirror's target node in
    // its graph, which QSD drops, a difference of its own).
    await withDaemon(tool, dir, ARGS, async (d) => {
      await d.q.execute('qmp_capabilities');
      assert.ok('return' in await d.q.execute('drive-mirror', { device: 'top', target: 'sub/mir.qcow2', sync: 'none', 'job-id': 'm', format: 'qcow2' }));
      await d.q.waitFor(jobEvent('m', 'ready'));
      await d.q.execute('block-job-cancel', { device: 'm' });
      await d.q.waitFor(jobEvent('m', 'null'));
      await quit(d);
    });
    const headers: Record<string, unknown> = {};
    for (const f of ['snap', 'ov3', 'mir']) headers[f] = await backingFields(dir, `sub/${f}.qcow2`);
    // What the overlay reads through its header: other's data at 0, nothing of base's at 1M.
    const read = await qemuIo(['-r', '-c', 'read -q -P 0x41 0 1M', '-c', 'read -q -P 0 1M 1M', 'sub/snap.qcow2'], dir);
    return { replies, headers, read: read.code === 0 && !/fail|error/i.test(read.stdout + read.stderr) };
  });
  assert.deepEqual(res.qchain.replies, res.qemu.replies);
  assert.deepEqual(res.qchain.headers, res.qemu.headers);
  assert.deepEqual(res.qemu.headers, {
    snap: { 'backing-filename': TOP_JSON, 'full-backing-filename': TOP_JSON, 'backing-filename-format': 'qcow2' },
    ov3: { 'backing-filename': T3_JSON, 'full-backing-filename': T3_JSON, 'backing-filename-format': 'qcow2' },
    mir: { 'backing-filename': TOP_JSON, 'full-backing-filename': TOP_JSON, 'backing-filename-format': 'qcow2' },
  });
  assert.equal(res.qemu.read, true, 'qemu-io reads the overlay over other, as the guest saw it');
  assert.equal(res.qchain.read, true);
});

test('qchain\'s own tools follow a json: backing name as QEMU (and info --backing-chain fails as qemu-img\'s)', { skip, timeout: 60000 }, async () => {
  const dir = scratch('qchain-snapjson-offline-');
  await images(dir);
  assert.equal((await qemuImg(['create', '-q', '-f', 'qcow2', '-u', '-b', TOP_JSON, '-F', 'qcow2', 'sub/snap.qcow2', '16M'], dir)).code, 0);
  const both = async (ours: string[], theirs: () => Promise<{ code: number; stdout: string; stderr: string }>): Promise<void> => {
    const [a, b] = [await run(process.execPath, [QCHAIN, ...ours], { cwd: dir }), await theirs()];
    assert.deepEqual({ code: a.code, stdout: a.stdout, stderr: a.stderr }, { code: b.code, stdout: b.stdout, stderr: b.stderr }, ours.join(' '));
  };
  await both(['img', 'info', '--backing-chain', 'sub/snap.qcow2'], () => qemuImg(['info', '--backing-chain', 'sub/snap.qcow2'], dir));
  await both(['img', 'map', '--output=json', 'sub/snap.qcow2'], () => qemuImg(['map', '--output=json', 'sub/snap.qcow2'], dir));
  const io = ['-r', '-c', 'read -q -P 0x41 0 1M', '-c', 'read -q -P 0 1M 1M', 'sub/snap.qcow2'];
  await both(['io', ...io], () => qemuIo(io, dir));
  // The overlay itself (its header only) is fine for both.
  const info = await run(process.execPath, [QCHAIN, 'img', 'info', '--output=json', 'sub/snap.qcow2'], { cwd: dir });
  assert.equal(info.code, 0, info.stderr);
  assert.equal((JSON.parse(info.stdout) as Record<string, unknown>)['full-backing-filename'], TOP_JSON);
});
