/**
 * The file driver's locking option as qemu-storage-daemon takes it: locking=off (on a protocol
 * node, or file.locking=off inline) takes no byte-range locks, so the same image can be added
 * again and another process may open it; a bad value is refused with QEMU's text. Same script
 * and command lines against both daemons.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { oracle, qemuImg, qemuIo, scratch } from './helpers/qemu.js';
import { MONITOR, onBoth, quit, withDaemon, type Tool } from './helpers/live-qmp.js';

const ADDS: Array<Record<string, unknown>> = [
  { driver: 'qcow2', 'node-name': 'a', file: { driver: 'file', filename: 'a.qcow2' } },
  { driver: 'qcow2', 'node-name': 'b', file: { driver: 'file', filename: 'a.qcow2', locking: 'off' } },
  { driver: 'file', 'node-name': 'cf', filename: 'c.qcow2', locking: 'off' },
  { driver: 'qcow2', 'node-name': 'c', file: 'cf' },
  { driver: 'qcow2', 'node-name': 'd', file: { driver: 'file', filename: 'c.qcow2', locking: 'auto' } },
  { driver: 'qcow2', 'node-name': 'e', file: { driver: 'file', filename: 'c.qcow2', locking: 'maybe' } },
];

async function session(tool: Tool, dir: string): Promise<unknown[]> {
  fs.mkdirSync(dir, { recursive: true });
  for (const f of ['a', 'c']) assert.equal((await qemuImg(['create', '-q', '-f', 'qcow2', `${f}.qcow2`, '1M'], dir)).code, 0);
  return withDaemon(tool, dir, [...MONITOR], async (d) => {
    const out: unknown[] = [];
    await d.q.execute('qmp_capabilities');
    for (const [i, a] of ADDS.entries()) out.push(await d.q.execute('blockdev-add', a, i));
    // c.qcow2 is held with locking=off (and by d, locking=auto, which locks): qemu-io is refused;
    // once d is gone, another writer may open it.
    const w1 = await qemuIo(['-c', 'write -P 3 0 4k', 'c.qcow2'], dir);
    out.push(w1.code === 0 ? 'written' : w1.stderr.trim());
    out.push(await d.q.execute('blockdev-del', { 'node-name': 'd' }, 'del'));
    const w2 = await qemuIo(['-c', 'write -P 3 0 4k', 'c.qcow2'], dir);
    out.push(w2.code === 0 ? 'written' : w2.stderr.trim());
    await quit(d);
    return out;
  });
}

test('locking=off takes no locks, as qemu-storage-daemon', oracle(), async () => {
  const r = await onBoth(scratch(), session);
  assert.deepEqual(r.qchain, r.qemu);
  assert.equal(r.qemu.at(-1), 'written');
});
