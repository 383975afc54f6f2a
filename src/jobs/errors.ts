/**
 * Job I/O error policies (QEMU's BlockdevOnError): what a job does when a read or write of its
 * copy fails. Errors of the copy step are tagged with the operation that failed, so the job can
 * report it in BLOCK_JOB_ERROR.
 */
import { QmpError } from '../daemon/graph.js';
import { optStr, type Args } from '../qmp/server.js';

export type OnError = 'report' | 'stop' | 'ignore' | 'enospc' | 'auto';
export type ErrorAction = 'report' | 'stop' | 'ignore';
export type IoOperation = 'read' | 'write';

const POLICIES: readonly OnError[] = ['report', 'stop', 'enospc', 'ignore', 'auto'];

/** An on-error style argument (default report). */
export function onErrorArg(a: Args, key: string): OnError {
  const v = optStr(a, key);
  if (v === undefined) return 'report';
  if (!(POLICIES as readonly string[]).includes(v)) throw new QmpError(`Parameter '${key}' does not accept value '${v}'`);
  return v as OnError;
}

/** A failed read or write of a job's copy; `cause` is the storage error. */
export class JobIoError extends Error {
  constructor(readonly operation: IoOperation, override readonly cause: unknown) {
    super(cause instanceof Error ? cause.message : String(cause));
  }

  get code(): string | undefined {
    return (this.cause as { code?: string } | null)?.code;
  }
}

/** Run `fn`, tagging a failure as a failed `operation`. */
export async function tagged<T>(operation: IoOperation, fn: () => Promise<T>): Promise<T> {
  try {
    return await fn();
  } catch (e) {
    throw e instanceof JobIoError ? e : new JobIoError(operation, e);
  }
}

/** QEMU's block_job_error_action: the action a policy takes for an error. */
export function actionFor(policy: OnError, code: string | undefined): ErrorAction {
  if (policy === 'enospc' || policy === 'auto') return code === 'ENOSPC' ? 'stop' : 'report';
  return policy;
}

/** The strerror text QEMU puts in BLOCK_JOB_COMPLETED's error for a failed job. */
export function jobErrorText(e: unknown): string {
  const code = e instanceof JobIoError ? e.code : (e as { code?: string } | null)?.code;
  const text: Record<string, string> = {
    ENOSPC: 'No space left on device', EFBIG: 'File too large', EIO: 'Input/output error', EROFS: 'Read-only file system',
    EACCES: 'Permission denied', EPERM: 'Operation not permitted', EINVAL: 'Invalid argument',
  };
  if (code && text[code]) return text[code];
  return e instanceof Error ? e.message : String(e);
}
