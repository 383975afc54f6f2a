#!/usr/bin/env -S node --max-semi-space-size=1
// The qchain command: runs the compiled CLI (build with `npm run build`).
// A 1 MiB young generation keeps a long-running daemon's heap small (throughput unchanged, see
// docs/PERFORMANCE.md); V8 reads the flag only at start-up, hence the interpreter line.
// The one-file bundle (dist/bin/main.js) starts faster; a tsc build newer than it (every tsc
// build rewrites dist/src) means it is stale, and the modules under dist/src are run instead.
import { statSync } from 'node:fs';

const dist = new URL('../dist/', import.meta.url);
const mtime = (rel) => { try { return statSync(new URL(rel, dist)).mtimeMs; } catch { return -1; } };
const entry = mtime('bin/main.js') >= mtime('src/cli/main.js') ? '../dist/bin/main.js' : '../dist/src/cli/main.js';
import(entry).then((m) => m.main(process.argv.slice(2))).then(
  (code) => { process.exitCode = code; },
  (err) => { process.stderr.write(`qchain: ${err && err.message ? err.message : String(err)}\n`); process.exitCode = 1; },
);
