/**
 * QEMU's size parser (`qemu_strtosz()`, util/cutils.c in QEMU 7.2), shared by the command lines
 * and by json: filename options.
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
