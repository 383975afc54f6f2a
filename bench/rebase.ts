/**
 * Safe rebase dropping the middle layer of base ← mid ← top (2 GiB virtual; base full, mid holds
 * 512 MiB that differs from base, top 256 MiB): `qchain img rebase -b base` vs `qemu-img rebase`,
 * on fresh copies each run; results compared (guest views identical).
 * Usage: node dist/bench/rebase.js [--size-gib N] [--reps N]
 */
import fs from 'node:fs';
import path from 'node:path';
import { QCHAIN, benchDir, fmtCpu, fmtRatio, numOption, sh, table, timeInterleavedDetailed } from './util.js';

const MiB = 1024 ** 2;
const sizeGiB = numOption('--size-gib', 2);
const reps = numOption('--reps', 3);
const dir = benchDir('rebase');
const size = sizeGiB * 1024 * MiB;

sh('qemu-img', ['create', '-q', '-f', 'qcow2', 'base.qcow2', `${size}`], dir);
sh('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'mid.qcow2'], dir);
sh('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', 'top.qcow2'], dir);
const fill = (file: string, first: number, stride: number, pat: number): void => {
  const cmds: string[] = [];
  for (let off = first * MiB; off < size; off += stride * MiB) cmds.push('-c', `write -q -P 0x${pat.toString(16)} ${off} ${MiB}`);
  for (let i = 0; i < cmds.length; i += 2000) sh('qemu-io', [...cmds.slice(i, i + 2000), file], dir);
};
fill('base.qcow2', 0, 1, 0x11);
fill('mid.qcow2', 0, 4, 0x22);
fill('top.qcow2', 1, 8, 0x33);
const files = ['base.qcow2', 'mid.qcow2', 'top.qcow2'];
const restore = (sub: string) => (): void => {
  fs.mkdirSync(path.join(dir, sub), { recursive: true });
  // Only the top is written; the lower layers are shared by hard links.
  for (const f of files.slice(0, 2)) if (!fs.existsSync(path.join(dir, sub, f))) fs.linkSync(path.join(dir, f), path.join(dir, sub, f));
  fs.copyFileSync(path.join(dir, 'top.qcow2'), path.join(dir, sub, 'top.qcow2'));
};
const cmd = ['rebase', '-b', 'base.qcow2', '-F', 'qcow2', 'top.qcow2'];
const [q, c] = timeInterleavedDetailed([
  { cmd: 'qemu-img', args: cmd, before: restore('q'), cwd: path.join(dir, 'q') },
  { cmd: QCHAIN, args: ['img', ...cmd], before: restore('c'), cwd: path.join(dir, 'c') },
], reps);
const cmp = sh('qemu-img', ['compare', path.join(dir, 'q/top.qcow2'), path.join(dir, 'c/top.qcow2')]);
if (!cmp.includes('identical')) throw new Error(`results differ: ${cmp}`);
console.log(`rebase: drop the middle of a 3-layer chain (${sizeGiB} GiB virtual), best of ${reps} interleaved runs`);
console.log(table([
  ['qemu-img rebase (s)', 'qchain img rebase (s)', 'qchain / qemu-img', 'CPU user / sys, qemu-img (s)', 'CPU user / sys, qchain (s)'],
  [q.wall.toFixed(2), c.wall.toFixed(2), fmtRatio(c.wall, q.wall), fmtCpu(q), fmtCpu(c)],
]));
fs.rmSync(dir, { recursive: true, force: true });
