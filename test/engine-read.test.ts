/**
 * "QEMU writes → we read the same bytes": images built with qemu-img / qemu-io (compressed zlib
 * and zstd, extended L2 with subcluster writes, internal snapshots, v2, preallocation, refcount
 * widths 1 and 64, 512-byte and 2 MiB clusters, deep chains with zero clusters masking backing
 * data, a raw base, an overlay larger than its backing, a dirty lazy-refcounts image left by a
 * killed qemu-io). Our chain.read of the whole guest must equal QEMU's guest view, and our block
 * status must equal `qemu-img map` (present/zero/data/depth, host offsets ignored).
 *
 * Seeds: QCHAIN_SEED=<n> overrides the base seed; each test prints its seed on failure.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { oracle, qemuImg, qemuRawView, scratch, QEMU_IO } from './helpers/qemu.js';
import { assertQemuCheckClean, assertSameBytes, assertSameMap, baseSeed, ourMap, qemuInfo, qemuMap, readAll } from './helpers/engine-util.js';
import { builders, create } from './helpers/engine-images.js';
import { openChain } from '../src/chain/open.js';

const dir = scratch('qchain-engine-read-');

function seedFor(name: string): number {
  let h = baseSeed();
  for (const c of name) h = (Math.imul(h ^ c.charCodeAt(0), 0x01000193) >>> 0);
  return h;
}

for (const [name, build] of Object.entries(builders)) {
  test(`read QEMU-made image: ${name}`, oracle(), async () => {
    const seed = seedFor(name);
    const sub = fs.mkdtempSync(path.join(dir, `${name}-`));
    const img = await build(sub, seed);
    const what = `[${name} seed=${seed}]`;
    const expected = await qemuRawView(img.top);
    const chain = await openChain(img.top, { readOnly: true });
    try {
      assert.equal(chain.size, expected.length, `${what} virtual size`);
      assertSameBytes(await readAll(chain), expected, `${what} our chain.read vs QEMU view`);
      // Unaligned reads at random places (exercises partial-cluster/subcluster/compressed paths).
      let x = seed;
      for (let i = 0; i < 40; i++) {
        x = (Math.imul(x, 1103515245) + 12345) >>> 0;
        const len = 1 + (x % (3 * img.clusterSize + 777));
        x = (Math.imul(x, 1103515245) + 12345) >>> 0;
        const off = x % Math.max(1, chain.size - len);
        const b = Buffer.alloc(Math.min(len, chain.size - off));
        await chain.read(b, off);
        assertSameBytes(b, expected.subarray(off, off + b.length), `${what} read(off=${off}, len=${b.length})`);
      }
      if (img.compareMap) assertSameMap(await ourMap(chain), await qemuMap(img.top), what);
    } finally {
      await chain.close();
    }
    // We only read: the files must still be clean for QEMU.
    for (const f of img.qcow2Files) await assertQemuCheckClean(f, what);
    if (name.startsWith('compressed')) {
      // Make sure the image really holds compressed clusters (the point of the test).
      const r = await qemuImg(['check', img.top]);
      const m = /([0-9.]+)% compressed clusters/.exec(r.stdout);
      assert.ok(m && Number(m[1]) > 0, `${what} expected compressed clusters: ${r.stdout}`);
    }
  });
}

/** Wait until `pred(output so far)` holds, or fail after `ms`. */
function waitFor(get: () => string, pred: (s: string) => boolean, ms: number): Promise<void> {
  return new Promise((resolve, reject) => {
    const t0 = Date.now();
    const tick = (): void => {
      if (pred(get())) return resolve();
      if (Date.now() - t0 > ms) return reject(new Error(`timeout waiting for qemu-io; output so far:\n${get()}`));
      setTimeout(tick, 20);
    };
    tick();
  });
}

test('lazy_refcounts image left dirty by a killed qemu-io: read-write open repairs it', oracle(), async () => {
  const seed = seedFor('lazy-dirty');
  const what = `[lazy-dirty seed=${seed}]`;
  const file = path.join(dir, 'lazy.qcow2');
  await create(file, 16 * 1024 * 1024, { lazy_refcounts: 'on', cluster_size: 65536 });
  const child = spawn(QEMU_IO as string, ['-f', 'qcow2', file], { stdio: ['pipe', 'pipe', 'pipe'] });
  let out = '';
  child.stdout.on('data', (d: Buffer) => (out += d.toString()));
  child.stderr.on('data', (d: Buffer) => (out += d.toString()));
  const exited = new Promise<void>((res) => child.on('exit', () => res()));
  try {
    // qemu-io handles one line per read of its stdin: send a line, wait for the next prompt.
    const cmds = ['write -P 0x5a 0 1M', 'flush', 'write -P 0x6b 3M 300k', 'write -P 0x3c 8000000 70000', 'flush', 'write -P 0x11 5M 64k'];
    await waitFor(() => out, (s) => s.includes('qemu-io>'), 10_000);
    for (let i = 0; i < cmds.length; i++) {
      child.stdin.write(cmds[i] + '\n');
      await waitFor(() => out, (s) => (s.match(/qemu-io> /g) ?? []).length >= i + 2, 10_000);
    }
    assert.equal((out.match(/wrote /g) ?? []).length, 4, `${what} qemu-io output:\n${out}`);
  } finally {
    child.kill('SIGKILL');
    await exited;
  }
  const info = await qemuInfo(file);
  assert.equal(info['dirty-flag'], true, `${what} qemu-img info should report the dirty flag after kill -9`);
  const chk = await qemuImg(['check', file]);
  assert.notEqual(chk.code, 0, `${what} the killed image should have refcount errors before repair\n${chk.stdout}`);
  // QEMU's guest view of the dirty image (read-only, so QEMU does not repair it).
  const expected = await qemuRawView(file);
  assert.equal((await qemuInfo(file))['dirty-flag'], true, `${what} qemu-img convert must not have repaired the image`);
  assert.ok(expected.subarray(0, 1 << 20).equals(Buffer.alloc(1 << 20, 0x5a)), `${what} flushed data at 0 should be visible`);

  const logs: string[] = [];
  const chain = await openChain(file, { log: (l) => logs.push(l) });
  try {
    assertSameBytes(await readAll(chain), expected, `${what} our read after repair`);
  } finally {
    await chain.close();
  }
  await assertQemuCheckClean(file, `${what} after our repair (log: ${logs.join(' | ')})`);
  assert.equal((await qemuInfo(file))['dirty-flag'], false, `${what} dirty flag must be cleared after our read-write open`);
  assertSameBytes(await qemuRawView(file), expected, `${what} QEMU view after our repair`);
});
