import fs from 'node:fs';
import { Storage, StorageError, errnoText } from './storage.js';
import { SEEK_DATA, SEEK_HOLE, nativeFs, nativeSeek } from './native.js';
import { lockImage, type LockMode } from './lock.js';
import { WriteBatcher } from './write-batcher.js';
import { SyncGate } from './sync-gate.js';
import { DIRECT_ALIGN, isDirectBuffer } from './aligned.js';

/** Reads and writes up to this size may be made synchronously (see SyncGate). */
const SYNC_MAX = 64 * 1024;
/** A small read slower than this counts as slow (it came from the device). */
const SLOW_MS = 0.05;
/** A small write slower than this counts as slow (writeback throttling, device I/O). */
const SLOW_WRITE_MS = 0.25;
/**
 * A vector write (a daemon's coalesced writes of one turn) up to this size is written
 * synchronously under the same rule: handing ~1 MiB to the thread pool costs the main thread
 * more than copying it into the page cache itself (allocating writes: ~20% less CPU per write).
 */
const SYNC_WRITEV_MAX = 1024 * 1024;
/** Writes this large and larger, aligned, bypass the page cache when direct writes are on. */
const DIRECT_MIN = 64 * 1024;
/**
 * Buffered writes reach the kernel in pieces of at most this size. Linux sizes the page-cache
 * folios a write creates by the request, and large folios come from high-order free memory, which
 * a VM with free page reporting has handed back to its host: every page of it faults on first
 * touch. Measured on the project's VM (dd, 1 GiB of new file, 3 s apart): 2 MiB writes 1.8-2.3 s
 * of kernel time, 1 MiB 0.6-1.3 s, 512 KiB and 256 KiB 0.2-0.3 s. Direct writes are not split.
 */
const BUFFERED_PIECE = 256 * 1024;

function pwriteSync(fd: number, buf: Buffer, offset: number): void {
  let done = 0;
  while (done < buf.length) done += fs.writeSync(fd, buf, done, Math.min(buf.length - done, BUFFERED_PIECE), offset + done);
}

/** The leading buffers of `list` up to `max` bytes (the last one cut), at most IOV_MAX (1024) of them. */
function prefix(list: Buffer[], max: number): Buffer[] {
  const out: Buffer[] = [];
  let bytes = 0;
  for (const b of list) {
    if (out.length === 1024 || bytes >= max) break;
    const take = Math.min(b.length, max - bytes);
    out.push(take === b.length ? b : b.subarray(0, take));
    bytes += take;
  }
  return out;
}

function pwritevSync(fd: number, bufs: Buffer[], offset: number): void {
  let list = bufs, pos = offset;
  while (list.length) {
    let n = fs.writevSync(fd, prefix(list, BUFFERED_PIECE), pos);
    pos += n;
    let k = 0;
    while (k < list.length && n >= list[k].length) n -= list[k++].length;
    list = list.slice(k);
    if (n > 0 && list.length) list[0] = list[0].subarray(n);
  }
}

function preadSync(fd: number, buf: Buffer, offset: number): number {
  let done = 0;
  while (done < buf.length) {
    const n = fs.readSync(fd, buf, done, buf.length - done, offset + done);
    if (n === 0) break;
    done += n;
  }
  return done;
}

/** Promise wrappers over the callback fs API (faster than FileHandle at small sizes, see docs). */
function preadFull(fd: number, buf: Buffer, offset: number): Promise<number> {
  return new Promise((resolve, reject) => {
    let done = 0;
    const step = (): void => {
      fs.read(fd, buf, done, buf.length - done, offset + done, (err, n) => {
        if (err) return reject(err);
        if (n === 0) return resolve(done);
        done += n;
        if (done >= buf.length) return resolve(done);
        step();
      });
    };
    step();
  });
}

/** Write all of buf (one request, repeated for what a short write leaves). */
function pwriteFull(fd: number, buf: Buffer, offset: number): Promise<void> {
  return new Promise((resolve, reject) => {
    let done = 0;
    const step = (): void => {
      fs.write(fd, buf, done, buf.length - done, offset + done, (err, n) => {
        if (err) return reject(err);
        done += n;
        if (done >= buf.length) return resolve();
        step();
      });
    };
    step();
  });
}

/** Write all of bufs back to back (requests of at most IOV_MAX buffers). */
function pwritevFull(fd: number, bufs: Buffer[], offset: number): Promise<void> {
  return new Promise((resolve, reject) => {
    let list = bufs.filter((b) => b.length > 0);
    let pos = offset;
    const step = (): void => {
      if (list.length === 0) return resolve();
      const batch = prefix(list, Infinity);
      fs.writev(fd, batch, pos, (err, n) => {
        if (err) return reject(err);
        pos += n;
        // Drop fully written buffers; trim a partially written one.
        let k = 0;
        while (k < list.length && n >= list[k].length) n -= list[k++].length;
        list = list.slice(k);
        if (n > 0 && list.length) list[0] = list[0].subarray(n);
        step();
      });
    };
    step();
  });
}

/**
 * Buffered writes of more than BUFFERED_PIECE bytes go out as pieces with two in flight: the
 * kernel takes one file's buffered writes one at a time anyway, and the piece queued behind the
 * one being copied saves a round trip through the event loop per piece.
 */
async function lanes(pieces: number, write: (i: number) => Promise<void>): Promise<void> {
  let next = 0;
  const lane = async (): Promise<void> => {
    while (next < pieces) await write(next++);
  };
  await Promise.all([lane(), lane()]);
}

function pwritevPieces(fd: number, bufs: Buffer[], offset: number): Promise<void> {
  // Cut the vector into groups of at most BUFFERED_PIECE bytes (and IOV_MAX buffers).
  const groups: Array<{ at: number; bufs: Buffer[] }> = [];
  let cur: Buffer[] = [], curBytes = 0, at = offset;
  for (let b of bufs) {
    while (b.length > 0) {
      const take = Math.min(b.length, BUFFERED_PIECE - curBytes);
      cur.push(take === b.length ? b : b.subarray(0, take));
      curBytes += take;
      b = b.subarray(take);
      if (curBytes === BUFFERED_PIECE || cur.length === 1024) {
        groups.push({ at, bufs: cur });
        at += curBytes;
        cur = [];
        curBytes = 0;
      }
    }
  }
  if (cur.length) groups.push({ at, bufs: cur });
  if (groups.length <= 1) return pwritevFull(fd, groups[0]?.bufs ?? [], offset);
  return lanes(groups.length, (i) => pwritevFull(fd, groups[i].bufs, groups[i].at));
}

function wrap(name: string, e: unknown): StorageError {
  const code = (e as NodeJS.ErrnoException).code;
  return new StorageError(`${name}: ${errnoText(code)}`, code);
}

export interface FileOpenOptions {
  readOnly?: boolean;
  /** Create (or truncate) the file. The file is truncated only after the lock is held. */
  create?: boolean;
  /** Image lock to take (QEMU-compatible byte-range locks); default none. */
  lock?: LockMode;
  /** Flushes do nothing (QEMU's cache=unsafe, BDRV_O_NO_FLUSH: qemu-img convert's default output mode). */
  noFlush?: boolean;
  /** Coalesce the writes of one event-loop turn (see WriteBatcher): for servers with many clients. */
  coalesceWrites?: boolean;
  /**
   * Bulk data writes bypass the page cache (O_DIRECT; QEMU's cache.direct): 'on' fails where the
   * file system refuses O_DIRECT, 'auto' then writes through the page cache. See DirectWriter.
   */
  direct?: DirectMode;
}

export type DirectMode = 'off' | 'on' | 'auto';

/**
 * A second descriptor on the same file, opened with O_DIRECT. Writes that are large and aligned
 * in offset, length and address (buffers from alignedBuffer) go through it to the device; all
 * other I/O stays on the buffered descriptor. Linux keeps the two coherent: a direct write first
 * writes back and then drops the page-cache pages of its range. Requests in flight never overlap
 * (the format drivers serialise overlapping writes), and fdatasync on either descriptor makes
 * both durable (it is per inode), so flushes are unchanged.
 */
async function openDirect(path: string, readOnly: boolean, mode: DirectMode): Promise<number> {
  if (mode === 'off' || readOnly) return -1;
  try {
    return await new Promise<number>((res, rej) =>
      fs.open(path, fs.constants.O_RDWR | fs.constants.O_DIRECT, (err, fd) => (err ? rej(err) : res(fd))));
  } catch (e) {
    if (mode === 'on') throw e;
    return -1; // tmpfs and some others refuse O_DIRECT (EINVAL): writes stay buffered
  }
}

/** A regular file (or block device) accessed with positional I/O. */
export class FileStorage implements Storage {
  /**
   * Whether files opened without an explicit `coalesceWrites` coalesce their writes: the policy
   * of the process (the daemon turns it on; one-shot commands issue their writes in order).
   */
  static coalesceByDefault = false;
  /** When small reads go through the thread pool (see SLOW_MS). */
  private readonly readGate = new SyncGate(SLOW_MS);
  /** The same for small writes (see SLOW_WRITE_MS). */
  private readonly writeGate = new SyncGate(SLOW_WRITE_MS);

  /** The end past which a write calls `onAbove` (Infinity: not armed; one compare per write). */
  private writeLimit = Infinity;
  private onAbove: ((end: number) => void) | null = null;

  /**
   * Called with each write's range (data, vector, hole punch) as it is issued: the dirty bitmaps
   * of the daemon's protocol node over this file (host writes, data and metadata alike).
   */
  readonly writeObservers: Array<(offset: number, length: number) => void> = [];

  /** Set when writes of one event-loop turn are coalesced (see WriteBatcher). */
  private readonly batcher: WriteBatcher | null;

  private constructor(readonly name: string, private fd: number, readonly readOnly: boolean, private readonly noFlush = false, coalesce = false,
    private directFd = -1, private readonly directMode: DirectMode = 'off') {
    this.batcher = coalesce && !readOnly
      ? new WriteBatcher({ write: (b, o) => this.writeNow(b, o), writev: (bs, o) => this.writevNow(bs, o) })
      : null;
  }

  /** Opens `path`; failures carry QEMU's strerror text (e.g. "No such file or directory"). */
  static async open(path: string, opts: FileOpenOptions = {}): Promise<FileStorage> {
    const readOnly = !!opts.readOnly;
    const flags = opts.create ? fs.constants.O_RDWR | fs.constants.O_CREAT : readOnly ? 'r' : 'r+';
    try {
      const fd = await new Promise<number>((res, rej) =>
        fs.open(path, flags, 0o644, (err, fd) => (err ? rej(err) : res(fd))));
      const st = fs.fstatSync(fd);
      if (st.isDirectory()) {
        fs.closeSync(fd);
        throw new StorageError(`'file' driver requires '${path}' to be a regular file`, 'ENOTREG');
      }
      try {
        lockImage(fd, path, opts.lock ?? 'none');
      } catch (e) {
        fs.closeSync(fd);
        throw e;
      }
      if (opts.create && st.isFile()) fs.ftruncateSync(fd, 0);
      let directFd = -1;
      try {
        directFd = await openDirect(path, readOnly, opts.direct ?? 'off');
      } catch (e) {
        fs.closeSync(fd);
        throw e;
      }
      return new FileStorage(path, fd, readOnly, !!opts.noFlush, opts.coalesceWrites ?? FileStorage.coalesceByDefault, directFd, opts.direct ?? 'off');
    } catch (e) {
      if (e instanceof StorageError) throw e;
      const code = (e as NodeJS.ErrnoException).code;
      throw new StorageError(errnoText(code), code);
    }
  }

  /** Take the image locks for `mode` on a file opened without locks; throws on a conflict with another opener. */
  lock(mode: LockMode): void {
    lockImage(this.fd, this.name, mode);
  }

  async read(buf: Buffer, offset: number): Promise<void> {
    // Offsets past 2^53 lie far beyond any real file: they read as zero, like any read past EOF.
    if (!Number.isSafeInteger(offset + buf.length) || offset < 0) {
      buf.fill(0);
      return;
    }
    let n: number;
    try {
      if (buf.length <= SYNC_MAX) {
        const t0 = performance.now();
        if (this.readGate.open(t0)) {
          n = preadSync(this.fd, buf, offset);
          this.readGate.record(t0, buf.length);
        } else n = await preadFull(this.fd, buf, offset);
      } else n = await preadFull(this.fd, buf, offset);
    } catch (e) {
      throw wrap(this.name, e);
    }
    if (n < buf.length) buf.fill(0, n);
  }

  readSync(buf: Buffer, offset: number): boolean {
    if (buf.length > SYNC_MAX || !Number.isSafeInteger(offset + buf.length) || offset < 0 || this.fd < 0) return false;
    const t0 = performance.now();
    if (!this.readGate.open(t0)) return false;
    let n: number;
    try {
      n = preadSync(this.fd, buf, offset);
    } catch (e) {
      throw wrap(this.name, e);
    }
    this.readGate.record(t0, buf.length);
    if (n < buf.length) buf.fill(0, n);
    return true;
  }

  async write(buf: Buffer, offset: number): Promise<void> {
    if (this.readOnly) throw new StorageError(`${this.name}: read-only`, 'EROFS');
    // Past 2^53 no file system of a real installation holds data (ext4: 16 TiB): EFBIG, as pwrite.
    if (!Number.isSafeInteger(offset + buf.length)) throw new StorageError(`${this.name}: ${errnoText('EFBIG')}`, 'EFBIG');
    if (offset + buf.length > this.writeLimit) this.above(offset + buf.length);
    if (this.writeObservers.length) for (const o of this.writeObservers) o(offset, buf.length);
    if (this.batcher) return this.batcher.write(buf, offset);
    return this.writeNow(buf, offset);
  }

  /** Whether direct writes are in use (see FileOpenOptions.direct). */
  get direct(): boolean {
    return this.directFd >= 0;
  }

  /** Bytes written with O_DIRECT so far. */
  directBytes = 0;
  /** The direct descriptor after direct writes were turned off (closed with the file). */
  private retiredDirectFd = -1;

  /**
   * A direct write failed with `e`: in 'auto' mode an EINVAL (a device whose logical blocks are
   * larger than DIRECT_ALIGN, a file system that takes O_DIRECT opens but not the I/O) turns
   * direct writes off for good and the caller redoes the write through the page cache.
   */
  private directRefused(e: unknown): boolean {
    if (this.directMode !== 'auto' || (e as NodeJS.ErrnoException).code !== 'EINVAL') return false;
    // Not closed here: other direct writes may still be in flight on it (and a closed number
    // could be reused by the next open). close() closes it.
    if (this.directFd >= 0) this.retiredDirectFd = this.directFd;
    this.directFd = -1;
    return true;
  }

  private async writeNow(buf: Buffer, offset: number): Promise<void> {
    try {
      if (this.directFd >= 0 && buf.length >= DIRECT_MIN && (offset & (DIRECT_ALIGN - 1)) === 0 && isDirectBuffer(buf)) {
        try {
          await pwriteFull(this.directFd, buf, offset);
          this.directBytes += buf.length;
          return;
        } catch (e) {
          if (!this.directRefused(e)) throw e;
        }
      }
      if (buf.length <= SYNC_MAX) {
        const t0 = performance.now();
        if (this.writeGate.open(t0)) {
          pwriteSync(this.fd, buf, offset);
          this.writeGate.record(t0, buf.length);
          return;
        }
      }
      if (buf.length <= BUFFERED_PIECE) await pwriteFull(this.fd, buf, offset);
      else await pwritevPieces(this.fd, [buf], offset);
    } catch (e) {
      throw wrap(this.name, e);
    }
  }

  async writev(bufs: Buffer[], offset: number): Promise<void> {
    if (this.readOnly) throw new StorageError(`${this.name}: read-only`, 'EROFS');
    if (this.writeLimit !== Infinity) {
      let end = offset;
      for (const b of bufs) end += b.length;
      if (end > this.writeLimit) this.above(end);
    }
    if (this.writeObservers.length) {
      let len = 0;
      for (const b of bufs) len += b.length;
      for (const o of this.writeObservers) o(offset, len);
    }
    return this.writevNow(bufs, offset);
  }

  private async writevNow(bufs: Buffer[], offset: number): Promise<void> {
    try {
      let bytes = 0, direct = this.directFd >= 0 && (offset & (DIRECT_ALIGN - 1)) === 0 && bufs.length <= 1024;
      for (const b of bufs) {
        bytes += b.length;
        if (direct && !isDirectBuffer(b)) direct = false;
      }
      if (direct && bytes >= DIRECT_MIN) {
        try {
          await pwritevFull(this.directFd, bufs, offset);
          this.directBytes += bytes;
          return;
        } catch (e) {
          if (!this.directRefused(e)) throw e;
        }
      }
      if (bytes <= SYNC_WRITEV_MAX && bufs.length <= 1024) {
        const t0 = performance.now();
        if (this.writeGate.open(t0)) {
          pwritevSync(this.fd, bufs, offset);
          this.writeGate.record(t0, bytes);
          return;
        }
      }
      await pwritevPieces(this.fd, bufs, offset);
    } catch (e) {
      throw wrap(this.name, e);
    }
  }

  /** Present only where the native hole-punching primitive loads (loaded on first use). */
  get punchHole(): ((offset: number, length: number) => Promise<void>) | undefined {
    const nfs = nativeFs();
    if (!nfs) return undefined;
    return async (offset: number, length: number): Promise<void> => {
      if (this.readOnly) throw new StorageError(`${this.name}: read-only`, 'EROFS');
      // The request as made counts, even the part past the end of the file.
      if (offset + length > this.writeLimit) this.above(offset + length);
      for (const o of this.writeObservers) o(offset, length);
      const end = Math.min(offset + length, await this.size());
      if (end <= offset) return;
      try {
        await nfs.trim(this.fd, offset, end - offset);
      } catch (e) {
        throw wrap(this.name, e);
      }
    };
  }

  watchWritesAbove(limit: number, fn: ((end: number) => void) | null): void {
    this.writeLimit = fn ? limit : Infinity;
    this.onAbove = fn;
  }

  /** A write ends past the armed limit: disarm, then tell the watcher. */
  private above(end: number): void {
    const fn = this.onAbove;
    this.writeLimit = Infinity;
    this.onAbove = null;
    fn?.(end);
  }

  get seekData(): ((offset: number) => number) | undefined {
    return nativeSeek() ? (offset: number): number => this.seek(offset, SEEK_DATA) : undefined;
  }

  get seekHole(): ((offset: number) => number) | undefined {
    return nativeSeek() ? (offset: number): number => this.seek(offset, SEEK_HOLE) : undefined;
  }

  private seek(offset: number, whence: number): number {
    try {
      return (nativeSeek() as NonNullable<ReturnType<typeof nativeSeek>>).seekSync(this.fd, offset, whence);
    } catch (e) {
      // ENXIO: no data (or no hole) at or after offset, i.e. offset is at or past the end.
      if ((e as NodeJS.ErrnoException).code === 'ENXIO') return whence === SEEK_DATA ? -1 : offset;
      throw wrap(this.name, e);
    }
  }

  async size(): Promise<number> {
    return new Promise((res, rej) => fs.fstat(this.fd, (err, st) => (err ? rej(wrap(this.name, err)) : res(st.size))));
  }

  async allocatedSize(): Promise<number> {
    return new Promise((res, rej) => fs.fstat(this.fd, (err, st) => (err ? rej(wrap(this.name, err)) : res(st.blocks * 512))));
  }

  async truncate(length: number): Promise<void> {
    return new Promise((res, rej) => fs.ftruncate(this.fd, length, (err) => (err ? rej(wrap(this.name, err)) : res())));
  }

  async flush(): Promise<void> {
    if (this.readOnly || this.noFlush) return;
    return new Promise((res, rej) => fs.fdatasync(this.fd, (err) => (err ? rej(wrap(this.name, err)) : res())));
  }

  async close(): Promise<void> {
    const fd = this.fd;
    if (fd < 0) return;
    this.fd = -1;
    for (const dfd of [this.directFd, this.retiredDirectFd]) {
      if (dfd >= 0) await new Promise<void>((res) => fs.close(dfd, () => res()));
    }
    this.directFd = this.retiredDirectFd = -1;
    return new Promise((res, rej) => fs.close(fd, (err) => (err ? rej(wrap(this.name, err)) : res())));
  }
}
