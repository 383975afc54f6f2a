/**
 * Storage back ends: byte-addressed containers that format drivers sit on.
 * Every method is positional; many requests may be in flight at once.
 */
export interface Storage {
  /** Human-readable name (file path or "memory:…"), used in messages. */
  readonly name: string;
  readonly readOnly: boolean;
  /** Large aligned writes bypass the host's page cache (O_DIRECT); absent means no. */
  readonly direct?: boolean;
  /** Read up to buf.length bytes at `offset`; bytes past the end read as zero. */
  read(buf: Buffer, offset: number): Promise<void>;
  /**
   * Read synchronously when that is cheap (small and served from the page cache); false means
   * nothing was read and `read` must be used. Optional.
   */
  readSync?(buf: Buffer, offset: number): boolean;
  /** Write all of buf at `offset`, growing the container if needed. */
  write(buf: Buffer, offset: number): Promise<void>;
  /** Write several buffers back to back starting at `offset` (one request where possible). */
  writev(bufs: Buffer[], offset: number): Promise<void>;
  /** Current length in bytes. */
  size(): Promise<number>;
  truncate(length: number): Promise<void>;
  /** Make completed writes durable. */
  flush(): Promise<void>;
  /**
   * Make [offset, offset+length) read as zero and give its space back where the host allows
   * (hole punching); the length of the container is unchanged. Absent when not supported.
   */
  punchHole?(offset: number, length: number): Promise<void>;
  /**
   * Sparse-file queries (lseek SEEK_DATA / SEEK_HOLE): the first data byte at or after `offset`
   * (-1 when only holes follow), and the first hole byte at or after `offset` (end of file counts
   * as a hole). Absent when the host cannot tell.
   */
  seekData?(offset: number): number;
  seekHole?(offset: number): number;
  /**
   * Call `fn` once, with the request's end, for the first write (data, vector, hole punch) that
   * ends past `limit`; then disarm. `fn` null disarms. Optional (the daemon's write threshold on
   * a protocol node).
   */
  watchWritesAbove?(limit: number, fn: ((end: number) => void) | null): void;
  /** Told each write's range (data, vector, hole punch) as it is issued (optional: the daemon's protocol-node bitmaps). */
  readonly writeObservers?: Array<(offset: number, length: number) => void>;
  /** Bytes actually allocated on the host (st_blocks*512 for files). */
  allocatedSize(): Promise<number>;
  close(): Promise<void>;
}

/** Error raised with a one-line message fit to show a user. */
export class StorageError extends Error {
  constructor(message: string, readonly code?: string) {
    super(message);
    this.name = 'StorageError';
  }
}

/** The strerror text QEMU prints for common errno codes. */
export function errnoText(code: string | undefined): string {
  switch (code) {
    case 'ENOENT': return 'No such file or directory';
    case 'EACCES': return 'Permission denied';
    case 'EPERM': return 'Operation not permitted';
    case 'EISDIR': return 'Is a directory';
    case 'ENOSPC': return 'No space left on device';
    case 'EROFS': return 'Read-only file system';
    case 'EINVAL': return 'Invalid argument';
    case 'EIO': return 'Input/output error';
    case 'ENOTDIR': return 'Not a directory';
    case 'EFBIG': return 'File too large';
    case 'ENOMEM': return 'Cannot allocate memory';
    case 'ELOOP': return 'Too many levels of symbolic links';
    case 'EADDRINUSE': return 'Address already in use';
    case 'EADDRNOTAVAIL': return 'Cannot assign requested address';
    case 'ENAMETOOLONG': return 'File name too long';
    default: return code ?? 'Unknown error';
  }
}
