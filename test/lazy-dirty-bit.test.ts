/**
 * Dirty bit with lazy refcounts, as QEMU 7.2 (issue 3: "lazy_refcounts=on images set the dirty bit
 * while open for writing and are repaired on the next read-write open"): `qchain io` and qemu-io
 * run the same commands on copies of one lazy_refcounts image.
 * - killed (sigraise 9) after a write, both leave the dirty bit set;
 * - a clean exit after a write leaves it clear; a read-only session never sets it;
 * - the next read-write open by qchain clears it and leaves an image `qemu-img check` finds clean,
 *   with the guest data flushed before the kill.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { QCHAIN, oracle, qemuImg, qemuImgSync, run, scratch } from './helpers/qemu.js';

const ROOT = scratch('qchain-lazy-dirty-');

async function dirtyFlag(file: string): Promise<boolean> {
  const r = await qemuImg(['info', '--output=json', '-U', file]);
  assert.equal(r.code, 0, r.stderr);
  return (JSON.parse(r.stdout) as { 'dirty-flag': boolean })['dirty-flag'];
}

function fresh(name: string): { a: string; b: string } {
  const dir = path.join(ROOT, name);
  fs.mkdirSync(dir, { recursive: true });
  qemuImgSync(['create', '-q', '-f', 'qcow2', '-o', 'lazy_refcounts=on', 'qemu.qcow2', '4M'], dir);
  fs.copyFileSync(path.join(dir, 'qemu.qcow2'), path.join(dir, 'qchain.qcow2'));
  return { a: path.join(dir, 'qemu.qcow2'), b: path.join(dir, 'qchain.qcow2') };
}

function both(args: string[], a: string, b: string): Promise<[Awaited<ReturnType<typeof run>>, Awaited<ReturnType<typeof run>>]> {
  return Promise.all([run('qemu-io', [...args, a]), run(process.execPath, [QCHAIN, 'io', ...args, b])]);
}

test('killed after a write: the dirty bit stays set, as with qemu-io; the next read-write open repairs', oracle(), async () => {
  const { a, b } = fresh('killed');
  // flush: the L2 tables reach the file (without it both tools lose the unflushed mappings).
  const [qr, cr] = await both(['-c', 'write -P 0x33 0 192k', '-c', 'write -P 0x44 1M 64k', '-c', 'flush', '-c', 'sigraise 9'], a, b);
  assert.equal(cr.code, qr.code, 'exit status (killed)');
  assert.equal(await dirtyFlag(a), true, 'qemu-io left the dirty bit');
  assert.equal(await dirtyFlag(b), true, 'qchain io left the dirty bit');
  // The next read-write open by qchain repairs the image and clears the bit.
  const again = await run(process.execPath, [QCHAIN, 'io', '-c', 'read -P 0x33 0 192k', '-c', 'read -P 0x44 1M 64k', b]);
  assert.equal(again.code, 0, again.stderr);
  assert.doesNotMatch(again.stdout, /Pattern verification failed/);
  assert.equal(await dirtyFlag(b), false, 'dirty bit cleared by the read-write open');
  const chk = await qemuImg(['check', b]);
  assert.equal(chk.code, 0, `${chk.stdout}${chk.stderr}`);
  const cmp = await qemuImg(['compare', '-U', a, b]);
  assert.equal(cmp.code, 0, cmp.stdout);
});

test('a clean exit clears the dirty bit; a read-only session never sets it', oracle(), async () => {
  const { a, b } = fresh('clean');
  const [qr, cr] = await both(['-c', 'write -P 0x55 64k 64k'], a, b);
  assert.equal(cr.code, qr.code);
  assert.equal(await dirtyFlag(a), false);
  assert.equal(await dirtyFlag(b), false);
  const [qr2, cr2] = await both(['-r', '-c', 'read -P 0x55 64k 64k', '-c', 'sigraise 9'], a, b);
  assert.equal(cr2.code, qr2.code);
  assert.equal(await dirtyFlag(a), false);
  assert.equal(await dirtyFlag(b), false);
  assert.ok(fs.readFileSync(a).equals(fs.readFileSync(b)), 'files identical');
});
