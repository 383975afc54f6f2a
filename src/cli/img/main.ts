/** `qchain img`: the qemu-img command line. */
import type { CliContext } from '../context.js';
import { CliError, UsageError, reportError } from '../util/errors.js';
import { PROG } from './common.js';

const COMMANDS: Record<string, () => Promise<(argv: string[], ctx: CliContext) => Promise<number>>> = {
  create: async () => (await import('./create.js')).createMain,
  info: async () => (await import('./info.js')).infoMain,
  map: async () => (await import('./map.js')).mapMain,
  check: async () => (await import('./check.js')).checkMain,
  commit: async () => (await import('./commit.js')).commitMain,
  convert: async () => (await import('./convert.js')).convertMain,
  snapshot: async () => (await import('./snapshot.js')).snapshotMain,
  resize: async () => (await import('./resize.js')).resizeMain,
  rebase: async () => (await import('./rebase.js')).rebaseMain,
  bench: async () => (await import('./bench.js')).benchMain,
  bitmap: async () => (await import('./bitmap.js')).bitmapMain,
  compare: async () => (await import('./compare.js')).compareMain,
  measure: async () => (await import('./measure.js')).measureMain,
  dd: async () => (await import('./dd.js')).ddMain,
  amend: async () => (await import('./amend.js')).amendMain,
};

const HELP = `qchain img - the qemu-img command line, implemented without QEMU
usage: qchain img [standard options] command [command options]

Command syntax:
  amend [-p] [-q] [-f fmt] [-t cache] [--force] -o options filename
  bench [-c count] [-d depth] [-f fmt] [--flush-interval=N] [-o offset] [--pattern=N] [-q] [-s buffer_size] [-S step_size] [-w] filename
  bitmap (--add [-g granularity] | --remove | --clear | --enable | --disable | --merge source [-b source_file [-F source_fmt]])... [-f fmt] filename bitmap
  check [-q] [-f fmt] [--output=ofmt] [-r [leaks | all]] [-U] filename
  commit [-q] [-f fmt] [-t cache] [-b base] [-r rate_limit] [-d] [-p] filename
  compare [-f fmt] [-F fmt] [-T src_cache] [-p] [-q] [-s] [-U] filename1 filename2
  convert [-c] [-p] [-q] [-n] [-f fmt] [-O output_fmt] [-B backing_file [-F backing_fmt]] [-o options] [-S sparse_size] [-m num_coroutines] [-W] filename [filename2 [...]] output_filename
  create [-q] [-f fmt] [-b backing_file [-F backing_fmt]] [-u] [-o options] filename [size]
  dd [-U] [-f fmt] [-O output_fmt] [bs=block_size] [count=blocks] [skip=blocks] if=input of=output
  info [-f fmt] [--output=ofmt] [--backing-chain] [-U] filename
  map [-f fmt] [--start-offset=offset] [--max-length=len] [--output=ofmt] [-U] filename
  measure [--output=ofmt] [-O output_fmt] [-o options] [--size N | [-f fmt] [-l snapshot_param] filename]
  rebase [-q] [-f fmt] [-t cache] [-T src_cache] [-p] [-u] [-U] -b backing_file [-F backing_fmt] filename
  resize [-f fmt] [--preallocation=prealloc] [-q] [--shrink] filename [+ | -]size
  snapshot [-q] [-l | -a snapshot | -c snapshot | -d snapshot] filename

Supported formats: qcow2 raw
Messages, JSON and exit codes are those of qemu-img 7.2.
`;

export async function imgMain(argv: string[], ctx: CliContext): Promise<number> {
  const [cmd, ...rest] = argv;
  if (cmd === undefined) {
    ctx.stderr.write(`${PROG}: Not enough arguments\nTry '${PROG} --help' for more information\n`);
    return 1;
  }
  if (cmd === '-h' || cmd === '--help') {
    ctx.stdout.write(HELP);
    return 0;
  }
  if (cmd === '-V' || cmd === '--version') {
    ctx.stdout.write('qchain img (qemu-img 7.2 compatible)\n');
    return 0;
  }
  const loader = COMMANDS[cmd];
  if (!loader) {
    ctx.stderr.write(`${PROG}: Command not found: ${cmd}\nTry '${PROG} --help' for more information\n`);
    return 1;
  }
  try {
    return await (await loader())(rest, ctx);
  } catch (e) {
    if (e instanceof UsageError) return reportError(PROG, e, ctx.stderr);
    if (e instanceof CliError) return reportError(PROG, e, ctx.stderr);
    return reportError(PROG, new CliError(e instanceof Error ? e.message : String(e)), ctx.stderr);
  }
}
