/**
 * Optional native file primitives Node lacks: hole punching and OFD byte-range locks (prebuilt
 * `fs-native-extensions` addon), lseek SEEK_DATA/SEEK_HOLE (prebuilt `fs-ext-extra-prebuilt`).
 * Loaded lazily; when one cannot load on a platform, callers fall back to portable behaviour
 * (writing zeros, reporting everything as data).
 */
import { createRequire } from 'node:module';
import path from 'node:path';

export interface NativeFs {
  /** Deallocate [offset, offset+length): reads return zeros afterwards, the file size is kept. */
  trim(fd: number, offset: number, length: number): Promise<void>;
  tryLock(fd: number, offset: number, length: number, opts?: { shared?: boolean }): boolean;
  unlock(fd: number, offset: number, length: number): void;
}

let cached: NativeFs | null | undefined;

/** The addon's raw binding: lock calls throw EAGAIN on conflict; trim completes through a callback. */
interface FsxBinding {
  tryLock(fd: number, offset: number, length: number, exclusive: boolean): void;
  unlock(fd: number, offset: number, length: number): void;
  trim(fd: number, offset: number, length: number, req: object, done: (this: TrimReq, err: Error | null) => void): unknown;
}
interface TrimReq { handle: unknown; resolve: () => void; reject: (e: Error) => void }

/**
 * Load the prebuilt binding directly: the package's own loader resolves runtimes and takes
 * 100-200 ms, which every command would pay at start-up; dlopen of the file takes well under 1 ms.
 */
function loadFsx(): FsxBinding {
  const req = createRequire(import.meta.url);
  const dir = path.dirname(req.resolve('fs-native-extensions/package.json'));
  const mod = { exports: {} as FsxBinding };
  process.dlopen(mod, path.join(dir, 'prebuilds', `${process.platform}-${process.arch}`, 'fs-native-extensions.node'));
  return mod.exports;
}

export function nativeFs(): NativeFs | null {
  if (cached === undefined) {
    try {
      const b = loadFsx();
      cached = {
        tryLock(fd, offset, length, opts = {}) {
          try {
            b.tryLock(fd, offset, length, opts.shared !== true);
          } catch (e) {
            if ((e as NodeJS.ErrnoException).code === 'EAGAIN') return false;
            throw e;
          }
          return true;
        },
        unlock: (fd, offset, length) => b.unlock(fd, offset, length),
        trim: (fd, offset, length) => new Promise<void>((resolve, reject) => {
          const r: TrimReq = { handle: null, resolve, reject };
          r.handle = b.trim(fd, offset, length, r, function (this: TrimReq, err) {
            if (err) this.reject(err);
            else this.resolve();
          });
        }),
      };
    } catch {
      cached = null;
    }
  }
  return cached;
}

export interface NativeSeek {
  seekSync(fd: number, offset: number, whence: number): number;
}

let seekCached: NativeSeek | null | undefined;

export function nativeSeek(): NativeSeek | null {
  if (seekCached === undefined) {
    try {
      seekCached = createRequire(import.meta.url)('fs-ext-extra-prebuilt') as NativeSeek;
    } catch {
      seekCached = null;
    }
  }
  return seekCached;
}

export const SEEK_DATA = 3;
export const SEEK_HOLE = 4;
