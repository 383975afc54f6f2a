/**
 * Optional native file primitives Node lacks (hole punching now; OFD byte-range locks later),
 * from the prebuilt `fs-native-extensions` addon. Loaded lazily; when it cannot load on a
 * platform, callers fall back to portable behaviour (writing zeros).
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
