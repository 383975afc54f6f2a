/**
 * Runs the benchmarks one after another (each prints its own table with qchain/QEMU ratios).
 * Usage: npm run bench [-- name...]   (names: convert, convert-compressed, commit, rebase, deletion, read, map-memory, daemon)
 * Arguments after the names are not passed on; run a single bench script directly for options.
 */
import { spawnSync } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const ALL = ['convert', 'convert-compressed', 'commit', 'rebase', 'deletion', 'read', 'map-memory', 'daemon'];
const dir = path.dirname(fileURLToPath(import.meta.url));
const wanted = process.argv.slice(2).filter((a) => !a.startsWith('-'));
const names = wanted.length ? wanted : ALL;
let failed = 0;
for (const n of names) {
  if (!ALL.includes(n)) {
    console.error(`unknown benchmark '${n}' (known: ${ALL.join(', ')})`);
    process.exitCode = 1;
    continue;
  }
  console.log(`\n== ${n}`);
  const r = spawnSync(process.execPath, [path.join(dir, `${n}.js`)], { stdio: 'inherit' });
  if (r.status !== 0) failed++;
}
if (failed) process.exitCode = 1;
