/**
 * Human readable numbers exactly as QEMU 7.2 prints them.
 *
 * Two different formatters exist in QEMU:
 * - qemu-img uses `size_to_str()` (util/cutils.c): `"%0.3g %sB"` after scaling
 *   to the unit whose value is below 1000, e.g. `4 MiB`, `1.5 GiB`, `118 MiB`,
 *   `0 B`, `512 B`, `0.977 MiB` (1024000 bytes) and, a QEMU quirk,
 *   `1e+03 KiB` (1023488 bytes: 999.5 KiB rounds to 3 significant digits).
 * - qemu-io uses `cvtstr()` (qemu-io-cmds.c): `"%.3f"` plus ` KiB`/` MiB`/...
 *   for values of at least 1 KiB, `"%f"` plus ` bytes` below that, and the
 *   first `.000` (and everything after it) is cut off, e.g. `64 KiB`,
 *   `3.875 MiB`, `1.500 KiB`, `512 bytes`, `0 bytes`, `1 bytes`.
 *
 * The qemu-io statistics line (`print_report()` / `timestr()`, timespec
 * version used since QEMU 5.x):
 * ```
 * 64 KiB, 1 ops; 00.00 sec (24.962 MiB/sec and 399.3857 ops/sec)
 * 65536,1,0:00:00.00,94408470.487,1440.559            (-C)
 * ```
 * If the elapsed time has a whole-seconds part, the non-CSV form switches to
 * `H:MM:SS.ss` *without* the ` sec` suffix: `1 MiB, 1 ops; 0:00:01.50 (...)`.
 *
 * @module
 */

import { formatFixed, formatGeneral } from './printf.js';

const SIZE_SUFFIXES = ['', 'Ki', 'Mi', 'Gi', 'Ti', 'Pi', 'Ei'] as const;

const F64 = new Float64Array(1);
const U64 = new BigUint64Array(F64.buffer);

/** The exponent `e` returned by C `frexp(x, &e)` (x = m * 2^e, 0.5 <= m < 1). */
function frexpExponent(x: number): number {
  if (x === 0 || !Number.isFinite(x)) {
    return 0;
  }
  F64[0] = Math.abs(x);
  const bexp = Number((U64[0]! >> 52n) & 0x7ffn);
  if (bexp === 0) {
    // Subnormal: normalise by scaling.
    return frexpExponent(x * 2 ** 64) - 64;
  }
  return bexp - 1022;
}

/**
 * QEMU `size_to_str()`: the value with 3 significant digits (`%0.3g`) in the
 * largest IEC unit keeping it below 1000, plus `B`, e.g. `4 MiB`, `0 B`,
 * `1.5 KiB`, `118 MiB`, `0.977 MiB`, `1e+03 KiB`, `16 EiB`.
 * Accepts any uint64 (bigint for exact values above 2^53).
 */
export function sizeToStr(val: number | bigint): string {
  // The C code converts the uint64 to double (round to nearest).
  const d = typeof val === 'bigint' ? Number(val) : val;
  // frexp(val / (1000.0 / 1024.0), &i); i = (i - 1) / 10  (C division truncates)
  const e = frexpExponent(d / (1000.0 / 1024.0));
  const i = Math.trunc((e - 1) / 10);
  const div = 2 ** (i * 10);
  return `${formatGeneral(d / div, 3)} ${SIZE_SUFFIXES[i]}B`;
}

const KIB = 2 ** 10;
const MIB = 2 ** 20;
const GIB = 2 ** 30;
const TIB = 2 ** 40;
const PIB = 2 ** 50;
const EIB = 2 ** 60;

/**
 * qemu-io `cvtstr()`: `64 KiB`, `1 MiB`, `3.875 MiB`, `1.500 KiB`,
 * `512 bytes`, `0 bytes`.  Also used for rates (`24.962 MiB` in `.../sec`).
 * `Infinity` gives `inf EiB`, NaN gives `-nan bytes` (x86-64 0.0/0.0).
 */
export function cvtstr(value: number): string {
  let str: string;
  let suffix: string;
  if (value >= EIB) {
    suffix = ' EiB';
    str = formatFixed(value / EIB, 3);
  } else if (value >= PIB) {
    suffix = ' PiB';
    str = formatFixed(value / PIB, 3);
  } else if (value >= TIB) {
    suffix = ' TiB';
    str = formatFixed(value / TIB, 3);
  } else if (value >= GIB) {
    suffix = ' GiB';
    str = formatFixed(value / GIB, 3);
  } else if (value >= MIB) {
    suffix = ' MiB';
    str = formatFixed(value / MIB, 3);
  } else if (value >= KIB) {
    suffix = ' KiB';
    str = formatFixed(value / KIB, 3);
  } else {
    suffix = ' bytes';
    str = formatFixed(value, 6);
  }
  const trim = str.indexOf('.000');
  return trim >= 0 ? str.slice(0, trim) + suffix : str + suffix;
}

/** `0x` + lower case hex, as `%" PRIx64 "` with a `0x` prefix. */
function hex(n: number | bigint): string {
  return '0x' + n.toString(16);
}

/**
 * One line of qemu-io `map` (no trailing newline):
 * `128 KiB (0x20000) bytes     allocated at offset 0 bytes (0x0)` or
 * `3.875 MiB (0x3e0000) bytes not allocated at offset 128 KiB (0x20000)`.
 */
export function formatMapLine(bytes: number, offset: number, allocated: boolean): string {
  const retstr = allocated ? '    allocated' : 'not allocated';
  return `${cvtstr(bytes)} (${hex(bytes)}) bytes ${retstr} at offset ${cvtstr(offset)} (${hex(offset)})`;
}

/**
 * qemu-io `alloc` result line (no trailing newline):
 * `131072/4194304 bytes allocated at offset 0 bytes`,
 * `0/1048576 bytes allocated at offset 3 MiB`.
 */
export function formatAllocLine(allocatedBytes: number, count: number, offset: number): string {
  return `${allocatedBytes}/${count} bytes allocated at offset ${cvtstr(offset)}`;
}

/** qemu-io `length` output line (no trailing newline), e.g. `4 MiB`. */
export function formatLength(length: number): string {
  return cvtstr(length);
}

/** An elapsed time split like a `struct timespec`. */
export interface Elapsed {
  /** Whole seconds (tv_sec). */
  sec: number;
  /** Nanoseconds, 0..999999999 (tv_nsec). */
  nsec: number;
}

/** Convert seconds (number), nanoseconds (bigint, e.g. from `process.hrtime.bigint()`) or an {@link Elapsed}. */
export function toElapsed(t: number | bigint | Elapsed): Elapsed {
  if (typeof t === 'bigint') {
    return { sec: Number(t / 1_000_000_000n), nsec: Number(t % 1_000_000_000n) };
  }
  if (typeof t === 'number') {
    let sec = Math.floor(t);
    let nsec = Math.round((t - sec) * 1e9);
    if (nsec >= 1e9) {
      sec += 1;
      nsec -= 1e9;
    }
    return { sec, nsec };
  }
  return t;
}

/** qemu-io `tdiv()`: value per second. */
function tdiv(value: number, tv: Elapsed): number {
  const seconds = tv.sec + tv.nsec / 1e9;
  return value / seconds;
}

/**
 * qemu-io `timestr()`: `00.00 sec` when under one second (non-CSV),
 * otherwise / in CSV mode `H:MM:SS.ss` (e.g. `0:00:00.00`, `0:01:05.25`).
 */
export function timestr(t: number | bigint | Elapsed, verbose: boolean): string {
  const tv = toElapsed(t);
  const fracSec = tv.nsec / 1e9;
  if (verbose || tv.sec !== 0) {
    const hours = Math.trunc(tv.sec / 3600);
    const minutes = Math.trunc((tv.sec % 3600) / 60);
    const seconds = tv.sec % 60;
    return `${hours >>> 0}:${String(minutes >>> 0).padStart(2, '0')}:` +
      formatFixed(seconds + fracSec, 2, { width: 5, zeroPad: true });
  }
  return `${formatFixed(fracSec, 2, { width: 5, zeroPad: true })} sec`;
}

/**
 * The qemu-io statistics line printed after an I/O command (no trailing
 * newline): `64 KiB, 1 ops; 00.00 sec (51.846 MiB/sec and 414.7696 ops/sec)`,
 * or with `-C`: `65536,1,0:00:00.00,1414578341.859,21584.753`
 * (`bytes,ops,time,bytes/sec,ops/sec`).
 *
 * @param bytes total bytes transferred
 * @param ops number of operations (`-c count` for aio/bench-like commands, else 1)
 * @param seconds elapsed time: seconds as a number, nanoseconds as a bigint, or an {@link Elapsed}
 * @param csv the `-C` flag
 */
export function formatIoStats(bytes: number, ops: number, seconds: number | bigint | Elapsed, csv: boolean): string {
  const tv = toElapsed(seconds);
  const ts = timestr(tv, csv);
  if (!csv) {
    return `${cvtstr(bytes)}, ${ops} ops; ${ts} (${cvtstr(tdiv(bytes, tv))}/sec and ${formatFixed(tdiv(ops, tv), 4)} ops/sec)`;
  }
  return `${bytes},${ops},${ts},${formatFixed(tdiv(bytes, tv), 3)},${formatFixed(tdiv(ops, tv), 3)}`;
}

/**
 * qemu-io `print_report()` text including the trailing newline(s):
 * non-CSV prints two lines,
 * ```
 * wrote 65536/65536 bytes at offset 0
 * 64 KiB, 1 ops; 00.00 sec (24.962 MiB/sec and 399.3857 ops/sec)
 * ```
 * while CSV (`-C`) prints only the CSV line.
 *
 * @param op `read`, `wrote`, `discard`, ...
 * @param offset request offset
 * @param count requested byte count
 * @param total bytes actually transferred
 */
export function formatIoReport(
  op: string,
  offset: number,
  count: number,
  total: number,
  ops: number,
  seconds: number | bigint | Elapsed,
  csv: boolean,
): string {
  const stats = formatIoStats(total, ops, seconds, csv);
  if (csv) {
    return stats + '\n';
  }
  return `${op} ${total}/${count} bytes at offset ${offset}\n${stats}\n`;
}
