#!/usr/bin/env -S node --max-semi-space-size=1
// The qchain command: runs the compiled CLI (build with `npm run build`).
// A 1 MiB young generation keeps a long-running daemon's heap small (throughput unchanged, see
// docs/PERFORMANCE.md); V8 reads the flag only at start-up, hence the interpreter line.
import('../dist/src/cli/main.js').then((m) => m.main(process.argv.slice(2))).then(
  (code) => { process.exitCode = code; },
  (err) => { process.stderr.write(`qchain: ${err && err.message ? err.message : String(err)}\n`); process.exitCode = 1; },
);
