/**
 * Exact emulation of the glibc printf floating point conversions that QEMU's
 * tools use for human readable output (`%f`, `%.3f`, `%05.2f`, `%3.2f`,
 * `%0.3g`, `%e`).
 *
 * JavaScript's `toFixed`/`toPrecision` round ties away from zero, glibc rounds
 * the *exact* binary value of the double to nearest, ties to even (for example
 * glibc prints 15.625 with `%.2f` as `15.62`, `toFixed(2)` gives `15.63`).
 * These helpers work on the exact rational value of the double with BigInt
 * arithmetic, so the digits match glibc bit for bit.
 *
 * Special values follow glibc: `inf`, `-inf`, `nan`, `-nan`.  JavaScript
 * cannot observe the sign of a NaN, so a NaN is printed as `-nan` by default
 * (the x86-64 result of 0.0/0.0, which is where NaNs come from in qemu-io);
 * pass `nanSign: '+'` to get `nan`.
 *
 * @module
 */

/** Padding options mirroring a printf field width with the `0` flag. */
export interface FieldOptions {
  /** Minimum field width (printf width). */
  width?: number;
  /** Pad with zeros after the sign instead of spaces before it (printf `0` flag). */
  zeroPad?: boolean;
  /** Sign printed for NaN (`-` by default, see module documentation). */
  nanSign?: '-' | '+';
}

/** An exact non-negative rational `num / den` (den is a power of two). */
interface Rational {
  neg: boolean;
  num: bigint;
  den: bigint;
}

const F64 = new Float64Array(1);
const U64 = new BigUint64Array(F64.buffer);

/** Decompose a finite double into its exact rational value. */
function toRational(x: number): Rational {
  F64[0] = x;
  const bits = U64[0]!;
  const neg = (bits >> 63n) === 1n;
  const bexp = Number((bits >> 52n) & 0x7ffn);
  let mant = bits & 0xfffffffffffffn;
  let exp: number;
  if (bexp === 0) {
    exp = -1074;
  } else {
    mant |= 1n << 52n;
    exp = bexp - 1075;
  }
  if (exp >= 0) {
    return { neg, num: mant << BigInt(exp), den: 1n };
  }
  return { neg, num: mant, den: 1n << BigInt(-exp) };
}

/** Round `num/den` to the nearest integer, ties to even. */
function roundHalfEven(num: bigint, den: bigint): bigint {
  const q = num / den;
  const r = num % den;
  const twice = r * 2n;
  if (twice > den || (twice === den && (q & 1n) === 1n)) {
    return q + 1n;
  }
  return q;
}

const POW10_CACHE: bigint[] = [];
function pow10(n: number): bigint {
  let v = POW10_CACHE[n];
  if (v === undefined) {
    v = 10n ** BigInt(n);
    POW10_CACHE[n] = v;
  }
  return v;
}

function special(x: number, opts: FieldOptions | undefined): string | undefined {
  if (Number.isNaN(x)) {
    return (opts?.nanSign ?? '-') === '-' ? '-nan' : 'nan';
  }
  if (x === Infinity) {
    return 'inf';
  }
  if (x === -Infinity) {
    return '-inf';
  }
  return undefined;
}

/** Apply printf field width / zero padding to a converted number. */
function pad(s: string, opts: FieldOptions | undefined, isFinite: boolean): string {
  const width = opts?.width ?? 0;
  if (s.length >= width) {
    return s;
  }
  if (opts?.zeroPad && isFinite) {
    const signLen = s.startsWith('-') ? 1 : 0;
    return s.slice(0, signLen) + '0'.repeat(width - s.length) + s.slice(signLen);
  }
  return ' '.repeat(width - s.length) + s;
}

/** Digits of an integer scaled by 10^prec, with the decimal point inserted. */
function insertPoint(n: bigint, prec: number): string {
  let digits = n.toString();
  if (prec === 0) {
    return digits;
  }
  if (digits.length <= prec) {
    digits = '0'.repeat(prec - digits.length + 1) + digits;
  }
  return digits.slice(0, digits.length - prec) + '.' + digits.slice(digits.length - prec);
}

/**
 * `%.<prec>f` exactly as glibc prints it (default precision 6, like `%f`).
 *
 * @example formatFixed(15.625, 2) === '15.62'; formatFixed(512, 6) === '512.000000'
 */
export function formatFixed(x: number, prec = 6, opts?: FieldOptions): string {
  const sp = special(x, opts);
  if (sp !== undefined) {
    return pad(sp, opts, false);
  }
  const r = toRational(x);
  const scaled = roundHalfEven(r.num * pow10(prec), r.den);
  const body = insertPoint(scaled, prec);
  return pad((r.neg ? '-' : '') + body, opts, true);
}

/**
 * Decimal exponent and rounded significand for `%e` with `prec` digits after
 * the point: returns `[digits, exp10]` with `10^prec <= digits < 10^(prec+1)`
 * (or digits = 0 for zero).
 */
function eDigits(r: Rational, prec: number): [bigint, number] {
  if (r.num === 0n) {
    return [0n, 0];
  }
  // Estimate the exponent, then correct it with exact arithmetic.
  const approx = Number(r.num) / Number(r.den);
  let e = Number.isFinite(approx) && approx > 0
    ? Math.floor(Math.log10(approx))
    : Math.floor((r.num.toString().length - r.den.toString().length));
  for (let guard = 0; guard < 8; guard++) {
    // digits = round(value * 10^(prec - e))
    const shift = prec - e;
    let d: bigint;
    if (shift >= 0) {
      d = roundHalfEven(r.num * pow10(shift), r.den);
    } else {
      d = roundHalfEven(r.num, r.den * pow10(-shift));
    }
    if (d >= pow10(prec + 1)) {
      e += 1;
      continue;
    }
    if (d < pow10(prec)) {
      e -= 1;
      continue;
    }
    return [d, e];
  }
  /* c8 ignore next */
  throw new Error('formatExp: exponent search did not converge');
}

function expSuffix(e: number): string {
  const a = Math.abs(e);
  return 'e' + (e < 0 ? '-' : '+') + (a < 10 ? '0' : '') + String(a);
}

/** `%.<prec>e` exactly as glibc prints it (default precision 6). */
export function formatExp(x: number, prec = 6, opts?: FieldOptions): string {
  const sp = special(x, opts);
  if (sp !== undefined) {
    return pad(sp, opts, false);
  }
  const r = toRational(x);
  const [d, e] = eDigits(r, prec);
  const s = d.toString().padStart(prec + 1, '0');
  const mant = prec === 0 ? s : s[0] + '.' + s.slice(1);
  return pad((r.neg ? '-' : '') + mant + expSuffix(e), opts, true);
}

/**
 * `%.<prec>g` exactly as glibc prints it (default precision 6, precision 0 is
 * treated as 1).  Trailing zeros and a trailing point are removed.
 *
 * @example formatGeneral(999.6, 3) === '1e+03'; formatGeneral(1.5, 3) === '1.5'
 */
export function formatGeneral(x: number, prec = 6, opts?: FieldOptions): string {
  const sp = special(x, opts);
  if (sp !== undefined) {
    return pad(sp, opts, false);
  }
  const p = prec === 0 ? 1 : prec;
  const r = toRational(x);
  const [d, e] = eDigits(r, p - 1);
  let body: string;
  if (p > e && e >= -4) {
    // %f with precision p - 1 - e
    const fprec = p - 1 - e;
    const scaled = roundHalfEven(r.num * pow10(fprec), r.den);
    body = insertPoint(scaled, fprec);
    if (body.includes('.')) {
      body = body.replace(/0+$/, '').replace(/\.$/, '');
    }
  } else {
    const s = d.toString().padStart(p, '0');
    let mant = p === 1 ? s : s[0] + '.' + s.slice(1);
    if (mant.includes('.')) {
      mant = mant.replace(/0+$/, '').replace(/\.$/, '');
    }
    body = mant + expSuffix(e);
  }
  return pad((r.neg ? '-' : '') + body, opts, true);
}
