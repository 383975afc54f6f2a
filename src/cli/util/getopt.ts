/**
 * A faithful work-alike of glibc's `getopt_long()` (glibc 2.36, the version
 * qemu-img / qemu-io 7.2 are linked against on Debian 12).
 *
 * Supported, as in glibc:
 * - bundled short options (`-pq`), attached arguments (`-fqcow2`), separate
 *   arguments (`-f qcow2`; the next element is taken even if it starts with `-`),
 *   optional arguments (`x::`, only attached);
 * - long options `--name`, `--name=value`, `--name value` (required args),
 *   unambiguous prefixes (`--out=json` for `--output`), exact matches winning
 *   over prefixes, and ambiguity detection;
 * - `--` ends option processing; a lone `-` is a positional argument;
 * - GNU permutation (default): options after positional arguments are still
 *   parsed, positional arguments keep their order (qemu-img subcommands and
 *   qemu-io commands rely on this: `qemu-img create x.img 1M -f raw` works);
 * - a leading `+` in the short spec (or `posixlyCorrect`) stops at the first
 *   positional argument (qemu-img's global option parsing uses `"+:hVT:"`);
 * - a leading `-` returns positional arguments in order as option `'\x01'`;
 * - a leading `:` (after `+`/`-`) selects "silent" mode: in glibc no message is
 *   printed and a missing argument is reported as `':'` instead of `'?'`.
 *
 * Errors are thrown as {@link GetoptError} (a {@link UsageError}).  Its
 * `message` is glibc's diagnostic without the `argv[0]: ` prefix, e.g.
 * `invalid option -- 'z'`.  Two formatters reproduce what the real tools print:
 * - {@link formatGetoptError}: glibc's own text, as printed by qemu-io (both the
 *   top level, `qemu-io: invalid option -- 'z'`, and its commands,
 *   `read: invalid option -- 'x'`);
 * - {@link formatQemuImgGetoptError}: qemu-img uses silent mode and prints
 *   `qemu-img: unrecognized option '<argv[optind-1]>'` or
 *   `qemu-img: missing argument for option '<argv[optind-1]>'` followed by
 *   `Try 'qemu-img --help' for more information`.  Because glibc's optind
 *   only advances after the last character of a bundle, the quoted word is
 *   sometimes surprising (`qemu-img info -zU x` reports `'info'`); the exact
 *   word is kept in {@link GetoptError.offendingArg}.
 *
 * @module
 */

import { UsageError, formatErrorExit } from './errors.js';

/** Description of one long option (glibc `struct option` with `flag == NULL`). */
export interface LongOption {
  /** Option name without the leading `--`. */
  name: string;
  /** `no_argument`, `required_argument` or `optional_argument`. */
  hasArg: 'no' | 'required' | 'optional';
  /** Value reported in {@link ParsedOption.opt} when this option is found. */
  val: string;
}

/** One option found on the command line, in command line order. */
export interface ParsedOption {
  /** The short option character, the long option's `val`, or `'\x01'` for an in-order positional argument. */
  opt: string;
  /** The option argument, if any. */
  arg?: string;
  /** For long options: the full option name that was matched. */
  longName?: string;
}

/** Result of {@link getopt}. */
export interface GetoptResult {
  /** Options in the order they were found. */
  opts: ParsedOption[];
  /** The remaining (positional) arguments, in order, i.e. `argv[optind..]` after permutation. */
  rest: string[];
}

/** Extra knobs for {@link getopt}. */
export interface GetoptConfig {
  /**
   * `argv[0]` as the C program sees it (qemu-img subcommands: the subcommand
   * name, e.g. `"info"`; qemu-io commands: the command name).  It is only used
   * for {@link GetoptError.offendingArg}, which can point at `argv[0]`.
   */
  argv0?: string;
  /** Behave as if `POSIXLY_CORRECT` were set (stop at the first non-option). Default false. */
  posixlyCorrect?: boolean;
}

/** Which getopt diagnostic occurred. */
export type GetoptErrorKind =
  | 'invalid-option' /* unknown short option */
  | 'missing-argument' /* short or long option lacks its required argument */
  | 'unrecognized-option' /* unknown long option */
  | 'ambiguous-option' /* long option prefix matches several options */
  | 'unexpected-argument'; /* `--flag=value` for a no-argument option */

/**
 * A getopt failure.  `message` is glibc's text without the program prefix,
 * e.g. `invalid option -- 'z'`, `option requires an argument -- 'f'`,
 * `unrecognized option '--foo'`, `option '--c' is ambiguous; possibilities: '--cmd' '--cache'`,
 * `option '--help' doesn't allow an argument`, `option '--cache' requires an argument`.
 */
export class GetoptError extends UsageError {
  /** Which diagnostic this is. */
  readonly kind: GetoptErrorKind;
  /** glibc `optopt`: the offending short option character or long option `val` (`''` when none). */
  readonly optopt: string;
  /** `argv[optind - 1]` at the time of the error (what qemu-img quotes). */
  readonly offendingArg: string;
  /** glibc's return value: `':'` for a missing argument in silent (`:`) mode, else `'?'`. */
  readonly code: '?' | ':';

  constructor(kind: GetoptErrorKind, message: string, optopt: string, offendingArg: string, code: '?' | ':') {
    super(message);
    this.name = 'GetoptError';
    this.kind = kind;
    this.optopt = optopt;
    this.offendingArg = offendingArg;
    this.code = code;
  }
}

/**
 * The line glibc itself prints to stderr for this error (used by qemu-io and
 * its commands): `program: invalid option -- 'z'\n`.
 */
export function formatGetoptError(program: string, err: GetoptError): string {
  return `${program}: ${err.message}\n`;
}

/**
 * The message qemu-img 7.2 prints for a getopt failure, without program prefix:
 * `missing argument for option '<arg>'` when getopt returned `':'`, otherwise
 * `unrecognized option '<arg>'`, where `<arg>` is `argv[optind - 1]`.
 */
export function qemuImgGetoptMessage(err: GetoptError): string {
  return err.code === ':'
    ? `missing argument for option '${err.offendingArg}'`
    : `unrecognized option '${err.offendingArg}'`;
}

/**
 * Full qemu-img stderr text for a getopt failure:
 * `qemu-img: unrecognized option '-z'\nTry 'qemu-img --help' for more information\n`.
 */
export function formatQemuImgGetoptError(err: GetoptError, program = 'qemu-img'): string {
  return formatErrorExit(program, qemuImgGetoptMessage(err));
}

type Ordering = 'permute' | 'require' | 'return-in-order';

/**
 * Parse `argv` (the arguments *after* argv[0]) like glibc `getopt_long()`
 * called in a loop until it returns -1.  Throws {@link GetoptError} at the
 * first error, as every QEMU tool exits (or aborts the command) on the first
 * `'?'` / `':'`.
 *
 * @param argv arguments without the program name
 * @param shortSpec glibc optstring, e.g. `":f:hU"`, `"+:hVT:"`, `"bcCfnpP:quzs:"`
 * @param longOpts long options; `null` (the default) means plain `getopt()`,
 *   where `--foo` is parsed as the short options `-`, `f`, `o`, `o`
 */
export function getopt(
  argv: readonly string[],
  shortSpec: string,
  longOpts: readonly LongOption[] | null = null,
  config: GetoptConfig = {},
): GetoptResult {
  const args: string[] = [config.argv0 ?? '', ...argv];
  const argc = args.length;

  // _getopt_initialize
  let spec = shortSpec;
  let ordering: Ordering;
  if (spec.startsWith('-')) {
    ordering = 'return-in-order';
    spec = spec.slice(1);
  } else if (spec.startsWith('+')) {
    ordering = 'require';
    spec = spec.slice(1);
  } else if (config.posixlyCorrect) {
    ordering = 'require';
  } else {
    ordering = 'permute';
  }
  const silent = spec.startsWith(':');

  let optind = 1;
  let firstNonopt = 1;
  let lastNonopt = 1;
  // Current position inside a bundle of short options ('' = none).
  let nextchar = '';
  const opts: ParsedOption[] = [];

  const isNonoption = (s: string): boolean => s[0] !== '-' || s.length === 1;

  /** glibc exchange(): move [lastNonopt, optind) before [firstNonopt, lastNonopt). */
  const exchange = (): void => {
    const nonopts = args.slice(firstNonopt, lastNonopt);
    const options = args.slice(lastNonopt, optind);
    args.splice(firstNonopt, optind - firstNonopt, ...options, ...nonopts);
    firstNonopt += optind - lastNonopt;
    lastNonopt = optind;
  };

  const fail = (kind: GetoptErrorKind, message: string, optopt: string, code: '?' | ':'): never => {
    throw new GetoptError(kind, message, optopt, args[optind - 1] ?? '', code);
  };

  const processLong = (): void => {
    const prefix = '--';
    const body = nextchar;
    const eq = body.indexOf('=');
    const name = eq >= 0 ? body.slice(0, eq) : body;
    const table = longOpts ?? [];
    let found: LongOption | undefined = table.find((o) => o.name === name);
    if (found === undefined) {
      // No exact match: look for abbreviations.
      const ambig = new Set<number>();
      let first: LongOption | undefined;
      let firstIdx = -1;
      for (let idx = 0; idx < table.length; idx++) {
        const o = table[idx]!;
        if (!o.name.startsWith(name)) {
          continue;
        }
        if (first === undefined) {
          first = o;
          firstIdx = idx;
        } else if (first.hasArg !== o.hasArg || first.val !== o.val) {
          ambig.add(firstIdx);
          ambig.add(idx);
        }
      }
      if (ambig.size > 0) {
        let poss = '';
        for (let idx = 0; idx < table.length; idx++) {
          if (ambig.has(idx)) {
            poss += ` '${prefix}${table[idx]!.name}'`;
          }
        }
        nextchar = '';
        optind++;
        fail('ambiguous-option', `option '${prefix}${body}' is ambiguous; possibilities:${poss}`, '', '?');
      }
      found = first;
    }
    if (found === undefined) {
      nextchar = '';
      optind++;
      fail('unrecognized-option', `unrecognized option '${prefix}${body}'`, '', '?');
      return;
    }
    const opt: LongOption = found;
    optind++;
    nextchar = '';
    if (eq >= 0) {
      if (opt.hasArg !== 'no') {
        opts.push({ opt: opt.val, arg: body.slice(eq + 1), longName: opt.name });
        return;
      }
      fail('unexpected-argument', `option '${prefix}${opt.name}' doesn't allow an argument`, opt.val, '?');
    } else if (opt.hasArg === 'required') {
      if (optind < argc) {
        opts.push({ opt: opt.val, arg: args[optind++]!, longName: opt.name });
        return;
      }
      fail('missing-argument', `option '${prefix}${opt.name}' requires an argument`, opt.val, silent ? ':' : '?');
    }
    opts.push({ opt: opt.val, longName: opt.name });
  };

  for (;;) {
    if (nextchar === '') {
      // Advance to the next ARGV-element.
      if (lastNonopt > optind) {
        lastNonopt = optind;
      }
      if (firstNonopt > optind) {
        firstNonopt = optind;
      }
      if (ordering === 'permute') {
        if (firstNonopt !== lastNonopt && lastNonopt !== optind) {
          exchange();
        } else if (lastNonopt !== optind) {
          firstNonopt = optind;
        }
        while (optind < argc && isNonoption(args[optind]!)) {
          optind++;
        }
        lastNonopt = optind;
      }
      if (optind !== argc && args[optind] === '--') {
        optind++;
        if (firstNonopt !== lastNonopt && lastNonopt !== optind) {
          exchange();
        } else if (firstNonopt === lastNonopt) {
          firstNonopt = optind;
        }
        lastNonopt = argc;
        optind = argc;
      }
      if (optind === argc) {
        if (firstNonopt !== lastNonopt) {
          optind = firstNonopt;
        }
        break;
      }
      const cur = args[optind]!;
      if (isNonoption(cur)) {
        if (ordering === 'require') {
          break;
        }
        opts.push({ opt: '\x01', arg: cur });
        optind++;
        continue;
      }
      if (longOpts !== null && cur[1] === '-') {
        nextchar = cur.slice(2);
        processLong();
        continue;
      }
      nextchar = cur.slice(1);
    }

    // Handle the next short option character.
    const c = nextchar[0]!;
    nextchar = nextchar.slice(1);
    const pos = spec.indexOf(c);
    if (nextchar === '') {
      optind++;
    }
    if (pos < 0 || c === ':' || c === ';') {
      fail('invalid-option', `invalid option -- '${c}'`, c, '?');
    }
    if (spec[pos + 1] === ':') {
      if (spec[pos + 2] === ':') {
        // Optional argument: only an attached one counts.
        if (nextchar !== '') {
          opts.push({ opt: c, arg: nextchar });
          optind++;
        } else {
          opts.push({ opt: c });
        }
        nextchar = '';
      } else if (nextchar !== '') {
        opts.push({ opt: c, arg: nextchar });
        optind++;
        nextchar = '';
      } else if (optind === argc) {
        fail('missing-argument', `option requires an argument -- '${c}'`, c, silent ? ':' : '?');
      } else {
        opts.push({ opt: c, arg: args[optind++]! });
        nextchar = '';
      }
    } else {
      opts.push({ opt: c });
    }
  }

  return { opts, rest: args.slice(optind) };
}
