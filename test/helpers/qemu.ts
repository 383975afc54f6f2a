/**
 * Test helpers for the QEMU oracle: locating qemu-img/qemu-io, running them and qchain, scratch
 * folders. In CI (CI=true) a missing QEMU tool fails the test instead of skipping it.
 */
import { execFile, execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');
export const QCHAIN = path.join(ROOT, 'bin/qchain.js');

/** The path of `cmd` on PATH, or null. */
export function which(cmd: string): string | null {
  for (const dir of (process.env.PATH ?? '').split(':')) {
    const p = path.join(dir, cmd);
    try {
      fs.accessSync(p, fs.constants.X_OK);
      return p;
    } catch {
      /* keep looking */
    }
  }
  return null;
}

export const QEMU_IMG = which('qemu-img');
export const QEMU_IO = which('qemu-io');

/**
 * Options for an oracle test: skipped when QEMU is missing locally; in CI the test runs anyway
 * and fails on the first QEMU call, so a missing install never passes silently.
 */
export function oracle(): { skip?: string } {
  if (QEMU_IMG && QEMU_IO) return {};
  if (process.env.CI) return {};
  return { skip: 'qemu-img/qemu-io not installed (CI installs them)' };
}

export interface RunResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** Run a command, never throwing on a non-zero exit. */
export function run(cmd: string, args: string[], opts: { cwd?: string; input?: string; timeout?: number } = {}): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const child = execFile(cmd, args, { cwd: opts.cwd, maxBuffer: 256 * 1024 * 1024, timeout: opts.timeout ?? 120_000, encoding: 'utf8' }, (err, stdout, stderr) => {
      if (err && typeof (err as NodeJS.ErrnoException).code === 'string') return reject(new Error(`${cmd}: ${err.message}`));
      resolve({ code: err ? ((err as { code?: number }).code ?? 1) : 0, stdout, stderr });
    });
    if (opts.input !== undefined) child.stdin?.end(opts.input);
    else child.stdin?.end();
  });
}

export function qemuImg(args: string[], cwd?: string): Promise<RunResult> {
  if (!QEMU_IMG) throw new Error('qemu-img is not installed');
  return run(QEMU_IMG, args, { cwd });
}

export function qemuIo(args: string[], cwd?: string): Promise<RunResult> {
  if (!QEMU_IO) throw new Error('qemu-io is not installed');
  return run(QEMU_IO, args, { cwd });
}

export function qchain(args: string[], cwd?: string, input?: string): Promise<RunResult> {
  return run(process.execPath, [QCHAIN, ...args], { cwd, input });
}

/**
 * Build a qcow2 chain in `dir` with qemu-img and qemu-io: the first layer `size` bytes, each
 * next one over the previous (backing format given); each layer's qemu-io commands run on it.
 */
export async function qemuChain(dir: string, size: string, layers: Array<[file: string, ...commands: string[]]>): Promise<void> {
  fs.mkdirSync(dir, { recursive: true });
  let below: string | null = null;
  for (const [file, ...commands] of layers) {
    await qemuImg(below ? ['create', '-q', '-f', 'qcow2', '-b', below, '-F', 'qcow2', file] : ['create', '-q', '-f', 'qcow2', file, size], dir);
    if (commands.length) await qemuIo([...commands.flatMap((c) => ['-c', c]), file], dir);
    below = file;
  }
}

/** Synchronous qemu-img that throws on failure (for setup steps). */
export function qemuImgSync(args: string[], cwd?: string): string {
  if (!QEMU_IMG) throw new Error('qemu-img is not installed');
  return execFileSync(QEMU_IMG, args, { cwd, encoding: 'utf8' });
}

export function qemuIoSync(args: string[], cwd?: string): string {
  if (!QEMU_IO) throw new Error('qemu-io is not installed');
  return execFileSync(QEMU_IO, args, { cwd, encoding: 'utf8' });
}

/**
 * `qemu-img map --output=json` of `file` without host offsets, adjacent entries of one kind
 * merged: what two images show alike when only their allocation order differs.
 */
export async function mapKinds(dir: string, file: string, fmt = 'qcow2'): Promise<Array<Record<string, unknown>>> {
  const m = await qemuImg(['map', '--output=json', '-f', fmt, file], dir);
  if (m.code !== 0) throw new Error(`qemu-img map ${file}: ${m.stderr}`);
  const map: Array<Record<string, unknown>> = [];
  const key = (x: Record<string, unknown>): string => JSON.stringify([x.depth, x.present, x.zero, x.data]);
  for (const e of JSON.parse(m.stdout) as Array<Record<string, unknown>>) {
    const last = map[map.length - 1];
    if (last && key(last) === key(e)) (last.length as number) += e.length as number;
    else map.push({ start: e.start, length: e.length, depth: e.depth, present: e.present, zero: e.zero, data: e.data });
  }
  return map;
}

/** Scratch folders to remove when the process exits (one exit listener for all of them). */
const scratchDirs: string[] = [];

/** A fresh scratch folder, removed when the process exits. */
export function scratch(prefix = 'qchain-test-'): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  if (scratchDirs.length === 0) process.on('exit', () => { for (const d of scratchDirs) fs.rmSync(d, { recursive: true, force: true }); });
  scratchDirs.push(dir);
  return dir;
}

/** qemu-io's timing line normalised with QEMU's iotests filter. */
export function filterTiming(s: string): string {
  return s.replace(/[0-9]* ops; [0-9/:. sec]* \([0-9/.inf]* [EPTGMKiBbytes]*\/sec and [0-9/.inf]* ops\/sec\)/g, 'X ops; XX:XX:XX.X (XXX YYY/sec and XXX ops/sec)');
}

/** The guest view of an image as raw bytes, as QEMU reads it. */
export async function qemuRawView(file: string, fmt?: string): Promise<Buffer> {
  const out = path.join(path.dirname(file), `.view-${path.basename(file)}-${process.pid}-${Math.random().toString(36).slice(2)}.raw`);
  const args = ['convert', ...(fmt ? ['-f', fmt] : []), '-O', 'raw', file, out];
  const r = await qemuImg(args);
  if (r.code !== 0) throw new Error(`qemu-img convert failed: ${r.stderr}`);
  const b = fs.readFileSync(out);
  fs.unlinkSync(out);
  return b;
}

/** Seeded PRNG (mulberry32) for reproducible random tests. */
export function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
