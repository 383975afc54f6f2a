#!/usr/bin/env node
// The qchain command: runs the compiled CLI (build with `npm run build`).
import('../dist/src/cli/main.js').then((m) => m.main(process.argv.slice(2))).then(
  (code) => { process.exitCode = code; },
  (err) => { process.stderr.write(`qchain: ${err && err.message ? err.message : String(err)}\n`); process.exitCode = 1; },
);
