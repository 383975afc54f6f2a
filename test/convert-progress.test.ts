/**
 * `img convert -p` prints the progress lines qemu-img convert prints (its requests are QEMU's:
 * one status extent of one layer at a time, at most 2 MiB, and the share of data requests taken
 * so far), and the output files are byte-identical to qemu-img's, 4 KiB clusters included.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { oracle, qchain, qemuImg, qemuIo, scratch } from './helpers/qemu.js';

const M = 1024 * 1024;

/** l0 <- l1 <- l2 <- l3 (64 MiB): 1 MiB stripes per layer, half-MiB overwrites, a zeroed range. */
async function chain(dir: string): Promise<void> {
  assert.equal((await qemuImg(['create', '-q', '-f', 'qcow2', 'l0.qcow2', '64M'], dir)).code, 0);
  for (let i = 1; i < 4; i++) assert.equal((await qemuImg(['create', '-q', '-f', 'qcow2', '-b', `l${i - 1}.qcow2`, '-F', 'qcow2', `l${i}.qcow2`], dir)).code, 0);
  for (let layer = 0; layer < 4; layer++) {
    const cmds: string[] = [];
    for (let off = layer * M; off < 64 * M; off += 8 * M) {
      cmds.push('-c', `write -q -P ${0x11 * (layer + 1)} ${off} ${M}`);
      if ((off / M) % 3 === 0) cmds.push('-c', `write -q -P ${0x21 + layer} ${off + 4 * M} ${M / 2}`);
    }
    if (layer === 2) cmds.push('-c', 'write -q -z 40M 3M');
    assert.equal((await qemuIo([...cmds, `l${layer}.qcow2`], dir)).code, 0);
  }
}

const CASES: string[][] = [
  ['-O', 'qcow2', 'l3.qcow2'],
  ['-O', 'raw', 'l3.qcow2'],
  ['-S', '0', '-O', 'qcow2', 'l3.qcow2'],
  ['-O', 'qcow2', '-o', 'cluster_size=4k', 'l3.qcow2'],
  ['-O', 'qcow2', '-B', 'l1.qcow2', '-F', 'qcow2', 'l3.qcow2'],
];

test('convert -p: the same progress lines and the same file as qemu-img convert', oracle(), async () => {
  const dir = scratch();
  await chain(dir);
  for (const [i, args] of CASES.entries()) {
    const q = path.join(dir, `q${i}`), c = path.join(dir, `c${i}`);
    const rq = await qemuImg(['convert', '-p', ...args, q], dir);
    const rc = await qchain(['img', 'convert', '-p', ...args, c], dir);
    assert.equal(rc.code, rq.code, `${args.join(' ')}: ${rc.stderr}`);
    assert.equal(rc.stdout, rq.stdout, `${args.join(' ')}: progress lines`);
    assert.ok(rq.stdout.split('\r').length > 10, `enough progress lines to compare: ${JSON.stringify(rq.stdout)}`);
    assert.ok(fs.readFileSync(c).equals(fs.readFileSync(q)), `${args.join(' ')}: output file`);
  }
});
