/** Shared helpers for the benchmarks: timing commands, building test chains. */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
export const QCHAIN = path.join(ROOT, 'bin/qchain.js');

/** The number after option `name` on the command line, or `def` without it. */
export function numOption(name: string, def: number): number {
  const args = process.argv.slice(2);
  const i = args.indexOf(name);
  return i >= 0 ? Number(args[i + 1]) : def;
}

export function sh(cmd: string, args: string[], cwd?: string): string {
  const r = spawnSync(cmd, args, { cwd, encoding: 'utf8', maxBuffer: 1 << 28 });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ').slice(0, 200)} failed (${r.status}): ${r.stderr.slice(0, 2000)}`);
  return r.stdout;
}

/** Wall-clock seconds of the best of `reps` runs (page cache warm; `before` runs untimed each time). */
export function timeBest(cmd: string, args: string[], reps: number, before?: () => void, cwd?: string): number {
  let best = Infinity;
  for (let i = 0; i < reps; i++) {
    before?.();
    const t0 = process.hrtime.bigint();
    sh(cmd, args, cwd);
    const t = Number(process.hrtime.bigint() - t0) / 1e9;
    best = Math.min(best, t);
  }
  return best;
}

export interface TimedCommand {
  cmd: string;
  args: string[];
  /** Runs untimed before each timed run (e.g. removing the previous output). */
  before?: () => void;
  cwd?: string;
}

/** Seconds of one command: wall clock, and CPU in user space and in the kernel. */
export interface Timing {
  wall: number;
  user: number;
  sys: number;
}

/** CPU seconds (user, sys) used so far by this process's waited-for children (Linux /proc; zeros elsewhere). */
function childCpu(): { user: number; sys: number } {
  try {
    const stat = fs.readFileSync('/proc/self/stat', 'utf8');
    const f = stat.slice(stat.lastIndexOf(')') + 2).split(' '); // f[0] is field 3 (state)
    const tick = 100; // USER_HZ, 100 on Linux
    return { user: Number(f[13]) / tick, sys: Number(f[14]) / tick }; // cutime, cstime
  } catch {
    return { user: 0, sys: 0 };
  }
}

/**
 * Each command's best (or, with `pick` 'median', middle) wall-clock seconds over `reps` rounds,
 * and likewise its user and kernel CPU time, the commands interleaved (the order rotating each round) and the page cache's dirty data
 * written back before every timed run, so no command pays for another's writeback and slow
 * phases of the machine hit all of them alike. On this project's VM the kernel time of writing
 * new data (page-cache pages the hypervisor must back) varies several-fold from run to run, so
 * for I/O-bound commands the user CPU time is the stable part of the comparison.
 */
export function timeInterleavedDetailed(cmds: TimedCommand[], reps: number, cwd?: string, pick: 'best' | 'median' = 'best'): Timing[] {
  const runs: Timing[][] = cmds.map(() => []);
  for (let r = 0; r < reps; r++) {
    for (let k = 0; k < cmds.length; k++) {
      const i = (k + r) % cmds.length;
      cmds[i].before?.();
      spawnSync('sync');
      const c0 = childCpu();
      const t0 = process.hrtime.bigint();
      sh(cmds[i].cmd, cmds[i].args, cmds[i].cwd ?? cwd);
      const wall = Number(process.hrtime.bigint() - t0) / 1e9;
      const c1 = childCpu();
      runs[i].push({ wall, user: c1.user - c0.user, sys: c1.sys - c0.sys });
    }
  }
  // Each figure on its own: the least (best) or the middle one over the rounds.
  const reduce = (xs: number[]): number => {
    const v = [...xs].sort((a, b) => a - b);
    return pick === 'best' ? v[0] : v.length % 2 ? v[(v.length - 1) / 2] : (v[v.length / 2 - 1] + v[v.length / 2]) / 2;
  };
  return runs.map((r) => ({ wall: reduce(r.map((t) => t.wall)), user: reduce(r.map((t) => t.user)), sys: reduce(r.map((t) => t.sys)) }));
}

/** "user / sys" CPU seconds. */
export function fmtCpu(t: Timing): string {
  return `${t.user.toFixed(2)} / ${t.sys.toFixed(2)}`;
}

/** Peak resident set size (KiB) of a command, via GNU time if present, else /proc polling is skipped. */
export function peakRssKiB(cmd: string, args: string[], cwd?: string): number | null {
  if (!fs.existsSync('/usr/bin/time')) return null;
  const r = spawnSync('/usr/bin/time', ['-f', '%M', cmd, ...args], { cwd, encoding: 'utf8', maxBuffer: 1 << 28 });
  if (r.status !== 0) throw new Error(`${cmd} failed: ${r.stderr}`);
  const lines = r.stderr.trim().split('\n');
  return Number(lines[lines.length - 1]);
}

/**
 * Reads files through once so their pages are in the page cache. This machine's kernel evicts
 * pages it has not seen used for a while (even with free memory), so each server is measured
 * right after its images were warmed, not after whatever the previous run left cached.
 */
export function warmCache(paths: string[]): void {
  const buf = Buffer.allocUnsafe(4 * 1024 * 1024);
  for (const p of paths) {
    const fd = fs.openSync(p, 'r');
    try {
      let pos = 0, n: number;
      while ((n = fs.readSync(fd, buf, 0, buf.length, pos)) > 0) pos += n;
    } finally {
      fs.closeSync(fd);
    }
  }
}

export function benchDir(name: string): string {
  const base = process.env.QCHAIN_BENCH_DIR ?? os.tmpdir();
  const dir = fs.mkdtempSync(path.join(base, `qchain-bench-${name}-`));
  return dir;
}

export function fmtRatio(ours: number, theirs: number): string {
  return `${(ours / theirs).toFixed(2)}×`;
}

export function table(rows: string[][]): string {
  const w = rows[0].map((_, i) => Math.max(...rows.map((r) => r[i].length)));
  return rows.map((r) => '| ' + r.map((c, i) => c.padEnd(w[i])).join(' | ') + ' |').join('\n');
}
