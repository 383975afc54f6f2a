/**
 * The qemu-io 7.2 commands (qemu-io-cmds.c plus open/close/quit from qemu-io.c), with their
 * option parsing, argument checks and messages reproduced exactly. A command returns 0 on
 * success and a negative number when it failed (the exit status of the run becomes 1).
 *
 * Output goes where qemu-io sends it: results, usage lines and most argument errors to stdout;
 * getopt diagnostics, `bad argument count`, `command not found`, `no file open` and
 * `error_report()` messages (`qemu-io: ...`) to stderr.
 *
 * @module
 */
import fs from 'node:fs';
import { getopt, GetoptError, formatGetoptError, type ParsedOption } from '../util/getopt.js';
import { cvtnumRaw, cvtnumErrorText, parseOptString } from '../util/options.js';
import { cvtstr, formatAllocLine, formatIoReport, formatLength, formatMapLine } from '../util/human.js';
import { Qcow2Image } from '../../qcow2/image.js';
import { errnoOf, strerror, IoErrno } from './errno.js';
import { IoSession, MAX_REQUEST, type OpenRequest } from './session.js';
import * as H from './help.js';

/** EINVAL as qemu-io's commands return it. */
const EINVAL = -22;

export interface CommandInfo {
  name: string;
  altname?: string;
  /** The argument synopsis (null: none, printed as nothing; '' prints an extra space, as for map). */
  args: string | null;
  oneline: string;
  help?: string;
  argmin: number;
  argmax: number;
  /** 'global': runs without a file (help, quit); 'nofile': may run without a file (open, sleep, ...). */
  flags?: 'global' | 'nofile';
  /** Needs write permission (refused with "Block node is read-only" on a read-only image). */
  write?: boolean;
  fn: (s: IoSession, argv: string[]) => Promise<number>;
}

// ---- helpers -------------------------------------------------------------------------------------

function usage(s: IoSession, ci: CommandInfo): number {
  s.out(`${ci.name} ${ci.args ?? '(null)'} -- ${ci.oneline}\n`);
  return EINVAL;
}

/** qemu-io's cvtnum() + print_cvtnum_err(): the value, or null after printing the error. */
function cvt(s: IoSession, arg: string): bigint | null {
  const r = cvtnumRaw(arg);
  for (const w of r.warnings) s.err(`qemu-io: warning: ${w}\n`);
  if (!r.ok) {
    s.out(cvtnumErrorText(r.error, arg) + '\n');
    return null;
  }
  return r.value;
}

/** glibc strtol(s, &end, 0): the value and whether the whole string was consumed. */
function strtol0(str: string): { value: bigint; complete: boolean } {
  let i = 0;
  while (i < str.length && ' \t\n\v\f\r'.includes(str[i])) i++;
  let neg = false;
  if (str[i] === '+' || str[i] === '-') {
    neg = str[i] === '-';
    i++;
  }
  let base = 10;
  if (str[i] === '0' && (str[i + 1] === 'x' || str[i + 1] === 'X') && /[0-9a-fA-F]/.test(str[i + 2] ?? '')) {
    base = 16;
    i += 2;
  } else if (str[i] === '0') {
    base = 8;
  }
  const start = i;
  let v = 0n;
  for (; i < str.length; i++) {
    const d = parseInt(str[i], 16);
    if (Number.isNaN(d) || d >= base) break;
    v = v * BigInt(base) + BigInt(d);
  }
  if (i === start) return { value: 0n, complete: str.length === 0 };
  const LONG_MAX = (1n << 63n) - 1n;
  if (v > LONG_MAX) v = neg ? LONG_MAX + 1n : LONG_MAX;
  return { value: neg ? -v : v, complete: i === str.length };
}

/** parse_pattern(): a byte value, or -1 after printing `X is not a valid pattern byte`. */
function parsePattern(s: IoSession, arg: string): number {
  const r = strtol0(arg);
  if (r.value < 0n || r.value > 255n || !r.complete) {
    s.out(`${arg} is not a valid pattern byte\n`);
    return -1;
  }
  return Number(r.value);
}

/** What an option handler asks for: go on (true), or stop the command with this return value. */
type OptResult = true | number;

/**
 * Run getopt() over a command's argv and feed each option to `handler` in order, as qemu-io's
 * `while ((c = getopt(...)) != -1)` loops do. Returns the remaining arguments, or the command's
 * return value when an option stopped it (after printing the diagnostic and usage).
 */
function parseOptions(s: IoSession, ci: CommandInfo, argv: string[], spec: string, handler: (opt: string, arg: string) => OptResult): string[] | number {
  const args = argv.slice(1);
  let parsed: { opts: ParsedOption[]; rest: string[] };
  try {
    parsed = getopt(args, spec, null, { argv0: argv[0] });
  } catch (e) {
    if (!(e instanceof GetoptError)) throw e;
    // The options before the bad one were handled first (and may stop the command themselves).
    let before: ParsedOption[] = [];
    for (let k = args.length - 1; k >= 0; k--) {
      try {
        before = getopt(args.slice(0, k), spec, null, { argv0: argv[0] }).opts;
        break;
      } catch {
        /* shorter */
      }
    }
    for (const o of before) {
      const r = handler(o.opt, o.arg ?? '');
      if (r !== true) return r;
    }
    s.err(formatGetoptError(argv[0], e));
    return usage(s, ci);
  }
  for (const o of parsed.opts) {
    const r = handler(o.opt, o.arg ?? '');
    if (r !== true) return r;
  }
  return parsed.rest;
}

/** Run an I/O request; on failure print `<label> failed: <strerror>` and return null. */
async function timed(s: IoSession, label: string, fn: () => Promise<void>): Promise<bigint | null> {
  const t1 = process.hrtime.bigint();
  try {
    await fn();
  } catch (e) {
    const code = errnoOf(e);
    if (code === null) throw e;
    s.out(`${label} failed: ${strerror(code)}\n`);
    return null;
  }
  return process.hrtime.bigint() - t1;
}

function isAlnum(c: number): boolean {
  return (c >= 0x30 && c <= 0x39) || (c >= 0x41 && c <= 0x5a) || (c >= 0x61 && c <= 0x7a);
}

/** dump_buffer(): `00000000:  cd cd ...  ................` */
function dumpBuffer(s: IoSession, buf: Buffer, offset: number): void {
  let out = '';
  for (let i = 0; i < buf.length; i += 16) {
    const n = Math.min(16, buf.length - i);
    let line = (offset + i).toString(16).padStart(8, '0') + ':  ';
    for (let j = 0; j < n; j++) line += buf[i + j].toString(16).padStart(2, '0') + ' ';
    line += ' ';
    for (let j = 0; j < n; j++) line += isAlnum(buf[i + j]) ? String.fromCharCode(buf[i + j]) : '.';
    out += line + '\n';
    if (out.length >= 1 << 16) {
      s.out(out);
      out = '';
    }
  }
  if (out) s.out(out);
}

function matchesPattern(buf: Buffer, pattern: number): boolean {
  const chunk = Buffer.alloc(Math.min(buf.length, 1 << 20), pattern);
  for (let p = 0; p < buf.length; p += chunk.length) {
    const n = Math.min(chunk.length, buf.length - p);
    if (!buf.subarray(p, p + n).equals(chunk.subarray(0, n))) return false;
  }
  return true;
}

/** create_iovec(): the total length of the vector, or null after printing the error. */
function iovecLength(s: IoSession, args: string[]): number | null {
  let count = 0n;
  const max = BigInt(MAX_REQUEST);
  for (const arg of args) {
    const len = cvt(s, arg);
    if (len === null) return null;
    if (len > max) {
      s.out(`Argument '${arg}' exceeds maximum size ${MAX_REQUEST}\n`);
      return null;
    }
    if (count > max - len) {
      s.out(`The total number of bytes exceed the maximum size ${MAX_REQUEST}\n`);
      return null;
    }
    count += len;
  }
  return Number(count);
}

/** qemu_io_alloc_from_file(): `len` bytes of the file, repeated cyclically; null after an error. */
function bufferFromFile(s: IoSession, file: string, len: number): Buffer | null {
  let fd: number;
  try {
    fd = fs.openSync(file, 'r');
  } catch (e) {
    s.err(`${file}: ${strerror((e as NodeJS.ErrnoException).code ?? 'EIO')}\n`);
    return null;
  }
  const buf = Buffer.alloc(len);
  let got = 0;
  try {
    while (got < len) {
      const n = fs.readSync(fd, buf, got, len - got, null);
      if (n === 0) break;
      got += n;
    }
  } catch (e) {
    s.err(`${file}: ${strerror((e as NodeJS.ErrnoException).code ?? 'EIO')}\n`);
    return null;
  } finally {
    fs.closeSync(fd);
  }
  if (got === 0) {
    s.err(`${file}: file is empty\n`);
    return null;
  }
  for (let p = got; p < len; p += got) buf.copy(buf, p, 0, Math.min(got, len - p));
  return buf;
}

function notSectorAligned(s: IoSession, value: bigint, what: 'offset' | 'count'): boolean {
  if (value % 512n === 0n) return false;
  s.out(`${value} is not a sector-aligned value for '${what}'\n`);
  return true;
}

const CACHE_MODES = ['off', 'none', 'directsync', 'writeback', 'unsafe', 'writethrough'];
const AIO_MODES = ['threads', 'native', 'io_uring'];

/** bdrv_parse_discard_flags(): true = unmap, false = ignore, null = invalid. */
export function parseDiscardMode(mode: string): boolean | null {
  if (mode === 'off' || mode === 'ignore') return false;
  if (mode === 'on' || mode === 'unmap') return true;
  return null;
}

export function isCacheMode(mode: string): boolean {
  return CACHE_MODES.includes(mode);
}

/** Cache modes with cache.direct=on. */
export function isDirectCacheMode(mode: string): boolean {
  return mode === 'none' || mode === 'off' || mode === 'directsync';
}

export function isAioMode(mode: string): boolean {
  return AIO_MODES.includes(mode);
}

// ---- read / write --------------------------------------------------------------------------------

async function readF(s: IoSession, argv: string[]): Promise<number> {
  let C = false, q = false, v = false, P = false, sflag = false, lflag = false, b = false;
  let pattern = 0;
  let patOff = 0n, patCount = 0n;
  const rest = parseOptions(s, READ, argv, 'bCl:pP:qs:v', (o, a) => {
    switch (o) {
      case 'b': b = true; break;
      case 'C': C = true; break;
      case 'l': {
        lflag = true;
        const n = cvt(s, a);
        if (n === null) return EINVAL;
        patCount = n;
        break;
      }
      case 'P':
        P = true;
        pattern = parsePattern(s, a);
        if (pattern < 0) return EINVAL;
        break;
      case 'q': q = true; break;
      case 's': {
        sflag = true;
        const n = cvt(s, a);
        if (n === null) return EINVAL;
        patOff = n;
        break;
      }
      case 'v': v = true; break;
    }
    return true;
  });
  if (typeof rest === 'number') return rest;
  if (rest.length !== 2) return usage(s, READ);
  const range = offsetAndCount(s, rest);
  if (range === null) return EINVAL;
  const { offset, count } = range;
  if (!P && (lflag || sflag)) return usage(s, READ);
  if (!lflag) patCount = count - patOff;
  if (patCount < 0n || patCount + patOff > count) {
    s.out('pattern verification range exceeds end of read data\n');
    return EINVAL;
  }
  if (b && (notSectorAligned(s, offset, 'offset') || notSectorAligned(s, count, 'count'))) return EINVAL;
  let buf: Buffer = Buffer.alloc(0);
  const t = await timed(s, 'read', async () => {
    if (b) throw new IoErrno('ENOTSUP'); // the VM state area is not supported
    buf = await s.read(offset, Number(count));
  });
  if (t === null) return -5;
  let ret = 0;
  if (P) {
    const part = buf.subarray(Number(patOff), Number(patOff + patCount));
    if (!matchesPattern(part, pattern)) {
      s.out(`Pattern verification failed at offset ${offset + patOff}, ${patCount} bytes\n`);
      ret = EINVAL;
    }
  }
  if (q) return ret;
  if (v) dumpBuffer(s, buf, Number(offset));
  s.out(formatIoReport('read', Number(offset), Number(count), Number(count), 1, t, C));
  return ret;
}

async function readvF(s: IoSession, argv: string[]): Promise<number> {
  let C = false, q = false, v = false, P = false, pattern = 0;
  const rest = parseOptions(s, READV, argv, 'CP:qv', (o, a) => {
    switch (o) {
      case 'C': C = true; break;
      case 'P':
        P = true;
        pattern = parsePattern(s, a);
        if (pattern < 0) return EINVAL;
        break;
      case 'q': q = true; break;
      case 'v': v = true; break;
    }
    return true;
  });
  if (typeof rest === 'number') return rest;
  if (rest.length < 2) return usage(s, READV);
  const offset = cvt(s, rest[0]);
  if (offset === null) return EINVAL;
  const size = iovecLength(s, rest.slice(1));
  if (size === null) return EINVAL;
  let buf: Buffer = Buffer.alloc(0);
  const t = await timed(s, 'readv', async () => {
    buf = await s.read(offset, size);
  });
  if (t === null) return -5;
  let ret = 0;
  if (P && !matchesPattern(buf, pattern)) {
    s.out(`Pattern verification failed at offset ${offset}, ${size} bytes\n`);
    ret = EINVAL;
  }
  if (q) return ret;
  if (v) dumpBuffer(s, buf, Number(offset));
  s.out(formatIoReport('read', Number(offset), size, size, 1, t, C));
  return ret;
}

async function writeF(s: IoSession, argv: string[]): Promise<number> {
  let C = false, q = false, b = false, P = false, z = false, c = false, sflag = false;
  let fua = false, noFallback = false, mayUnmap = false;
  let pattern = 0xcd;
  let file = '';
  const rest = parseOptions(s, WRITE, argv, 'bcCfnpP:qs:uz', (o, a) => {
    switch (o) {
      case 'b': b = true; break;
      case 'c': c = true; break;
      case 'C': C = true; break;
      case 'f': fua = true; break;
      case 'n': noFallback = true; break;
      case 'P':
        P = true;
        pattern = parsePattern(s, a);
        if (pattern < 0) return EINVAL;
        break;
      case 'q': q = true; break;
      case 's': sflag = true; file = a; break;
      case 'u': mayUnmap = true; break;
      case 'z': z = true; break;
    }
    return true;
  });
  if (typeof rest === 'number') return rest;
  if (rest.length !== 2) return usage(s, WRITE);
  if (b && z) {
    s.out('-b and -z cannot be specified at the same time\n');
    return EINVAL;
  }
  if (fua && (b || c)) {
    s.out('-f and -b or -c cannot be specified at the same time\n');
    return EINVAL;
  }
  if (noFallback && !z) {
    s.out('-n requires -z to be specified\n');
    return EINVAL;
  }
  if (mayUnmap && !z) {
    s.out('-u requires -z to be specified\n');
    return EINVAL;
  }
  if (Number(z) + Number(P) + Number(sflag) > 1) {
    s.out('Only one of -z, -P, and -s can be specified at the same time\n');
    return EINVAL;
  }
  const range = offsetAndCount(s, rest, noFallback, ' without -n');
  if (range === null) return EINVAL;
  const { offset, count } = range;
  if ((b || c) && (notSectorAligned(s, offset, 'offset') || notSectorAligned(s, count, 'count'))) return EINVAL;
  let buf: Buffer | null = null;
  if (!z) {
    if (sflag) {
      buf = bufferFromFile(s, file, Number(count));
      if (buf === null) return EINVAL;
    } else {
      buf = Buffer.alloc(Number(count), pattern);
    }
  }
  const t = await timed(s, 'write', async () => {
    if (b) throw new IoErrno('ENOTSUP'); // the VM state area is not supported
    if (z) await s.writeZeroes(offset, Number(count), mayUnmap, noFallback);
    else if (c) await s.writeCompressed(offset, buf as Buffer);
    else await s.write(offset, buf as Buffer);
    if (fua) await s.flush();
  });
  if (t === null) return -5;
  if (q) return 0;
  s.out(formatIoReport('wrote', Number(offset), Number(count), Number(count), 1, t, C));
  return 0;
}

async function writevF(s: IoSession, argv: string[]): Promise<number> {
  let C = false, q = false, fua = false, pattern = 0xcd;
  const rest = parseOptions(s, WRITEV, argv, 'CfqP:', (o, a) => {
    switch (o) {
      case 'C': C = true; break;
      case 'f': fua = true; break;
      case 'q': q = true; break;
      case 'P':
        pattern = parsePattern(s, a);
        if (pattern < 0) return EINVAL;
        break;
    }
    return true;
  });
  if (typeof rest === 'number') return rest;
  if (rest.length < 2) return usage(s, WRITEV);
  const offset = cvt(s, rest[0]);
  if (offset === null) return EINVAL;
  const size = iovecLength(s, rest.slice(1));
  if (size === null) return EINVAL;
  const buf = Buffer.alloc(size, pattern);
  const t = await timed(s, 'writev', async () => {
    await s.write(offset, buf);
    if (fua) await s.flush();
  });
  if (t === null) return -5;
  if (q) return 0;
  s.out(formatIoReport('wrote', Number(offset), size, size, 1, t, C));
  return 0;
}

/** aio_read: like readv, but completed later (see IoSession.submitAio); failures do not fail the command. */
async function aioReadF(s: IoSession, argv: string[]): Promise<number> {
  let C = false, q = false, v = false, P = false, pattern = 0;
  const rest = parseOptions(s, AIO_READ, argv, 'CP:iqv', (o, a) => {
    switch (o) {
      case 'C': C = true; break;
      case 'P':
        P = true;
        pattern = parsePattern(s, a);
        if (pattern < 0) return EINVAL;
        break;
      case 'i':
        s.out('injecting invalid read request\n');
        return 0;
      case 'q': q = true; break;
      case 'v': v = true; break;
    }
    return true;
  });
  if (typeof rest === 'number') return rest;
  if (rest.length < 2) return usage(s, AIO_READ);
  const offset = cvt(s, rest[0]);
  if (offset === null) return EINVAL;
  const size = iovecLength(s, rest.slice(1));
  if (size === null) return EINVAL;
  s.submitAio(offset, size, false, true, (code) => s.out(`readv failed: ${strerror(code)}\n`), async () => {
    let buf: Buffer = Buffer.alloc(0);
    const t = await timed(s, 'readv', async () => {
      buf = await s.read(offset, size);
    });
    if (t === null) return;
    if (P && !matchesPattern(buf, pattern)) s.out(`Pattern verification failed at offset ${offset}, ${size} bytes\n`);
    if (q) return;
    if (v) dumpBuffer(s, buf, Number(offset));
    s.out(formatIoReport('read', Number(offset), size, size, 1, t, C));
  });
  return 0;
}

/** aio_write: like writev (or a zero write with -z), completed later; failures do not fail the command. */
async function aioWriteF(s: IoSession, argv: string[]): Promise<number> {
  let C = false, q = false, z = false, fua = false, mayUnmap = false, pattern = 0xcd;
  const rest = parseOptions(s, AIO_WRITE, argv, 'CfiqP:uz', (o, a) => {
    switch (o) {
      case 'C': C = true; break;
      case 'f': fua = true; break;
      case 'q': q = true; break;
      case 'u': mayUnmap = true; break;
      case 'P':
        pattern = parsePattern(s, a);
        if (pattern < 0) return EINVAL;
        break;
      case 'i':
        s.out('injecting invalid write request\n');
        return 0;
      case 'z': z = true; break;
    }
    return true;
  });
  if (typeof rest === 'number') return rest;
  if (rest.length < 2) return usage(s, AIO_WRITE);
  if (z && rest.length !== 2) {
    s.out('-z supports only a single length parameter\n');
    return EINVAL;
  }
  if (mayUnmap && !z) {
    s.out('-u requires -z to be specified\n');
    return EINVAL;
  }
  const offset = cvt(s, rest[0]);
  if (offset === null) return EINVAL;
  const fail = (code: string): void => {
    s.out(`aio_write failed: ${strerror(code)}\n`);
  };
  if (z) {
    const count = cvt(s, rest[1]);
    if (count === null) return EINVAL;
    const size = Number(count);
    s.submitAio(offset, size, true, false, fail, async () => {
      const t = await timed(s, 'aio_write', () => s.writeZeroes(offset, size, mayUnmap, false));
      if (t === null || q) return;
      // qemu-io never sets the start time of an aio zero write: the time is counted from 0.
      s.out(formatIoReport('wrote', Number(offset), size, size, 1, process.hrtime.bigint(), C));
    });
    return 0;
  }
  const size = iovecLength(s, rest.slice(1));
  if (size === null) return EINVAL;
  const buf = Buffer.alloc(size, pattern);
  s.submitAio(offset, size, false, false, fail, async () => {
    const t = await timed(s, 'aio_write', async () => {
      await s.write(offset, buf);
      if (fua) await s.flush();
    });
    if (t === null || q) return;
    s.out(formatIoReport('wrote', Number(offset), size, size, 1, t, C));
  });
  return 0;
}

/**
 * Parses the `off len` pair of read/write/discard; a length above MAX_REQUEST is refused (with
 * qemu-io's message) unless `allowLong`. Returns null after printing the error.
 */
function offsetAndCount(s: IoSession, rest: string[], allowLong = false, qualifier = ''): { offset: bigint; count: bigint } | null {
  const offset = cvt(s, rest[0]);
  if (offset === null) return null;
  const count = cvt(s, rest[1]);
  if (count === null) return null;
  if (count > BigInt(MAX_REQUEST) && !allowLong) {
    s.out(`length cannot exceed ${MAX_REQUEST}${qualifier}, given ${rest[1]}\n`);
    return null;
  }
  return { offset, count };
}

async function discardF(s: IoSession, argv: string[]): Promise<number> {
  let C = false, q = false;
  const rest = parseOptions(s, DISCARD, argv, 'Cq', (o) => {
    if (o === 'C') C = true;
    if (o === 'q') q = true;
    return true;
  });
  if (typeof rest === 'number') return rest;
  if (rest.length !== 2) return usage(s, DISCARD);
  const range = offsetAndCount(s, rest);
  if (range === null) return EINVAL;
  const { offset, count: bytes } = range;
  const t = await timed(s, 'discard', () => s.discard(offset, Number(bytes)));
  if (t === null) return -5;
  if (!q) s.out(formatIoReport('discard', Number(offset), Number(bytes), Number(bytes), 1, t, C));
  return 0;
}

// ---- status ---------------------------------------------------------------------------------------

async function allocF(s: IoSession, argv: string[]): Promise<number> {
  const start = cvt(s, argv[1]);
  if (start === null) return EINVAL;
  let count = 512n;
  if (argv.length === 3) {
    const c = cvt(s, argv[2]);
    if (c === null) return EINVAL;
    count = c;
  }
  let sum = 0;
  if (count > 0n) {
    let size: number;
    try {
      size = s.length();
    } catch (e) {
      const code = errnoOf(e);
      if (code === null) throw e;
      s.out(`is_allocated failed: ${strerror(code)}\n`);
      return -5;
    }
    const big = BigInt(size);
    if (start >= big) count = 0n;
    else if (start + count > big) count = big - start;
    if (count > 0n) {
      const st = await s.topStatus(Number(start), Number(start + count));
      if (st.error !== undefined) {
        s.out(`is_allocated failed: ${strerror(errnoOf(st.error) ?? 'EIO')}\n`);
        return -5;
      }
      for (const x of st.extents) if (x.kind !== 'unallocated') sum += x.length;
    }
  }
  s.out(formatAllocLine(sum, Number(count), Number(start)) + '\n');
  return 0;
}

async function mapF(s: IoSession): Promise<number> {
  let size: number;
  try {
    size = s.length();
  } catch (e) {
    const code = errnoOf(e);
    if (code === null) throw e;
    s.report(`Failed to query image length: ${strerror(code)}`);
    return -5;
  }
  const st = await s.topStatus(0, size);
  const runs: Array<{ offset: number; length: number; allocated: boolean }> = [];
  let pos = 0;
  for (const x of st.extents) {
    if (x.offset !== pos) break;
    const allocated = x.kind !== 'unallocated';
    const last = runs[runs.length - 1];
    if (last && last.allocated === allocated) last.length += x.length;
    else runs.push({ offset: x.offset, length: x.length, allocated });
    pos = x.offset + x.length;
  }
  let text = '';
  for (const r of runs) text += formatMapLine(r.length, r.offset, r.allocated) + '\n';
  s.out(text);
  if (st.error !== undefined) {
    s.report(`Failed to get allocation status: ${strerror(errnoOf(st.error) ?? 'EIO')}`);
    return -5;
  }
  if (pos < size) {
    s.report('Unexpected end of image');
    return -5;
  }
  return 0;
}

async function lengthF(s: IoSession): Promise<number> {
  try {
    s.out(formatLength(s.length()) + '\n');
    return 0;
  } catch (e) {
    const code = errnoOf(e);
    if (code === null) throw e;
    s.out(`getlength: ${strerror(code)}\n`);
    return -5;
  }
}

async function infoF(s: IoSession): Promise<number> {
  if (!s.chain || s.ejected) return -123;
  const top = s.chain.top;
  let text = `format name: ${top.format}\n`;
  if (top instanceof Qcow2Image) {
    const vmState = Math.ceil(top.size / top.l2Coverage) * top.l2Coverage;
    text += `cluster size: ${cvtstr(top.clusterSize)}\n`;
    text += `vm state offset: ${cvtstr(vmState)}\n`;
    text += 'Format specific information:\n';
    if (top.version >= 3) {
      text += '    compat: 1.1\n';
      text += `    compression type: ${top.compressionType === 1 ? 'zstd' : 'zlib'}\n`;
      text += `    lazy refcounts: ${top.lazyRefcounts}\n`;
      text += `    refcount bits: ${2 ** top.header.refcountOrder}\n`;
      text += `    corrupt: ${top.corrupt}\n`;
      text += `    extended l2: ${top.extL2}\n`;
    } else {
      text += '    compat: 0.10\n';
      text += '    compression type: zlib\n';
      text += `    refcount bits: ${2 ** top.header.refcountOrder}\n`;
    }
  } else {
    text += 'cluster size: 0 bytes\n';
    text += 'vm state offset: 0 bytes\n';
  }
  s.out(text);
  return 0;
}

async function flushF(s: IoSession): Promise<number> {
  try {
    await s.flush();
    return 0;
  } catch (e) {
    if (errnoOf(e) === null) throw e;
    return -5;
  }
}

async function truncateF(s: IoSession, argv: string[]): Promise<number> {
  let prealloc: 'off' | 'metadata' | 'falloc' | 'full' = 'off';
  const rest = parseOptions(s, TRUNCATE, argv, 'm:', (o, a) => {
    if (o === 'm') {
      if (a !== 'off' && a !== 'metadata' && a !== 'falloc' && a !== 'full') {
        s.report(`Invalid preallocation mode '${a}'`);
        return EINVAL;
      }
      prealloc = a;
    }
    return true;
  });
  if (typeof rest === 'number') return rest;
  if (rest.length === 0) return usage(s, TRUNCATE); // (qemu-io 7.2 crashes here)
  const r = cvtnumRaw(rest[0]);
  for (const w of r.warnings) s.err(`qemu-io: warning: ${w}\n`);
  if (!r.ok) {
    // qemu-io names argv[1] in this message, whatever the options were.
    s.out(cvtnumErrorText(r.error, argv[1]) + '\n');
    return EINVAL;
  }
  try {
    await s.truncate(Number(r.value), prealloc);
  } catch (e) {
    const code = errnoOf(e);
    if (code === 'ENOMEDIUM') s.report('No medium inserted');
    else s.report(e instanceof Error ? e.message : String(e));
    return code ? -5 : EINVAL;
  }
  return 0;
}

// ---- session --------------------------------------------------------------------------------------

async function openF(s: IoSession, argv: string[]): Promise<number> {
  const req: OpenRequest = { file: null, readOnly: false, snapshot: false, copyOnRead: false, unmap: true, forceShare: false };
  const extra: Array<[string, string]> = [];
  const rest = parseOptions(s, OPEN, argv, 'snCro:ki:t:d:U', (o, a) => {
    switch (o) {
      case 's': req.snapshot = true; break;
      case 'C': req.copyOnRead = true; break;
      case 'r': req.readOnly = true; break;
      case 'n': req.directCache = true; break;
      case 'k': req.nativeAio = true; break;
      case 'U': req.forceShare = true; break;
      case 'o':
        for (const [k, v] of parseOptString(a)) {
          if (k === 'driver') req.format = v;
          else extra.push([k, v]);
        }
        break;
      case 'i':
        if (!isAioMode(a)) {
          s.report(`Invalid aio option: ${a}`);
          return EINVAL;
        }
        req.nativeAio = a === 'native';
        break;
      case 't':
        if (!isCacheMode(a)) {
          s.report(`Invalid cache option: ${a}`);
          return EINVAL;
        }
        req.directCache = isDirectCacheMode(a);
        break;
      case 'd': {
        const d = parseDiscardMode(a);
        if (d === null) {
          s.report(`Invalid discard option: ${a}`);
          return EINVAL;
        }
        req.unmap = d;
        break;
      }
    }
    return true;
  });
  if (typeof rest === 'number') return rest;
  if (rest.length > 1) return usage(s, OPEN);
  req.file = rest.length === 1 ? rest[0] : null;
  req.extraOptions = extra;
  return (await s.open(req)) ? 0 : EINVAL;
}

async function closeF(s: IoSession): Promise<number> {
  return (await s.close()) ? 0 : -5;
}

async function quitF(s: IoSession): Promise<number> {
  s.quit = true;
  return 0;
}

async function reopenF(s: IoSession, argv: string[]): Promise<number> {
  let rw: boolean | null = null;
  const rest = parseOptions(s, REOPEN, argv, 'c:o:rw', (o, a) => {
    switch (o) {
      case 'c':
        if (!isCacheMode(a)) {
          s.report(`Invalid cache option: ${a}`);
          return EINVAL;
        }
        break;
      case 'o':
        parseOptString(a);
        break;
      case 'r':
      case 'w':
        if (rw !== null) {
          s.report('Only one -r/-w option may be given');
          return EINVAL;
        }
        rw = o === 'w';
        break;
    }
    return true;
  });
  if (typeof rest === 'number') return rest;
  if (rest.length !== 0) return usage(s, REOPEN);
  if (rw === null) return 0;
  return (await s.reopen(!rw)) ? 0 : EINVAL;
}

async function sleepF(s: IoSession, argv: string[]): Promise<number> {
  const r = strtol0(argv[1]);
  if (r.value < 0n || !r.complete) {
    s.out(`${argv[1]} is not a valid number\n`);
    return EINVAL;
  }
  let ms = Number(r.value);
  await s.drain();
  while (ms > 0) {
    const step = Math.min(ms, 2 ** 31 - 1);
    await new Promise((res) => setTimeout(res, step));
    ms -= step;
  }
  return 0;
}

/** NSIG on Linux. */
const NSIG = 65;

async function raise(sig: number): Promise<void> {
  if (sig === 0) return;
  try {
    process.kill(process.pid, sig);
  } catch {
    return; // raise() fails for an invalid signal number
  }
  // Give a fatal signal the time to arrive before the next command runs.
  await new Promise((res) => setTimeout(res, 50));
}

async function sigraiseF(s: IoSession, argv: string[]): Promise<number> {
  const sig = cvt(s, argv[1]);
  if (sig === null) return EINVAL;
  if (sig > BigInt(NSIG)) {
    s.out(`signal argument '${argv[1]}' is too large to be a valid signal\n`);
    return EINVAL;
  }
  await raise(Number(sig));
  return 0;
}

async function abortF(): Promise<number> {
  await raise(6);
  return 0;
}

async function helpF(s: IoSession, argv: string[]): Promise<number> {
  if (argv.length < 2) {
    let text = '';
    for (const ct of COMMANDS) text += helpOneline(ct.name, ct);
    s.out(text + "\nUse 'help commandname' for extended help.\n");
    return 0;
  }
  const ct = findCommand(argv[1]);
  if (!ct) {
    s.out(`command ${argv[1]} not found\n`);
    return EINVAL;
  }
  s.out(helpOneline(argv[1], ct) + (ct.help ?? ''));
  return 0;
}

function helpOneline(cmd: string, ct: CommandInfo): string {
  return `${cmd} ${ct.args !== null ? ct.args + ' ' : ''}-- ${ct.oneline}\n`;
}

// ---- the table ------------------------------------------------------------------------------------

const READ: CommandInfo = {
  name: 'read', altname: 'r', fn: readF, argmin: 2, argmax: -1,
  args: '[-abCqv] [-P pattern [-s off] [-l len]] off len', oneline: 'reads a number of bytes at a specified offset', help: H.READ_HELP,
};
const READV: CommandInfo = {
  name: 'readv', fn: readvF, argmin: 2, argmax: -1,
  args: '[-Cqv] [-P pattern] off len [len..]', oneline: 'reads a number of bytes at a specified offset', help: H.READV_HELP,
};
const WRITE: CommandInfo = {
  name: 'write', altname: 'w', fn: writeF, argmin: 2, argmax: -1, write: true,
  args: '[-bcCfnquz] [-P pattern | -s source_file] off len', oneline: 'writes a number of bytes at a specified offset', help: H.WRITE_HELP,
};
const WRITEV: CommandInfo = {
  name: 'writev', fn: writevF, argmin: 2, argmax: -1, write: true,
  args: '[-Cfq] [-P pattern] off len [len..]', oneline: 'writes a number of bytes at a specified offset', help: H.WRITEV_HELP,
};
const AIO_READ: CommandInfo = {
  name: 'aio_read', fn: aioReadF, argmin: 2, argmax: -1,
  args: '[-Ciqv] [-P pattern] off len [len..]', oneline: 'asynchronously reads a number of bytes', help: H.AIO_READ_HELP,
};
const AIO_WRITE: CommandInfo = {
  name: 'aio_write', fn: aioWriteF, argmin: 2, argmax: -1, write: true,
  args: '[-Cfiquz] [-P pattern] off len [len..]', oneline: 'asynchronously writes a number of bytes', help: H.AIO_WRITE_HELP,
};
const DISCARD: CommandInfo = {
  name: 'discard', altname: 'd', fn: discardF, argmin: 2, argmax: -1, write: true,
  args: '[-Cq] off len', oneline: 'discards a number of bytes at a specified offset', help: H.DISCARD_HELP,
};
const TRUNCATE: CommandInfo = {
  name: 'truncate', altname: 't', fn: truncateF, argmin: 1, argmax: 3, write: true,
  args: '[-m prealloc_mode] off', oneline: 'truncates the current file at the given offset',
};
const OPEN: CommandInfo = {
  name: 'open', altname: 'o', fn: openF, argmin: 1, argmax: -1, flags: 'nofile',
  args: '[-rsCnkU] [-t cache] [-d discard] [-o options] [path]', oneline: 'open the file specified by path', help: H.OPEN_HELP,
};
const REOPEN: CommandInfo = {
  name: 'reopen', fn: reopenF, argmin: 0, argmax: -1,
  args: '[(-r|-w)] [-c cache] [-o options]', oneline: 'reopens an image with new options', help: H.REOPEN_HELP,
};

const notSupported = (msg: (argv: string[]) => string) => async (s: IoSession, argv: string[]): Promise<number> => {
  s.out(msg(argv) + '\n');
  return -95;
};

/** Every command, sorted by name as qemu-io keeps its table. */
export const COMMANDS: CommandInfo[] = [
  { name: 'abort', fn: abortF, argmin: 0, argmax: 0, flags: 'nofile', args: null, oneline: 'simulate a program crash using abort(3)' },
  { name: 'aio_flush', fn: async (s) => { await s.drain(); return 0; }, argmin: 0, argmax: 0, args: null, oneline: 'completes all outstanding aio requests' },
  AIO_READ,
  AIO_WRITE,
  { name: 'alloc', altname: 'a', fn: allocF, argmin: 1, argmax: 2, args: 'offset [count]', oneline: 'checks if offset is allocated in the file' },
  {
    name: 'break', fn: notSupported(() => 'Could not set breakpoint: Operation not supported'), argmin: 2, argmax: 2,
    args: 'event tag', oneline: 'sets a breakpoint on event and tags the stopped request as tag',
  },
  { name: 'close', altname: 'c', fn: closeF, argmin: 0, argmax: 0, args: null, oneline: 'close the current open file' },
  DISCARD,
  { name: 'flush', altname: 'f', fn: flushF, argmin: 0, argmax: 0, args: null, oneline: 'flush all in-core file state to disk' },
  { name: 'help', altname: '?', fn: helpF, argmin: 0, argmax: 1, flags: 'global', args: '[command]', oneline: 'help for one or all commands' },
  { name: 'info', altname: 'i', fn: infoF, argmin: 0, argmax: 0, args: null, oneline: 'prints information about the current file' },
  { name: 'length', altname: 'l', fn: lengthF, argmin: 0, argmax: 0, args: null, oneline: 'gets the length of the current file' },
  { name: 'map', fn: mapF, argmin: 0, argmax: 0, args: '', oneline: 'prints the allocated areas of a file' },
  OPEN,
  { name: 'quit', altname: 'q', fn: quitF, argmin: -1, argmax: -1, flags: 'global', args: null, oneline: 'exit the program' },
  READ,
  READV,
  {
    name: 'remove_break', fn: notSupported((a) => `Could not remove breakpoint ${a[1]}: Operation not supported`), argmin: 1, argmax: 1,
    args: 'tag', oneline: 'remove a breakpoint by tag',
  },
  REOPEN,
  {
    name: 'resume', fn: notSupported(() => 'Could not resume request: Operation not supported'), argmin: 1, argmax: 1,
    args: 'tag', oneline: 'resumes the request tagged as tag',
  },
  { name: 'sigraise', fn: sigraiseF, argmin: 1, argmax: 1, flags: 'nofile', args: 'signal', oneline: 'raises a signal', help: H.SIGRAISE_HELP },
  { name: 'sleep', fn: sleepF, argmin: 1, argmax: 1, flags: 'nofile', args: null, oneline: 'waits for the given value in milliseconds' },
  TRUNCATE,
  // Without blkdebug no request is ever suspended (qemu-io would wait forever).
  { name: 'wait_break', fn: async () => 0, argmin: 1, argmax: 1, args: 'tag', oneline: 'waits for the suspension of a request' },
  WRITE,
  WRITEV,
];

export function findCommand(name: string): CommandInfo | undefined {
  return COMMANDS.find((c) => c.name === name || c.altname === name);
}

/** breakline(): split at single spaces, dropping empty words. */
export function breakline(input: string): string[] {
  return input.split(' ').filter((w) => w !== '');
}

/**
 * qemuio_command(): run one command line. Returns 0, or a negative number when the command
 * failed.
 */
export async function runCommand(s: IoSession, input: string): Promise<number> {
  const argv = breakline(input);
  if (argv.length === 0) return 0;
  const ct = findCommand(argv[0]);
  if (!ct) {
    s.err(`command "${argv[0]}" not found\n`);
    return EINVAL;
  }
  if (ct.flags !== 'global' && ct.flags !== 'nofile' && !s.chain) {
    s.err("no file open, try 'help open'\n");
    return EINVAL;
  }
  const n = argv.length - 1;
  if (n < ct.argmin || (ct.argmax !== -1 && n > ct.argmax)) {
    if (ct.argmax === -1) s.err(`bad argument count ${n} to ${argv[0]}, expected at least ${ct.argmin} arguments\n`);
    else if (ct.argmin === ct.argmax) s.err(`bad argument count ${n} to ${argv[0]}, expected ${ct.argmin} arguments\n`);
    else s.err(`bad argument count ${n} to ${argv[0]}, expected between ${ct.argmin} and ${ct.argmax} arguments\n`);
    return EINVAL;
  }
  if (ct.write && s.chain && !s.ejected && s.readOnly) {
    s.report('Block node is read-only');
    return -1;
  }
  return ct.fn(s, argv);
}
