/** The version in qchain's package.json, found from this module's location (compiled or bundled). */
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export async function packageVersion(): Promise<string> {
  let dir = path.dirname(fileURLToPath(import.meta.url));
  for (let i = 0; i < 6; i++) {
    try {
      const pkg = JSON.parse(await readFile(path.join(dir, 'package.json'), 'utf8')) as { name?: string; version?: string };
      if (pkg.name === 'qchain' && pkg.version) return pkg.version;
    } catch {
      /* not here: look one level up */
    }
    dir = path.dirname(dir);
  }
  return 'unknown';
}
