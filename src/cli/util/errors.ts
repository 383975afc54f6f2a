/**
 * Error types and stderr helpers shared by the qemu-img / qemu-io work-alikes.
 *
 * QEMU's `error_report()` prints `<program>: <message>\n` to stderr;
 * `warn_report()` prints `<program>: warning: <message>\n`; qemu-img's
 * `error_exit()` (used for command line mistakes) prints the error followed by
 * `Try 'qemu-img --help' for more information\n` and exits with status 1.
 *
 * @module
 */

/** Anything with a `write(string)` method (process.stdout, a socket, a test sink...). */
export interface TextSink {
  write(chunk: string): unknown;
}

/**
 * An error that should end the command with `exitCode` after its message has
 * been shown.  `message` is the text without the `program: ` prefix; it may
 * span several lines (each line is reported with the prefix by
 * {@link reportError}, matching consecutive `error_report()` calls).
 */
export class CliError extends Error {
  /** Process exit status to use (QEMU tools use 1 for every failure). */
  exitCode: number;

  constructor(message: string, exitCode = 1) {
    super(message);
    this.name = 'CliError';
    this.exitCode = exitCode;
  }
}

/**
 * A command line usage mistake (bad option, missing argument...).  For
 * qemu-img these are printed by {@link formatErrorExit}, i.e. followed by the
 * `Try 'qemu-img --help'` hint.
 */
export class UsageError extends CliError {
  constructor(message: string, exitCode = 1) {
    super(message, exitCode);
    this.name = 'UsageError';
  }
}

/** Hint lines QEMU appends to an error without the program prefix (error_append_hint). */
const HINT_LINE = new RegExp('^(' + [
  'Is another process using the image \\[.*\\]\\?',
  'Try block-dirty-bitmap-remove to delete this bitmap from disk',
  "Try --skip-broken-bitmaps, or use 'qemu-img bitmap --remove' to delete it",
  'Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-',
  'and exabytes, respectively\\.',
  'Could not open backing image\\.',
  'You can force-remove this extra metadata with qemu-img check -r all',
  "Try the 'qcow2' driver instead\\.",
].join('|') + ')$');

/** `program: msg\n` for every line of `msg` (QEMU's `error_report()` format); hint lines unprefixed. */
export function formatError(program: string, msg: string): string {
  return msg.split('\n').map((line) => (HINT_LINE.test(line) ? `${line}\n` : `${program}: ${line}\n`)).join('');
}

/** `program: warning: msg\n` (QEMU's `warn_report()` format). */
export function formatWarning(program: string, msg: string): string {
  return `${program}: warning: ${msg}\n`;
}

/**
 * The text of qemu-img's `error_exit()`:
 * `qemu-img: <msg>\nTry 'qemu-img --help' for more information\n`.
 */
export function formatErrorExit(program: string, msg: string): string {
  return `${program}: ${msg}\nTry '${program} --help' for more information\n`;
}

/**
 * Print `program: msg` (one prefixed line per line of `msg`) to `out`
 * (stderr by default).  It does not exit; throw a {@link CliError} or return
 * the exit status yourself.
 */
export function fatal(program: string, msg: string, out: TextSink = process.stderr): void {
  out.write(formatError(program, msg));
}

/** Print `program: warning: msg` to `out` (stderr by default). */
export function warn(program: string, msg: string, out: TextSink = process.stderr): void {
  out.write(formatWarning(program, msg));
}

/**
 * Report any error the way the tools do and return the exit status:
 * a {@link UsageError} gets the qemu-img `Try '... --help'` hint when
 * `tryHelp` is true, other {@link CliError}s are printed with
 * {@link formatError}; anything else is printed as `program: <message>` with
 * status 1.
 */
export function reportError(program: string, err: unknown, out: TextSink = process.stderr, tryHelp = true): number {
  if (err instanceof UsageError && tryHelp) {
    out.write(formatErrorExit(program, err.message));
    return err.exitCode;
  }
  if (err instanceof CliError) {
    out.write(formatError(program, err.message));
    return err.exitCode;
  }
  const msg = err instanceof Error ? err.message : String(err);
  out.write(formatError(program, msg));
  return 1;
}
