/**
 * `qchain img dd` against `qemu-img dd`: same messages and exit status, and byte-identical output
 * files (raw and qcow2) over block sizes, counts, skips (including qemu-img's count-includes-skip
 * arithmetic and skips past the end), chains and odd sizes.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { oracle, qchain, qemuImg, qemuImgSync, qemuIoSync, scratch } from './helpers/qemu.js';
import { qchainImgInProcess } from './helpers/inproc.js';

/** Run both with `OUT` replaced by qo/co output names; compare output, status and files. */
async function same(dir: string, args: string[], fresh = false): Promise<void> {
  const qa = args.map((a) => a.replace('OUT', 'qo')), ca = args.map((a) => a.replace('OUT', 'co'));
  const q = await qemuImg(['dd', ...qa], dir);
  const c = fresh ? await qchain(['img', 'dd', ...ca], dir) : await qchainImgInProcess(['dd', ...ca], dir);
  const norm = (s: string): string => s.replace(/\bco(?=[.':\s]|$)/g, 'qo');
  assert.deepEqual({ code: c.code, stdout: c.stdout, stderr: norm(c.stderr) }, { code: q.code, stdout: q.stdout, stderr: q.stderr }, `dd ${args.join(' ')}`);
  for (const f of fs.readdirSync(dir).filter((n) => n.startsWith('qo'))) {
    const g = f.replace('qo', 'co');
    const a = fs.readFileSync(path.join(dir, f)), b = fs.readFileSync(path.join(dir, g));
    assert.ok(a.equals(b), `output file differs for dd ${args.join(' ')} (${a.length} vs ${b.length} bytes)`);
    fs.unlinkSync(path.join(dir, f));
    fs.unlinkSync(path.join(dir, g));
  }
}

test('dd: output files byte-identical to qemu-img dd over bs/count/skip, raw and qcow2', oracle(), async () => {
  const dir = scratch();
  const data = Buffer.alloc(3 * 1024 * 1024 + 4096);
  for (let i = 0; i < data.length; i += 4096) data.fill((i / 4096) % 251 + 1, i, i + 1000);
  fs.writeFileSync(path.join(dir, 'in.raw'), data);
  fs.writeFileSync(path.join(dir, 'odd.raw'), data.subarray(0, 1000));
  qemuImgSync(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', 'base.qcow2', '2M'], dir);
  qemuIoSync(['-c', 'write -P 7 0 1M', '-c', 'write -z 256k 64k', 'base.qcow2'], dir);
  qemuImgSync(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'top.qcow2', '3M'], dir);
  qemuIoSync(['-c', 'write -P 9 700k 1M', 'top.qcow2'], dir);
  const grid: string[][] = [
    [], ['bs=64k', 'skip=1', 'count=2'], ['bs=100', 'count=3'], ['bs=1.5k'], ['bs=1M', 'skip=1'], ['bs=4k', 'count=100', 'skip=3'],
    ['bs=1k', 'skip=5'], ['count=0'], ['skip=100G'], ['bs=1k', 'skip=99999999999999999'], ['bs=3M', 'count=2'], ['bs=7', 'count=1000', 'skip=3'],
  ];
  for (const input of ['in.raw', 'top.qcow2', 'odd.raw']) {
    for (const g of grid) {
      await same(dir, [`if=${input}`, 'of=OUT.raw', ...g]);
      await same(dir, ['-O', 'qcow2', `if=${input}`, 'of=OUT.qcow2', ...g]);
    }
  }
  await same(dir, ['-f', 'raw', 'if=top.qcow2', 'of=OUT.raw', 'bs=4k']);
  // An existing output file is replaced.
  fs.writeFileSync(path.join(dir, 'qo.raw'), Buffer.alloc(8 * 1024 * 1024, 1));
  fs.writeFileSync(path.join(dir, 'co.raw'), Buffer.alloc(8 * 1024 * 1024, 1));
  await same(dir, ['if=odd.raw', 'of=OUT.raw']);
  assert.equal((await qemuImg(['check', '-q', 'top.qcow2'], dir)).code, 0);
});

test('dd: bad operands and files give qemu-img messages and status', oracle(), async () => {
  const dir = scratch();
  fs.writeFileSync(path.join(dir, 'in.raw'), Buffer.alloc(65536, 3));
  const cases: string[][] = [
    [], ['if=in.raw'], ['of=OUT.raw'], ['if=in.raw', 'of=OUT.raw', 'bs=0'], ['if=in.raw', 'of=OUT.raw', 'bs=3G'], ['if=in.raw', 'of=OUT.raw', 'bs=1x'],
    ['if=in.raw', 'of=OUT.raw', 'count=-1'], ['if=in.raw', 'of=OUT.raw', 'skip=abc'], ['if=in.raw', 'of=OUT.raw', 'foo=1'], ['if=in.raw', 'of=OUT.raw', 'foo'],
    ['-O', 'foo', 'if=in.raw', 'of=OUT'], ['if=nothere', 'of=OUT'], ['-f', 'qcow2', 'if=in.raw', 'of=OUT'], ['-f', 'foo', 'if=in.raw', 'of=OUT'],
    ['if=in.raw', 'of=/nonexistent-dir/OUT'], ['if=in.raw', 'of=OUT.raw', 'count=99999999999999999999'], ['-x'], ['-f'],
    ['if=in.raw', 'of=OUT.raw', 'skip=16E'], ['if=in.raw', 'of=OUT.raw', '=5'],
  ];
  for (const c of cases) await same(dir, c, true);
});
