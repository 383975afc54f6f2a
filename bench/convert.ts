/**
 * Flatten a 4-layer chain (4 GiB virtual, about half allocated, mixed across layers) to a
 * standalone qcow2 and to raw: `qchain img convert` vs `qemu-img convert` (and `-m 8 -W`), both
 * defaults and each cache mode like for like (`-t none`: O_DIRECT; `-t unsafe`: page cache).
 * Usage: node dist/bench/convert.js [--size-gib N] [--reps N] [--median]
 */
import fs from 'node:fs';
import path from 'node:path';
import { QCHAIN, benchDir, fmtCpu, fmtRatio, numOption, sh, table, timeInterleavedDetailed } from './util.js';

const GiB = 1024 ** 3, MiB = 1024 ** 2;
const sizeGiB = numOption('--size-gib', 4);
const reps = numOption('--reps', 3);
// --median: the middle of the rounds instead of the best (this VM's page-cache cost swings).
const pick = process.argv.includes('--median') ? 'median' : 'best';
const dir = benchDir('convert');
const size = sizeGiB * GiB;

// Build the chain with QEMU's own tools so both converters read the same bytes.
sh('qemu-img', ['create', '-q', '-f', 'qcow2', 'l0.qcow2', `${size}`], dir);
for (let i = 1; i < 4; i++) sh('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', `l${i - 1}.qcow2`, '-F', 'qcow2', `l${i}.qcow2`], dir);
// Each layer writes 1 MiB extents on its own stripe: together ~half the disk, mixed across layers.
for (let layer = 0; layer < 4; layer++) {
  const cmds: string[] = [];
  for (let off = layer * MiB; off < size; off += 8 * MiB) {
    cmds.push('-c', `write -q -P 0x${(0x11 * (layer + 1)).toString(16)} ${off} ${MiB}`);
    // A second extent at a layer-dependent stride, so upper layers also overwrite lower ones.
    if ((off / MiB) % 3 === 0) cmds.push('-c', `write -q -P 0x${(0x21 + layer).toString(16)} ${off + 4 * MiB} ${MiB / 2}`);
  }
  for (let i = 0; i < cmds.length; i += 2000) sh('qemu-io', [...cmds.slice(i, i + 2000), `l${layer}.qcow2`], dir);
}
const top = path.join(dir, 'l3.qcow2');
const out = (n: string): string => path.join(dir, n);
const rm = (n: string) => () => fs.rmSync(out(n), { force: true });

// qchain writes convert's data with O_DIRECT by default (qemu-img: through the page cache, no
// flushes: -t unsafe). Both defaults are compared, and each mode like for like.
const rows: string[][] = [['target', 'qemu-img (s)', 'qemu-img -m 8 -W (s)', 'qemu-img -t none (s)', 'qchain (s)', 'qchain -t unsafe (s)',
  'default / default', 'qchain / qemu-img -t none', 'qchain -t unsafe / qemu-img', 'CPU user / sys (s): qemu-img', 'qemu-img -t none', 'qchain', 'qchain -t unsafe']];
for (const fmt of ['qcow2', 'raw']) {
  const [q, qw, qn, c, cu] = timeInterleavedDetailed([
    { cmd: 'qemu-img', args: ['convert', '-O', fmt, top, out(`q.${fmt}`)], before: rm(`q.${fmt}`) },
    { cmd: 'qemu-img', args: ['convert', '-m', '8', '-W', '-O', fmt, top, out(`qw.${fmt}`)], before: rm(`qw.${fmt}`) },
    { cmd: 'qemu-img', args: ['convert', '-t', 'none', '-O', fmt, top, out(`qn.${fmt}`)], before: rm(`qn.${fmt}`) },
    { cmd: QCHAIN, args: ['img', 'convert', '-O', fmt, top, out(`c.${fmt}`)], before: rm(`c.${fmt}`) },
    { cmd: QCHAIN, args: ['img', 'convert', '-t', 'unsafe', '-O', fmt, top, out(`cu.${fmt}`)], before: rm(`cu.${fmt}`) },
  ], reps, undefined, pick);
  for (const other of [`c.${fmt}`, `cu.${fmt}`]) {
    const cmp = sh('qemu-img', ['compare', '-f', fmt, '-F', fmt, out(`q.${fmt}`), out(other)]);
    if (!cmp.includes('identical')) throw new Error(`outputs differ: ${cmp}`);
  }
  rows.push([fmt, q.wall.toFixed(2), qw.wall.toFixed(2), qn.wall.toFixed(2), c.wall.toFixed(2), cu.wall.toFixed(2),
    fmtRatio(c.wall, q.wall), fmtRatio(c.wall, qn.wall), fmtRatio(cu.wall, q.wall), fmtCpu(q), fmtCpu(qn), fmtCpu(c), fmtCpu(cu)]);
  for (const n of ['q', 'qw', 'qn', 'c', 'cu']) rm(`${n}.${fmt}`)();
}
console.log(`convert: 4-layer chain, ${sizeGiB} GiB virtual, ${pick} of ${reps} interleaved runs (lower ratio = qchain faster)`);
console.log(table(rows));
fs.rmSync(dir, { recursive: true, force: true });
