/**
 * A read-write open of a dirty (lazy refcounts) image repairs it first; when that repair meets
 * errors it cannot handle, QEMU fails the open ("Could not repair dirty image: …") instead of
 * going on with the image. Fuzz-found images (long fuzz mode) where qchain used to carry on:
 * qemu-img is the judge for the exit code and every line of stderr.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { buildCorpus, materialiseCase, type Recipe } from './helpers/fuzz.js';
import { QCHAIN, oracle, run, scratch } from './helpers/qemu.js';

const CASES: Recipe[] = [
  {
    shape: 'lazy-dirty', target: 'a.qcow2', off: 247887, len: 1,
    patches: [{ off: 7715, hex: 'ee' }, { off: 6872, hex: '80' }, { off: 13488, hex: '02' }, { off: 15696, hex: '8d' }, { off: 17160, hex: '17' },
      { off: 8290, hex: '91' }, { off: 17781, hex: 'cb' }, { off: 12923, hex: '20' }, { off: 11997, hex: '01' }],
  },
  {
    shape: 'lazy-dirty', target: 'a.qcow2', off: 32386, len: 512,
    patches: [{ off: 4096, hex: '7ffffffffffffe00' }, { off: 4096, hex: '7ffffffffffffe08' }, { off: 19304, hex: '0000000000001000' }],
  },
];

test('a dirty image whose repair fails is not opened for writing, as in QEMU', { skip: oracle().skip, timeout: 120000 }, async () => {
  const root = scratch('qchain-dirty-open-');
  const shapes = buildCorpus(path.join(root, 'corpus'));
  for (const [i, c] of CASES.entries()) {
    const got: Record<string, { code: number | null; stderr: string; stdout: string }> = {};
    for (const tool of ['qemu', 'qchain']) {
      // The same directory name for both, so file names in messages compare equal.
      const dir = path.join(root, `${tool}-${i}`, 'img');
      fs.mkdirSync(dir, { recursive: true });
      const file = materialiseCase(c, shapes, dir);
      const r = tool === 'qemu' ? await run('qemu-img', ['commit', 'a.qcow2'], { cwd: dir }) : await run(process.execPath, [QCHAIN, 'img', 'commit', 'a.qcow2'], { cwd: dir });
      got[tool] = { code: r.code, stderr: r.stderr, stdout: r.stdout };
      assert.ok(fs.existsSync(file));
    }
    assert.ok(got.qemu.stderr.includes('Could not repair dirty image'), `case ${i}: QEMU refuses the open (${got.qemu.stderr.slice(-300)})`);
    assert.equal(got.qchain.code, got.qemu.code, `case ${i}`);
    assert.equal(got.qchain.stdout, got.qemu.stdout, `case ${i}`);
    assert.equal(got.qchain.stderr, got.qemu.stderr, `case ${i}`);
  }
});
