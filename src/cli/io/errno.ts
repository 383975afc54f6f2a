/**
 * errno handling for the qemu-io work-alike: failures of I/O requests are reported the way
 * qemu-io prints `strerror(-ret)` (`read failed: Input/output error`), so every error thrown by
 * the engine is reduced to an errno name first.
 *
 * @module
 */
import { ImageError } from '../../image/errors.js';
import { StorageError } from '../../storage/storage.js';

/** An I/O failure with a known errno, raised by the session layer itself (EIO on bounds, ...). */
export class IoErrno extends Error {
  constructor(readonly errno: string) {
    super(strerror(errno));
    this.name = 'IoErrno';
  }
}

/** glibc's strerror() texts for the errnos the tools can meet. */
const TEXTS: Record<string, string> = {
  EPERM: 'Operation not permitted',
  ENOENT: 'No such file or directory',
  EIO: 'Input/output error',
  E2BIG: 'Argument list too long',
  EBADF: 'Bad file descriptor',
  EAGAIN: 'Resource temporarily unavailable',
  ENOMEM: 'Cannot allocate memory',
  EACCES: 'Permission denied',
  EFAULT: 'Bad address',
  EBUSY: 'Device or resource busy',
  EEXIST: 'File exists',
  ENODEV: 'No such device',
  ENOTDIR: 'Not a directory',
  EISDIR: 'Is a directory',
  EINVAL: 'Invalid argument',
  ENFILE: 'Too many open files in system',
  EMFILE: 'Too many open files',
  EFBIG: 'File too large',
  ENOSPC: 'No space left on device',
  ESPIPE: 'Illegal seek',
  EROFS: 'Read-only file system',
  EPIPE: 'Broken pipe',
  EDOM: 'Numerical argument out of domain',
  ERANGE: 'Numerical result out of range',
  ELOOP: 'Too many levels of symbolic links',
  ENAMETOOLONG: 'File name too long',
  ENOTSUP: 'Operation not supported',
  EOPNOTSUPP: 'Operation not supported',
  ENOMEDIUM: 'No medium found',
  EDQUOT: 'Disk quota exceeded',
  ENXIO: 'No such device or address',
  ETIMEDOUT: 'Connection timed out',
  ECANCELED: 'Operation canceled',
};

/** `strerror()` for an errno name (`EIO` → `Input/output error`). */
export function strerror(errno: string): string {
  return TEXTS[errno] ?? errno;
}

/**
 * The errno an error stands for, or null when it is not an I/O error at all (a programming
 * error, which the caller lets escape as `qemu-io: <message>`).
 * Engine errors without an errno are I/O errors (EIO), as QEMU reports metadata problems.
 */
export function errnoOf(e: unknown): string | null {
  if (e instanceof IoErrno) return e.errno;
  if (e instanceof ImageError) return e.errno && /^E[A-Z0-9]+$/.test(e.errno) ? e.errno : 'EIO';
  if (e instanceof StorageError) return e.code && /^E[A-Z0-9]+$/.test(e.code) ? e.code : 'EIO';
  const code = (e as NodeJS.ErrnoException | null)?.code;
  if (typeof code === 'string' && /^E[A-Z0-9]+$/.test(code) && TEXTS[code]) return code;
  return null;
}
