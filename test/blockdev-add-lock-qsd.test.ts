/**
 * blockdev-add and --blockdev refusals as qemu-storage-daemon words them: a root node with no
 * node-name, and an image another node already holds for writing (the file driver's lock error,
 * with no "Could not open" prefix; the "Is another process using the image" hint on the command
 * line only, never in QMP). Same script and command lines against both daemons.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { oracle, qemuImg, run, QCHAIN, scratch } from './helpers/qemu.js';
import { MONITOR, QSD, onBoth, quit, withDaemon, type Tool } from './helpers/live-qmp.js';

const ADDS: Array<Record<string, unknown>> = [
  { driver: 'qcow2', file: { driver: 'file', filename: 'a.qcow2' } },
  { driver: 'file', filename: 'a.qcow2' },
  { driver: 'qcow2', 'node-name': 'a', file: { driver: 'file', filename: 'a.qcow2' } },
  { driver: 'qcow2', 'node-name': 'b', file: { driver: 'file', filename: 'a.qcow2' } },
  { driver: 'file', 'node-name': 'c', filename: 'a.qcow2' },
  { driver: 'qcow2', 'node-name': 'e', 'read-only': true, file: { driver: 'file', filename: 'a.qcow2' } },
  { driver: 'qcow2', 'node-name': 'f', backing: null, file: { driver: 'file', filename: 'a.qcow2' } },
];

async function session(tool: Tool, dir: string): Promise<unknown[]> {
  fs.mkdirSync(dir, { recursive: true });
  assert.equal((await qemuImg(['create', '-q', '-f', 'qcow2', 'a.qcow2', '1M'], dir)).code, 0);
  const out: unknown[] = await withDaemon(tool, dir, [...MONITOR], async (d) => {
    const replies: unknown[] = [];
    await d.q.execute('qmp_capabilities');
    for (const [i, a] of ADDS.entries()) replies.push(await d.q.execute('blockdev-add', a, i));
    await quit(d);
    return replies;
  });
  for (const args of [['--blockdev', 'driver=qcow2,file=x'],
    ['--blockdev', 'driver=qcow2,node-name=a,file.driver=file,file.filename=a.qcow2', '--blockdev', 'driver=qcow2,node-name=b,file.driver=file,file.filename=a.qcow2']]) {
    const r = tool === 'qemu' ? await run(QSD, args, { cwd: dir }) : await run(process.execPath, [QCHAIN, 'daemon', ...args], { cwd: dir });
    out.push([r.code, r.stderr]);
  }
  return out;
}

test('blockdev-add refusals (no node-name, image locked) read as qemu-storage-daemon\'s', oracle(), async () => {
  const r = await onBoth(scratch(), session);
  assert.deepEqual(r.qchain, r.qemu);
  assert.deepEqual((r.qemu[3] as { error: unknown }).error, { class: 'GenericError', desc: 'Failed to get "write" lock' });
});
