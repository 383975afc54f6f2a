/**
 * QEMU option strings (`-o key=val,key2=val2`) and size parsing
 * (`qemu_strtosz()` and its callers in qemu-img / qemu-io 7.2).
 *
 * Size syntax accepted by `qemu_strtosz()` (util/cutils.c, QEMU 7.2):
 * - leading whitespace and a `+` sign are allowed (strtoull rules); any `-`
 *   is rejected, except that a huge negative number is reported as out of
 *   range (the overflow check comes first);
 * - decimal integer, optional fraction (`1.5M`, `1.k`, `1.`), then an
 *   optional suffix `b/B` (bytes), `k/K`, `m/M`, `g/G`, `t/T`, `p/P`, `e/E`
 *   (binary multiples of 1024).  A non-zero fraction needs a suffix larger
 *   than bytes (`1.5` and `1.5b` are invalid, `1.0` is 1).  Exponents are
 *   rejected (`1e3`, `1.5e3k`), but `1e`/`1.5e` mean exabytes.  The
 *   fraction is computed in 64.64 fixed point and rounded half up
 *   (`12.345M` = 12944671);
 * - hexadecimal `0x...` without a fraction; a suffix is accepted with the
 *   warning `Using a multiplier suffix on hex numbers is deprecated: 0x10k`
 *   (note `b`/`B`/`e`/`E` are hex digits there);
 * - octal is not supported (`010` is ten); nothing may follow the number.
 *
 * @module
 */

import { CliError } from './errors.js';

/** 2^64 - 1 */
const U64_MAX = (1n << 64n) - 1n;
/** 2^63 - 1 */
export const INT64_MAX = (1n << 63n) - 1n;

/** Outcome of {@link qemuStrtosz}. */
export type StrtoszResult =
  | { ok: true; value: bigint; warnings: string[] }
  | { ok: false; error: 'EINVAL' | 'ERANGE'; warnings: string[] };

const isSpace = (c: string | undefined): boolean =>
  c === ' ' || c === '\t' || c === '\n' || c === '\v' || c === '\f' || c === '\r';

interface StrtoullResult {
  /** Parsed value (wrapped to uint64 for negative input, U64_MAX on overflow). */
  value: bigint;
  /** Index just after the parsed number (== start index when nothing was parsed). */
  end: number;
  /** 0, or 'EINVAL' (no conversion) / 'ERANGE' (overflow). */
  err: 0 | 'EINVAL' | 'ERANGE';
}

/** glibc `strtoull()` for base 10 or 16, wrapped like `qemu_strtou64()`. */
function strtoull(s: string, start: number, base: 10 | 16): StrtoullResult {
  let i = start;
  while (isSpace(s[i])) {
    i++;
  }
  let neg = false;
  if (s[i] === '+' || s[i] === '-') {
    neg = s[i] === '-';
    i++;
  }
  const digitVal = (c: string | undefined): number => {
    if (c === undefined) {
      return -1;
    }
    const v = parseInt(c, 16);
    if (Number.isNaN(v) || v >= base) {
      return -1;
    }
    return v;
  };
  if (base === 16 && s[i] === '0' && (s[i + 1] === 'x' || s[i + 1] === 'X') && digitVal(s[i + 2]) >= 0) {
    i += 2;
  }
  const digitsStart = i;
  let v = 0n;
  let overflow = false;
  const b = BigInt(base);
  while (digitVal(s[i]) >= 0) {
    v = v * b + BigInt(digitVal(s[i]));
    if (v > U64_MAX) {
      overflow = true;
    }
    i++;
  }
  if (i === digitsStart) {
    return { value: 0n, end: start, err: 'EINVAL' };
  }
  if (overflow) {
    return { value: U64_MAX, end: i, err: 'ERANGE' };
  }
  if (neg) {
    v = (-v) & U64_MAX;
  }
  return { value: v, end: i, err: 0 };
}

interface StrtodResult {
  value: number;
  end: number;
  err: 0 | 'EINVAL' | 'ERANGE';
}

/**
 * glibc `strtod()` restricted to what can follow the integral part in
 * `do_strtosz()`: the text starts with `.`.
 */
function strtodFraction(s: string, start: number): StrtodResult {
  const m = /^\.(\d+)([eE][+-]?\d+)?/.exec(s.slice(start));
  if (m === null) {
    return { value: 0, end: start, err: 'EINVAL' };
  }
  const text = m[0];
  const value = Number('0' + text);
  const end = start + text.length;
  if (!Number.isFinite(value)) {
    return { value: Infinity, end, err: 'ERANGE' };
  }
  const mantissaNonZero = /[1-9]/.test(m[1] ?? '');
  if (mantissaNonZero && value < 2.2250738585072014e-308) {
    // Underflow to zero or a subnormal: glibc sets ERANGE.
    return { value, end, err: 'ERANGE' };
  }
  return { value, end, err: 0 };
}

function suffixMul(c: string | undefined, unit: bigint): bigint {
  switch (c?.toUpperCase()) {
    case 'B':
      return 1n;
    case 'K':
      return unit;
    case 'M':
      return unit ** 2n;
    case 'G':
      return unit ** 3n;
    case 'T':
      return unit ** 4n;
    case 'P':
      return unit ** 5n;
    case 'E':
      return unit ** 6n;
    default:
      return -1n;
  }
}

/** `(uint64_t)(fraction * 0x1p64)` as compiled by GCC on x86-64 (2^64 wraps to 0). */
function fractionToFixed64(fraction: number): bigint {
  const scaled = fraction * 2 ** 64; // exact: scaling by a power of two
  if (!(scaled >= 0) || scaled >= 2 ** 64) {
    return 0n;
  }
  return BigInt(Math.trunc(scaled));
}

/** Options for {@link qemuStrtosz}. */
export interface StrtoszOptions {
  /** Suffix assumed when none is given: `'B'` (qemu_strtosz) or `'M'` (qemu_strtosz_MiB). */
  defaultSuffix?: 'B' | 'M';
  /** 1024 (qemu_strtosz) or 1000 (qemu_strtosz_metric). */
  unit?: 1024 | 1000;
}

/**
 * Exact port of QEMU 7.2 `qemu_strtosz(nptr, NULL, &result)` (the whole
 * string must be consumed).  Values are unsigned 64-bit, returned as bigint.
 * Deprecation warnings (hex with a suffix) are returned in `warnings`; QEMU
 * prints them as `<prog>: warning: <text>` even when parsing then fails.
 */
export function qemuStrtosz(nptr: string, options: StrtoszOptions = {}): StrtoszResult {
  const unit = BigInt(options.unit ?? 1024);
  const defaultSuffix = options.defaultSuffix ?? 'B';
  const warnings: string[] = [];
  let retval: 0 | 'EINVAL' | 'ERANGE';
  let endptr: number;
  let val = 0n;
  let valf = 0n;
  let hex = false;

  const finish = (): StrtoszResult => {
    if (endptr < nptr.length) {
      retval = 'EINVAL';
    }
    return retval === 0 ? { ok: true, value: val, warnings } : { ok: false, error: retval, warnings };
  };

  // Parse integral portion as decimal.
  const dec = strtoull(nptr, 0, 10);
  retval = dec.err;
  endptr = dec.end;
  val = dec.value;
  if (retval !== 0) {
    return finish();
  }
  if (nptr.slice(0, endptr).includes('-')) {
    endptr = 0;
    retval = 'EINVAL';
    return finish();
  }
  if (val === 0n && (nptr[endptr] === 'x' || nptr[endptr] === 'X')) {
    // Input looks like hex: reparse, and insist on no fraction.
    const h = strtoull(nptr, 0, 16);
    retval = h.err;
    endptr = h.end;
    val = h.value;
    if (retval !== 0) {
      return finish();
    }
    if (nptr[endptr] === '.') {
      endptr = 0;
      retval = 'EINVAL';
      return finish();
    }
    hex = true;
  } else if (nptr[endptr] === '.') {
    // A fraction; even "1.k" works.  An exponent makes the input invalid.
    const f = endptr;
    const d = strtodFraction(nptr, f);
    endptr = d.end;
    if (d.err !== 0) {
      // QEMU skips one character here and forgets the error (for EINVAL that
      // is the '.', for ERANGE it is whatever follows the number).
      endptr++;
    } else if (/[eE]/.test(nptr.slice(f, endptr))) {
      endptr = 0;
      retval = 'EINVAL';
      return finish();
    } else {
      valf = fractionToFixed64(d.value);
    }
  }
  let mul = suffixMul(nptr[endptr], unit);
  if (mul > 0n) {
    if (hex) {
      warnings.push(`Using a multiplier suffix on hex numbers is deprecated: ${nptr}`);
    }
    endptr++;
  } else {
    mul = suffixMul(defaultSuffix, unit);
  }
  if (mul === 1n) {
    // When a fraction is present, a scale is required.
    if (valf !== 0n) {
      endptr = 0;
      retval = 'EINVAL';
      return finish();
    }
  } else {
    // 64.64 fixed point times integer, rounding 0.5 upward.
    const fracProd = valf * mul;
    const low = fracProd & U64_MAX;
    const total = val * mul + (fracProd >> 64n) + (low >> 63n);
    if (total > U64_MAX) {
      retval = 'ERANGE';
      return finish();
    }
    val = total;
  }
  retval = 0;
  return finish();
}

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
