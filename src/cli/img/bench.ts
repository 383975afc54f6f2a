/** `qemu-img bench`: issue N reads or writes of one size, `depth` in flight, stepping through the image. */
import type { CliContext } from '../context.js';
import { CliError } from '../util/errors.js';
import { parseSize } from '../util/options.js';
import { FORCE_SHARE, HELP, IMAGE_OPTS, OBJECT, formatArg, oneFile, open, parseArgs } from './common.js';
import type { ImageFormat } from '../../chain/open.js';

export async function benchMain(argv: string[], ctx: CliContext): Promise<number> {
  const { opts, rest } = parseArgs(argv, ':hc:d:f:ni:o:qs:S:t:wU', [HELP, OBJECT, IMAGE_OPTS, FORCE_SHARE,
    { name: 'pattern', hasArg: 'required', val: 'PATTERN' }, { name: 'no-drain', hasArg: 'no', val: 'NODRAIN' },
    { name: 'flush-interval', hasArg: 'required', val: 'FLUSH' }]);
  let count = 75000, depth = 64, bufsize = 4096, step = 0, offset = 0, write = false, quiet = false, pattern = 0;
  let flushInterval = 0;
  let fmt: ImageFormat | undefined;
  const num = (s: string, what: string): number => {
    const n = Number(s);
    if (!Number.isInteger(n) || n <= 0) throw new CliError(`Invalid ${what} specified`);
    return n;
  };
  let forceShare = false;
  for (const o of opts) {
    const a = o.arg as string;
    switch (o.opt) {
      case 'h': ctx.stdout.write('usage: qchain img bench [-c count] [-d depth] [-f fmt] [--flush-interval=N] [-o offset] [--pattern=N] [-q] [-s buffer_size] [-S step_size] [-w] filename\n'); return 0;
      case 'c': count = num(a, 'request count'); break;
      case 'd': depth = num(a, 'queue depth'); break;
      case 'f': fmt = formatArg(a); break;
      case 'U': forceShare = true; break;
      case 'o': offset = parseSize(a, { name: 'offset' }); break;
      case 's': bufsize = parseSize(a, { name: 'buffer size' }); break;
      case 'S': step = parseSize(a, { name: 'step size' }); break;
      case 'w': write = true; break;
      case 'q': quiet = true; break;
      case 'PATTERN': pattern = Number(a) & 0xff; break;
      case 'FLUSH': flushInterval = num(a, 'flush interval'); break;
      default: break;
    }
  }
  const file = oneFile(rest);
  if (!step) step = bufsize;
  const chain = await open(file, { format: fmt, readOnly: !write, forceShare }, ctx);
  try {
    const size = chain.size;
    if (!quiet) {
      ctx.stdout.write(`Sending ${count} ${write ? 'write' : 'read'} requests, ${bufsize} bytes each, ${depth} in parallel ` +
        `(starting at offset ${offset}, step size ${step})\n`);
      if (flushInterval) ctx.stdout.write(`Sending flush every ${flushInterval} requests\n`);
    }
    let next = offset, issued = 0;
    const nextOffset = (): number => {
      const o = next;
      next += step;
      next = size <= bufsize ? 0 : next % (size - bufsize);
      return o;
    };
    const t0 = process.hrtime.bigint();
    const worker = async (): Promise<void> => {
      const buf = Buffer.alloc(bufsize, pattern);
      while (issued < count) {
        issued++;
        const off = nextOffset();
        if (write) await chain.write(buf, off);
        else await chain.read(buf, off);
        if (flushInterval && issued % flushInterval === 0) await chain.flush();
      }
    };
    await Promise.all(Array.from({ length: Math.min(depth, count) }, worker));
    const secs = Number(process.hrtime.bigint() - t0) / 1e9;
    if (!quiet) ctx.stdout.write(`Run completed in ${secs.toFixed(3)} seconds.\n`);
  } finally {
    await chain.close();
  }
  return 0;
}
