/**
 * A qcow2 node's `backing` option against qemu-storage-daemon 7.2, side by side. On the command
 * line (--blockdev keyval) `backing=` with nothing after it means no backing (with QEMU's
 * deprecation warning on stderr, after the option as written) and `backing=null` names a node
 * called "null" (refused when there is none); in QMP blockdev-add JSON null is no backing, ""
 * the same (warned), the string "null" a node name, and other JSON types are refused. A
 * missing node is "Could not open backing file: ...". Command line errors start with the option
 * as written (both the `--blockdev ARG` and `--blockdev=ARG` spellings).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { QCHAIN, oracle, qemuImg, run, scratch } from './helpers/qemu.js';
import { MONITOR, QSD, connectQmp, exited, killIfRunning, norm, onBoth, quit, spawnDaemon, withDaemon, type Tool } from './helpers/live-qmp.js';
import { waitForSocket } from './helpers/qmp-client.js';

const skip = oracle().skip ?? (fs.existsSync(QSD) ? undefined : 'no qemu-storage-daemon');

/** top.qcow2 and t0..t5.qcow2 over base.qcow2 (header), other.qcow2 standalone. */
async function images(dir: string): Promise<void> {
  fs.mkdirSync(dir, { recursive: true });
  const img = async (args: string[]): Promise<void> => assert.equal((await qemuImg(args, dir)).code, 0);
  await img(['create', '-q', '-f', 'qcow2', 'base.qcow2', '16M']);
  await img(['create', '-q', '-f', 'qcow2', 'other.qcow2', '16M']);
  for (const t of ['top', 't0', 't1', 't2', 't3', 't4', 't5']) await img(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', `${t}.qcow2`]);
}

const file = (name: string, f: string): string[] => ['--blockdev', `driver=file,node-name=${name},filename=${f}`];

/** Command lines: the daemon starts (and is queried) or exits with a message. */
const LINES: Record<string, string[]> = {
  empty: [...file('tf', 'top.qcow2'), '--blockdev', 'driver=qcow2,node-name=top,file=tf,backing='],
  emptyInline: [...file('tf', 'top.qcow2'), '--blockdev=driver=qcow2,node-name=top,file=tf,backing='],
  nullMissing: [...file('tf', 'top.qcow2'), '--blockdev', 'driver=qcow2,node-name=top,file=tf,backing=null'],
  nullMissingInline: [...file('tf', 'top.qcow2'), '--blockdev=driver=qcow2,node-name=top,file=tf,backing=null'],
  nullNode: [...file('of', 'other.qcow2'), '--blockdev', 'driver=qcow2,node-name=null,file=of',
    ...file('tf', 'top.qcow2'), '--blockdev', 'driver=qcow2,node-name=top,file=tf,backing=null'],
  missing: [...file('tf', 'top.qcow2'), '--blockdev', 'driver=qcow2,node-name=top,file=tf,backing=nosuch'],
  unexpected: ['--blockdev', 'driver=file,node-name=tf,filename=top.qcow2,foo=1'],
};

interface Outcome { code: number | null; stderr: string; nodes?: unknown }

/** Start the daemon with `args` and a monitor: its exit code and stderr if it fails, else the flat node listing and stderr after quit. */
async function runLine(tool: Tool, dir: string, args: string[]): Promise<Outcome> {
  const child = spawnDaemon(tool, dir, [...args, ...MONITOR]);
  const stderr = (): string => fs.readFileSync(path.join(dir, 'daemon.err'), 'utf8');
  await Promise.race([exited(child), waitForSocket(path.join(dir, 'qmp.sock'), child).catch(() => {})]);
  if (child.exitCode !== null) {
    await exited(child);
    return { code: child.exitCode, stderr: stderr() };
  }
  const d = { child, q: await connectQmp(dir, child) };
  try {
    await d.q.execute('qmp_capabilities');
    const nodes = norm(await d.q.execute('query-named-block-nodes', { flat: true }, 'q'), false);
    await quit(d);
    fs.rmSync(path.join(dir, 'qmp.sock'), { force: true });
    return { code: child.exitCode, stderr: stderr(), nodes };
  } finally {
    d.q.close();
    killIfRunning(child);
  }
}

test('--blockdev backing= (empty) and backing=null: as qemu-storage-daemon', { skip, timeout: 120000 }, async () => {
  const res = await onBoth(scratch('qchain-backing-cli-'), async (tool, dir) => {
    await images(dir);
    const out: Record<string, Outcome> = {};
    for (const [k, args] of Object.entries(LINES)) out[k] = await runLine(tool, dir, args);
    return out;
  });
  assert.deepEqual(res.qchain, res.qemu);
  const q = res.qemu;
  assert.equal(q.empty.code, 0);
  assert.equal(q.empty.stderr, 'qemu-storage-daemon: --blockdev driver=qcow2,node-name=top,file=tf,backing=: warning: Use of "backing": "" is deprecated; use "backing": null instead\n');
  assert.match(q.emptyInline.stderr, /^qemu-storage-daemon: --blockdev=driver=qcow2,node-name=top,file=tf,backing=: warning: /);
  assert.equal(q.nullMissing.code, 1);
  assert.equal(q.nullMissing.stderr, "qemu-storage-daemon: --blockdev driver=qcow2,node-name=top,file=tf,backing=null: Could not open backing file: Cannot find device='null' nor node-name='null'\n");
  assert.match(q.nullMissingInline.stderr, /^qemu-storage-daemon: --blockdev=driver=qcow2,node-name=top,file=tf,backing=null: Could not open/);
  assert.equal(q.nullNode.code, 0);
  // The node named "null" is attached: top shows it as its backing.
  assert.match(JSON.stringify(q.nullNode.nodes), /"backing_file":"other.qcow2"/);
});

/** blockdev-add's backing as JSON null, "", "null" (without and with a node so named), other types. */
const ADDS: Array<Record<string, unknown>> = [
  { 'node-name': 'a', file: { driver: 'file', filename: 't0.qcow2' }, backing: 'null' },
  { 'node-name': 'b', file: { driver: 'file', filename: 't1.qcow2' }, backing: '' },
  { 'node-name': 'c', file: { driver: 'file', filename: 't2.qcow2' }, backing: null },
  { 'node-name': 'null', file: { driver: 'file', filename: 'other.qcow2' } },
  { 'node-name': 'd', file: { driver: 'file', filename: 't3.qcow2' }, backing: 'null' },
  { 'node-name': 'e', file: { driver: 'file', filename: 't4.qcow2' }, backing: 'nosuch' },
  { 'node-name': 'f', file: { driver: 'file', filename: 't4.qcow2' }, backing: 5 },
  { 'node-name': 'g', file: { driver: 'file', filename: 't4.qcow2' }, backing: true },
  { 'node-name': 'h', file: { driver: 'file', filename: 't4.qcow2' }, backing: [] },
  { 'node-name': 'j', file: { driver: 'file', filename: 't5.qcow2' }, backing: 'b' },
];

test('blockdev-add backing: null, "", "null" and other types as qemu-storage-daemon', { skip, timeout: 60000 }, async () => {
  const res = await onBoth(scratch('qchain-backing-qmp-'), async (tool, dir) => {
    await images(dir);
    return withDaemon(tool, dir, [...MONITOR], async (d) => {
      await d.q.execute('qmp_capabilities');
      const replies = [];
      for (const [i, a] of ADDS.entries()) replies.push(await d.q.execute('blockdev-add', { driver: 'qcow2', ...a }, i));
      replies.push(await d.q.execute('query-named-block-nodes', { flat: true }, 'q'));
      await quit(d);
      return { replies: replies.map((r) => norm(r, false)), stderr: fs.readFileSync(path.join(dir, 'daemon.err'), 'utf8') };
    });
  });
  assert.deepEqual(res.qchain, res.qemu);
  const r = res.qemu.replies as Array<{ error?: { desc: string } }>;
  assert.equal(r[0].error?.desc, "Could not open backing file: Cannot find device='null' nor node-name='null'");
  assert.ok(!r[1].error && !r[2].error && !r[4].error && !r[9].error);
  assert.equal(r[6].error?.desc, "Invalid parameter type for 'backing', expected: BlockdevRefOrNull");
  // A QMP command's warning has no program name nor location.
  assert.equal(res.qemu.stderr, 'warning: Use of "backing": "" is deprecated; use "backing": null instead\n');
});

test('backing given as options (not a node name) is refused by qchain, on the command line and over QMP', { skip: oracle().skip, timeout: 60000 }, async () => {
  const dir = scratch('qchain-backing-inline-');
  await images(dir);
  const msg = 'backing given as options is not supported by qchain (add the backing node, then name it: backing=NODE)';
  const r = await run(process.execPath, [QCHAIN, 'daemon', ...file('tf', 'top.qcow2'), '--blockdev', 'driver=qcow2,node-name=top,file=tf,backing.driver=qcow2'], { cwd: dir, timeout: 20000 });
  assert.equal(r.code, 1);
  assert.equal(r.stderr, `qemu-storage-daemon: --blockdev driver=qcow2,node-name=top,file=tf,backing.driver=qcow2: ${msg}\n`);
  await withDaemon('qchain', dir, [...MONITOR], async (d) => {
    await d.q.execute('qmp_capabilities');
    const rep = await d.q.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'x', file: { driver: 'file', filename: 't0.qcow2' }, backing: { driver: 'qcow2', file: { driver: 'file', filename: 'base.qcow2' } } });
    assert.deepEqual(rep.error, { class: 'GenericError', desc: msg });
  });
});
