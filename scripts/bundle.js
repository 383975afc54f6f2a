// Bundles the compiled CLI (dist/src/cli/main.js) and the compression worker into dist/bin/, one
// file each, so a command loads one module instead of about a hundred (start-up: see
// docs/PERFORMANCE.md). npm packages stay external. bin/qchain.js falls back to dist/src when the
// bundle is missing or older than the last tsc build.
import { build } from 'esbuild';

await build({
  entryPoints: ['dist/src/cli/main.js', 'dist/src/qcow2/compress-worker.js'],
  outdir: 'dist/bin',
  entryNames: '[name]',
  bundle: true,
  platform: 'node',
  format: 'esm',
  target: 'node20',
  packages: 'external',
  logLevel: 'warning',
});
