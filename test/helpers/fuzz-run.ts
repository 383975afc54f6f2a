/**
 * Fuzzer: the commands run on every mutated image, the two ways of running them (a real
 * `node bin/qchain.js` child with a capped heap and its peak RSS measured, or in-process in a
 * worker thread with a capped heap) and the verdict on each run: exits in time, a normal exit
 * status, no JavaScript internals on stderr/stdout, bounded memory, no silent failure.
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import { Worker } from 'node:worker_threads';
import { ROOT, QCHAIN } from './qemu.js';

/** Wall-clock limit for one command; past it the run is killed and reported as a hang. */
export const TIME_LIMIT_MS = Number(process.env.QCHAIN_FUZZ_TIMEOUT_MS ?? 10_000);
export const HEAP_MB = 256;
/** Peak RSS accepted for a CLI child (V8 heap capped at HEAP_MB, plus buffers and code). */
export const RSS_LIMIT_KB = 400 * 1024;

/** What a command line is run on: absolute paths inside one iteration's folder. */
export interface CmdEnv {
  /** The image to open (read-only commands), or a private copy of it (commands that write). */
  file: string;
  /** A free output path in the same folder. */
  out: string;
  size: number;
  /** Seeded offset/length for write commands. */
  off: number;
  len: number;
}

export interface CommandSpec {
  name: string;
  argv(e: CmdEnv): string[];
  /** Exit statuses that are normal for this command. */
  codes: number[];
  /** Runs on a private copy of the iteration's files (it may write). */
  writes?: boolean;
  /** Only run when this module exists in the build (commands being written on other branches). */
  needs?: string;
  /** A failure may print a long report (check). */
  longReport?: boolean;
}

/** The command matrix. Add a line to fuzz a new command; `needs` skips it in builds without it. */
export const COMMANDS: CommandSpec[] = [
  { name: 'info', argv: (e) => ['img', 'info', e.file], codes: [0, 1] },
  { name: 'info-json', argv: (e) => ['img', 'info', '--output=json', e.file], codes: [0, 1] },
  { name: 'info-chain', argv: (e) => ['img', 'info', '--backing-chain', e.file], codes: [0, 1], longReport: true },
  { name: 'check', argv: (e) => ['img', 'check', e.file], codes: [0, 1, 2, 3, 63], longReport: true },
  { name: 'check-json', argv: (e) => ['img', 'check', '--output=json', e.file], codes: [0, 1, 2, 3, 63], longReport: true },
  { name: 'check-repair', argv: (e) => ['img', 'check', '-r', 'all', e.file], codes: [0, 1, 2, 3, 63], writes: true, longReport: true },
  { name: 'map', argv: (e) => ['img', 'map', e.file], codes: [0, 1] },
  { name: 'map-json', argv: (e) => ['img', 'map', '--output=json', e.file], codes: [0, 1] },
  { name: 'snapshot-list', argv: (e) => ['img', 'snapshot', '-l', e.file], codes: [0, 1] },
  { name: 'io-read', argv: (e) => ['io', '-c', `read 0 ${e.size}`, e.file], codes: [0, 1], writes: true },
  { name: 'io-write', argv: (e) => ['io', '-c', `write -P 0x5a ${e.off} ${e.len}`, '-c', `read -P 0x5a ${e.off} ${e.len}`, e.file], codes: [0, 1], writes: true },
  { name: 'convert-raw', argv: (e) => ['img', 'convert', '-O', 'raw', e.file, e.out], codes: [0, 1] },
  { name: 'convert-qcow2', argv: (e) => ['img', 'convert', '-O', 'qcow2', e.file, e.out], codes: [0, 1] },
  { name: 'commit', argv: (e) => ['img', 'commit', e.file], codes: [0, 1], writes: true, needs: 'cli/img/commit.js' },
  { name: 'compare', argv: (e) => ['img', 'compare', e.file, e.file], codes: [0, 1, 2, 3, 4], needs: 'cli/img/compare.js' },
  { name: 'resize', argv: (e) => ['img', 'resize', e.file, '+1M'], codes: [0, 1], writes: true, needs: 'cli/img/resize.js' },
  { name: 'rebase-unsafe', argv: (e) => ['img', 'rebase', '-u', '-b', '', e.file], codes: [0, 1], writes: true, needs: 'cli/img/rebase.js' },
  { name: 'measure', argv: (e) => ['img', 'measure', '-O', 'qcow2', e.file], codes: [0, 1], needs: 'cli/img/measure.js' },
  { name: 'amend', argv: (e) => ['img', 'amend', '-o', 'compat=1.1', e.file], codes: [0, 1], writes: true, needs: 'cli/img/amend.js' },
  { name: 'bitmap-add', argv: (e) => ['img', 'bitmap', '--add', e.file, 'fuzz'], codes: [0, 1], writes: true, needs: 'cli/img/bitmap.js' },
];

/** The commands this build has. */
export function availableCommands(): CommandSpec[] {
  return COMMANDS.filter((c) => !c.needs || fs.existsSync(path.join(ROOT, 'dist/src', c.needs)));
}

export interface RunResult {
  code: number | null;
  signal?: string | null;
  stdout: string;
  stderr: string;
  ms: number;
  timedOut: boolean;
  /** Peak RSS in KiB (CLI children). */
  rssKb?: number;
  /** The worker died: out of memory, uncaught exception, unhandled rejection. */
  fatal?: string;
}

export interface Runner {
  readonly kind: 'cli' | 'inproc';
  run(argv: string[], cwd: string): Promise<RunResult>;
  close(): Promise<void>;
}

// ------------------------------------------------------------------------------------------------
// CLI children

export class CliRunner implements Runner {
  readonly kind = 'cli';
  private preload = '';
  private seq = 0;
  constructor(private readonly tmp: string) {}

  private setup(): string {
    if (this.preload) return this.preload;
    const file = path.join(this.tmp, 'rss-preload.mjs');
    // Exit status 99 unless bin/qchain.js sets one: a drained event loop with main() never settled.
    fs.writeFileSync(file, "import fs from 'node:fs';\nprocess.exitCode = 99;\nprocess.on('exit', () => { const f = process.env.QCHAIN_FUZZ_RSS; if (f) try { fs.writeFileSync(f, String(process.resourceUsage().maxRSS)); } catch {} });\n");
    return (this.preload = pathToFileURL(file).href);
  }

  run(argv: string[], cwd: string): Promise<RunResult> {
    const rssFile = path.join(this.tmp, `rss-${process.pid}-${this.seq++}`);
    const args = [`--max-old-space-size=${HEAP_MB}`, '--import', this.setup(), QCHAIN, ...argv];
    return new Promise((resolve, reject) => {
      const t0 = performance.now();
      const child = spawn(process.execPath, args, { cwd, env: { ...process.env, QCHAIN_FUZZ_RSS: rssFile }, stdio: ['ignore', 'pipe', 'pipe'] });
      const out: Buffer[] = [];
      const err: Buffer[] = [];
      let n = 0;
      child.stdout.on('data', (b: Buffer) => { if ((n += b.length) < 4 << 20) out.push(b); });
      child.stderr.on('data', (b: Buffer) => { if ((n += b.length) < 4 << 20) err.push(b); });
      let timedOut = false;
      const timer = setTimeout(() => { timedOut = true; child.kill('SIGKILL'); }, TIME_LIMIT_MS);
      child.on('error', (e) => { clearTimeout(timer); reject(e); });
      child.on('close', (code, signal) => {
        clearTimeout(timer);
        let rssKb: number | undefined;
        try { rssKb = Number(fs.readFileSync(rssFile, 'utf8')); fs.unlinkSync(rssFile); } catch { /* died before exit */ }
        resolve({ code, signal, stdout: Buffer.concat(out).toString('utf8'), stderr: Buffer.concat(err).toString('utf8'), ms: performance.now() - t0, timedOut, rssKb });
      });
    });
  }

  async close(): Promise<void> { /* nothing held */ }
}

// ------------------------------------------------------------------------------------------------
// In-process workers

interface Reply { id?: number; code?: number; stdout?: string; stderr?: string; ms?: number; fatal?: string }

class Slot {
  worker!: Worker;
  pending: ((r: RunResult) => void) | null = null;
  fatal = '';
  /** Resolves when a terminated worker has been replaced. */
  restarted: Promise<void> = Promise.resolve();
  private onRestart: (() => void) | null = null;
  constructor() { this.start(); }

  start(): void {
    const url = new URL('./fuzz-worker.js', import.meta.url);
    this.worker = new Worker(url, { resourceLimits: { maxOldGenerationSizeMb: HEAP_MB, maxYoungGenerationSizeMb: 32 } });
    this.worker.unref();
    this.worker.on('message', (m: Reply) => {
      if (m.fatal) { this.fatal += `${m.fatal}\n`; return; }
      const done = this.pending;
      this.pending = null;
      const fatal = this.fatal || undefined;
      this.fatal = '';
      done?.({ code: m.code ?? null, stdout: m.stdout ?? '', stderr: m.stderr ?? '', ms: m.ms ?? 0, timedOut: false, fatal });
    });
    this.worker.on('error', (e) => { this.fatal += `worker error: ${e.name}: ${e.message} ${(e as NodeJS.ErrnoException).code ?? ''}\n`; });
    this.worker.on('exit', () => {
      const done = this.pending;
      this.pending = null;
      const fatal = this.fatal || 'worker exited';
      this.fatal = '';
      this.start();
      this.onRestart?.();
      this.onRestart = null;
      done?.({ code: null, stdout: '', stderr: '', ms: 0, timedOut: false, fatal });
    });
  }

  /** Stop a runaway job; the slot is usable again once `restarted` resolves. */
  kill(): void {
    this.pending = null;
    this.fatal = '';
    this.restarted = new Promise((res) => { this.onRestart = res; });
    void this.worker.terminate();
  }
}

export class InProcRunner implements Runner {
  readonly kind = 'inproc';
  private readonly free: Slot[] = [];
  private readonly waiters: ((s: Slot) => void)[] = [];
  private seq = 0;
  constructor(n: number) { for (let i = 0; i < n; i++) this.free.push(new Slot()); }

  private acquire(): Promise<Slot> {
    const s = this.free.pop();
    return s ? Promise.resolve(s) : new Promise((res) => this.waiters.push(res));
  }

  private release(s: Slot): void {
    const w = this.waiters.shift();
    if (w) w(s); else this.free.push(s);
  }

  async run(argv: string[]): Promise<RunResult> {
    const slot = await this.acquire();
    const id = this.seq++;
    const t0 = performance.now();
    const r = await new Promise<RunResult>((resolve) => {
      const timer = setTimeout(() => {
        // terminate() interrupts a busy loop; the exit handler restarts the slot.
        const done = slot.pending;
        slot.kill();
        done?.({ code: null, stdout: '', stderr: '', ms: performance.now() - t0, timedOut: true });
      }, TIME_LIMIT_MS);
      slot.pending = (x) => { clearTimeout(timer); resolve(x); };
      slot.worker.postMessage({ id, argv });
    });
    await slot.restarted;
    this.release(slot);
    return r;
  }

  async close(): Promise<void> {
    await Promise.all(this.free.map((s) => { s.worker.removeAllListeners('exit'); return s.worker.terminate(); }));
  }
}

// ------------------------------------------------------------------------------------------------
// Verdict

/** JavaScript / V8 / Node internals: with no stack printed, these messages are the tell. */
const INTERNAL = new RegExp([
  String.raw`(^|\n)\s+at \S[^\n]*(\(|:\d+:\d+)`, 'at file://', 'node:internal', String.raw`\b(TypeError|RangeError|ReferenceError|SyntaxError|EvalError|URIError|AggregateError)\b`,
  String.raw`\bERR_[A-Z0-9_]{3,}\b`, 'Cannot read propert', 'Cannot set propert', 'is not a function', 'is not iterable', 'is not defined', 'is not a constructor',
  'Invalid array length', 'Invalid typed array length', 'Array buffer allocation failed', 'Invalid string length', 'BigInt', 'Maximum call stack',
  'is out of range. It must be', 'The value of "', String.raw`The "\w+" argument`, 'must be of type', 'outside (the )?buffer bounds', 'Offset is outside the bounds',
  'Division by zero', 'Unexpected token', 'Unexpected end of JSON', 'Uncaught', 'unhandled', 'Unhandled', 'FATAL ERROR', 'heap out of memory',
  String.raw`\bundefined\b`, String.raw`\bNaN\b`, String.raw`\[object Object\]`, 'Assertion', 'Aborted', 'Segmentation fault', 'main\\(\\) threw',
].join('|'));

export interface Failure {
  /** A known parity gap: reported, not failing the case. */
  soft?: boolean;
  command: string;
  argv: string[];
  kind: string;
  detail: string;
}

function clip(s: string, n = 600): string {
  return s.length > n ? `${s.slice(0, n)}… [${s.length} chars]` : s;
}

/** Everything wrong with one run of `spec` (empty when it behaved). */
export function judge(spec: CommandSpec, argv: string[], r: RunResult): Failure[] {
  const f: Failure[] = [];
  const add = (kind: string, detail: string): void => { f.push({ command: spec.name, argv, kind, detail }); };
  if (r.timedOut) add('hang', `no exit within ${TIME_LIMIT_MS} ms`);
  if (r.fatal) add('crash', clip(r.fatal, 2000));
  if (r.signal) add('crash', `killed by ${r.signal}`);
  if (!r.timedOut && !r.fatal && !r.signal && (r.code === null || !spec.codes.includes(r.code))) add('exit-code', `exit ${r.code}${r.code === 99 ? ' (main() never settled)' : ''}; stderr ${JSON.stringify(clip(r.stderr))}`);
  const m = INTERNAL.exec(r.stderr) ?? INTERNAL.exec(r.stdout.slice(0, 1 << 16));
  if (m) add('internal-error', `"${m[0].trim()}" in output; stderr ${JSON.stringify(clip(r.stderr))}`);
  const said = r.stderr.trim() !== '' || (argv[0] === 'io' && r.stdout.trim() !== '');
  if (r.code !== null && r.code !== 0 && !said && !(spec.name.startsWith('check') && r.code !== 1) && !(spec.name === 'compare' && r.code === 1)) {
    add('silent-failure', `exit ${r.code} with nothing on stderr`);
  }
  // Check-style report lines (a dirty image is repaired on open, as QEMU does) are not counted.
  const errLines = r.stderr.split('\n').filter((l) => l && !/^(ERROR|Repairing|Rebuilding|Leaked|Warning: cluster|qcow2: |Can't get refcount for cluster)/.test(l));
  if (r.code === 1 && !spec.longReport && errLines.length > 8) add('noisy-failure', `${r.stderr.split('\n').length} stderr lines: ${JSON.stringify(clip(r.stderr))}`);
  if (r.rssKb !== undefined && r.rssKb > RSS_LIMIT_KB) add('memory', `peak RSS ${(r.rssKb / 1024).toFixed(0)} MiB`);
  return f;
}
