/** Crash-test support: run a qchain command and SIGKILL it at a chosen moment. */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { QCHAIN } from './qemu.js';
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
