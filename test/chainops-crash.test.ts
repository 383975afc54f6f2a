/**
 * kill -9 during `qchain img commit` and during a safe `qchain img rebase`, many times at random
 * moments: afterwards `qemu-img check` finds no corruption (leaks allowed; an image caught inside
 * the emptying step carries the dirty bit and is repaired by QEMU), the top's guest view is the
 * original one, and re-running the command finishes with qemu-img's result.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { oracle, qemuImg, qemuImgSync, qemuIoSync, qemuRawView, rng, scratch } from './helpers/qemu.js';
import { copyDir, qchainImg } from './helpers/chains.js';
import { killLoop } from './helpers/crash.js';


/** A 3-layer chain with most of its data in the top and the middle (16 MiB virtual). */
function buildChain(dir: string): void {
  qemuImgSync(['create', '-q', '-f', 'qcow2', 'base.qcow2', '16M'], dir);
  qemuImgSync(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'mid.qcow2'], dir);
  qemuImgSync(['create', '-q', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', 'top.qcow2'], dir);
  const w = (f: string, cmds: string[]): string => qemuIoSync([...cmds.flatMap((c) => ['-c', c]), f], dir);
  w('base.qcow2', ['write -q -P 0x11 0 16M']);
  w('mid.qcow2', ['write -q -P 0x22 1M 6M', 'write -q -z 8M 2M', 'write -q -P 0x23 11M 4M']);
  const r = rng(7), top: string[] = [];
  for (let i = 0; i < 40; i++) top.push(`write -q -P 0x${(0x30 + (i % 40)).toString(16)} ${Math.floor(r() * 15 * 16) * 65536} ${(1 + Math.floor(r() * 8)) * 65536}`);
  top.push('write -q -z 3M 1M');
  w('top.qcow2', top);
}

async function dirty(file: string): Promise<boolean> {
  const j = JSON.parse(qemuImgSync(['info', '--output=json', '-U', file])) as { 'dirty-flag'?: boolean };
  return !!j['dirty-flag'];
}

/** No corruption: check passes (leaks allowed); a dirty image must repair cleanly. */
async function assertConsistent(file: string, ctx: string): Promise<void> {
  const chk = await qemuImg(['check', file]);
  if (chk.code === 0 || chk.code === 3) return;
  assert.ok(await dirty(file), `${ctx}: check ${file} exit ${chk.code}: ${chk.stdout}${chk.stderr}`);
  const rep = await qemuImg(['check', '-r', 'all', file]);
  assert.ok(rep.code === 0, `${ctx}: repair of dirty ${file}: ${rep.stdout}${rep.stderr}`);
}

/** `written`: the files the command changes (the others are QEMU's own, never opened writable). */
async function crashLoop(name: string, args: string[], written: string[], iterations: number, seed: number): Promise<void> {
  const root = scratch(`qchain-crash-${name}-`);
  const src = path.join(root, 'src');
  fs.mkdirSync(src);
  buildChain(src);
  const original = await qemuRawView(path.join(src, 'top.qcow2'));
  // The expected end state: qemu-img's own run on a copy.
  const exp = path.join(root, 'expected');
  copyDir(src, exp);
  assert.equal((await qemuImg(args, exp)).code, 0);
  const expected = new Map<string, Buffer>();
  for (const n of written) expected.set(n, await qemuRawView(path.join(exp, n)));
  // Kills land after the first write to the first file the command changes.
  await killLoop({
    name, root, src, args, watch: written[0], iterations, seed,
    after: async (dir, ctx) => {
      for (const n of written) await assertConsistent(path.join(dir, n), ctx);
      const view = await qemuRawView(path.join(dir, 'top.qcow2'));
      assert.ok(view.equals(original), `${ctx}: top's guest view changed`);
      const again = await qchainImg(args, dir);
      assert.equal(again.code, 0, `${ctx}: re-run: ${again.stderr}`);
      for (const n of written) {
        const v = await qemuRawView(path.join(dir, n));
        assert.ok(v.equals(expected.get(n) as Buffer), `${ctx}: ${n} after re-run differs from qemu-img's result`);
        const chk = await qemuImg(['check', '-r', 'leaks', path.join(dir, n)]);
        assert.equal(chk.code, 0, `${ctx}: ${n}: ${chk.stdout}`);
      }
    },
  });
}

describe('crash safety of commit and rebase (SIGKILL at random moments)', oracle(), () => {
  test('commit (copy, then empty the top)', async () => {
    await crashLoop('commit', ['commit', 'top.qcow2'], ['mid.qcow2', 'top.qcow2'], 5, 1);
  });
  test('commit -b base (through the intermediate)', async () => {
    await crashLoop('commit-b', ['commit', '-b', 'base.qcow2', 'top.qcow2'], ['base.qcow2'], 3, 2);
  });
  test('safe rebase dropping the middle layer', async () => {
    await crashLoop('rebase', ['rebase', '-b', 'base.qcow2', '-F', 'qcow2', 'top.qcow2'], ['top.qcow2'], 4, 3);
  });
});
