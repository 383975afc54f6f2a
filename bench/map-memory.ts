/**
 * Peak memory while mapping a 1 TiB virtual image with data spread over it: qchain's RSS must
 * stay bounded by its caches, not grow with the virtual size. Compared with qemu-img map.
 * Usage: node dist/bench/map-memory.js
 */
import fs from 'node:fs';
import { QCHAIN, benchDir, peakRssKiB, sh, table } from './util.js';

const dir = benchDir('map');
const TiB = 1024 ** 4, GiB = 1024 ** 3;
sh('qemu-img', ['create', '-q', '-f', 'qcow2', 'big.qcow2', `${TiB}`], dir);
// One 64 KiB cluster every 1 GiB (1024 L2 tables), plus a dense 256 MiB region.
const cmds: string[] = [];
for (let g = 0; g < 1024; g++) cmds.push('-c', `write -q -P 0x${(g % 255 + 1).toString(16)} ${g * GiB + 12345 * 65536} 64k`);
cmds.push('-c', `write -q -P 0x77 ${512 * GiB} 256M`);
sh('qemu-io', [...cmds, 'big.qcow2'], dir);
const rows = [['command', 'peak RSS (MiB)', 'wall (s)']];
for (const [name, cmd, args] of [
  ['qemu-img map --output=json', 'qemu-img', ['map', '--output=json', 'big.qcow2']],
  ['qchain img map --output=json', process.execPath, [QCHAIN, 'img', 'map', '--output=json', 'big.qcow2']],
] as Array<[string, string, string[]]>) {
  const t0 = Date.now();
  const kib = peakRssKiB(cmd, args, dir);
  rows.push([name, kib === null ? 'n/a' : (kib / 1024).toFixed(1), ((Date.now() - t0) / 1000).toFixed(2)]);
}
const lines = sh(process.execPath, [QCHAIN, 'img', 'map', '--output=json', 'big.qcow2'], dir).trim().split('\n').length;
console.log(`map of a 1 TiB virtual image (${lines} map entries)`);
console.log(table(rows));
fs.rmSync(dir, { recursive: true, force: true });
