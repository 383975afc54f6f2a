/**
 * The `qchain` executable: `qchain img …` (the qemu-img command line), `qchain io …` (qemu-io),
 * `qchain demo`. Messages use the program names of the tools they mirror ("qemu-img: …"), so
 * scripts written against QEMU's tools read the same text.
 */
import { packageVersion } from './util/version.js';
import { processContext, type CliContext } from './context.js';

const USAGE = `qchain - qcow2 backing-chain management (qemu-img / qemu-io compatible)

Usage:
  qchain img <command> [options...]   the qemu-img command line (create, info, map, check, convert,
                                      commit, rebase, snapshot, compare, measure, resize, amend,
                                      bitmap, dd, bench)
  qchain io [options...] [-c cmd]... file   the qemu-io command line
  qchain daemon [options] [file]       the storage daemon: NBD exports of open chains (qemu-storage-daemon)
  qchain demo                          build the seed walk-through chain in a temporary folder and show it
  qchain --help | --version

Run 'qchain img --help' or 'qchain io --help' for the commands and their options.
`;

export async function main(argv: string[], ctx: CliContext = processContext): Promise<number> {
  const [cmd, ...rest] = argv;
  // Flush output before the process exits, and never print a stack trace.
  try {
    switch (cmd) {
      case 'img': return await (await import('./img/main.js')).imgMain(rest, ctx);
      case 'io': return await (await import('./io/main.js')).ioMain(rest, ctx);
      case 'demo': return await (await import('./demo.js')).demoMain(rest, ctx);
      case 'daemon': return await (await import('./daemon/main.js')).daemonMain(rest, ctx);
      case '--version': case '-V': ctx.stdout.write(`qchain ${await packageVersion()}\n`); return 0;
      case undefined: case '-h': case '--help': ctx.stdout.write(USAGE); return cmd === undefined ? 1 : 0;
      default:
        ctx.stderr.write(`qchain: unknown command '${cmd}'\nTry 'qchain --help' for more information\n`);
        return 1;
    }
  } catch (e) {
    ctx.stderr.write(`qchain: ${e instanceof Error ? e.message : String(e)}\n`);
    return 1;
  }
}


