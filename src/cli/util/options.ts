/**
 * QEMU option strings (`-o key=val,key2=val2`) and size parsing on the command line
 * (`qemu_strtosz()`'s callers in qemu-img / qemu-io 7.2; the parser is src/util/strtosz.ts).
 *
 * @module
 */

import { CliError } from './errors.js';
import { INT64_MAX, qemuStrtosz } from '../../util/strtosz.js';

export { INT64_MAX, qemuStrtosz, type StrtoszOptions, type StrtoszResult } from '../../util/strtosz.js';

/** Options for {@link parseSizeBig} / {@link parseSize}. */
export interface ParseSizeOptions {
  /** What is being parsed, used in the messages (default `"image size"`). */
  name?: string;
  /** Minimum accepted value (default 0). */
  min?: bigint;
  /** Maximum accepted value (default INT64_MAX). */
  max?: bigint;
  /** Called with each deprecation warning text (print as `qemu-img: warning: <text>`). */
  onWarning?: (msg: string) => void;
}

/**
 * qemu-img's `cvtnum_full(name, value, min, max)`.  Throws a {@link CliError}
 * whose message holds the exact (possibly two-line) error text qemu-img
 * reports, each line to be prefixed with `qemu-img: `:
 * ```
 * Invalid image size specified. You may use k, M, G, T, P or E suffixes for
 * kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.
 * ```
 * or `Invalid image size specified. Must be between 0 and 9223372036854775807.`
 */
export function parseSizeBig(str: string, options: ParseSizeOptions = {}): bigint {
  const name = options.name ?? 'image size';
  const min = options.min ?? 0n;
  const max = options.max ?? INT64_MAX;
  const r = qemuStrtosz(str);
  for (const w of r.warnings) {
    options.onWarning?.(w);
  }
  if (!r.ok && r.error === 'EINVAL') {
    throw new CliError(
      `Invalid ${name} specified. You may use k, M, G, T, P or E suffixes for\n` +
        'kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.',
    );
  }
  if (!r.ok || r.value > max || r.value < min) {
    throw new CliError(`Invalid ${name} specified. Must be between ${min} and ${max}.`);
  }
  return r.value;
}

/**
 * Like {@link parseSizeBig} but returns a number.  Values above 2^53 lose
 * precision; use {@link parseSizeBig} where exact 64-bit values matter.
 */
export function parseSize(str: string, options: ParseSizeOptions = {}): number {
  return Number(parseSizeBig(str, options));
}

/** Result of {@link cvtnumRaw}: a non-negative value or QEMU's negative errno name. */
export type CvtnumResult = { ok: true; value: bigint; warnings: string[] } | { ok: false; error: 'EINVAL' | 'ERANGE'; warnings: string[] };

/** qemu-io's `cvtnum()`: `qemu_strtosz()` limited to INT64_MAX (larger is ERANGE). */
export function cvtnumRaw(s: string): CvtnumResult {
  const r = qemuStrtosz(s);
  if (r.ok && r.value > INT64_MAX) {
    return { ok: false, error: 'ERANGE', warnings: r.warnings };
  }
  return r;
}

/**
 * qemu-io's `print_cvtnum_err()` text (printed to **stdout** by qemu-io):
 * `Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- 1x`
 * or `Parsing error: argument too large -- 16E`.
 */
export function cvtnumErrorText(error: 'EINVAL' | 'ERANGE', arg: string): string {
  return error === 'EINVAL'
    ? `Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- ${arg}`
    : `Parsing error: argument too large -- ${arg}`;
}

/**
 * qemu-io `cvtnum()` + `print_cvtnum_err()`: returns the value (as a number;
 * offsets above 2^53 lose precision, use {@link cvtnumRaw} for exactness) or
 * throws a {@link CliError} whose message is the `Parsing error: ...` line.
 */
export function cvtnum(s: string, onWarning?: (msg: string) => void): number {
  const r = cvtnumRaw(s);
  for (const w of r.warnings) {
    onWarning?.(w);
  }
  if (!r.ok) {
    throw new CliError(cvtnumErrorText(r.error, s));
  }
  return Number(r.value);
}

/**
 * QemuOpts `parse_option_size()` (a size-typed `-o` option such as `size` or
 * `cluster_size`).  Throws {@link CliError} with the exact text:
 * `Value '16E' is out of range for parameter 'size'`, or
 * ```
 * Parameter 'size' expects a non-negative number below 2^64
 * Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-
 * and exabytes, respectively.
 * ```
 * (qemu-img prints the first line as `qemu-img: <file>: <line>` and the hint
 * lines unprefixed).  Values up to 2^64-1 are accepted.
 */
export function parseOptionSize(name: string, value: string): bigint {
  const r = qemuStrtosz(value);
  if (!r.ok && r.error === 'ERANGE') {
    throw new CliError(`Value '${value}' is out of range for parameter '${name}'`);
  }
  if (!r.ok) {
    throw new CliError(
      `Parameter '${name}' expects a non-negative number below 2^64\n` +
        'Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n' +
        'and exabytes, respectively.',
    );
  }
  return r.value;
}

// ---------------------------------------------------------------------------
// Option strings
// ---------------------------------------------------------------------------

/**
 * QEMU `get_opt_value()`: read a value starting at `pos` up to the first
 * single comma; `,,` stands for a literal comma.  Returns the value and the
 * index of the terminating comma (or the string length).
 */
export function getOptValue(s: string, pos = 0): { value: string; end: number } {
  let value = '';
  let p = pos;
  for (;;) {
    let offset = s.indexOf(',', p);
    if (offset < 0) {
      offset = s.length;
    }
    const escaped = offset < s.length && s[offset + 1] === ',';
    value += s.slice(p, offset + (escaped ? 1 : 0));
    if (!escaped) {
      return { value, end: offset };
    }
    p = offset + 2;
  }
}

/** Escape a value for an option string (`,` becomes `,,`), as `qemu_opts_print()` shows string options. */
export function escapeOptValue(s: string): string {
  return s.replace(/,/g, ',,');
}

/** `is_help_option()`: `help` or `?`. */
export function isHelpOption(s: string): boolean {
  return s === 'help' || s === '?';
}

/**
 * qemu-img `is_valid_option_list()`: not empty, not starting with `,`, and an
 * even number of trailing commas.
 */
export function isValidOptionList(s: string): boolean {
  if (s === '' || s[0] === ',') {
    return false;
  }
  let i = s.length;
  while (i > 0 && s[i - 1] === ',') {
    i--;
  }
  return (s.length - i) % 2 === 0;
}

/**
 * qemu-img `accumulate_options()`: merge repeated `-o` arguments as `a,b`.
 * Throws {@link CliError} `Invalid option list: <optarg>` for invalid lists.
 */
export function accumulateOptions(prev: string | undefined, optarg: string): string {
  if (!isValidOptionList(optarg)) {
    throw new CliError(`Invalid option list: ${optarg}`);
  }
  return prev === undefined ? optarg : `${prev},${optarg}`;
}

/**
 * `has_help_option()`: true if any comma separated element (with `,,`
 * escapes) is exactly `help` or `?`.  `size=help` does not count.
 */
export function hasHelpOption(s: string): boolean {
  let p = 0;
  while (p < s.length) {
    const { value, end } = getOptValue(s, p);
    p = end < s.length ? end + 1 : end;
    if (isHelpOption(value)) {
      return true;
    }
  }
  return false;
}

/** Options for {@link parseOptString}. */
export interface ParseOptStringOptions {
  /**
   * Name given to a leading element without `=` (QemuOpts "implied" first
   * option, e.g. `file` for `--image-opts`-style strings).  Default none.
   */
  firstname?: string;
  /** Keep `id=...` pairs (qemu_opts_do_parse() silently drops them). Default false. */
  keepId?: boolean;
}

/**
 * Split a QemuOpts option string like `qemu_opts_do_parse()` does:
 * - `key=value` pairs separated by `,`; in a value `,,` is a literal comma
 *   (names cannot contain commas);
 * - a bare `key` is the short-form boolean `key=on`, and `nokey` is
 *   `key=off` (so `help` and `?` give `['help','on']` / `['?','on']`; use
 *   {@link hasHelpOption} to detect help requests first);
 * - repeated keys are all returned, in order (QEMU: the last one wins);
 * - `id` pairs are dropped unless `keepId`.
 */
export function parseOptString(s: string, options: ParseOptStringOptions = {}): Array<[string, string]> {
  const out: Array<[string, string]> = [];
  let firstname = options.firstname;
  let p = 0;
  while (p < s.length) {
    let name: string;
    let value: string;
    const rest = s.slice(p);
    const m = /^[^=,]*/.exec(rest);
    const len = m === null ? 0 : m[0].length;
    if (rest[len] !== '=') {
      if (firstname !== undefined) {
        name = firstname;
        const v = getOptValue(s, p);
        value = v.value;
        p = v.end;
      } else {
        name = rest.slice(0, len);
        p += len;
        if (name.startsWith('no')) {
          name = name.slice(2);
          value = 'off';
        } else {
          value = 'on';
        }
      }
    } else {
      name = rest.slice(0, len);
      const v = getOptValue(s, p + len + 1);
      value = v.value;
      p = v.end;
    }
    if (s[p] === ',') {
      p++;
    }
    firstname = undefined;
    if (name === 'id' && !options.keepId) {
      continue;
    }
    out.push([name, value]);
  }
  return out;
}
