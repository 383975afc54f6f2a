/**
 * Fuzzer: QEMU as the judge of what qchain did with a hostile image, when qchain says it
 * succeeded. Only checks where QEMU's answer is unambiguous are made:
 *   - io-write succeeded: qemu-io reads the pattern back; on an image qemu-img check found clean
 *     before, it is still clean after;
 *   - check -r all said clean: qemu-img check finds no corruption or leak;
 *   - convert -O qcow2 succeeded: the new image is clean;
 *   - convert -O raw succeeded and qemu-img convert -O raw succeeded too: same bytes.
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import { QEMU_IMG, QEMU_IO } from './qemu.js';
import type { CmdEnv, RunResult } from './fuzz-run.js';

interface QResult { code: number | null; out: string }

const QEMU_TIMEOUT_MS = 20_000;

function q(bin: string | null, args: string[], cwd: string): Promise<QResult> {
  return new Promise((resolve) => {
    if (!bin) { resolve({ code: null, out: '' }); return; }
    const child = spawn(bin, args, { cwd, stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    child.stdout.on('data', (b: Buffer) => { if (out.length < 1 << 16) out += b.toString(); });
    child.stderr.on('data', (b: Buffer) => { if (out.length < 1 << 16) out += b.toString(); });
    const timer = setTimeout(() => child.kill('SIGKILL'), QEMU_TIMEOUT_MS);
    child.on('error', () => { clearTimeout(timer); resolve({ code: null, out: '' }); });
    child.on('close', (code) => { clearTimeout(timer); resolve({ code, out }); });
  });
}

export interface VerifyCtx {
  env: CmdEnv;
  cwd: string;
  r: RunResult;
  /** qemu-img check's exit status on the case before any command ran (lazily computed). */
  baseline: () => Promise<number | null>;
}

type Verifier = (c: VerifyCtx) => Promise<string | null>;

/** Verifiers whose disagreement is a known parity gap, reported but not failing (see SOFT_WHY). */
export const SOFT: ReadonlySet<string> = new Set(['check-repair']);
export const SOFT_WHY = 'qchain check -r all still differs from QEMU on a few hostile images (bench/check-repair-diff.ts: 5 of the first 540 seeds, all deliberate): qchain keeps the snapshot table that qemu-img 7.2 drops when, in check mode, it rewrites the header at open (bitmaps marked in use, invalid bitmaps extension, unknown autoclear bits) with no snapshots, and has no VMDK driver for a backing file';

const firstLines = (s: string): string => s.split('\n').slice(0, 3).join(' | ');

/** Post-conditions by command name; add an entry to verify a new command. */
export const VERIFY: Record<string, Verifier> = {
  'io-write': async ({ env, cwd, r, baseline }) => {
    if (r.code !== 0) return null;
    const rd = await q(QEMU_IO, ['-r', '-c', `read -P 0x5a ${env.off} ${env.len}`, env.file], cwd);
    if (rd.code === 0 && /Pattern verification failed/.test(rd.out)) return `qemu-io does not read back the pattern: ${firstLines(rd.out)}`;
    if ((await baseline()) !== 0) return null;
    // Leaks (exit 3) are expected on images with persistent bitmaps: qchain clears the bitmaps
    // autoclear bit on write, as the spec asks of programs without bitmap support.
    const ck = await q(QEMU_IMG, ['check', env.file], cwd);
    return ck.code === 2 ? `image was clean, qemu-img check after the write exits ${ck.code}: ${firstLines(ck.out)}` : null;
  },
  'check-repair': async ({ env, cwd, r }) => {
    if (r.code !== 0) return null;
    const ck = await q(QEMU_IMG, ['check', env.file], cwd);
    return ck.code === 2 || ck.code === 3 ? `repair reported success, qemu-img check exits ${ck.code}: ${firstLines(ck.out)}` : null;
  },
  'convert-qcow2': async ({ env, cwd, r }) => {
    if (r.code !== 0) return null;
    const ck = await q(QEMU_IMG, ['check', env.out], cwd);
    return ck.code !== 0 ? `converted image: qemu-img check exits ${ck.code}: ${firstLines(ck.out)}` : null;
  },
  'convert-raw': async ({ env, cwd, r }) => {
    if (r.code !== 0) return null;
    const mine = `${env.out}.qemu`;
    const cv = await q(QEMU_IMG, ['convert', '-O', 'raw', env.file, mine], cwd);
    if (cv.code !== 0) return null;
    try {
      const sa = fs.statSync(env.out).size, sb = fs.statSync(mine).size;
      if (sa !== sb) return `raw output size ${sa} differs from qemu-img convert's ${sb}`;
      if (sa > 64 << 20) return null;
      const a = fs.readFileSync(env.out);
      const b = fs.readFileSync(mine);
      if (a.equals(b)) return null;
      let i = 0;
      const n = Math.min(a.length, b.length);
      while (i < n && a[i] === b[i]) i++;
      return `raw output differs from qemu-img convert's: sizes ${a.length}/${b.length}, first difference at byte ${i}`;
    } finally {
      fs.rmSync(mine, { force: true });
    }
  },
};

/** qemu-img check's exit status on `file` (null if it did not finish). */
export async function qemuCheckCode(file: string, cwd: string): Promise<number | null> {
  return (await q(QEMU_IMG, ['check', file], cwd)).code;
}
