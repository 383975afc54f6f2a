/**
 * `qchain daemon`: the storage daemon (qemu-storage-daemon's role). It holds chains open and
 * exports them over NBD; SIGTERM/SIGINT flush, close every image cleanly (dirty bits cleared)
 * and exit 0. The QMP control socket and block jobs build on this.
 */
import fs from 'node:fs';
import type { CliContext } from '../context.js';
import { CliError, UsageError, reportError } from '../util/errors.js';
import { parseDaemonArgs, type BlockdevSpec, type DaemonOptions } from './options.js';
import { openChain, openImage, isFormat } from '../../chain/open.js';
import { Chain } from '../../chain/chain.js';
import { NbdServer } from '../../nbd/server.js';
import { ImageError } from '../../image/errors.js';

const PROG = 'qemu-storage-daemon';

const HELP = `Usage: qchain daemon [options]
       qchain daemon --nbd SOCKET [--name NAME] [-r] file

A storage daemon in the role of qemu-storage-daemon: it holds images open and exports them over NBD.

  --blockdev driver=file,node-name=N,filename=F
  --blockdev driver=qcow2|raw,node-name=N,file=FILENODE[,backing=NODE|null][,read-only=on]
  --nbd-server addr.type=unix,addr.path=P | addr.type=inet,addr.host=H,addr.port=N
  --export type=nbd,id=ID,node-name=N[,name=NAME][,writable=on][,allocation-depth=on]
  --pidfile FILE

Short form: --nbd SOCKET (or --nbd-tcp [HOST:]PORT) exports FILE writable (unless -r) under
the name NAME (default: empty), with qemu:allocation-depth.
`;

/** Open every format node of the command line as a chain, by node name. */
export async function openNodes(specs: BlockdevSpec[], log: (l: string) => void, unmapOut?: Set<string>): Promise<Map<string, Chain>> {
  const files = new Map<string, string>();
  /** Nodes opened with discard=unmap (format node or its file node). */
  const unmap = new Set<string>();
  const nodes = new Map<string, Chain>();
  const names = new Set<string>();
  try {
    for (const b of specs) {
      if (names.has(b.nodeName)) throw new CliError(`Duplicate nodes with node-name='${b.nodeName}'`);
      names.add(b.nodeName);
      if (b.driver === 'file') {
        if (!b.filename) throw new CliError("Parameter 'filename' is missing");
        files.set(b.nodeName, b.filename);
        if (b.discard) unmap.add(b.nodeName);
        continue;
      }
      const auto = b.driver === 'auto';
      if (!auto && !isFormat(b.driver)) throw new CliError(`Invalid parameter value for 'driver': '${b.driver}'`);
      const filename = b.file !== undefined ? files.get(b.file) : b.filename;
      if (filename === undefined) throw new CliError(b.file !== undefined ? `Cannot find device='' nor node-name='${b.file}'` : "Parameter 'file' is missing");
      if (b.discard || (b.file !== undefined && unmap.has(b.file))) unmap.add(b.nodeName);
      const format = auto ? undefined : (b.driver as 'qcow2' | 'raw');
      if (b.backing === undefined) {
        nodes.set(b.nodeName, await openChain(filename, { format, readOnly: b.readOnly, log }));
      } else {
        const below = b.backing === null ? null : nodes.get(b.backing);
        if (b.backing !== null && !below) throw new CliError(`Cannot find device='' nor node-name='${b.backing}'`);
        const top = await openImage(filename, { format, readOnly: b.readOnly, log });
        nodes.set(b.nodeName, new Chain([{ driver: top.driver, filename }, ...(below ? below.layers : [])]));
      }
    }
    for (const n of unmap) unmapOut?.add(n);
  } catch (e) {
    for (const c of nodes.values()) await c.close().catch(() => {});
    if (e instanceof ImageError) throw new CliError(e.message);
    throw e;
  }
  return nodes;
}

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
  let nodes: Map<string, Chain>;
  const unmap = new Set<string>();
  try {
    nodes = await openNodes(opts.blockdevs, log, unmap);
  } catch (e) {
    return reportError(PROG, e, ctx.stderr);
  }
  const server = new NbdServer(log);
  const closeAll = async (): Promise<void> => {
    await server.close();
    const closed = new Set<Chain>();
    for (const c of nodes.values()) {
      if (closed.has(c)) continue;
      closed.add(c);
      await c.flush().catch(() => {});
      await c.close().catch((e: unknown) => log(`${PROG}: ${e instanceof Error ? e.message : String(e)}`));
    }
  };
  try {
    for (const e of opts.exports) {
      const chain = nodes.get(e.nodeName);
      if (!chain) throw new CliError(`Cannot find device='' nor node-name='${e.nodeName}'`);
      if (e.writable && chain.top.readOnly) throw new CliError('Cannot export a read-only node as writable');
      if (e.bitmaps.length) throw new CliError(`Bitmap '${e.bitmaps[0]}' is not found`);
      server.addExport({ name: e.name, writable: e.writable, discard: unmap.has(e.nodeName), allocationDepth: e.allocationDepth, chain: () => chain });
    }
    if (opts.exports.length && !opts.nbdServers.length) throw new CliError('NBD server not running');
    for (const a of opts.nbdServers) await server.listen(a);
    if (opts.pidfile) fs.writeFileSync(opts.pidfile, `${process.pid}\n`);
  } catch (e) {
    await closeAll();
    return reportError(PROG, e instanceof Error && !(e instanceof CliError) ? new CliError(e.message) : e, ctx.stderr);
  }
  return new Promise<number>((resolve) => {
    let stopping = false;
    const stop = (): void => {
      if (stopping) return;
      stopping = true;
      void closeAll().then(() => {
        if (opts.pidfile) fs.rmSync(opts.pidfile, { force: true });
        resolve(0);
      });
    };
    process.on('SIGTERM', stop);
    process.on('SIGINT', stop);
  });
}
