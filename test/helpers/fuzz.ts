/**
 * Structure-aware fuzzer for hostile qcow2 input. One iteration = one seed: pick a corpus shape
 * and the file to break, apply 1-3 structure-aware mutations (fuzz-mutate), then run every command
 * of the matrix (fuzz-run) on the result and judge each run. A failure is reported with its seed
 * and its byte-level recipe, ready to paste into test/fuzz-regressions.ts.
 */
import fs from 'node:fs';
import path from 'node:path';
import { buildCorpus, SHAPE_NAMES, type Shape } from './fuzz-corpus.js';
import { mutate, applyPatches, Rand, type Patch } from './fuzz-mutate.js';
import { VERIFY, SOFT, qemuCheckCode } from './fuzz-oracle.js';
import { availableCommands, judge, type CommandSpec, type Failure, type Runner, type RunResult } from './fuzz-run.js';

export { buildCorpus, SHAPE_NAMES } from './fuzz-corpus.js';
export { CliRunner, InProcRunner, availableCommands, COMMANDS, TIME_LIMIT_MS } from './fuzz-run.js';
export type { Patch } from './fuzz-mutate.js';

/** A self-contained mutated case: a shape, the file to patch, and the patches. */
export interface Recipe {
  shape: string;
  target: string;
  patches: Patch[];
  /** Where the io write goes (defaults to the first cluster). */
  off?: number;
  len?: number;
}

export interface CaseResult {
  seed?: number;
  recipe: Recipe;
  notes: string[];
  /** Hard failures (the case fails). */
  failures: Failure[];
  /** Known parity gaps seen (reported only). */
  soft?: Failure[];
  runs: number;
}

/** The recipe seed `seed` produces on `shapes` (deterministic for a given corpus). */
export function recipeFor(seed: number, shapes: Map<string, Shape>): { recipe: Recipe; notes: string[] } {
  const R = new Rand(seed);
  const shape = shapes.get(R.pick(SHAPE_NAMES));
  if (!shape) throw new Error('corpus not built');
  const target = R.pick(shape.targets);
  const img = mutate(fs.readFileSync(path.join(shape.dir, target)), R);
  const off = R.chance(0.5) ? R.int(0, shape.size - 1) : R.int(0, Math.max(0, shape.size / 65536 - 1)) * 65536;
  const len = R.pick([1, 512, 4096, 65536, R.int(1, 200_000)]);
  return { recipe: { shape: shape.name, target, patches: img.patches, off, len }, notes: img.notes };
}

/** Lay the case's files out in `dir` (the shape's files, the target patched). */
function materialise(recipe: Recipe, shape: Shape, dir: string): void {
  fs.mkdirSync(dir, { recursive: true });
  for (const f of fs.readdirSync(shape.dir)) {
    const src = fs.readFileSync(path.join(shape.dir, f));
    fs.writeFileSync(path.join(dir, f), f === recipe.target ? applyPatches(src, recipe.patches) : src);
  }
}

/** Lay a recipe out in `dir` and return the path of the file the commands open. */
export function materialiseCase(recipe: Recipe, shapes: Map<string, Shape>, dir: string): string {
  const shape = shapes.get(recipe.shape);
  if (!shape) throw new Error(`unknown shape ${recipe.shape}`);
  materialise(recipe, shape, dir);
  return path.join(dir, shape.entry);
}

/** Files larger than this are compared by size and first bytes only (a block far past EOF grows the file sparsely). */
const HEAD_BYTES = 64 << 20;

/** The first HEAD_BYTES of a repaired image (all of a normal one), for comparing two tools' results. */
export function fileHead(f: string): Buffer {
  const b = Buffer.alloc(Math.min(fs.statSync(f).size, HEAD_BYTES));
  const fd = fs.openSync(f, 'r');
  try { fs.readSync(fd, b, 0, b.length, 0); } finally { fs.closeSync(fd); }
  return b;
}

/** Run the command matrix on one recipe; every command writing gets a private copy of the files. */
export async function runCase(recipe: Recipe, shapes: Map<string, Shape>, runner: Runner, work: string, commands: CommandSpec[] = availableCommands(), onRun?: (spec: CommandSpec, r: RunResult) => void): Promise<Failure[]> {
  const shape = shapes.get(recipe.shape);
  if (!shape) throw new Error(`unknown shape ${recipe.shape}`);
  const base = path.join(work, 'case');
  fs.rmSync(work, { recursive: true, force: true });
  materialise(recipe, shape, base);
  const failures: Failure[] = [];
  let n = 0;
  let base0: Promise<number | null> | undefined;
  const baseline = (): Promise<number | null> => (base0 ??= qemuCheckCode(path.join(base, shape.entry), base));
  for (const spec of commands) {
    let dir = base;
    if (spec.writes) {
      dir = path.join(work, `w${n++}`);
      fs.cpSync(base, dir, { recursive: true });
    }
    const out = path.join(work, `out-${spec.name}`);
    const env = { file: path.join(dir, shape.entry), out, size: shape.size, off: recipe.off ?? 0, len: recipe.len ?? 512 };
    const argv = spec.argv(env);
    const r = await runner.run(argv, dir);
    onRun?.(spec, r);
    failures.push(...judge(spec, argv, r));
    const verify = VERIFY[spec.name];
    if (verify && !r.timedOut) {
      const detail = await verify({ env, cwd: dir, r, baseline });
      if (detail) failures.push({ command: spec.name, argv, kind: 'qemu-disagrees', detail, ...(SOFT.has(spec.name) ? { soft: true } : {}) });
    }
    fs.rmSync(out, { force: true });
    if (spec.writes) fs.rmSync(dir, { recursive: true, force: true });
  }
  fs.rmSync(work, { recursive: true, force: true });
  return failures;
}

export interface FuzzOptions {
  seeds: number[];
  shapes: Map<string, Shape>;
  runner: Runner;
  work: string;
  /** Iterations run side by side (the in-process runner has one worker per lane). */
  lanes: number;
  onResult?: (r: CaseResult) => void;
  /** Every single command run (for statistics). */
  onRun?: (spec: CommandSpec, r: RunResult) => void;
}

/** Run one iteration per seed; returns the cases that failed. */
export async function fuzz(o: FuzzOptions): Promise<CaseResult[]> {
  const bad: CaseResult[] = [];
  const commands = availableCommands();
  let next = 0;
  const lane = async (k: number): Promise<void> => {
    while (next < o.seeds.length) {
      const seed = o.seeds[next++];
      const { recipe, notes } = recipeFor(seed, o.shapes);
      const all = await runCase(recipe, o.shapes, o.runner, path.join(o.work, `lane${k}`), commands, o.onRun);
      const failures = all.filter((f) => !f.soft);
      const res: CaseResult = { seed, recipe, notes, failures, soft: all.filter((f) => f.soft), runs: commands.length };
      if (failures.length) bad.push(res);
      o.onResult?.(res);
    }
  };
  await Promise.all(Array.from({ length: o.lanes }, (_, k) => lane(k)));
  return bad;
}

/** A failure as a printable block with its seed and recipe. */
export function describe(c: CaseResult): string {
  const lines = [`seed ${c.seed ?? '-'}: shape ${c.recipe.shape}, target ${c.recipe.target}; ${c.notes.join('; ')}`];
  for (const f of c.failures) lines.push(`  [${f.kind}] ${f.command}: ${f.detail}`);
  lines.push(`  recipe: ${JSON.stringify(c.recipe)}`);
  return lines.join('\n');
}

/** A short key grouping failures of the same kind (for summaries). */
export function failureKey(f: Failure): string {
  return `${f.kind} ${f.command}: ${f.detail.replace(/0x[0-9a-f]+|\d+/gi, 'N').slice(0, 160)}`;
}
