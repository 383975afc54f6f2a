/**
 * Commit a top with 1 GiB of data (1 MiB extents every other MiB over a 2 GiB disk, on top of a
 * base that is half full) into its base: `qchain img commit` vs `qemu-img commit`, both on fresh
 * copies each run, including emptying the top. Results are compared (guest views identical).
 * Usage: node dist/bench/commit.js [--dirty-gib N] [--reps N]
 */
import fs from 'node:fs';
import path from 'node:path';
import { QCHAIN, benchDir, fmtCpu, fmtRatio, numOption, sh, table, timeInterleavedDetailed } from './util.js';

const MiB = 1024 ** 2;
const dirtyGiB = numOption('--dirty-gib', 1);
const reps = numOption('--reps', 3);
const dir = benchDir('commit');
const size = 2 * dirtyGiB * 1024 * MiB;

sh('qemu-img', ['create', '-q', '-f', 'qcow2', 'base.qcow2', `${size}`], dir);
sh('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'top.qcow2'], dir);
const fill = (file: string, first: number, pat: number): void => {
  const cmds: string[] = [];
  for (let off = first * MiB; off < size; off += 2 * MiB) cmds.push('-c', `write -q -P 0x${pat.toString(16)} ${off} ${MiB}`);
  for (let i = 0; i < cmds.length; i += 2000) sh('qemu-io', [...cmds.slice(i, i + 2000), file], dir);
};
fill('base.qcow2', 0, 0x11); // base: even MiBs
fill('top.qcow2', 1, 0x22); // top: odd MiBs (1 GiB dirty), so the base allocates as it goes
for (const f of ['base.qcow2', 'top.qcow2']) fs.copyFileSync(path.join(dir, f), path.join(dir, `orig-${f}`));
const restore = (sub: string) => (): void => {
  fs.mkdirSync(path.join(dir, sub), { recursive: true });
  for (const f of ['base.qcow2', 'top.qcow2']) fs.copyFileSync(path.join(dir, `orig-${f}`), path.join(dir, sub, f));
};

// qemu-img's default cache mode (writeback) and -t none (O_DIRECT, as qchain's commit by default).
const [q, qn, c] = timeInterleavedDetailed([
  { cmd: 'qemu-img', args: ['commit', 'top.qcow2'], before: restore('q'), cwd: path.join(dir, 'q') },
  { cmd: 'qemu-img', args: ['commit', '-t', 'none', 'top.qcow2'], before: restore('qn'), cwd: path.join(dir, 'qn') },
  { cmd: QCHAIN, args: ['img', 'commit', 'top.qcow2'], before: restore('c'), cwd: path.join(dir, 'c') },
], reps);
for (const other of ['qn', 'c']) {
  const cmp = sh('qemu-img', ['compare', path.join(dir, 'q/base.qcow2'), path.join(dir, `${other}/base.qcow2`)]);
  if (!cmp.includes('identical')) throw new Error(`results differ: ${cmp}`);
}
console.log(`commit: ${dirtyGiB} GiB dirty top into its base (${2 * dirtyGiB} GiB virtual), best of ${reps} interleaved runs`);
console.log(table([
  ['', 'wall (s)', 'CPU user / sys (s)', 'qchain / this'],
  ['qemu-img commit', q.wall.toFixed(2), fmtCpu(q), fmtRatio(c.wall, q.wall)],
  ['qemu-img commit -t none', qn.wall.toFixed(2), fmtCpu(qn), fmtRatio(c.wall, qn.wall)],
  ['qchain img commit', c.wall.toFixed(2), fmtCpu(c), ''],
]));
fs.rmSync(dir, { recursive: true, force: true });
