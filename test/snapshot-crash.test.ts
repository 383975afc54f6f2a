/**
 * Crashes during `qchain img snapshot -c` and `-d`: after every single write of the operation
 * (in process, deterministic), and kill -9 of the command at random moments. Afterwards:
 * - `qemu-img check` finds leaks at worst (exit 0 or 3), or, while the image still carries the
 *   dirty bit, only COPIED flags cleared where the refcount is still one (never a COPIED flag on a
 *   shared cluster, never a refcount below its references) — the only states an in-place update of
 *   two separate clusters (L2 entry, refcount block) must pass through;
 * - such a dirty image is repaired to a clean check both by `qemu-img check -r all` and by ours;
 * - the active view and every snapshot that exists read exactly as before.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { oracle, qemuImg, qemuImgSync, qemuIoSync, qemuRawView, rng, scratch } from './helpers/qemu.js';
import { qchainImg } from './helpers/chains.js';
import { CrashStorage, killLoop } from './helpers/crash.js';
import { Qcow2Image } from '../src/qcow2/image.js';
import { createSnapshot } from '../src/qcow2/snapshot.js';
import { deleteSnapshot } from '../src/qcow2/snapshot-manage.js';

const IMG = 'img.qcow2';

/** `mib` MiB in 1 KiB clusters (128 KiB per L2 table, all full), snapshot s0, then rewrites over part of it. */
function build(dir: string, withS1: boolean, mib = 16): void {
  qemuImgSync(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=1024', IMG, `${mib}M`], dir);
  qemuIoSync(['-c', `write -q -P 0x11 0 ${mib}M`, IMG], dir);
  qemuImgSync(['snapshot', '-c', 's0', IMG], dir);
  const r = rng(11), cmds: string[] = [];
  for (let i = 0; i < 24; i++) cmds.push(`write -q -P 0x${(0x40 + i).toString(16)} ${Math.floor(r() * (mib - 1) * 16) * 65536} ${(1 + Math.floor(r() * 8)) * 65536}`);
  qemuIoSync([...cmds.flatMap((c) => ['-c', c]), IMG], dir);
  if (withS1) {
    qemuImgSync(['snapshot', '-c', 's1', IMG], dir);
    qemuIoSync(['-c', `write -q -P 0x77 ${mib / 4}M ${mib / 8}M`, IMG], dir);
  }
}

async function snapshotNames(file: string): Promise<string[]> {
  const j = JSON.parse(qemuImgSync(['info', '--output=json', '-U', file])) as { snapshots?: Array<{ name: string }> };
  return (j.snapshots ?? []).map((s) => s.name);
}

async function views(file: string): Promise<Map<string, Buffer>> {
  const out = new Map<string, Buffer>([['', await qemuRawView(file)]]);
  for (const name of await snapshotNames(file)) {
    const raw = `${file}.${name}.raw`;
    const r = await qemuImg(['convert', '-U', '-l', `snapshot.name=${name}`, '-O', 'raw', file, raw]);
    assert.equal(r.code, 0, r.stderr);
    out.set(name, fs.readFileSync(raw));
    fs.rmSync(raw);
  }
  return out;
}

/** A COPIED flag that is clear where the refcount is one: an extra copy-on-write, nothing worse. */
function harmless(line: string): boolean {
  const m = /^ERROR OFLAG_COPIED (?:data cluster: l2_entry|L2 cluster: l1_index=\d+ l1_entry)=([0-9a-f]+) refcount=(\d+)$/.exec(line);
  return !!m && m[2] === '1' && (BigInt(`0x${m[1]}`) >> 63n) === 0n;
}

async function assertConsistent(file: string, ctx: string): Promise<void> {
  const chk = await qemuImg(['check', file]);
  if (chk.code === 0 || chk.code === 3) return;
  const out = chk.stdout + chk.stderr;
  const info = JSON.parse(qemuImgSync(['info', '--output=json', '-U', file])) as { 'dirty-flag'?: boolean };
  assert.ok(info['dirty-flag'], `${ctx}: check exit ${chk.code} on an image without the dirty bit:\n${out}`);
  if (process.env.QCHAIN_CRASH_DEBUG) console.log(ctx, out);
  const errors = out.split('\n').filter((l) => l.startsWith('ERROR'));
  assert.ok(errors.length > 0 && errors.every(harmless), `${ctx}: check found more than cleared COPIED flags:\n${out}`);
  // Both repairs make it clean: QEMU's, and ours (on a copy).
  const ours = `${file}.ours`;
  fs.copyFileSync(file, ours);
  for (const [what, run] of [['qemu-img', () => qemuImg(['check', '-r', 'all', file])], ['qchain', () => qchainImg(['check', '-r', 'all', path.basename(ours)], path.dirname(ours))]] as const) {
    const rep = await run();
    assert.equal(rep.code, 0, `${ctx}: ${what} check -r all: ${rep.stdout}${rep.stderr}`);
  }
  for (const f of [file, ours]) {
    const again = await qemuImg(['check', f]);
    assert.equal(again.code, 0, `${ctx}: ${f} after repair: ${again.stdout}${again.stderr}`);
  }
  fs.rmSync(ours);
}

/** After a crash: every view that exists reads as before (a new snapshot as the active state), and check passes. */
async function assertCrashState(file: string, before: Map<string, Buffer>, ctx: string): Promise<void> {
  for (const [sn, view] of await views(file)) {
    const want = before.get(sn) ?? before.get('');
    assert.ok(want && view.equals(want), `${ctx}: ${sn ? `snapshot ${sn}` : 'the active view'} changed`);
  }
  await assertConsistent(file, ctx);
}

/**
 * Every crash point of one in-process operation: the file as it is after each prefix of the
 * operation's writes (all of them, in order) must pass assertCrashState.
 */
async function crashSweep(name: string, withS1: boolean, op: (img: Qcow2Image) => Promise<unknown>): Promise<void> {
  const dir = scratch(`qchain-snapsweep-${name}-`);
  build(dir, withS1, 1);
  const file = path.join(dir, IMG);
  const before = await views(file);
  const initial = fs.readFileSync(file);
  const run = async (limit: number): Promise<CrashStorage> => {
    const st = new CrashStorage(initial, limit);
    await op(await Qcow2Image.open(st)).catch((e: unknown) => {
      if (limit === Infinity) throw e;
    });
    return st;
  };
  const total = (await run(Infinity)).writes;
  assert.ok(total > 10, `${name}: only ${total} writes`);
  for (let limit = 0; limit < total; limit++) {
    const st = await run(limit);
    fs.writeFileSync(file, st.contents());
    await assertCrashState(file, before, `${name}: crash after write ${limit} of ${total}`);
  }
}

async function crashLoop(name: string, args: string[], withS1: boolean, iterations: number, seed: number): Promise<void> {
  const root = scratch(`qchain-snapcrash-${name}-`);
  const src = path.join(root, 'src');
  fs.mkdirSync(src);
  build(src, withS1);
  const before = await views(path.join(src, IMG));
  await killLoop({
    name, root, src, args, watch: IMG, iterations, seed,
    probed: async (probe) => {
      assert.equal((await qemuImg(['check', path.join(probe, IMG)])).code, 0, `${name}: an uninterrupted run must leave a clean image`);
    },
    after: (dir, ctx) => assertCrashState(path.join(dir, IMG), before, ctx),
  });
}

describe('crash safety of internal snapshots (every write as a crash point)', oracle(), () => {
  test('snapshot -c', async () => {
    await crashSweep('create', false, (img) => createSnapshot(img, { name: 's1' }));
  });
  test('snapshot -d', async () => {
    await crashSweep('delete', true, (img) => deleteSnapshot(img, null, 's0'));
  });
});

describe('crash safety of internal snapshots (SIGKILL at random moments)', oracle(), () => {
  test('snapshot -c', async () => {
    await crashLoop('create', ['snapshot', '-c', 's1', IMG], false, 8, 21);
  });
  test('snapshot -d', async () => {
    await crashLoop('delete', ['snapshot', '-d', 's0', IMG], true, 8, 22);
  });
});
