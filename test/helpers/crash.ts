/** Crash-test support: run a qchain command and SIGKILL it at a chosen moment. */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { QCHAIN, rng } from './qemu.js';
import { copyDir } from './chains.js';
import { MemoryStorage } from '../../src/storage/memory.js';
import { StorageError, type Storage } from '../../src/storage/storage.js';

/**
 * Run `qchain img ARGS` in `cwd`; once `watch` (a file the command writes) has changed, SIGKILL
 * it after `delay` more ms (it may finish first). Resolves whether it was killed and how long
 * it ran after that first write.
 */
export function runAndKill(args: string[], cwd: string, delay: number, watch?: string): Promise<{ killed: boolean; active: number }> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [QCHAIN, 'img', ...args], { cwd, stdio: 'ignore' });
    const stamp = (): string => {
      try {
        const st = fs.statSync(path.join(cwd, watch as string));
        return `${st.mtimeMs}:${st.size}`;
      } catch {
        return '';
      }
    };
    const initial = watch ? stamp() : '';
    let timer: NodeJS.Timeout | undefined;
    let armedAt = Date.now();
    const arm = (): void => {
      armedAt = Date.now();
      timer = setTimeout(() => child.kill('SIGKILL'), delay);
    };
    const poll = watch ? setInterval(() => {
      if (stamp() !== initial) {
        clearInterval(poll);
        arm();
      }
    }, 2) : undefined;
    if (!watch) arm();
    child.on('error', reject);
    child.on('close', (_code, signal) => {
      clearInterval(poll);
      clearTimeout(timer);
      resolve({ killed: signal === 'SIGKILL', active: Date.now() - armedAt });
    });
  });
}

export interface KillLoop {
  /** For messages. */
  name: string;
  /** The scratch folder: probe/ and it<N>/ are made in it. */
  root: string;
  /** The images every run starts from. */
  src: string;
  /** `qchain img` arguments. */
  args: string[];
  /** The file whose first change arms the kill. */
  watch: string;
  iterations: number;
  seed: number;
  /** Checks of the uninterrupted probe run's folder. */
  probed?: (dir: string) => Promise<void>;
  /** Checks of a folder after a run was (most likely) killed; `ctx` describes the run. */
  after: (dir: string, ctx: string) => Promise<void>;
}

/**
 * SIGKILL `qchain img ARGS` at random moments: an uninterrupted run on a copy of `src` (probe/)
 * measures how long the command works after its first write to `watch`; then each of
 * `iterations` runs on a fresh copy is killed a random time (up to 90% of that) after its first
 * write and its folder handed to `after`. At least a third of the runs must really be killed (a
 * run that finished first proves little).
 */
export async function killLoop(o: KillLoop): Promise<void> {
  const probe = path.join(o.root, 'probe');
  copyDir(o.src, probe);
  const window = (await runAndKill(o.args, probe, 60_000, o.watch)).active;
  await o.probed?.(probe);
  const r = rng(o.seed);
  let killed = 0;
  for (let it = 0; it < o.iterations; it++) {
    const dir = path.join(o.root, `it${it}`);
    copyDir(o.src, dir);
    const delay = Math.floor(r() * window * 0.9);
    const ctx = `${o.name} iteration ${it}, kill ${delay} ms after the first write (full run ~${window} ms)`;
    if ((await runAndKill(o.args, dir, delay, o.watch)).killed) killed++;
    await o.after(dir, ctx);
    fs.rmSync(dir, { recursive: true, force: true });
  }
  assert.ok(killed >= Math.ceil(o.iterations / 3), `${o.name}: only ${killed} of ${o.iterations} runs were killed`);
}

/**
 * A memory container that "loses power" after its first `limit` writes (write, writev and truncate
 * each count as one): later ones fail and change nothing, so `contents()` is what
 * the file holds at that crash point. With limit = Infinity it counts the writes of a whole run.
 */
export class CrashStorage implements Storage {
  readonly name = 'crash';
  readonly readOnly = false;
  writes = 0;
  private readonly mem: MemoryStorage;
  constructor(initial: Buffer, private readonly limit = Infinity) {
    this.mem = new MemoryStorage('crash', initial);
  }
  contents(): Buffer {
    return this.mem.contents();
  }
  private async mutate(fn: () => Promise<void>): Promise<void> {
    if (this.writes >= this.limit) throw new StorageError('simulated crash', 'EIO');
    this.writes++;
    await fn();
  }
  read(buf: Buffer, offset: number): Promise<void> { return this.mem.read(buf, offset); }
  write(buf: Buffer, offset: number): Promise<void> { return this.mutate(() => this.mem.write(buf, offset)); }
  writev(bufs: Buffer[], offset: number): Promise<void> { return this.mutate(() => this.mem.writev(bufs, offset)); }
  truncate(length: number): Promise<void> { return this.mutate(() => this.mem.truncate(length)); }
  size(): Promise<number> { return this.mem.size(); }
  flush(): Promise<void> { return Promise.resolve(); }
  allocatedSize(): Promise<number> { return this.mem.size(); }
  close(): Promise<void> { return Promise.resolve(); }
}
