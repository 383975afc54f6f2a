/**
 * Fuzzer: worker thread that runs qchain command lines in-process through the CLI entry point
 * (`main(argv, ctx)`), much faster than a node start per command. The parent caps its heap with
 * resourceLimits and terminates it on a time-out. Loaded as a plain script it does nothing.
 */
import { isMainThread, parentPort } from 'node:worker_threads';

interface Job { id: number; argv: string[] }

/** Output kept per stream; the rest is only counted. */
const CAP = 1 << 20;

if (!isMainThread && parentPort) {
  const port = parentPort;
  const { main } = await import('../../src/cli/main.js');
  const fatal = (what: string, e: unknown): void => {
    port.postMessage({ fatal: `${what}: ${e instanceof Error ? `${e.name}: ${e.message}\n${e.stack ?? ''}` : String(e)}` });
  };
  process.on('uncaughtException', (e) => fatal('uncaught exception', e));
  process.on('unhandledRejection', (e) => fatal('unhandled rejection', e));
  port.on('message', async (job: Job) => {
    const out = { s: '', n: 0 };
    const err = { s: '', n: 0 };
    const sink = (o: { s: string; n: number }) => ({
      write(chunk: string | Uint8Array): boolean {
        const t = typeof chunk === 'string' ? chunk : Buffer.from(chunk).toString('utf8');
        o.n += t.length;
        if (o.s.length < CAP) o.s += t.slice(0, CAP - o.s.length);
        return true;
      },
    });
    const t0 = performance.now();
    let code: number;
    try {
      code = await main(job.argv, { stdout: sink(out), stderr: sink(err) });
    } catch (e) {
      code = -1;
      err.s += `main() threw: ${e instanceof Error ? `${e.name}: ${e.message}` : String(e)}\n`;
    }
    port.postMessage({ id: job.id, code, stdout: out.s, stderr: err.s, outBytes: out.n, ms: performance.now() - t0 });
  });
}
