/** Run `qchain img` inside the test process (no start-up cost per call), relative to a folder. */
import { imgMain } from '../../src/cli/img/main.js';
import type { RunResult } from './qemu.js';

export async function qchainImgInProcess(args: string[], dir: string): Promise<RunResult> {
  let stdout = '', stderr = '';
  const ctx = {
    stdout: { write: (s: string | Uint8Array): void => { stdout += String(s); } },
    stderr: { write: (s: string | Uint8Array): void => { stderr += String(s); } },
  };
  const prev = process.cwd();
  process.chdir(dir);
  try {
    const code = await imgMain(args, ctx);
    return { code, stdout, stderr };
  } finally {
    process.chdir(prev);
  }
}
