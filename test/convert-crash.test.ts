/**
 * kill -9 during `qchain img convert` (plain and compressed, qcow2 output), many times at random
 * moments after the output file appears. Afterwards the source chain is byte for byte unchanged,
 * the partial output is never corrupt (`qemu-img check` passes, leaks allowed; an output killed
 * inside create, before its refcount structures follow the header, is not an image yet, as with
 * qemu-img convert), and re-running the same command line
 * finishes with the source's guest view and a clean `qemu-img check`.
 *
 * Issue 3, "Crash tests: kill -9 during … convert …".
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { oracle, qemuImg, qemuImgSync, qemuIoSync, qemuRawView, rng, scratch } from './helpers/qemu.js';
import { qchainImg } from './helpers/chains.js';
import { killLoop } from './helpers/crash.js';

/** base ← top, 64 MiB virtual: data in both layers, zeroes, holes, some incompressible data. */
function buildChain(dir: string): void {
  qemuImgSync(['create', '-q', '-f', 'qcow2', 'base.qcow2', '64M'], dir);
  qemuImgSync(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'top.qcow2'], dir);
  const w = (f: string, cmds: string[]): string => qemuIoSync([...cmds.flatMap((c) => ['-c', c]), f], dir);
  w('base.qcow2', ['write -q -P 0x11 0 48M', 'write -q -z 4M 1M']);
  const r = rng(11);
  const noise = Buffer.alloc(4 * 1024 * 1024);
  for (let i = 0; i < noise.length; i += 4) noise.writeUInt32LE(Math.floor(r() * 2 ** 32), i);
  fs.writeFileSync(path.join(dir, 'noise.bin'), noise);
  const top: string[] = ['write -q -s noise.bin 8M 4M', 'write -q -z 2M 512k'];
  for (let i = 0; i < 30; i++) top.push(`write -q -P 0x${(0x40 + i).toString(16)} ${Math.floor(r() * 63 * 16) * 65536} ${(1 + Math.floor(r() * 4)) * 65536}`);
  w('top.qcow2', top);
}

const QCOW2_MAGIC = Buffer.from('QFI\xfb', 'latin1');

function hashes(dir: string, names: string[]): Map<string, Buffer> {
  return new Map(names.map((n) => [n, fs.readFileSync(path.join(dir, n))]));
}

async function crashLoop(name: string, args: string[], iterations: number, seed: number): Promise<void> {
  const root = scratch(`qchain-crash-${name}-`);
  const src = path.join(root, 'src');
  fs.mkdirSync(src);
  buildChain(src);
  const sources = ['base.qcow2', 'top.qcow2'];
  const before = hashes(src, sources);
  const view = await qemuRawView(path.join(src, 'top.qcow2'));
  await killLoop({
    name, root, src, args, watch: 'out.qcow2', iterations, seed,
    after: async (dir, ctx) => {
      for (const [n, b] of before) assert.ok(fs.readFileSync(path.join(dir, n)).equals(b), `${ctx}: source ${n} changed`);
      const out = path.join(dir, 'out.qcow2');
      // An output killed inside create is not an image yet: no qcow2 magic, or the header written
      // but not yet the refcount table and block after it (qemu-img create writes them in that
      // order too; killed at that moment, qemu-img convert leaves the same 64 KiB file).
      const size = fs.existsSync(out) ? fs.statSync(out).size : 0;
      if (size >= 3 * 65536 && fs.readFileSync(out).subarray(0, 4).equals(QCOW2_MAGIC)) {
        const chk = await qemuImg(['check', out]);
        // 0: clean, 3: leaks only; anything else is corruption or a header QEMU cannot open.
        assert.ok(chk.code === 0 || chk.code === 3, `${ctx}: check exit ${chk.code}: ${chk.stdout}${chk.stderr}`);
      }
      const again = await qchainImg(args, dir);
      assert.equal(again.code, 0, `${ctx}: re-run: ${again.stderr}`);
      assert.ok((await qemuRawView(out)).equals(view), `${ctx}: output after the re-run differs from the source's guest view`);
      const chk = await qemuImg(['check', out]);
      assert.equal(chk.code, 0, `${ctx}: check after the re-run: ${chk.stdout}${chk.stderr}`);
    },
  });
}

describe('crash safety of convert (SIGKILL at random moments)', oracle(), () => {
  test('convert -O qcow2', async () => {
    await crashLoop('convert', ['convert', '-O', 'qcow2', 'top.qcow2', 'out.qcow2'], 6, 3);
  });
  test('convert -c -O qcow2 (zlib)', async () => {
    await crashLoop('convert-c', ['convert', '-c', '-O', 'qcow2', 'top.qcow2', 'out.qcow2'], 6, 4);
  });
});
