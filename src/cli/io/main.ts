/**
 * `qchain io`: the qemu-io 7.2 command line.
 *
 *   qemu-io [-f fmt] [-r] [-U] [-s] [-n] [-C] [-t cache] [-d discard] [-i aio] [-c cmd]... [file]
 *
 * The commands given with -c run in order; without -c, commands are read from stdin, one per
 * line, after a `qemu-io> ` prompt (as qemu-io does, also when stdin is not a terminal). The exit
 * status is 1 when any command failed, else 0.
 *
 * @module
 */
import { packageVersion } from '../util/version.js';
import readline from 'node:readline';
import type { CliContext } from '../context.js';
import { getopt, GetoptError, formatGetoptError, type LongOption } from '../util/getopt.js';
import { errnoOf } from './errno.js';
import { USAGE } from './help.js';
import { IoSession, type OpenRequest } from './session.js';
import { isAioMode, isCacheMode, isDirectCacheMode, parseDiscardMode, runCommand } from './commands.js';

const PROMPT = 'qemu-io> ';

const SHORT_OPTS = 'hVc:d:f:rsnCmki:t:T:U';
const LONG_OPTS: LongOption[] = [
  { name: 'help', hasArg: 'no', val: 'h' },
  { name: 'version', hasArg: 'no', val: 'V' },
  { name: 'cmd', hasArg: 'required', val: 'c' },
  { name: 'format', hasArg: 'required', val: 'f' },
  { name: 'read-only', hasArg: 'no', val: 'r' },
  { name: 'snapshot', hasArg: 'no', val: 's' },
  { name: 'nocache', hasArg: 'no', val: 'n' },
  { name: 'copy-on-read', hasArg: 'no', val: 'C' },
  { name: 'misalign', hasArg: 'no', val: 'm' },
  { name: 'native-aio', hasArg: 'no', val: 'k' },
  { name: 'aio', hasArg: 'required', val: 'i' },
  { name: 'discard', hasArg: 'required', val: 'd' },
  { name: 'cache', hasArg: 'required', val: 't' },
  { name: 'trace', hasArg: 'required', val: 'T' },
  { name: 'object', hasArg: 'required', val: 'O' },
  { name: 'image-opts', hasArg: 'no', val: 'I' },
  { name: 'force-share', hasArg: 'no', val: 'U' },
];



export async function ioMain(argv: string[], ctx: CliContext): Promise<number> {
  const s = new IoSession(ctx.stdout, ctx.stderr);
  const req: OpenRequest = { file: null, readOnly: false, snapshot: false, copyOnRead: false, unmap: true, forceShare: false };
  const commands: string[] = [];
  let imageOpts = false;

  let parsed;
  try {
    parsed = getopt(argv, SHORT_OPTS, LONG_OPTS, { argv0: 'qemu-io' });
  } catch (e) {
    if (!(e instanceof GetoptError)) throw e;
    ctx.stderr.write(formatGetoptError('qemu-io', e));
    ctx.stdout.write(USAGE);
    return 1;
  }
  for (const { opt, arg = '' } of parsed.opts) {
    switch (opt) {
      case 's': req.snapshot = true; break;
      case 'n': req.directCache = true; break;
      case 'C': req.copyOnRead = true; break;
      case 'd': {
        const d = parseDiscardMode(arg);
        if (d === null) {
          s.report(`Invalid discard option: ${arg}`);
          return 1;
        }
        req.unmap = d;
        break;
      }
      case 'f': req.format = arg; break;
      case 'c': commands.push(arg); break;
      case 'r': req.readOnly = true; break;
      case 'm': break;
      case 'k': req.nativeAio = true; break;
      case 'i':
        if (!isAioMode(arg)) {
          s.report(`Invalid aio option: ${arg}`);
          return 1;
        }
        req.nativeAio = arg === 'native';
        break;
      case 't':
        if (!isCacheMode(arg)) {
          s.report(`Invalid cache option: ${arg}`);
          return 1;
        }
        req.directCache = isDirectCacheMode(arg);
        break;
      case 'T': break; // tracing is not available
      case 'V':
        ctx.stdout.write(`qemu-io version 7.2.0 (qchain ${await packageVersion()})\n`);
        return 0;
      case 'h':
        ctx.stdout.write(USAGE);
        return 0;
      case 'U': req.forceShare = true; break;
      case 'O': break; // --object: secrets are not needed by the supported formats
      case 'I': imageOpts = true; break;
    }
  }
  if (parsed.rest.length > 1) {
    ctx.stdout.write(USAGE);
    return 1;
  }
  if (req.format !== undefined && imageOpts) {
    s.report('--image-opts and -f are mutually exclusive');
    return 1;
  }
  if (imageOpts && parsed.rest.length === 1) {
    s.report("can't open: --image-opts is not supported by qchain");
    return 1;
  }

  let lastError = 0;
  try {
    if (parsed.rest.length === 1) {
      req.file = parsed.rest[0];
      if (!(await s.open(req))) return 1;
    }
    if (commands.length > 0) {
      for (const cmd of commands) {
        if (s.quit) break;
        const ret = await runCommand(s, cmd);
        if (ret < 0) lastError = ret;
      }
    } else {
      lastError = await commandLoop(s);
    }
  } catch (e) {
    // Not an I/O error: a bug. Report it in one line, never with a stack trace.
    s.report(e instanceof Error ? e.message : String(e));
    await s.close().catch(() => false);
    return 1;
  }
  try {
    if (!(await s.close())) return 1;
  } catch (e) {
    if (errnoOf(e) === null) s.report(e instanceof Error ? e.message : String(e));
    return 1;
  }
  return lastError < 0 ? 1 : 0;
}

/** Read commands from stdin, one per line, each after a prompt, until EOF or `quit`. */
async function commandLoop(s: IoSession): Promise<number> {
  let lastError = 0;
  const input = process.stdin;
  const rl = readline.createInterface({ input, terminal: false, crlfDelay: Infinity });
  try {
    s.out(PROMPT);
    for await (const line of rl) {
      const ret = await runCommand(s, line);
      if (ret < 0) lastError = ret;
      if (s.quit) break;
      s.out(PROMPT);
    }
  } finally {
    rl.close();
    if (s.quit) input.destroy();
  }
  return lastError;
}
