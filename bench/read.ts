/**
 * 4 KiB read throughput through a 1-deep and a 64-deep chain: `qchain img bench` vs
 * `qemu-img bench` (same flags), sequential and scattered (a large odd step that wraps).
 * Usage: node dist/bench/read.js [--size-mib N] [--count N]
 */
import fs from 'node:fs';
import { QCHAIN, benchDir, numOption, sh, table, timeBest } from './util.js';

const MiB = 1024 * 1024;
const sizeMiB = numOption('--size-mib', 1024);
const count = numOption('--count', 200000);
const dir = benchDir('read');

sh('qemu-img', ['create', '-q', '-f', 'qcow2', 'd0.qcow2', `${sizeMiB}M`], dir);
const fill: string[] = [];
for (let off = 0; off < sizeMiB; off += 64) fill.push('-c', `write -q -P 0x5a ${off * MiB} ${64 * MiB}`);
sh('qemu-io', [...fill, 'd0.qcow2'], dir);
// 63 overlays, each holding a few scattered clusters, so lookups must walk the chain.
for (let d = 1; d < 64; d++) {
  sh('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', `d${d - 1}.qcow2`, '-F', 'qcow2', `d${d}.qcow2`], dir);
  sh('qemu-io', ['-c', `write -q -P ${d} ${((d * 37) % sizeMiB) * MiB} 64k`, `d${d}.qcow2`], dir);
}

const rows: string[][] = [['chain', 'pattern', 'qemu-img bench (s)', 'qchain img bench (s)', 'qchain IOPS', 'qemu IOPS', 'qemu / qchain time']];
const results: Record<string, number> = {};
for (const [label, file] of [['depth 1', 'd0.qcow2'], ['depth 64', 'd63.qcow2']]) {
  for (const [pat, step] of [['sequential', 4096], ['scattered', 4096 * 7919]] as Array<[string, number]>) {
    const common = ['bench', '-f', 'qcow2', '-c', String(count), '-d', '32', '-s', '4096', '-S', String(step), file];
    const q = timeBest('qemu-img', common, 3, undefined, dir);
    const c = timeBest(process.execPath, [QCHAIN, 'img', ...common], 3, undefined, dir);
    results[`${label} ${pat}`] = c;
    rows.push([label, pat, q.toFixed(3), c.toFixed(3), Math.round(count / c).toString(), Math.round(count / q).toString(), `${(q / c).toFixed(2)}`]);
  }
}
console.log(`read bench: ${count} × 4 KiB reads, 32 in flight, ${sizeMiB} MiB image; times include process start; best of 3`);
console.log(table(rows));
console.log(`qchain depth-64 / depth-1 IOPS: sequential ${(results['depth 1 sequential'] / results['depth 64 sequential']).toFixed(2)}, scattered ${(results['depth 1 scattered'] / results['depth 64 scattered']).toFixed(2)}`);
fs.rmSync(dir, { recursive: true, force: true });
