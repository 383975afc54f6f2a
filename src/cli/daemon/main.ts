/**
 * `qchain daemon`: the storage daemon (qemu-storage-daemon's role). It holds chains open,
 * exports them over NBD and takes QMP commands on its monitor socket; SIGTERM/SIGINT and `quit`
 * flush, close every image cleanly (dirty bits cleared) and exit 0.
 */
import fs from 'node:fs';
import type { CliContext } from '../context.js';
import { CliError, UsageError, reportError } from '../util/errors.js';
import { located, parseDaemonArgs, type DaemonOptions } from './options.js';
import { Daemon } from '../../daemon/daemon.js';
import { formatArg } from '../../daemon/graph.js';
import { QmpServer } from '../../qmp/server.js';
import { FileStorage } from '../../storage/file.js';

const PROG = 'qemu-storage-daemon';

const HELP = `Usage: qchain daemon [options]
       qchain daemon [--qmp SOCKET] --nbd SOCKET [--name NAME] [-r] file

A storage daemon in the role of qemu-storage-daemon: it holds images open, exports them over NBD
and takes QMP commands.

  --blockdev driver=file,node-name=N,filename=F[,discard=unmap][,cache.no-flush=on]
  --blockdev driver=qcow2|raw,node-name=N,file=FILENODE[,backing=NODE|backing=][,read-only=on]
             [,detect-zeroes=on|unmap][,cache.no-flush=on]
             (backing= with nothing after it: no backing, deprecated as in QEMU)
             qcow2 caches: [,l2-cache-size=SIZE][,refcount-cache-size=SIZE][,cache-size=SIZE]
             (QEMU's rules; L2 cache default 16M per node here, QEMU's is 32M)
  --nbd-server addr.type=unix,addr.path=P | addr.type=inet,addr.host=H,addr.port=N
  --export type=nbd,id=ID,node-name=N[,name=NAME][,writable=on][,allocation-depth=on][,bitmaps.0=BITMAP]
  --chardev socket,id=ID,path=P,server=on,wait=off   with   --monitor chardev=ID
  --pidfile FILE   written once everything is listening

Short form: --nbd SOCKET (or --nbd-tcp [HOST:]PORT) exports FILE writable (unless -r) under
the name NAME (default: empty), with qemu:allocation-depth; --qmp SOCKET adds a monitor.
In QMP the image is node 'disk0' and the export 'export0' (e.g. blockdev-snapshot-sync with
"node-name": "disk0").
`;

export async function daemonMain(argv: string[], ctx: CliContext): Promise<number> {
  if (argv.includes('-h') || argv.includes('--help')) {
    ctx.stdout.write(HELP);
    return 0;
  }
  let opts: DaemonOptions;
  try {
    opts = parseDaemonArgs(argv);
  } catch (e) {
    return reportError(PROG, e instanceof UsageError ? new CliError(e.message) : e, ctx.stderr);
  }
  const log = (l: string): void => { ctx.stderr.write(`${l}\n`); };
  // Many clients write at once: their writes of one event-loop turn go out coalesced.
  FileStorage.coalesceByDefault = true;
  const daemon = new Daemon(log);
  const qmp = new QmpServer(daemon.commands());
  daemon.emit = (name, data) => qmp.event(name, data);
  let stopped: Promise<void> | null = null;
  const stop = (): Promise<void> => {
    stopped ??= (async () => {
      // Exports closed and jobs cancelled while the monitor is still connected (their events reach it, as QSD's do).
      await daemon.quiesce();
      await qmp.close();
      await daemon.shutdown();
      if (opts.pidfile) fs.rmSync(opts.pidfile, { force: true });
    })();
    return stopped;
  };
  /** Run one option's step; its errors start with the option as written, as QSD's. */
  const at = async (where: string, step: () => unknown): Promise<void> => {
    try {
      await step();
    } catch (e) {
      throw new CliError(located(where, e instanceof Error ? e.message : String(e)));
    }
  };
  try {
    for (const b of opts.blockdevs) {
      await at(b.where, async () => {
        for (const w of b.warnings) log(`${PROG}: ${located(b.where, w)}`);
        if (b.driver === 'file') daemon.graph.addFile(b.nodeName, b.filename ?? '', { discard: b.discard, readOnly: b.readOnly, detectZeroes: b.detectZeroes, noFlush: b.noFlush, noLock: b.noLock });
        else {
          if (b.file === undefined && b.filename === undefined) throw new CliError("Parameter 'file' is missing");
          await daemon.graph.addFormat({
            name: b.nodeName, format: formatArg(b.driver), file: b.file ?? (b.filename as string), fileIsNode: b.file !== undefined,
            backing: b.backing, readOnly: b.readOnly, discard: b.discard, cache: b.cache,
            detectZeroes: b.detectZeroes, noFlush: b.noFlush, fileNoFlush: b.fileNoFlush, fileDetectZeroes: b.fileDetectZeroes, noLock: b.noLock,
          });
        }
      });
    }
    for (const n of opts.nbdServers) await at(n.where, () => daemon.startNbd(n.addr, n.maxConnections));
    for (const e of opts.exports) {
      await at(e.where, () => daemon.addExport({ id: e.id, nodeName: e.nodeName, name: e.name, writable: e.writable, allocationDepth: e.allocationDepth, bitmaps: e.bitmaps }));
    }
    for (const m of opts.monitors) await qmp.listen(m);
    if (opts.pidfile) fs.writeFileSync(opts.pidfile, `${process.pid}\n`);
  } catch (e) {
    await stop();
    return reportError(PROG, e instanceof Error && !(e instanceof CliError) ? new CliError(e.message) : e, ctx.stderr);
  }
  return new Promise<number>((resolve) => {
    const done = (): void => { void stop().then(() => resolve(0)); };
    qmp.onQuit = done;
    process.on('SIGTERM', done);
    process.on('SIGINT', done);
    process.on('SIGHUP', done);
  });
}
