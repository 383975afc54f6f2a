/**
 * Image locking interoperates with QEMU's OFD byte-range locks: while one tool holds an image,
 * the other refuses conflicting opens with QEMU's messages; -U and read-only sharing work.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { QCHAIN, QEMU_IO, oracle, qchain, qemuImg, qemuIo, scratch } from './helpers/qemu.js';

/** Start a holder that keeps `file` open (qemu-io or qchain io sleeping) and wait for its locks. */
async function hold(tool: 'qemu' | 'qchain', file: string, readOnly: boolean): Promise<ChildProcess> {
  const args = [...(readOnly ? ['-r'] : []), '-c', 'sleep 20000', file];
  const child = tool === 'qemu' ? spawn(QEMU_IO ?? 'qemu-io', args, { stdio: 'ignore' })
    : spawn(process.execPath, [QCHAIN, 'io', ...args], { stdio: 'ignore' });
  const ino = String(fs.statSync(file).ino);
  // Bytes 100 and 203 for every holder, 101 for writers (the kernel merges adjacent ranges).
  const want = readOnly ? [100, 203] : [100, 101, 203];
  for (let i = 0; i < 200; i++) {
    const ranges = fs.readFileSync('/proc/locks', 'utf8').split('\n').filter((l) => l.includes(`:${ino} `))
      .map((l) => l.trim().split(/\s+/).slice(-2).map(Number));
    if (want.every((b) => ranges.some(([a, e]) => a <= b && b <= e))) return child;
    await new Promise((r) => setTimeout(r, 25));
  }
  child.kill('SIGKILL');
  throw new Error(`${tool} did not take its locks`);
}

async function release(child: ChildProcess): Promise<void> {
  const done = new Promise((r) => child.once('exit', r));
  child.kill('SIGKILL');
  await done;
}

const cases: Array<{ what: string; args: (d: string) => string[] }> = [
  { what: 'info', args: () => ['img', 'info', 'lk.qcow2'] },
  { what: 'info -U', args: () => ['img', 'info', '-U', 'lk.qcow2'] },
  { what: 'map', args: () => ['img', 'map', 'lk.qcow2'] },
  { what: 'check', args: () => ['img', 'check', 'lk.qcow2'] },
  { what: 'create over it', args: () => ['img', 'create', '-q', '-f', 'qcow2', 'lk.qcow2', '1M'] },
  { what: 'info of the overlay', args: () => ['img', 'info', 'ov.qcow2'] },
  { what: 'io write', args: () => ['io', '-c', 'write 0 512', 'lk.qcow2'] },
  { what: 'io -r read', args: () => ['io', '-r', '-c', 'read 0 512', 'lk.qcow2'] },
  { what: 'io -r -U read', args: () => ['io', '-r', '-U', '-c', 'read 0 512', 'lk.qcow2'] },
  { what: 'io write through the overlay', args: () => ['io', '-c', 'write 0 512', 'ov.qcow2'] },
];

function normalise(s: string): string {
  return s.replace(/^qemu-(img|io): /gm, 'X: ').replace(/\(.*ops\/sec\)/g, '(T)').replace(/\d+(\.\d+)? sec/g, 'T sec');
}

for (const holder of ['qemu', 'qchain'] as const) {
  for (const readOnly of [false, true]) {
    test(`while ${holder === 'qemu' ? 'qemu-io' : 'qchain io'}${readOnly ? ' -r' : ''} holds the image, both tools answer alike`, oracle(), async () => {
      const dir = scratch();
      assert.equal((await qemuImg(['create', '-q', '-f', 'qcow2', path.join(dir, 'lk.qcow2'), '1M'])).code, 0);
      assert.equal((await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'lk.qcow2', '-F', 'qcow2', path.join(dir, 'ov.qcow2')])).code, 0);
      const child = await hold(holder, path.join(dir, 'lk.qcow2'), readOnly);
      try {
        for (const c of cases) {
          const a = c.args(dir);
          const q = a[0] === 'img' ? await qemuImg(a.slice(1), dir) : await qemuIo(a.slice(1), dir);
          const m = await qchain(a, dir);
          assert.equal(m.code, q.code, `${c.what}: exit code (qemu stderr: ${q.stderr})`);
          assert.equal(normalise(m.stderr), normalise(q.stderr), c.what);
          if (q.code === 0 && c.what.startsWith('info')) assert.equal(m.stdout.split('\n')[0], q.stdout.split('\n')[0]);
        }
      } finally {
        await release(child);
      }
      // Once the holder is gone, writers get in again.
      assert.equal((await qchain(['io', '-c', 'write 0 512', 'lk.qcow2'], dir)).code, 0);
    });
  }
}
