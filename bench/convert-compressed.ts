/**
 * Compressed convert of a mixed image (text-like compressible data, random data, zero runs):
 * `qchain img convert -c` vs `qemu-img convert -c` (and `-m 8 -W`), zlib and zstd.
 * Usage: node dist/bench/convert-compressed.js [--size-gib N] [--reps N]
 */
import fs from 'node:fs';
import path from 'node:path';
import { QCHAIN, benchDir, fmtRatio, numOption, sh, table, timeBest } from './util.js';

const GiB = 1024 ** 3, MiB = 1024 ** 2;
const sizeGiB = numOption('--size-gib', 2);
const reps = numOption('--reps', 1);
const dir = benchDir('convert-compressed');
const size = Math.round(sizeGiB * GiB);

// Source: per 1 MiB, 40% text-like, 25% random, 35% zero (left as holes); then made a qcow2 by QEMU.
const raw = path.join(dir, 'src.raw');
{
  const fd = fs.openSync(raw, 'w');
  fs.ftruncateSync(fd, size);
  const text = Buffer.from('Lorem ipsum dolor sit amet, consectetur adipiscing elit 0123456789 {"k": [1, 2, 3]}\n');
  const textMiB = Buffer.alloc(MiB);
  for (let p = 0; p < MiB; p += text.length) text.copy(textMiB, p, 0, Math.min(text.length, MiB - p));
  const rnd = Buffer.alloc(MiB);
  let x = 0x12345678;
  const u32 = new Uint32Array(rnd.buffer, rnd.byteOffset, MiB / 4);
  for (let off = 0, i = 0; off < size; off += MiB, i++) {
    const r = (i * 2654435761) % 100;
    if (r < 40) {
      textMiB.writeUInt32LE(i, 0); // vary a little between MiBs
      fs.writeSync(fd, textMiB, 0, Math.min(MiB, size - off), off);
    } else if (r < 65) {
      for (let k = 0; k < u32.length; k++) {
        x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0;
        u32[k] = x;
      }
      fs.writeSync(fd, rnd, 0, Math.min(MiB, size - off), off);
    }
  }
  fs.closeSync(fd);
}
sh('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, 'src.qcow2'], dir);
fs.rmSync(raw);
const src = path.join(dir, 'src.qcow2');
const out = (n: string): string => path.join(dir, n);
const rm = (n: string) => () => fs.rmSync(out(n), { force: true });
const mib = (n: string): string => (fs.statSync(out(n)).size / MiB).toFixed(0);

const rows: string[][] = [['type', 'qemu-img -c (s)', 'qemu-img -c -m 8 -W (s)', 'qchain -c (s)', 'qchain / qemu-img', 'qchain / qemu-img -W', 'output MiB (qemu / qchain)']];
for (const type of ['zlib', 'zstd']) {
  const o = ['-o', `compression_type=${type}`];
  const q = timeBest('qemu-img', ['convert', '-c', '-O', 'qcow2', ...o, src, out('q.qcow2')], reps, rm('q.qcow2'));
  const qw = timeBest('qemu-img', ['convert', '-c', '-m', '8', '-W', '-O', 'qcow2', ...o, src, out('qw.qcow2')], reps, rm('qw.qcow2'));
  const c = timeBest(process.execPath, [QCHAIN, 'img', 'convert', '-c', '-O', 'qcow2', ...o, src, out('c.qcow2')], reps, rm('c.qcow2'));
  const cmp = sh('qemu-img', ['compare', out('q.qcow2'), out('c.qcow2')]);
  if (!cmp.includes('identical')) throw new Error(`outputs differ: ${cmp}`);
  sh('qemu-img', ['check', out('c.qcow2')]);
  rows.push([type, q.toFixed(2), qw.toFixed(2), c.toFixed(2), fmtRatio(c, q), fmtRatio(c, qw), `${mib('q.qcow2')} / ${mib('c.qcow2')}`]);
  for (const n of ['q.qcow2', 'qw.qcow2', 'c.qcow2']) rm(n)();
}
console.log(`convert -c: ${sizeGiB} GiB virtual (40% text, 25% random, 35% zero), best of ${reps} (lower ratio = qchain faster)`);
console.log(table(rows));
fs.rmSync(dir, { recursive: true, force: true });
