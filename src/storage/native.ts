/**
 * Optional native file primitives Node lacks: hole punching and OFD byte-range locks (prebuilt
 * `fs-native-extensions` addon), lseek SEEK_DATA/SEEK_HOLE (prebuilt `fs-ext-extra-prebuilt`).
 * Loaded lazily; when one cannot load on a platform, callers fall back to portable behaviour
 * (writing zeros, reporting everything as data).
 */
import { createRequire } from 'node:module';

export interface NativeFs {
  /** Deallocate [offset, offset+length): reads return zeros afterwards, the file size is kept. */
  trim(fd: number, offset: number, length: number): Promise<void>;
  tryLock(fd: number, offset: number, length: number, opts?: { shared?: boolean }): boolean;
  unlock(fd: number, offset: number, length: number): void;
}

let cached: NativeFs | null | undefined;

export function nativeFs(): NativeFs | null {
  if (cached === undefined) {
    try {
      cached = createRequire(import.meta.url)('fs-native-extensions') as NativeFs;
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
