/**
 * Differential of `check -r all` over fuzzer seeds (test/helpers/fuzz.ts recipes): qemu-img 7.2 and
 * qchain each repair their own copy; stdout, stderr, exit status, the repaired file (size and
 * bytes) and `qemu-img check`'s verdict afterwards must agree, as in test/check-repair-fuzz.test.ts.
 * Not part of the test suite (a few minutes for 540 seeds).
 *
 *   node dist/bench/check-repair-diff.js [from=0] [count=540] [--seed=N ...] [--verbose]
 *
 * Prints one line per differing seed (with its recipe, ready for the regression test) and a count.
 */
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { buildCorpus, fileHead, materialiseCase, recipeFor } from '../test/helpers/fuzz.js';
import { QCHAIN, QEMU_IMG } from '../test/helpers/qemu.js';

interface R { code: number | null; stdout: string; stderr: string; timedOut: boolean }

function run(cmd: string, args: string[], cwd: string, timeout = 120_000): Promise<R> {
  return new Promise((resolve) => {
    execFile(cmd, args, { cwd, timeout, maxBuffer: 64 << 20, encoding: 'utf8', killSignal: 'SIGKILL' }, (err, stdout, stderr) => {
      const e = err as (NodeJS.ErrnoException & { killed?: boolean; code?: unknown }) | null;
      resolve({ code: e ? (typeof e.code === 'number' ? e.code : null) : 0, stdout, stderr, timedOut: !!e?.killed });
    });
  });
}

function firstDiff(a: Buffer, b: Buffer): number {
  const n = Math.min(a.length, b.length);
  let i = 0;
  while (i < n && a[i] === b[i]) i++;
  return i;
}

const args = process.argv.slice(2);
const verbose = args.includes('--verbose');
const picked = args.filter((a) => a.startsWith('--seed=')).map((a) => Number(a.slice(7)));
const pos = args.filter((a) => !a.startsWith('--')).map(Number);
const from = pos[0] ?? 0;
const count = pos[1] ?? 540;
const seeds = picked.length ? picked : Array.from({ length: count }, (_, i) => from + i);

if (!QEMU_IMG) throw new Error('qemu-img is not installed');
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'qchain-check-diff-'));
process.on('exit', () => fs.rmSync(tmp, { recursive: true, force: true }));
const shapes = buildCorpus(path.join(tmp, 'corpus'));

let differ = 0;
const t0 = Date.now();
for (const seed of seeds) {
  const { recipe, notes } = recipeFor(seed, shapes);
  const dir = path.join(tmp, `s${seed}`);
  const q = materialiseCase(recipe, shapes, path.join(dir, 'q'));
  const m = materialiseCase(recipe, shapes, path.join(dir, 'm'));
  const name = path.basename(q);
  const qr = await run(QEMU_IMG, ['check', '-r', 'all', name], path.dirname(q));
  const mr = await run(process.execPath, [QCHAIN, 'img', 'check', '-r', 'all', name], path.dirname(m));
  const diffs: string[] = [];
  if (mr.timedOut) diffs.push('qchain timed out');
  if (qr.timedOut) diffs.push('qemu-img timed out');
  if (mr.stderr !== qr.stderr) diffs.push(`stderr:\n    qemu:   ${JSON.stringify(qr.stderr.slice(0, 800))}\n    qchain: ${JSON.stringify(mr.stderr.slice(0, 800))}`);
  if (mr.stdout !== qr.stdout) diffs.push(`stdout:\n    qemu:   ${JSON.stringify(qr.stdout.slice(0, 1500))}\n    qchain: ${JSON.stringify(mr.stdout.slice(0, 1500))}`);
  if (mr.code !== qr.code) diffs.push(`exit ${mr.code} (qemu-img ${qr.code})`);
  const sq = fs.statSync(q).size, sm = fs.statSync(m).size;
  if (sq !== sm) diffs.push(`size ${sm} (qemu-img ${sq})`);
  else {
    const hq = fileHead(q), hm = fileHead(m);
    if (!hq.equals(hm)) diffs.push(`files differ from byte ${firstDiff(hq, hm)}`);
  }
  const qa = await run(QEMU_IMG, ['check', name], path.dirname(q));
  const ma = await run(QEMU_IMG, ['check', name], path.dirname(m));
  if (qa.code !== ma.code) diffs.push(`qemu-img check afterwards: ${ma.code} (on qemu-img's: ${qa.code})`);
  if (diffs.length) {
    differ++;
    console.log(`seed ${seed}: shape ${recipe.shape}, target ${recipe.target}; ${notes.join('; ')}`);
    for (const d of diffs) console.log(`  ${d}`);
    console.log(`  recipe: shape: ${JSON.stringify(recipe.shape)}, target: ${JSON.stringify(recipe.target)}, patches: ${JSON.stringify(recipe.patches)}`);
  } else if (verbose) {
    console.log(`seed ${seed}: same (exit ${qr.code})`);
  }
  fs.rmSync(dir, { recursive: true, force: true });
}
console.log(`${differ} of ${seeds.length} seeds differ (${((Date.now() - t0) / 1000).toFixed(0)} s)`);
