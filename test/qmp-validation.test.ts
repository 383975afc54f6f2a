/**
 * block-stream, block-commit and block_resize argument checks against qemu-storage-daemon: the
 * same QMP script runs against both daemons; every reply (implicit "#blockNNN" names
 * normalised), every event (timestamps, offsets and lengths dropped), the read-only state and
 * size of the named format nodes, and the size an NBD client sees after a resize must match.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { oracle, qemuImg, qemuIo, run, scratch } from './helpers/qemu.js';
import type { QmpMessage } from './helpers/qmp-client.js';
import { M, MONITOR, QSD, nbdUri, onBoth, qcow2Node, quit, withDaemon, type Tool } from './helpers/live-qmp.js';

async function setup(dir: string): Promise<void> {
  fs.mkdirSync(dir, { recursive: true });
  const ok = async (p: Promise<{ code: number; stderr: string }>): Promise<void> => assert.equal((await p).code, 0);
  await ok(qemuImg(['create', '-q', '-f', 'qcow2', 'base.qcow2', '64M'], dir));
  await ok(qemuIo(['-c', 'write -P 1 0 1M', 'base.qcow2'], dir));
  await ok(qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'mid.qcow2'], dir));
  await ok(qemuIo(['-c', 'write -P 2 1M 1M', 'mid.qcow2'], dir));
  await ok(qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', 'top.qcow2'], dir));
  await ok(qemuImg(['create', '-q', '-f', 'raw', 'r.raw', '1M'], dir));
  await ok(qemuImg(['create', '-q', '-f', 'qcow2', 'solo.qcow2', '4M'], dir));
  await ok(qemuIo(['-c', 'write -P 7 0 3M', 'solo.qcow2'], dir));
  await ok(qemuImg(['create', '-q', '-f', 'raw', 'lone.raw', '1M'], dir));
}

const ARGS = [
  ...qcow2Node('base', ',read-only=on'), ...qcow2Node('mid', ',backing=base'), ...qcow2Node('top', ',backing=mid'), ...qcow2Node('solo'),
  '--blockdev', 'driver=file,node-name=rf,filename=r.raw', '--blockdev', 'driver=raw,node-name=r,file=rf',
  '--blockdev', 'driver=file,node-name=lone,filename=lone.raw',
  '--nbd-server', 'addr.type=unix,addr.path=nbd.sock',
  '--export', 'type=nbd,id=e,node-name=top,name=vda,writable=on',
  ...MONITOR,
];

type Step = [string, Record<string, unknown>?] | ['wait-event', string, string] | ['nodes'] | ['nbd-size', string] | ['wait-ro', string];

const SCRIPT: Step[] = [
  // block-stream
  ['block-stream', { device: 'top', 'base-node': 'top' }],
  ['block-stream', { device: 'mid', 'base-node': 'top' }],
  ['block-stream', { device: 'top', 'backing-file': 'x.qcow2' }],
  ['block-stream', { device: 'top', base: 'nosuch.qcow2' }],
  ['block-stream', { device: 'top', base: 'base.qcow2', 'base-node': 'base' }],
  ['block-stream', { device: 'top', 'job-id': 'bad id' }],
  ['block-stream', { device: 'top', 'job-id': '1abc' }],
  ['block-stream', { device: 'top', 'job-id': '' }],
  ['block-stream', { device: 'top' }],
  ['block-stream', { device: 'nosuch', 'job-id': 's' }],
  ['block-stream', { device: 'mid', 'job-id': 's1', speed: 1 }],
  ['block-stream', { device: 'mid', 'job-id': 's1' }],
  ['block_resize', { 'node-name': 'mid', size: M }],
  ['job-cancel', { id: 's1' }],
  ['wait-event', 's1', 'null'],
  // block-commit
  ['block-commit', { device: 'top', 'job-id': 'c0', 'top-node': 'mid', 'base-node': 'mid' }],
  ['block-commit', { device: 'top', 'job-id': 'c0', 'top-node': 'base', 'base-node': 'mid' }],
  ['block-commit', { device: 'top', 'job-id': 'c0', 'top-node': 'mid', 'base-node': 'top' }],
  ['block-commit', { device: 'top', 'job-id': 'c0', 'backing-file': 'x.qcow2' }],
  ['block-commit', { device: 'top', 'job-id': 'c0', 'top-node': 'top', 'backing-file': 'x.qcow2' }],
  ['block-commit', { device: 'top', 'job-id': 'c0', 'top-node': 'base' }],
  ['block-commit', { device: 'top', 'job-id': 'c0', top: 'nosuch.qcow2' }],
  ['block-commit', { device: 'top', 'job-id': 'c0', base: 'nosuch.qcow2' }],
  ['block-commit', { device: 'mid', 'job-id': 'c0' }],
  ['block-commit', { device: 'top', 'top-node': 'mid' }],
  ['nodes'],
  // An intermediate commit reopens the read-only base read-write; cancelled, it is read-only again.
  ['block-commit', { device: 'top', 'job-id': 'c1', 'top-node': 'mid', speed: 1 }],
  ['block-commit', { device: 'top', 'job-id': 'c1', 'top-node': 'mid' }],
  ['nodes'],
  ['job-cancel', { id: 'c1' }],
  ['wait-event', 'c1', 'null'],
  // qchain announces the cancel before its copy loop has stopped and the base is reopened.
  ['wait-ro', 'base'],
  ['nodes'],
  // Active commit: the base is read-write before the command returns, and stays so once cancelled.
  ['block-commit', { device: 'top', 'job-id': 'a1', speed: 1 }],
  ['nodes'],
  ['job-cancel', { id: 'a1' }],
  ['wait-event', 'a1', 'null'],
  ['nodes'],
  // block_resize
  ['block_resize', { 'node-name': 'r', size: 2 * M }],
  ['block_resize', { 'node-name': 'r', size: M }],
  ['block_resize', { 'node-name': 'top', size: 128 * M }],
  ['block_resize', { 'node-name': 'base', size: 128 * M }],
  ['block_resize', { device: 'top', size: 128 * M }],
  ['block_resize', { 'node-name': 'nosuch', size: 128 * M }],
  ['block_resize', { 'node-name': 'top', size: -1 }],
  ['block_resize', { size: 1 }],
  ['block_resize', { 'node-name': 'top-file', size: 128 * M }],
  ['block_resize', { 'node-name': 'solo', size: 8 * M }],
  ['block_resize', { 'node-name': 'solo', size: 2 * M }],
  ['block_resize', { 'node-name': 'solo', size: 1000 }],
  ['block_resize', { 'node-name': 'solo', size: 'x' }],
  ['block_resize', { 'node-name': 'solo', size: 2 ** 53 }],
  ['block_resize', { 'node-name': 'solo', size: 0 }],
  ['block_resize', { 'node-name': 'solo', size: 6 * M }],
  ['block_resize', { 'node-name': 'lone', size: 8192 }],
  ['block_resize', { 'node-name': 'solo-file', size: 8192 }],
  ['block-export-add', { type: 'nbd', id: 'e2', 'node-name': 'solo', writable: true }],
  ['nbd-size', 'solo'],
  ['block_resize', { 'node-name': 'solo', size: 4 * M }],
  ['block-export-del', { id: 'e2' }],
  ['wait-event', 'e2', 'deleted'],
  ['block_resize', { 'node-name': 'solo', size: 4 * M }],
  ['block-export-add', { type: 'nbd', id: 'e3', 'node-name': 'solo' }],
  ['nbd-size', 'solo'],
  ['nodes'],
];

function norm(v: unknown): unknown {
  return JSON.parse(JSON.stringify(v).replace(/#block\d+/g, '#block')) as unknown;
}

async function session(tool: Tool, dir: string): Promise<{ log: unknown[]; events: unknown[] }> {
  await setup(dir);
  return withDaemon(tool, dir, ARGS, async (d) => {
    const { q } = d;
    await q.execute('qmp_capabilities', undefined, 'cap');
    const log: unknown[] = [];
    for (const [i, step] of SCRIPT.entries()) {
      if (step[0] === 'wait-event') {
        const [, id, what] = step;
        await q.waitFor((m: QmpMessage) => {
          const d = m.data as Record<string, unknown> | undefined;
          return what === 'deleted' ? m.event === 'BLOCK_EXPORT_DELETED' && d?.id === id : m.event === 'JOB_STATUS_CHANGE' && d?.id === id && d?.status === what;
        }, 60000);
      } else if (step[0] === 'wait-ro') {
        for (let k = 0; k < 200; k++) {
          const r = await q.execute('query-named-block-nodes', undefined, `ro-${i}-${k}`);
          if ((r.return as Array<Record<string, unknown>>).some((n) => n['node-name'] === step[1] && n.ro === true)) break;
          await new Promise((res) => setTimeout(res, 25));
        }
      } else if (step[0] === 'nodes') {
        const r = await q.execute('query-named-block-nodes', undefined, i);
        // Format nodes only: protocol nodes' sizes follow how much each job copied before a cancel.
        const list = (r.return as Array<Record<string, unknown>>).filter((n) => !String(n['node-name']).startsWith('#') && n.drv !== 'file');
        log.push([i, list.map((n) => [n['node-name'], n.ro, (n.image as Record<string, unknown>)['virtual-size']])
          .sort((a, b) => String(a[0]).localeCompare(String(b[0])))]);
      } else if (step[0] === 'nbd-size') {
        const r = await run('qemu-img', ['info', '--output=json', nbdUri(dir, step[1] as string)]);
        log.push([i, r.code, r.code === 0 ? (JSON.parse(r.stdout) as Record<string, unknown>)['virtual-size'] : r.stderr]);
      } else {
        const r = await q.execute(step[0], step[1] as Record<string, unknown> | undefined, i);
        log.push(norm(r));
      }
    }
    await quit(d, 'quit');
    q.close();
    const events = q.received.filter((m) => m.event).map((m) => {
      const c = norm(m) as Record<string, unknown>;
      delete c.timestamp;
      const d = c.data as Record<string, unknown> | undefined;
      if (d) {
        delete d.offset;
        delete d.len;
      }
      return c;
    });
    return { log, events };
  });
}

test('block-stream, block-commit and block_resize checks match qemu-storage-daemon', { skip: oracle().skip ?? (fs.existsSync(QSD) ? undefined : 'no qemu-storage-daemon'), timeout: 180000 }, async () => {
  const root = scratch('qchain-validate-');
  const { qemu, qchain: ours } = await onBoth(root, session);
  for (let i = 0; i < qemu.log.length; i++) assert.deepEqual(ours.log[i], qemu.log[i], `step ${JSON.stringify(qemu.log[i]).slice(0, 200)}`);
  assert.deepEqual(ours.events, qemu.events);
  for (const f of ['base.qcow2', 'mid.qcow2', 'top.qcow2', 'solo.qcow2']) {
    const c = await qemuImg(['check', '-q', path.join(root, 'qchain', f)]);
    assert.equal(c.code, 0, `${f}: ${c.stdout}${c.stderr}`);
  }
});
