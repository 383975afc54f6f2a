/**
 * Tests for src/cli/util: getopt, option strings / sizes, human readable
 * numbers, progress output and error helpers.  Where possible the expected
 * text is taken from the real qemu-img / qemu-io 7.2 binaries ("oracle"
 * tests).  Oracle tests are skipped when the binaries are missing, unless
 * the CI environment variable is set, in which case they fail.
 */
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import {
  GetoptError,
  type LongOption,
  formatGetoptError,
  formatQemuImgGetoptError,
  getopt,
  qemuImgGetoptMessage,
} from '../src/cli/util/getopt.js';
import {
  INT64_MAX,
  accumulateOptions,
  cvtnum,
  cvtnumErrorText,
  cvtnumRaw,
  escapeOptValue,
  getOptValue,
  hasHelpOption,
  isValidOptionList,
  parseOptString,
  parseOptionSize,
  parseSize,
  parseSizeBig,
  qemuStrtosz,
} from '../src/cli/util/options.js';
import {
  cvtstr,
  formatAllocLine,
  formatIoReport,
  formatIoStats,
  formatLength,
  formatMapLine,
  sizeToStr,
  timestr,
  toElapsed,
} from '../src/cli/util/human.js';
import { ProgressPrinter, formatProgress } from '../src/cli/util/progress.js';
import {
  CliError,
  UsageError,
  fatal,
  formatError,
  formatErrorExit,
  formatWarning,
  reportError,
  warn,
} from '../src/cli/util/errors.js';
import { formatExp, formatFixed, formatGeneral } from '../src/cli/util/printf.js';

// ---------------------------------------------------------------------------
// helpers

/** Collects everything written to it. */
class Sink {
  text = '';
  write(chunk: string): boolean {
    this.text += chunk;
    return true;
  }
}

function hasBinary(name: string): boolean {
  const r = spawnSync(name, ['--version'], { encoding: 'utf8' });
  return r.status === 0;
}

const HAVE_QEMU = hasBinary('qemu-img') && hasBinary('qemu-io');

/** Skip (or, under CI, fail) an oracle test when qemu is not installed. Returns true to continue. */
function needQemu(t: TestContext): boolean {
  if (HAVE_QEMU) {
    return true;
  }
  if (process.env.CI) {
    assert.fail('qemu-img/qemu-io not found, required when CI is set');
  }
  t.skip('qemu-img/qemu-io not installed');
  return false;
}

interface RunResult {
  stdout: string;
  stderr: string;
  status: number | null;
}

function run(cmd: string, args: string[], cwd?: string): RunResult {
  const r = spawnSync(cmd, args, { encoding: 'utf8', cwd, env: { ...process.env, LC_ALL: 'C' } });
  return { stdout: r.stdout, stderr: r.stderr, status: r.status };
}

function withTmpDir<T>(fn: (dir: string) => T): T {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'qchain-cli-util-'));
  try {
    return fn(dir);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

/** A path whose parent does not exist: qemu-img create prints its "Formatting" line, then fails. */
const NO_SUCH_FILE = path.join(os.tmpdir(), 'qchain-no-such-dir-cli-util', 'x.img');

const L = (name: string, hasArg: LongOption['hasArg'], val: string): LongOption => ({ name, hasArg, val });

/** qemu-img 7.2 `info` option table. */
const INFO_LONG: LongOption[] = [
  L('help', 'no', 'h'),
  L('format', 'required', 'f'),
  L('output', 'required', 'OUTPUT'),
  L('backing-chain', 'no', 'BACKING_CHAIN'),
  L('object', 'required', 'OBJECT'),
  L('image-opts', 'no', 'IMAGE_OPTS'),
  L('force-share', 'no', 'U'),
];
const INFO_SHORT = ':f:hU';

/** qemu-img 7.2 `create` option table. */
const CREATE_LONG: LongOption[] = [L('help', 'no', 'h'), L('object', 'required', 'OBJECT')];
const CREATE_SHORT = ':F:b:f:ho:qu';

/** qemu-io 7.2 top level option table (same order as qemu-io.c). */
const QEMU_IO_LONG: LongOption[] = [
  L('help', 'no', 'h'),
  L('version', 'no', 'V'),
  L('cmd', 'required', 'c'),
  L('format', 'required', 'f'),
  L('read-only', 'no', 'r'),
  L('snapshot', 'no', 's'),
  L('nocache', 'no', 'n'),
  L('copy-on-read', 'no', 'C'),
  L('misalign', 'no', 'm'),
  L('native-aio', 'no', 'k'),
  L('aio', 'required', 'i'),
  L('discard', 'required', 'd'),
  L('cache', 'required', 't'),
  L('trace', 'required', 'T'),
  L('object', 'required', 'OBJECT'),
  L('image-opts', 'no', 'IMAGE_OPTS'),
  L('force-share', 'no', 'U'),
];
const QEMU_IO_SHORT = 'hVc:d:f:rsnCmki:t:T:U';

function catchGetopt(fn: () => unknown): GetoptError {
  try {
    fn();
  } catch (e) {
    if (e instanceof GetoptError) {
      return e;
    }
    throw e;
  }
  assert.fail('expected a GetoptError');
}

// ---------------------------------------------------------------------------
// printf emulation

test('printf: glibc rounding (ties to even on the exact binary value)', () => {
  assert.equal(formatFixed(15.625, 2), '15.62');
  assert.equal(formatFixed(9.375, 2), '9.38');
  assert.equal(formatFixed(0.125, 2), '0.12');
  assert.equal(formatFixed(2.5, 0), '2');
  assert.equal(formatFixed(3.5, 0), '4');
  assert.equal(formatFixed(1.005, 2), '1.00'); // 1.005 is really 1.00499999...
  assert.equal(formatFixed(512), '512.000000');
  assert.equal(formatFixed(-0.0001, 2), '-0.00');
  assert.equal(formatFixed(0.5, 2, { width: 5, zeroPad: true }), '00.50');
  assert.equal(formatFixed(59.999, 2, { width: 5, zeroPad: true }), '60.00');
  assert.equal(formatFixed(1, 2, { width: 7 }), '   1.00');
  assert.equal(formatFixed(Infinity, 3), 'inf');
  assert.equal(formatFixed(-Infinity, 3), '-inf');
  assert.equal(formatFixed(NaN, 3), '-nan');
  assert.equal(formatFixed(NaN, 3, { nanSign: '+' }), 'nan');
  assert.equal(formatFixed(1e21, 1), '1000000000000000000000.0');
  assert.equal(formatExp(123456), '1.234560e+05');
  assert.equal(formatExp(0), '0.000000e+00');
  assert.equal(formatExp(1e-300, 2), '1.00e-300');
  assert.equal(formatGeneral(999.6, 3), '1e+03');
  assert.equal(formatGeneral(999.4, 3), '999');
  assert.equal(formatGeneral(1.5, 3), '1.5');
  assert.equal(formatGeneral(0.9765625, 3), '0.977');
  assert.equal(formatGeneral(0, 3), '0');
  assert.equal(formatGeneral(0.0001234), '0.0001234');
  assert.equal(formatGeneral(0.00001234), '1.234e-05');
  assert.equal(formatGeneral(100000), '100000');
  assert.equal(formatGeneral(1000000), '1e+06');
  assert.equal(formatGeneral(2.5, 1), '2');
  assert.equal(formatGeneral(12.5, 0), '1e+01');
});

// ---------------------------------------------------------------------------
// getopt

test('getopt: short options, bundles, attached and separate arguments', () => {
  assert.deepEqual(getopt(['-pq', '-fqcow2', '-O', 'raw', 'a', 'b'], 'pqf:O:'), {
    opts: [{ opt: 'p' }, { opt: 'q' }, { opt: 'f', arg: 'qcow2' }, { opt: 'O', arg: 'raw' }],
    rest: ['a', 'b'],
  });
  // The next element is the argument even when it looks like an option.
  assert.deepEqual(getopt(['-f', '-q', 'x'], 'f:q').opts, [{ opt: 'f', arg: '-q' }]);
  // Bundle ending in an option with an argument.
  assert.deepEqual(getopt(['-qf', 'raw'], 'qf:').opts, [{ opt: 'q' }, { opt: 'f', arg: 'raw' }]);
  // Optional argument: only attached.
  assert.deepEqual(getopt(['-c3', '-c', '4'], 'c::'), { opts: [{ opt: 'c', arg: '3' }, { opt: 'c' }], rest: ['4'] });
  // A lone "-" is positional.
  assert.deepEqual(getopt(['-', '-q'], 'q'), { opts: [{ opt: 'q' }], rest: ['-'] });
  assert.deepEqual(getopt([], 'q'), { opts: [], rest: [] });
});

test('getopt: long options, prefixes, --name=value and --name value', () => {
  const r = getopt(['--output=json', '--backing-chain', '--format', 'qcow2', '--force', 'x'], INFO_SHORT, INFO_LONG);
  assert.deepEqual(r.opts, [
    { opt: 'OUTPUT', arg: 'json', longName: 'output' },
    { opt: 'BACKING_CHAIN', longName: 'backing-chain' },
    { opt: 'f', arg: 'qcow2', longName: 'format' },
    { opt: 'U', longName: 'force-share' },
  ]);
  assert.deepEqual(r.rest, ['x']);
  // Unique prefix.
  assert.deepEqual(getopt(['--out=json'], INFO_SHORT, INFO_LONG).opts, [{ opt: 'OUTPUT', arg: 'json', longName: 'output' }]);
  // An exact match wins over being a prefix of another option.
  const t = [L('ca', 'no', 'a'), L('cache', 'required', 't')];
  assert.deepEqual(getopt(['--ca'], '', t).opts, [{ opt: 'a', longName: 'ca' }]);
  // Several prefix matches with identical has_arg/val are not ambiguous.
  const same = [L('alpha', 'no', 'a'), L('alphabet', 'no', 'a')];
  assert.deepEqual(getopt(['--alp'], '', same).opts, [{ opt: 'a', longName: 'alpha' }]);
  // Optional long argument only with "=".
  const g = [L('gamma', 'optional', 'g')];
  assert.deepEqual(getopt(['--gamma', 'x', '--gamma=3'], '', g), {
    opts: [{ opt: 'g', longName: 'gamma' }, { opt: 'g', arg: '3', longName: 'gamma' }],
    rest: ['x'],
  });
});

test('getopt: GNU permutation, "--", "+" and "-" orderings', () => {
  // qemu-img create x.img 1G -f qcow2
  assert.deepEqual(getopt(['x.img', '1G', '-f', 'qcow2'], CREATE_SHORT, CREATE_LONG, { argv0: 'create' }), {
    opts: [{ opt: 'f', arg: 'qcow2' }],
    rest: ['x.img', '1G'],
  });
  assert.deepEqual(getopt(['a', '-U', 'b', '-f', 'raw', 'c'], INFO_SHORT, INFO_LONG).rest, ['a', 'b', 'c']);
  // "--" ends options; later option-like words are positional, order kept.
  assert.deepEqual(getopt(['a', '-q', '--', '-b', 'c'], 'qb'), { opts: [{ opt: 'q' }], rest: ['a', '-b', 'c'] });
  assert.deepEqual(getopt(['--'], 'q'), { opts: [], rest: [] });
  // "+" (qemu-img's global "+:hVT:") stops at the first positional argument.
  assert.deepEqual(getopt(['-T', 'foo', 'info', '-f', 'raw'], '+:hVT:', [L('help', 'no', 'h')]), {
    opts: [{ opt: 'T', arg: 'foo' }],
    rest: ['info', '-f', 'raw'],
  });
  assert.deepEqual(getopt(['x', '-q'], 'q', null, { posixlyCorrect: true }), { opts: [], rest: ['x', '-q'] });
  // "-": positional arguments are returned in order as option "\x01".
  assert.deepEqual(getopt(['x', '-q', 'y'], '-q'), {
    opts: [{ opt: '\x01', arg: 'x' }, { opt: 'q' }, { opt: '\x01', arg: 'y' }],
    rest: [],
  });
});

test('getopt: error kinds and glibc messages', () => {
  let e = catchGetopt(() => getopt(['-z'], QEMU_IO_SHORT, QEMU_IO_LONG));
  assert.equal(e.kind, 'invalid-option');
  assert.equal(e.message, "invalid option -- 'z'");
  assert.equal(e.optopt, 'z');
  assert.ok(e instanceof UsageError && e instanceof CliError);
  assert.equal(e.exitCode, 1);
  assert.equal(formatGetoptError('qemu-io', e), "qemu-io: invalid option -- 'z'\n");

  e = catchGetopt(() => getopt(['-c'], QEMU_IO_SHORT, QEMU_IO_LONG));
  assert.equal(e.kind, 'missing-argument');
  assert.equal(e.message, "option requires an argument -- 'c'");
  assert.equal(e.code, '?');

  e = catchGetopt(() => getopt(['--foo=bar'], QEMU_IO_SHORT, QEMU_IO_LONG));
  assert.equal(e.kind, 'unrecognized-option');
  assert.equal(e.message, "unrecognized option '--foo=bar'");

  e = catchGetopt(() => getopt(['--c=x'], QEMU_IO_SHORT, QEMU_IO_LONG));
  assert.equal(e.kind, 'ambiguous-option');
  assert.equal(e.message, "option '--c=x' is ambiguous; possibilities: '--cmd' '--copy-on-read' '--cache'");

  e = catchGetopt(() => getopt(['--image-opts=x'], QEMU_IO_SHORT, QEMU_IO_LONG));
  assert.equal(e.kind, 'unexpected-argument');
  assert.equal(e.message, "option '--image-opts' doesn't allow an argument");
  assert.equal(e.optopt, 'IMAGE_OPTS');

  e = catchGetopt(() => getopt(['--h=1'], QEMU_IO_SHORT, QEMU_IO_LONG));
  assert.equal(e.message, "option '--help' doesn't allow an argument");

  e = catchGetopt(() => getopt(['--cache'], QEMU_IO_SHORT, QEMU_IO_LONG));
  assert.equal(e.message, "option '--cache' requires an argument");

  // ':' and ';' are never valid option characters.
  e = catchGetopt(() => getopt(['-:'], ':a:'));
  assert.equal(e.message, "invalid option -- ':'");

  // Plain getopt (no long table): "--foo" is a bundle starting with '-'.
  e = catchGetopt(() => getopt(['--foo'], 'abCqP:s:l:v', null, { argv0: 'read' }));
  assert.equal(formatGetoptError('read', e), "read: invalid option -- '-'\n");
});

test('getopt: qemu-img silent mode and argv[optind-1] quirks', () => {
  const info = (args: string[]): GetoptError =>
    catchGetopt(() => getopt(args, INFO_SHORT, INFO_LONG, { argv0: 'info' }));
  let e = info(['-z', 'x']);
  assert.equal(qemuImgGetoptMessage(e), "unrecognized option '-z'");
  // Invalid char that is not the last of its bundle: optind not yet advanced.
  assert.equal(info(['-zU', 'x']).offendingArg, 'info');
  assert.equal(info(['-qz', 'x']).offendingArg, 'info');
  assert.equal(info(['x', '-Uz']).offendingArg, '-Uz');
  e = info(['-f']);
  assert.equal(e.code, ':');
  assert.equal(qemuImgGetoptMessage(e), "missing argument for option '-f'");
  e = info(['--output']);
  assert.equal(e.code, ':');
  assert.equal(qemuImgGetoptMessage(e), "missing argument for option '--output'");
  e = info(['--o=json']);
  assert.equal(e.kind, 'ambiguous-option');
  assert.equal(qemuImgGetoptMessage(e), "unrecognized option '--o=json'");
  assert.equal(
    formatQemuImgGetoptError(info(['--backing-chain=x'])),
    "qemu-img: unrecognized option '--backing-chain=x'\nTry 'qemu-img --help' for more information\n",
  );
  // create: "-qf" with a missing argument quotes the whole bundle.
  e = catchGetopt(() => getopt(['x', '-qf'], CREATE_SHORT, CREATE_LONG, { argv0: 'create' }));
  assert.equal(qemuImgGetoptMessage(e), "missing argument for option '-qf'");
});

test('getopt oracle: qemu-img and qemu-io print the same diagnostics', (t) => {
  if (!needQemu(t)) {
    return;
  }
  withTmpDir((dir) => {
    assert.equal(run('qemu-img', ['create', '-q', '-f', 'raw', 'x.img', '1M'], dir).status, 0);
    const imgCases: string[][] = [
      ['-z', 'x.img'],
      ['-zU', 'x.img'],
      ['-qz', 'x.img'],
      ['x.img', '-Uz'],
      ['--foo=bar', 'x.img'],
      ['--backing-chain=x', 'x.img'],
      ['-f'],
      ['--output'],
      ['--o=json', 'x.img'],
      ['x.img', '--image=x'],
    ];
    for (const args of imgCases) {
      const real = run('qemu-img', ['info', ...args], dir);
      const e = catchGetopt(() => getopt(args, INFO_SHORT, INFO_LONG, { argv0: 'info' }));
      assert.equal(real.stderr, formatQemuImgGetoptError(e), `qemu-img info ${args.join(' ')}`);
      assert.equal(real.status, 1);
    }
    // Permutation: options after positional arguments are honoured.
    const real = run('qemu-img', ['info', 'x.img', '-f', 'raw', '--output', 'json'], dir);
    assert.equal(real.status, 0);
    assert.match(real.stdout, /"format": "raw"/);
    assert.deepEqual(getopt(['x.img', '-f', 'raw', '--output', 'json'], INFO_SHORT, INFO_LONG).rest, ['x.img']);

    const ioCases: string[][] = [['-z', 'x.img'], ['--foo', 'x.img'], ['x.img', '-c'], ['--c', 'x', 'x.img'], ['--c=x', 'x.img'],
      ['x.img', '--cache'], ['--image-opts=x', 'x.img'], ['--h=1'], ['---x'], ['--=x'], ['-f', 'raw', 'x.img', '-rz']];
    for (const args of ioCases) {
      const r = run('qemu-io', args, dir);
      const e = catchGetopt(() => getopt(args, QEMU_IO_SHORT, QEMU_IO_LONG, { argv0: 'qemu-io' }));
      const firstLine = r.stderr.split('\n')[0] + '\n';
      assert.equal(firstLine, formatGetoptError('qemu-io', e), `qemu-io ${args.join(' ')}`);
    }
    // qemu-io commands use plain getopt with the command name as argv[0].
    const r = run('qemu-io', ['-f', 'raw', '-c', 'read -x 0 512', 'x.img'], dir);
    const e = catchGetopt(() => getopt(['-x', '0', '512'], 'abCqP:s:l:v', null, { argv0: 'read' }));
    assert.equal(r.stderr, formatGetoptError('read', e));
  });
});

// ---------------------------------------------------------------------------
// sizes

test('qemuStrtosz: accepted syntax and values', () => {
  const ok: Array<[string, bigint]> = [
    ['0', 0n],
    ['1024', 1024n],
    ['1G', 1n << 30n],
    ['1g', 1n << 30n],
    ['1b', 1n],
    ['1B', 1n],
    ['1k', 1024n],
    ['1K', 1024n],
    ['2m', 2n << 20n],
    ['1T', 1n << 40n],
    ['1P', 1n << 50n],
    ['1E', 1n << 60n],
    ['1e', 1n << 60n],
    ['1.5M', 1572864n],
    ['1.5G', 1610612736n],
    ['12.345M', 12944671n],
    ['1.k', 1024n],
    ['1.', 1n],
    ['1.0', 1n],
    ['1.0b', 1n],
    ['1.5e', 1729382256910270464n],
    ['0.0000001k', 0n],
    ['1.9999999999999999999k', 1024n], // fraction rounds to 1.0, (uint64_t)2^64 == 0 on x86-64
    ['1.1e-400k', 1n], // strtod underflow: QEMU skips one char and ignores the error
    ['0x100', 256n],
    ['0X10', 16n],
    ['0x1E', 30n],
    ['08', 8n],
    ['010', 10n],
    [' 1k', 1024n],
    ['+1k', 1024n],
    ['18446744073709551615', (1n << 64n) - 1n],
    ['8E', 1n << 63n],
    ['15.999999999999999E', 18446744073709550464n],
  ];
  for (const [s, v] of ok) {
    const r = qemuStrtosz(s);
    assert.ok(r.ok, `${JSON.stringify(s)} should parse`);
    assert.equal(r.value, v, JSON.stringify(s));
    assert.deepEqual(r.warnings, []);
  }
  const hex = qemuStrtosz('0x10k');
  assert.ok(hex.ok);
  assert.equal(hex.value, 16384n);
  assert.deepEqual(hex.warnings, ['Using a multiplier suffix on hex numbers is deprecated: 0x10k']);

  const inval = ['', ' ', 'k', '1e3', '1E3', '1.5e3k', '.5k', '1.5', '1.5b', '0.5', '1kB', '1KiB', '1k ', '1k5', '1z',
    '1..5k', '0x', '0x1.8', '0x 10', '0x-10', '+ 1k', '-1', '-0', '-1k', '1.5 k', 'inf', '1.infk', '99999999999999999999k'];
  for (const s of inval) {
    const r = qemuStrtosz(s);
    assert.ok(!r.ok && r.error === 'EINVAL', `${JSON.stringify(s)} should be EINVAL`);
  }
  for (const s of ['18446744073709551616', '16E', '16384P', '0x10000000000000000', '-99999999999999999999']) {
    const r = qemuStrtosz(s);
    assert.ok(!r.ok && r.error === 'ERANGE', `${JSON.stringify(s)} should be ERANGE`);
  }
  // qemu_strtosz_MiB / _metric variants.
  const mib = qemuStrtosz('2', { defaultSuffix: 'M' });
  assert.ok(mib.ok && mib.value === 2n << 20n);
  const metric = qemuStrtosz('1.5k', { unit: 1000 });
  assert.ok(metric.ok && metric.value === 1500n);
});

test('parseSize: qemu-img cvtnum messages and limits', () => {
  assert.equal(parseSize('1G'), 1073741824);
  assert.equal(parseSizeBig('9223372036854775807'), INT64_MAX);
  assert.throws(() => parseSize('1e3'), {
    name: 'CliError',
    message: 'Invalid image size specified. You may use k, M, G, T, P or E suffixes for\n' +
      'kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.',
  });
  assert.throws(() => parseSize('8E'), { message: 'Invalid image size specified. Must be between 0 and 9223372036854775807.' });
  assert.throws(() => parseSize('16E'), { message: 'Invalid image size specified. Must be between 0 and 9223372036854775807.' });
  assert.throws(() => parseSize('5k', { name: 'rate limit', min: 1n, max: 4096n }), {
    message: 'Invalid rate limit specified. Must be between 1 and 4096.',
  });
  const warnings: string[] = [];
  assert.equal(parseSize('0x10k', { onWarning: (w) => warnings.push(w) }), 16384);
  assert.deepEqual(warnings, ['Using a multiplier suffix on hex numbers is deprecated: 0x10k']);
  // Warnings are reported even when the value is then rejected.
  const w2: string[] = [];
  assert.throws(() => parseSize('0x10kz', { onWarning: (w) => w2.push(w) }));
  assert.equal(w2.length, 1);
  assert.equal(
    formatError('qemu-img', 'Invalid image size specified. You may use k, M, G, T, P or E suffixes for\nkilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.'),
    'qemu-img: Invalid image size specified. You may use k, M, G, T, P or E suffixes for\n' +
      'qemu-img: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.\n',
  );
});

test('parseSize oracle: qemu-img create agrees on values, errors and warnings', (t) => {
  if (!needQemu(t)) {
    return;
  }
  const inputs = ['0', '1', '1G', '1g', '1024', '1.5M', '1e3', '0x100', '0x10k', '0X10', '1.k', '1.', '.5k', '1.5', '1.5b',
    '1b', '1kB', '1KiB', ' 1k', '1k ', '+1k', '-5', '-99999999999999999999', '9223372036854775807', '9223372036854775808',
    '8E', '7E', '16E', '1.0', '1.0b', '1.9999999999999999999k', '0.5', '1k5', '08', '010', '1T', '', 'k', '1z', '1..5k',
    '1.5e3k', '1.5E', '0x1.8', '1e', '1E3', '12.345M', '0.0000001k', '1.1e-400k', '1.5e1000k', '0x', '0x-10',
    '0xffffffffffffffff', '99999999999999999999k', '123.456789G', '0.001T', '7.999999999999999E', '1.5kb'];
  for (const s of inputs) {
    const real = run('qemu-img', ['create', '-f', 'raw', '--', NO_SUCH_FILE, s]);
    const m = / size=(-?\d+)/.exec(real.stdout);
    const warnings: string[] = [];
    let mine: string;
    let expectedStderr = '';
    try {
      mine = String(parseSizeBig(s, { onWarning: (w) => warnings.push(w) }));
    } catch (e) {
      assert.ok(e instanceof CliError);
      mine = 'error';
      expectedStderr = formatError('qemu-img', e.message);
    }
    const warnText = warnings.map((w) => formatWarning('qemu-img', w)).join('');
    if (m) {
      assert.equal(mine, m[1], `size ${JSON.stringify(s)}`);
      assert.ok(real.stderr.startsWith(warnText), `warnings for ${JSON.stringify(s)}`);
    } else {
      assert.equal(mine, 'error', `size ${JSON.stringify(s)} should fail`);
      assert.equal(real.stderr, warnText + expectedStderr, `stderr for ${JSON.stringify(s)}`);
    }
  }
});

test('cvtnum: qemu-io number parsing and messages', () => {
  assert.equal(cvtnum('64k'), 65536);
  assert.equal(cvtnum('0x200'), 512);
  const r = cvtnumRaw('8E');
  assert.ok(!r.ok && r.error === 'ERANGE');
  assert.throws(() => cvtnum('1x'), { message: 'Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- 1x' });
  assert.throws(() => cvtnum('16E'), { message: 'Parsing error: argument too large -- 16E' });
  assert.throws(() => cvtnum('1.5'), { message: 'Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- 1.5' });
  assert.equal(cvtnumErrorText('ERANGE', '99999999999999999999'), 'Parsing error: argument too large -- 99999999999999999999');
  const w: string[] = [];
  assert.equal(cvtnum('0x1k', (m) => w.push(m)), 1024);
  assert.deepEqual(w, ['Using a multiplier suffix on hex numbers is deprecated: 0x1k']);
});

test('cvtnum oracle: qemu-io prints the same parsing errors', (t) => {
  if (!needQemu(t)) {
    return;
  }
  withTmpDir((dir) => {
    assert.equal(run('qemu-img', ['create', '-q', '-f', 'raw', 'x.img', '1M'], dir).status, 0);
    const bad = ['1x', '99999999999999999999', '16E', '8E', '1.5', '1e3', 'k'];
    const cmds = bad.map((b) => ['-c', `read 0 ${b}`]).flat();
    const real = run('qemu-io', ['-f', 'raw', ...cmds, 'x.img'], dir);
    const expected = bad.map((b) => {
      try {
        cvtnum(b);
        return 'no error';
      } catch (e) {
        assert.ok(e instanceof CliError);
        return e.message + '\n';
      }
    }).join('');
    assert.equal(real.stdout, expected);
    assert.equal(real.status, 1);
  });
});

test('parseOptionSize: -o size=... messages', () => {
  assert.equal(parseOptionSize('cluster_size', '4k'), 4096n);
  assert.equal(parseOptionSize('size', '8E'), 1n << 63n);
  assert.throws(() => parseOptionSize('size', '16E'), { message: "Value '16E' is out of range for parameter 'size'" });
  assert.throws(() => parseOptionSize('size', '1.5x'), {
    message: "Parameter 'size' expects a non-negative number below 2^64\n" +
      'Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.',
  });
});

test('parseOptionSize oracle: qemu-img create -o', (t) => {
  if (!needQemu(t)) {
    return;
  }
  for (const v of ['16E', '99999999999999999999']) {
    const real = run('qemu-img', ['create', '-f', 'qcow2', '-o', `size=${v}`, NO_SUCH_FILE]);
    assert.throws(() => parseOptionSize('size', v), (e: unknown) => {
      assert.ok(e instanceof CliError);
      assert.equal(real.stderr, `qemu-img: ${NO_SUCH_FILE}: ${e.message}\n`);
      return true;
    });
  }
  // Values up to 2^64-1 are accepted; qemu-img prints them as int64.
  for (const v of ['15.999999999999999E', '8E', '0x8000000000000001', '1.5k', '12.345M']) {
    const r = run('qemu-img', ['create', '-f', 'qcow2', '-o', `size=${v}`, NO_SUCH_FILE]);
    const m = / size=(-?\d+)/.exec(r.stdout);
    assert.ok(m, r.stdout + r.stderr);
    assert.equal(BigInt.asIntN(64, parseOptionSize('size', v)), BigInt(m[1]!), v);
  }
  const real = run('qemu-img', ['create', '-f', 'qcow2', '-o', 'size=help', NO_SUCH_FILE]);
  assert.throws(() => parseOptionSize('size', 'help'), (e: unknown) => {
    assert.ok(e instanceof CliError);
    const [first, ...hint] = e.message.split('\n');
    assert.equal(real.stderr, `qemu-img: ${NO_SUCH_FILE}: ${first}\n${hint.join('\n')}\n`);
    return true;
  });
});

// ---------------------------------------------------------------------------
// option strings

test('option strings: parsing, escapes, flags, help, accumulation', () => {
  assert.deepEqual(parseOptString('cluster_size=4k,lazy_refcounts=on'), [['cluster_size', '4k'], ['lazy_refcounts', 'on']]);
  assert.deepEqual(parseOptString('backing_file=a,,b,backing_fmt=raw'), [['backing_file', 'a,b'], ['backing_fmt', 'raw']]);
  assert.deepEqual(parseOptString('a=1,,,b=2'), [['a', '1,'], ['b', '2']]);
  assert.deepEqual(parseOptString('a=1,,'), [['a', '1,']]);
  assert.deepEqual(parseOptString('lazy_refcounts'), [['lazy_refcounts', 'on']]);
  assert.deepEqual(parseOptString('nolazy_refcounts'), [['lazy_refcounts', 'off']]);
  assert.deepEqual(parseOptString('help'), [['help', 'on']]);
  assert.deepEqual(parseOptString('?'), [['?', 'on']]);
  assert.deepEqual(parseOptString('=x'), [['', 'x']]);
  assert.deepEqual(parseOptString('a=x=y'), [['a', 'x=y']]);
  assert.deepEqual(parseOptString('size=1M,size=2M'), [['size', '1M'], ['size', '2M']]);
  assert.deepEqual(parseOptString('id=foo,a=1'), [['a', '1']]);
  assert.deepEqual(parseOptString('id=foo,a=1', { keepId: true }), [['id', 'foo'], ['a', '1']]);
  assert.deepEqual(parseOptString('disk.img,,x,format=raw', { firstname: 'file' }), [['file', 'disk.img,x'], ['format', 'raw']]);
  assert.deepEqual(parseOptString(''), []);

  assert.deepEqual(getOptValue('a,,b,c'), { value: 'a,b', end: 4 });
  assert.deepEqual(getOptValue('abc'), { value: 'abc', end: 3 });
  assert.equal(escapeOptValue('a,b,,c'), 'a,,b,,,,c');

  assert.equal(hasHelpOption('size=1M,help'), true);
  assert.equal(hasHelpOption('?'), true);
  assert.equal(hasHelpOption('size=help'), false);
  assert.equal(hasHelpOption('a=x,,help'), false);
  assert.equal(hasHelpOption('helpme'), false);

  assert.equal(isValidOptionList('a=1'), true);
  assert.equal(isValidOptionList('a=1,,'), true);
  assert.equal(isValidOptionList(''), false);
  assert.equal(isValidOptionList(',x'), false);
  assert.equal(isValidOptionList('x,'), false);
  assert.equal(isValidOptionList('x,,,'), false);

  let acc = accumulateOptions(undefined, 'lazy_refcounts=on');
  acc = accumulateOptions(acc, 'cluster_size=4k');
  assert.equal(acc, 'lazy_refcounts=on,cluster_size=4k');
  assert.throws(() => accumulateOptions(acc, ',x'), { name: 'CliError', message: 'Invalid option list: ,x' });
  assert.throws(() => accumulateOptions(undefined, ''), { message: 'Invalid option list: ' });
});

test('option strings oracle: qemu-img create -o', (t) => {
  if (!needQemu(t)) {
    return;
  }
  // Escaped comma survives, repeated -o merge, last value wins, bare flag means on.
  const real = run('qemu-img', ['create', '-f', 'qcow2', '-u', '-o', 'backing_file=a,,b,backing_fmt=raw', '-o',
    'cluster_size=4k,cluster_size=8k', '-o', 'lazy_refcounts', NO_SUCH_FILE, '1M']);
  const opts = parseOptString(accumulateOptions(accumulateOptions(accumulateOptions(undefined,
    'backing_file=a,,b,backing_fmt=raw'), 'cluster_size=4k,cluster_size=8k'), 'lazy_refcounts'));
  const last = new Map(opts);
  assert.equal(last.get('backing_file'), 'a,b');
  assert.ok(real.stdout.includes(`backing_file=${escapeOptValue(last.get('backing_file') ?? '')} `));
  assert.ok(real.stdout.includes(`cluster_size=${parseOptionSize('cluster_size', last.get('cluster_size') ?? '')} `));
  assert.equal(last.get('lazy_refcounts'), 'on');
  assert.ok(real.stdout.includes('lazy_refcounts=on'));
  for (const bad of [',x', 'x,', '']) {
    const r = run('qemu-img', ['create', '-f', 'qcow2', '-o', bad, NO_SUCH_FILE, '1M']);
    assert.throws(() => accumulateOptions(undefined, bad), (e: unknown) => {
      assert.ok(e instanceof CliError);
      assert.equal(r.stderr, formatError('qemu-img', e.message));
      return true;
    });
  }
  // A bare "help" element prints the option list (exit 0); "size=help" does not.
  assert.equal(hasHelpOption('size=1M,help'), true);
  const help = run('qemu-img', ['create', '-f', 'qcow2', '-o', 'size=1M,help', NO_SUCH_FILE]);
  assert.equal(help.status, 0);
  assert.match(help.stdout, /^Supported options:/);
});

// ---------------------------------------------------------------------------
// human readable numbers

test('sizeToStr: QEMU size_to_str', () => {
  const cases: Array<[number | bigint, string]> = [
    [0, '0 B'],
    [1, '1 B'],
    [512, '512 B'],
    [999, '999 B'],
    [1000, '0.977 KiB'],
    [1024, '1 KiB'],
    [1536, '1.5 KiB'],
    [10240, '10 KiB'],
    [102400, '100 KiB'],
    [1023488, '1e+03 KiB'],
    [1024000, '0.977 MiB'],
    [1048576, '1 MiB'],
    [4194304, '4 MiB'],
    [397312, '388 KiB'],
    [104857600, '100 MiB'],
    [1610612736, '1.5 GiB'],
    [10737418752, '10 GiB'],
    [123457024, '118 MiB'],
    [1099511627776, '1 TiB'],
    [2 ** 50, '1 PiB'],
    [2 ** 60, '1 EiB'],
    [(1n << 64n) - 1n, '16 EiB'],
    [9223372036854775807n, '8 EiB'],
  ];
  for (const [n, s] of cases) {
    assert.equal(sizeToStr(n), s, String(n));
  }
});

/** Sizes (multiples of 512, as raw images round up) exercising every rounding path. */
const ORACLE_SIZES = [0, 512, 1024, 1536, 10240, 102400, 511488, 1022976, 1023488, 1024000, 1048064, 1048576, 1049088,
  1572864, 1610612736, 10737418752, 123457024, 1073741312, 1073741824, 1099511627776, 12345678848, 5368709120,
  1048576 * 999, 1048576 * 1000, 1048576 * 1023, 1048576 * 1023 + 524288, 4194304, 6291456, 104857600, 512 * 1999,
  512 * 2047, 512 * 20479, 512 * 204799, 512 * 2047999];

test('sizeToStr oracle: qemu-img info "virtual size" lines', (t) => {
  if (!needQemu(t)) {
    return;
  }
  withTmpDir((dir) => {
    const f = path.join(dir, 'v.img');
    for (const size of ORACLE_SIZES) {
      rmSync(f, { force: true });
      assert.equal(run('qemu-img', ['create', '-q', '-f', 'raw', f, String(size)]).status, 0);
      const info = run('qemu-img', ['info', '-f', 'raw', f]);
      const line = info.stdout.split('\n').find((l) => l.startsWith('virtual size:'));
      assert.equal(line, `virtual size: ${sizeToStr(size)} (${size} bytes)`);
      const len = run('qemu-io', ['-f', 'raw', '-c', 'length', f]);
      assert.equal(len.stdout, `${formatLength(size)}\n`, `qemu-io length ${size}`);
    }
  });
});

test('cvtstr: qemu-io human sizes', () => {
  const cases: Array<[number, string]> = [
    [0, '0 bytes'],
    [1, '1 bytes'],
    [512, '512 bytes'],
    [1023, '1023 bytes'],
    [1024, '1 KiB'],
    [1536, '1.500 KiB'],
    [65536, '64 KiB'],
    [917504, '896 KiB'],
    [1048576, '1 MiB'],
    [4063232, '3.875 MiB'],
    [4194304, '4 MiB'],
    [1048575, '1023.999 KiB'],
    [1048575.9, '1024 KiB'], // "1024.000" KiB
    [1024 * 1024 * 1024 * 1.25, '1.250 GiB'],
    [2 ** 40, '1 TiB'],
    [2 ** 50, '1 PiB'],
    [2 ** 61, '2 EiB'],
    [500.5, '500.500000 bytes'],
    [0.0005, '0 bytes'], // "0.000500" is cut at the first ".000"
    [26214400, '25 MiB'],
    [Infinity, 'inf EiB'],
  ];
  for (const [n, s] of cases) {
    assert.equal(cvtstr(n), s, String(n));
  }
  assert.equal(formatLength(4194304), '4 MiB');
});

test('map / alloc line formatters', () => {
  assert.equal(formatMapLine(131072, 0, true), '128 KiB (0x20000) bytes     allocated at offset 0 bytes (0x0)');
  assert.equal(formatMapLine(4063232, 131072, false), '3.875 MiB (0x3e0000) bytes not allocated at offset 128 KiB (0x20000)');
  assert.equal(formatMapLine(65536, 65536, true), '64 KiB (0x10000) bytes     allocated at offset 64 KiB (0x10000)');
  assert.equal(formatAllocLine(131072, 4194304, 0), '131072/4194304 bytes allocated at offset 0 bytes');
  assert.equal(formatAllocLine(0, 1048576, 3145728), '0/1048576 bytes allocated at offset 3 MiB');
  assert.equal(formatAllocLine(1, 1, 513), '1/1 bytes allocated at offset 513 bytes');
});

test('map / alloc oracle: qemu-io output', (t) => {
  if (!needQemu(t)) {
    return;
  }
  withTmpDir((dir) => {
    const f = path.join(dir, 'm.qcow2');
    assert.equal(run('qemu-img', ['create', '-q', '-f', 'qcow2', f, '5M']).status, 0);
    const w = run('qemu-io', ['-c', 'write 64k 64k', '-c', 'write 1M 1536k', '-c', 'write 4M 512', f]);
    assert.equal(w.status, 0);
    const map = run('qemu-io', ['-c', 'map', f]);
    // Reconstruct the runs from the hex fields and re-render every line.
    const lines = map.stdout.trimEnd().split('\n');
    let next = 0;
    for (const line of lines) {
      const m = /\(0x([0-9a-f]+)\) bytes +(allocated|not allocated) at offset .* \(0x([0-9a-f]+)\)$/.exec(line);
      assert.ok(m, line);
      const bytes = parseInt(m[1]!, 16);
      const offset = parseInt(m[3]!, 16);
      assert.equal(offset, next);
      next += bytes;
      assert.equal(formatMapLine(bytes, offset, m[2] === 'allocated'), line);
    }
    assert.equal(next, 5 * 1048576);
    const alloc = run('qemu-io', ['-c', 'alloc 0 5M', '-c', 'alloc 3M 1M', '-c', 'alloc 64k', '-c', 'alloc 4M 4k', f]);
    assert.equal(
      alloc.stdout,
      [
        formatAllocLine(65536 + 1572864 + 65536, 5242880, 0),
        formatAllocLine(0, 1048576, 3145728),
        formatAllocLine(512, 512, 65536),
        formatAllocLine(4096, 4096, 4194304),
      ].join('\n') + '\n',
    );
  });
});

test('formatIoStats / formatIoReport: print_report and timestr', () => {
  assert.equal(timestr({ sec: 0, nsec: 2_500_000 }, false), '00.00 sec');
  assert.equal(timestr({ sec: 0, nsec: 125_000_000 }, false), '00.12 sec');
  assert.equal(timestr({ sec: 0, nsec: 995_000_000 }, false), '00.99 sec'); // 0.995 is 0.99499999...
  assert.equal(timestr({ sec: 0, nsec: 996_000_000 }, false), '01.00 sec');
  assert.equal(timestr({ sec: 1, nsec: 500_000_000 }, false), '0:00:01.50');
  assert.equal(timestr({ sec: 3725, nsec: 250_000_000 }, false), '1:02:05.25');
  assert.equal(timestr({ sec: 0, nsec: 2_500_000 }, true), '0:00:00.00');
  assert.deepEqual(toElapsed(1.25), { sec: 1, nsec: 250_000_000 });
  assert.deepEqual(toElapsed(3_000_000_001n), { sec: 3, nsec: 1 });

  assert.equal(formatIoStats(65536, 1, 0.0025, false), '64 KiB, 1 ops; 00.00 sec (25 MiB/sec and 400.0000 ops/sec)');
  assert.equal(formatIoStats(65536, 1, 0.0025, true), '65536,1,0:00:00.00,26214400.000,400.000');
  assert.equal(
    formatIoStats(65536, 1, { sec: 0, nsec: 1_205_500 }, false),
    '64 KiB, 1 ops; 00.00 sec (51.846 MiB/sec and 829.5313 ops/sec)',
  );
  assert.equal(formatIoStats(1048576, 1, 1.5, false), '1 MiB, 1 ops; 0:00:01.50 (682.667 KiB/sec and 0.6667 ops/sec)');
  assert.equal(formatIoStats(512, 2, 1000n, false), '512 bytes, 2 ops; 00.00 sec (488.281 MiB/sec and 2000000.0000 ops/sec)');
  assert.equal(formatIoStats(100, 1, 1, false), '100 bytes, 1 ops; 0:00:01.00 (100 bytes/sec and 1.0000 ops/sec)');
  assert.equal(formatIoStats(0, 0, 0, false), '0 bytes, 0 ops; 00.00 sec (-nan bytes/sec and -nan ops/sec)');

  assert.equal(
    formatIoReport('wrote', 0, 65536, 65536, 1, 0.0025, false),
    'wrote 65536/65536 bytes at offset 0\n64 KiB, 1 ops; 00.00 sec (25 MiB/sec and 400.0000 ops/sec)\n',
  );
  assert.equal(formatIoReport('read', 512, 1024, 1024, 1, 0.5, true), '1024,1,0:00:00.50,2048.000,2.000\n');
});

/** qemu-iotests' _filter_qemu_io timing normalisation. */
function filterTiming(s: string): string {
  return s.replace(
    /[0-9]* ops; [0-9/:. sec]* \([0-9/.inf]* [EPTGMKiBbytes]*\/sec and [0-9/.inf]* ops\/sec\)/g,
    'X ops; XX:XX:XX.X (XXX YYY/sec and XXX ops/sec)',
  );
}

test('formatIoReport oracle: qemu-io write/read report lines', (t) => {
  if (!needQemu(t)) {
    return;
  }
  withTmpDir((dir) => {
    const f = path.join(dir, 'r.qcow2');
    assert.equal(run('qemu-img', ['create', '-q', '-f', 'qcow2', f, '4M']).status, 0);
    const real = run('qemu-io', ['-c', 'write 0 64k', '-c', 'write -P 0x11 1M 1536', '-c', 'read 0 512', '-c', 'write -C 64k 64k',
      '-c', 'read -C 0 128k', '-c', 'discard 0 64k', f]);
    assert.equal(real.status, 0);
    const expected = formatIoReport('wrote', 0, 65536, 65536, 1, 0.001, false) +
      formatIoReport('wrote', 1048576, 1536, 1536, 1, 0.001, false) +
      formatIoReport('read', 0, 512, 512, 1, 0.001, false) +
      formatIoReport('wrote', 65536, 65536, 65536, 1, 0.001, true) +
      formatIoReport('read', 0, 131072, 131072, 1, 0.001, true) +
      formatIoReport('discard', 0, 65536, 65536, 1, 0.001, false);
    const csvPattern = /^\d+,1,0:00:00\.\d\d,\d+\.\d{3},\d+\.\d{3}$/;
    const realLines = filterTiming(real.stdout).split('\n');
    const myLines = filterTiming(expected).split('\n');
    assert.equal(realLines.length, myLines.length);
    realLines.forEach((line, i) => {
      if (csvPattern.test(line)) {
        assert.match(myLines[i]!, csvPattern);
        assert.equal(line.split(',')[0], myLines[i]!.split(',')[0]);
      } else {
        assert.equal(line, myLines[i]);
      }
    });
    // The rates in a real non-CSV line are consistent with the printed ops/sec.
    const m = /^64 KiB, 1 ops; (\d\d\.\d\d sec) \((.*)\/sec and (\d+\.\d{4}) ops\/sec\)$/m.exec(real.stdout);
    assert.ok(m, real.stdout);
    const seconds = 1 / Number(m[3]);
    const mine = formatIoStats(65536, 1, seconds, false);
    assert.equal(mine.split(' (')[0], `64 KiB, 1 ops; ${m[1]}`);
  });
});

// ---------------------------------------------------------------------------
// progress

test('ProgressPrinter: qemu-progress.c semantics', () => {
  const out = new Sink();
  const p = new ProgressPrinter(true, out, 1.0);
  p.print(0, 100); // 0 always prints
  p.print(0.5, 0); // not > 0 + 1
  p.print(1.0, 0); // not strictly greater
  p.print(1.01, 0); // prints
  p.print(15.625, 0); // ties-to-even: 15.62
  p.print(200, 0); // capped at 100
  p.print(100, 0); // 100 always prints
  p.end();
  assert.equal(out.text, '    (0.00/100%)\r    (1.01/100%)\r    (15.62/100%)\r    (100.00/100%)\r    (100.00/100%)\r\n');

  // Relative mode: delta is a percentage of max.
  const rel = new ProgressPrinter(true, new Sink(), 2.0);
  rel.print(50, 40); // +20
  rel.print(50, 40); // +20
  assert.equal(rel.current, 40);
  rel.print(1, 100); // 41: not > 40 + 2
  assert.equal(rel.current, 41);

  // float32 arithmetic like the C code
  const f = new ProgressPrinter(true, new Sink());
  f.print(0.1, 0);
  assert.equal(f.current, Math.fround(0.1));

  // Disabled: silent, except a SIGUSR1-style report goes to the error stream.
  const o2 = new Sink();
  const e2 = new Sink();
  const d = new ProgressPrinter(false, o2, 1.0, e2);
  d.print(0, 100);
  d.print(50, 0);
  d.requestReport();
  d.print(50.5, 0); // below threshold: nothing yet
  d.print(60, 0);
  d.print(70, 0);
  d.end();
  assert.equal(o2.text, '');
  assert.equal(e2.text, '    (60.00/100%)\n');
  assert.equal(formatProgress(3.125), '    (3.12/100%)');
  assert.equal(formatProgress(100), '    (100.00/100%)');
});

test('ProgressPrinter oracle: matches qemu-img convert -p byte for byte', (t) => {
  if (!needQemu(t)) {
    return;
  }
  withTmpDir((dir) => {
    const src = path.join(dir, 's.qcow2');
    assert.equal(run('qemu-img', ['create', '-q', '-f', 'qcow2', src, '64M']).status, 0);
    assert.equal(run('qemu-io', ['-c', 'write 0 64M', src]).status, 0);
    const real = run('qemu-img', ['convert', '-p', '-O', 'raw', src, path.join(dir, 'd.raw')]);
    assert.equal(real.status, 0);
    // convert: init(1.0), print(0, 100), one update per 2 MiB chunk, print(100, 0), end().
    const out = new Sink();
    const p = new ProgressPrinter(true, out, 1.0);
    p.print(0, 100);
    for (let k = 1; k <= 32; k++) {
      p.print((100.0 * k) / 32, 0);
    }
    p.print(100, 0);
    p.end();
    assert.equal(real.stdout, out.text);
  });
});

// ---------------------------------------------------------------------------
// errors

test('errors: CliError, UsageError, fatal and friends', () => {
  const e = new CliError('boom');
  assert.equal(e.exitCode, 1);
  assert.equal(e.name, 'CliError');
  assert.equal(new CliError('x', 2).exitCode, 2);
  const u = new UsageError('Expecting one image file name');
  assert.ok(u instanceof CliError && u instanceof Error);
  assert.equal(u.name, 'UsageError');

  const s = new Sink();
  fatal('qemu-img', 'Could not open \'x\': No such file or directory', s);
  assert.equal(s.text, "qemu-img: Could not open 'x': No such file or directory\n");
  const w = new Sink();
  warn('qemu-img', 'Using a multiplier suffix on hex numbers is deprecated: 0x10k', w);
  assert.equal(w.text, 'qemu-img: warning: Using a multiplier suffix on hex numbers is deprecated: 0x10k\n');
  assert.equal(formatError('qemu-img', 'a\nb'), 'qemu-img: a\nqemu-img: b\n');
  assert.equal(formatErrorExit('qemu-img', 'Not enough arguments'), "qemu-img: Not enough arguments\nTry 'qemu-img --help' for more information\n");

  const r1 = new Sink();
  assert.equal(reportError('qemu-img', u, r1), 1);
  assert.equal(r1.text, "qemu-img: Expecting one image file name\nTry 'qemu-img --help' for more information\n");
  const r2 = new Sink();
  assert.equal(reportError('qemu-io', u, r2, false), 1);
  assert.equal(r2.text, 'qemu-io: Expecting one image file name\n');
  const r3 = new Sink();
  assert.equal(reportError('qemu-img', new CliError('x', 3), r3), 3);
  assert.equal(r3.text, 'qemu-img: x\n');
  const r4 = new Sink();
  assert.equal(reportError('qemu-img', new Error('plain'), r4), 1);
  assert.equal(r4.text, 'qemu-img: plain\n');
});

test('errors oracle: qemu-img error_exit text', (t) => {
  if (!needQemu(t)) {
    return;
  }
  assert.equal(run('qemu-img', ['info']).stderr, formatErrorExit('qemu-img', 'Expecting one image file name'));
  assert.equal(run('qemu-img', []).stderr, formatErrorExit('qemu-img', 'Not enough arguments'));
  const r = run('qemu-img', ['create', '-f', 'raw', '--', NO_SUCH_FILE, '1M', '-q']);
  assert.equal(r.stderr, formatErrorExit('qemu-img', 'Unexpected argument: -q'));
  assert.equal(r.status, 1);
});
