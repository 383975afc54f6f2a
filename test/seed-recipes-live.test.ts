/**
 * Seed recipes done live through QMP, against qemu-storage-daemon and `qchain daemon` with the
 * same command line and the same script; replies and events must match (timestamps dropped).
 *
 * - Seed 001: base <- sn1 <- sn2 <- cur built with blockdev-snapshot-sync under guest writes,
 *   then an active commit of the whole chain into base with pivot; the seed's tables of what
 *   each file holds and what you would see through it are checked exactly.
 * - Seed 003: live storage migration from nfs/ to local/: a live snapshot, a copy of the now
 *   read-only base, a shallow mirror into a pre-created wrapper with pivot, a shallow active
 *   commit of the wrapper with pivot; the guest keeps writing throughout.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { oracle, qemuImg, qemuIo, qemuRawView, run, scratch } from './helpers/qemu.js';
import { M, backingChain, daemonArgs, exportView, firstDiff, guest, jobEvent, letters, onBoth, put, quit, transcript, withDaemon, type Tool } from './helpers/live-qmp.js';
import { randomWrites } from './helpers/guest-load.js';

/* ---------------------------------------------------------------- seed 001 */

/** What a file itself holds: its own clusters, its backing file left out. */
async function contents(file: string): Promise<string> {
  const out = `${file}.own.raw`;
  const spec = JSON.stringify({ driver: 'qcow2', backing: null, file: { driver: 'file', filename: file } });
  const r = await qemuImg(['convert', `json:${spec}`, '-O', 'raw', out]);
  assert.equal(r.code, 0, r.stderr);
  const b = fs.readFileSync(out);
  fs.unlinkSync(out);
  return letters(b);
}

interface Seed001 { log: unknown[]; own: Record<string, string>; seen: Record<string, string>; guestBefore: string }

async function seed001(tool: Tool, dir: string): Promise<Seed001> {
  fs.mkdirSync(dir, { recursive: true });
  await qemuImg(['create', '-q', '-f', 'qcow2', 'base.qcow2', '12M'], dir);
  const { q, guestBefore } = await withDaemon(tool, dir, daemonArgs('base.qcow2', 'base'), async (d) => {
    const { q } = d;
    await q.execute('qmp_capabilities', undefined, 'c0');
    await guest(dir, [put('A', 0, 4)]);
    await q.execute('blockdev-snapshot-sync', { 'node-name': 'base', 'snapshot-file': 'sn1.qcow2', 'snapshot-node-name': 'sn1', format: 'qcow2' }, 's1');
    await guest(dir, [put('B', 2, 4)]);
    await q.execute('blockdev-snapshot-sync', { 'node-name': 'sn1', 'snapshot-file': 'sn2.qcow2', 'snapshot-node-name': 'sn2', format: 'qcow2' }, 's2');
    await guest(dir, [put('C', 5, 4)]);
    await q.execute('blockdev-snapshot-sync', { 'node-name': 'sn2', 'snapshot-file': 'cur.qcow2', 'snapshot-node-name': 'cur', format: 'qcow2' }, 's3');
    await guest(dir, [put('D', 0, 1), put('D', 8, 2)]);
    await q.execute('query-block-exports', undefined, 'x1');
    // virsh blockcommit vm1 vda --active --pivot
    await q.execute('block-commit', { 'job-id': 'commit0', device: 'cur', 'base-node': 'base' }, 'j1');
    await q.waitFor(jobEvent('commit0', 'ready'));
    await q.execute('query-block-jobs', undefined, 'j2');
    await q.execute('job-complete', { id: 'commit0' }, 'j3');
    await q.waitFor(jobEvent('commit0', 'null'));
    await q.execute('query-block-exports', undefined, 'x2');
    await guest(dir, [put('E', 0, 1), put('E', 10, 1)]);
    const guestBefore = letters(await exportView(dir));
    await quit(d, 'q');
    return { q, guestBefore };
  });
  const own: Record<string, string> = {}, seen: Record<string, string> = {};
  for (const f of ['base', 'sn1', 'sn2', 'cur']) {
    const file = path.join(dir, `${f}.qcow2`);
    const ck = await qemuImg(['check', file]);
    assert.equal(ck.code, 0, `${tool} ${f}: ${ck.stdout}${ck.stderr}`);
    own[f] = await contents(file);
    seen[f] = letters(await qemuRawView(file));
  }
  return { log: transcript(q), own, seen, guestBefore };
}

describe('seed 001: live active commit of a whole chain into base, with pivot', oracle(), () => {
  test('the seed\'s tables after E, on QSD and qchain; same replies and events', async () => {
    const root = scratch('qchain-seed001-');
    const res = await onBoth(root, async (tool, dir) => {
      const r = await seed001(tool, dir);
      assert.equal(r.guestBefore, 'EABBBCCCDDE-', `${tool}: guest sees`);
      // contents: what each file holds itself.
      assert.deepEqual(r.own, { base: 'EABBBCCCDDE-', sn1: '--BBBB------', sn2: '-----CCCC---', cur: 'D-------DD--' }, `${tool}: contents`);
      // what you would see through each file with its backing chain.
      assert.deepEqual(r.seen, { base: 'EABBBCCCDDE-', sn1: 'EABBBBCCDDE-', sn2: 'EABBBCCCCDE-', cur: 'DABBBCCCDDE-' }, `${tool}: views`);
      return r;
    });
    assert.deepEqual(res.qchain.log, res.qemu.log);
  });
});

/* ---------------------------------------------------------------- seed 003 */

const SIZE = 16 * M;

/** Guest writes up to 128 KiB each, 6 in flight, applied to `model` too. */
function writes(seed: number, n: number, model: Buffer): string[] {
  return randomWrites(seed, n, { size: SIZE, maxBlocks: 32, batch: 6, quiet: true, model });
}

interface Seed003 { log: unknown[]; model: Buffer; final: Buffer; chain: string }

/**
 * 'blockdev': the target is added with blockdev-add over its backing node, then blockdev-mirror.
 * 'drive': drive-mirror with mode=existing opens the target alone and, at completion, its own
 * backing chain from the header (local/image, not the source's nfs/image); the shallow commit
 * then names its base by file name.
 */
type Flavour = 'blockdev' | 'drive';

async function seed003(tool: Tool, dir: string, flavour: Flavour): Promise<Seed003> {
  fs.mkdirSync(path.join(dir, 'nfs'), { recursive: true });
  fs.mkdirSync(path.join(dir, 'local'), { recursive: true });
  await qemuImg(['create', '-q', '-f', 'qcow2', 'nfs/image', `${SIZE}`], dir);
  await qemuIo(['-c', 'write -q -P 0x11 0 6M', '-c', 'write -q -P 0x12 10M 3M', 'nfs/image'], dir);
  const model = Buffer.alloc(SIZE);
  model.fill(0x11, 0, 6 * M);
  model.fill(0x12, 10 * M, 13 * M);
  let seed = 300;
  const batch = (n = 30): string[] => writes(seed++, n, model);
  /** Between phases (no guest request in flight) the export must serve exactly the model. */
  const checkpoint = async (label: string): Promise<void> => {
    const served = await exportView(dir);
    assert.ok(served.equals(model), `${tool} ${label}: the export serves every write: ${firstDiff(served, model)}`);
  };
  const { q } = await withDaemon(tool, dir, daemonArgs('nfs/image', 'nfs'), async (d) => {
    const { q } = d;
    await q.execute('qmp_capabilities', undefined, 'c0');
    await guest(dir, batch());
    // virsh snapshot-create-as domain tmp --no-metadata --disk-only, the guest writing meanwhile.
    await Promise.all([
      guest(dir, batch()),
      q.execute('blockdev-snapshot-sync', { 'node-name': 'nfs', 'snapshot-file': 'nfs/image.tmp', 'snapshot-node-name': 'tmp', format: 'qcow2' }, 's1'),
    ]);
    await checkpoint('after the snapshot');
    // cp /nfs/image /local/image: the base is read-only now; the guest writes into tmp.
    await Promise.all([
      guest(dir, batch()),
      run('cp', ['nfs/image', 'local/image'], { cwd: dir }).then((r) => assert.equal(r.code, 0, r.stderr)),
    ]);
    // qemu-img create -f qcow2 -b /local/image -F qcow2 /local/wrap
    const cr = await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'image', '-F', 'qcow2', 'local/wrap'], dir);
    assert.equal(cr.code, 0, cr.stderr);
    // virsh blockcopy domain vda /local/wrap --shallow --pivot --reuse-external (blockdev flavour).
    if (flavour === 'blockdev') {
      await q.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'local', 'read-only': true, file: { driver: 'file', filename: 'local/image' } }, 'a1');
      await q.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'wrap', file: { driver: 'file', filename: 'local/wrap' }, backing: 'local' }, 'a2');
    }
    const mirror = flavour === 'blockdev'
      ? q.execute('blockdev-mirror', { 'job-id': 'copy0', device: 'tmp', target: 'wrap', sync: 'top', 'auto-dismiss': false }, 'm1')
      : q.execute('drive-mirror', { 'job-id': 'copy0', device: 'tmp', target: 'local/wrap', format: 'qcow2', 'node-name': 'wrap', sync: 'top', mode: 'existing', 'auto-dismiss': false }, 'm1');
    await Promise.all([guest(dir, batch()), mirror]);
    await q.waitFor(jobEvent('copy0', 'ready'), 60000);
    await checkpoint('mirror started');
    await guest(dir, batch());
    await checkpoint('mirror ready');
    await q.execute('query-block-jobs', undefined, 'm2');
    // No guest request in flight at job-complete: qemu-storage-daemon 7.2 aborts then
    // (mirror.c: Assertion `QLIST_EMPTY(&bs->tracked_requests)' failed).
    await q.execute('job-complete', { id: 'copy0' }, 'm3');
    await q.waitFor(jobEvent('copy0', 'concluded'), 60000);
    await q.execute('job-dismiss', { id: 'copy0' }, 'm4');
    await guest(dir, batch());
    await checkpoint('mirror pivoted');
    await q.execute('query-block-exports', undefined, 'x1');
    // A base name is relative to the overlay (local/), not to the daemon's folder: refused.
    if (flavour === 'drive') await q.execute('block-commit', { 'job-id': 'commit0', device: 'wrap', base: 'local/image' }, 'k0');
    // virsh blockcommit domain vda --shallow --pivot: the wrapper into local/image.
    await Promise.all([
      guest(dir, batch()),
      q.execute('block-commit', { 'job-id': 'commit0', device: 'wrap', ...(flavour === 'blockdev' ? { 'base-node': 'local' } : { base: path.join(dir, 'local/image') }), 'auto-dismiss': false }, 'k1'),
    ]);
    await q.waitFor(jobEvent('commit0', 'ready'), 60000);
    await checkpoint('commit started');
    await guest(dir, batch());
    await checkpoint('commit ready');
    // No guest request in flight at job-complete: qemu-storage-daemon 7.2 aborts then
    // (mirror.c: Assertion `QLIST_EMPTY(&bs->tracked_requests)' failed).
    await q.execute('job-complete', { id: 'commit0' }, 'k2');
    await q.waitFor(jobEvent('commit0', 'concluded'), 60000);
    await q.execute('job-dismiss', { id: 'commit0' }, 'k3');
    await guest(dir, batch());
    await checkpoint('commit pivoted');
    await q.execute('query-block-exports', undefined, 'x2');
    await guest(dir, batch());
    // The export must serve exactly the model, and so must local/image alone after quit.
    await checkpoint('the end');
    await quit(d, 'q');
    return d;
  });
  // blockdev-snapshot-sync records the backing file as the node's filename ('nfs/image', relative
  // to the daemon's folder, so not resolvable from nfs/): check the overlay on its own.
  for (const f of ['nfs/image', 'nfs/image.tmp', 'local/image', 'local/wrap']) {
    const spec = `json:${JSON.stringify({ driver: 'qcow2', backing: null, file: { driver: 'file', filename: f } })}`;
    const ck = await qemuImg(['check', f === 'nfs/image.tmp' ? spec : f], dir);
    assert.equal(ck.code, 0, `${tool} ${f}: ${ck.stdout}${ck.stderr}`);
  }
  const chain = await backingChain(dir, 'local/image');
  return { log: transcript(q, true), model, final: await qemuRawView(path.join(dir, 'local/image'), 'qcow2'), chain };
}

describe('seed 003: live storage migration from nfs/ to local/', oracle(), () => {
  for (const flavour of ['blockdev', 'drive'] as const) {
    test(`snapshot, cp, shallow reuse-external ${flavour}-mirror with pivot, shallow active commit with pivot, under guest writes`, async () => {
      const root = scratch('qchain-seed003-');
      const res = await onBoth(root, async (tool, dir) => {
        const r = await seed003(tool, dir, flavour);
        assert.ok(r.final.equals(r.model), `${tool}: local/image alone is every write: ${firstDiff(r.final, r.model)}`);
        assert.equal(r.chain, 'image: local/image', `${tool}: local/image stands alone`);
        return r;
      });
      const cmp = await qemuImg(['compare', '-f', 'qcow2', '-F', 'qcow2', path.join(root, 'qemu/local/image'), path.join(root, 'qchain/local/image')]);
      assert.equal(cmp.code, 0, cmp.stdout);
      assert.deepEqual(res.qchain.log, res.qemu.log);
    });
  }
});
