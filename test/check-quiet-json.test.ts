/**
 * `img check -q --output=json` prints nothing, as qemu-img 7.2 (its JSON result goes through
 * qprintf): on a clean image, a leaky one (with and without -r) and a corrupt one; stdout, stderr
 * and the exit status equal qemu-img's on copies of the same image.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { oracle, qchain, qemuImg, qemuImgSync, qemuIoSync, scratch } from './helpers/qemu.js';
import { getRefcountTableEntry, patchU32, readBytes } from './helpers/craft.js';

const ROOT = scratch('qchain-check-quiet-');

test('check -q --output=json prints nothing, exit status as qemu-img', oracle(), async () => {
  const dir = path.join(ROOT, 'imgs');
  fs.mkdirSync(dir, { recursive: true });
  qemuImgSync(['create', '-q', '-f', 'qcow2', 'clean.qcow2', '1M'], dir);
  qemuIoSync(['-c', 'write 0 64k', 'clean.qcow2'], dir);
  // Leaks: a v2 downgrade with a bitmap leaves the bitmap clusters unreferenced.
  qemuImgSync(['create', '-q', '-f', 'qcow2', 'leaky.qcow2', '1M'], dir);
  qemuImgSync(['bitmap', '--add', 'leaky.qcow2', 'b0'], dir);
  qemuImgSync(['amend', '-o', 'compat=0.10', 'leaky.qcow2'], dir);
  // Corruption: the refcount of cluster 4 (the L2 table) dropped to 0.
  fs.copyFileSync(path.join(dir, 'clean.qcow2'), path.join(dir, 'corrupt.qcow2'));
  const block = Number(getRefcountTableEntry(path.join(dir, 'corrupt.qcow2'), 0));
  const word = readBytes(path.join(dir, 'corrupt.qcow2'), block + 8, 4).readUInt32BE(0);
  patchU32(path.join(dir, 'corrupt.qcow2'), block + 8, word & 0x0000ffff);
  const cases: Array<[string, string[]]> = [
    ['clean.qcow2', []], ['leaky.qcow2', []], ['leaky.qcow2', ['-r', 'leaks']], ['corrupt.qcow2', []], ['corrupt.qcow2', ['-r', 'all']],
  ];
  for (const [name, extra] of cases) {
    const q = path.join(ROOT, `q-${name}-${extra.join('')}`), c = path.join(ROOT, `c-${name}-${extra.join('')}`);
    fs.mkdirSync(q);
    fs.mkdirSync(c);
    fs.copyFileSync(path.join(dir, name), path.join(q, name));
    fs.copyFileSync(path.join(dir, name), path.join(c, name));
    const args = ['check', '-q', '--output=json', ...extra, name];
    const [rq, rc] = await Promise.all([qemuImg(args, q), qchain(['img', ...args], c)]);
    const what = `check ${args.join(' ')}`;
    assert.equal(rq.stdout, '', `${what}: qemu-img prints nothing`);
    assert.equal(rc.stdout, rq.stdout, `${what}: stdout`);
    assert.equal(rc.stderr, rq.stderr, `${what}: stderr`);
    assert.equal(rc.code, rq.code, `${what}: exit status`);
  }
});
