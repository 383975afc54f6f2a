/**
 * Helpers for live QMP scripts run against qemu-storage-daemon and `qchain daemon` alike: the
 * daemons' command lines, starting either daemon with the same command line in its own folder
 * (and the same script against both, side by side), guest I/O over the NBD export, transcripts
 * of replies and events with what legitimately differs normalised, 1 MiB-per-letter image views.
 */
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { QCHAIN, qemuImg, qemuIo, run } from './qemu.js';
import { QmpClient, type QmpMessage, waitForSocket } from './qmp-client.js';

export const QSD = '/usr/bin/qemu-storage-daemon';
export const M = 1024 * 1024;
export type Tool = 'qemu' | 'qchain';
/** QSD first, then qchain: the order every side-by-side test runs them in. */
export const TOOLS: readonly Tool[] = ['qemu', 'qchain'];

/* ---------------------------------------------------------------- command lines */

/** The QMP monitor on qmp.sock. */
export const MONITOR: readonly string[] = ['--chardev', 'socket,id=qmp0,path=qmp.sock,server=on,wait=off', '--monitor', 'chardev=qmp0'];

/**
 * A qcow2 image as format node `name` over protocol node `${name}-file`; `extra` is appended to
 * the format node's options (',backing=mid', ',read-only=on').
 */
export function qcow2Node(name: string, extra = '', fileName = `${name}.qcow2`): string[] {
  return ['--blockdev', `driver=file,node-name=${name}-file,filename=${fileName}`,
    '--blockdev', `driver=qcow2,node-name=${name},file=${name}-file${extra}`];
}

/** The NBD server on nbd.sock exporting `node` writable as 'vda' (export id exp0, `extra` appended), and the monitor. */
export function serve(node: string, extra = ''): string[] {
  return ['--nbd-server', 'addr.type=unix,addr.path=nbd.sock',
    '--export', `type=nbd,id=exp0,node-name=${node},name=vda,writable=on${extra}`, ...MONITOR];
}

/** One qcow2 image as node `node`, exported writable as 'vda' on nbd.sock, QMP on qmp.sock. */
export function daemonArgs(fileName: string, node: string): string[] {
  return [...qcow2Node(node, '', fileName), ...serve(node)];
}

/** base.qcow2 <- mid.qcow2 <- top.qcow2 as nodes base, mid, top; top exported (export options `extra`). */
export function chainArgs(extra = ''): string[] {
  return [...qcow2Node('base'), ...qcow2Node('mid', ',backing=base'), ...qcow2Node('top', ',backing=mid'), ...serve('top', extra)];
}

/* ---------------------------------------------------------------- daemons */

/** Spawn QSD or `qchain daemon` in `dir` with stderr to daemon.err. */
export function spawnDaemon(tool: Tool, dir: string, args: string[]): ChildProcess {
  const err = fs.openSync(path.join(dir, 'daemon.err'), 'w');
  const child = tool === 'qemu' ? spawn(QSD, args, { cwd: dir, stdio: ['ignore', 'ignore', err] })
    : spawn(process.execPath, [QCHAIN, 'daemon', ...args], { cwd: dir, stdio: ['ignore', 'ignore', err] });
  fs.closeSync(err);
  return child;
}

/** Connect to the monitor on `dir`/qmp.sock once the daemon has made it, and wait for the greeting. */
export async function connectQmp(dir: string, child: ChildProcess): Promise<QmpClient> {
  await waitForSocket(path.join(dir, 'qmp.sock'), child);
  const q = await QmpClient.connect(path.join(dir, 'qmp.sock'));
  await q.waitFor((m) => 'QMP' in m);
  return q;
}

export interface Daemon { child: ChildProcess; q: QmpClient }

/**
 * Start QSD or `qchain daemon` in `dir` (stderr to daemon.err), wait for its NBD socket when the
 * command line has an NBD server, and connect to its monitor. The daemon is killed if this fails.
 */
export async function start(tool: Tool, dir: string, args: string[]): Promise<Daemon> {
  const child = spawnDaemon(tool, dir, args);
  try {
    await waitForSocket(path.join(dir, 'qmp.sock'), child);
    if (args.includes('--nbd-server')) await waitForSocket(path.join(dir, 'nbd.sock'), child);
    return { child, q: await connectQmp(dir, child) };
  } catch (e) {
    killIfRunning(child);
    throw e;
  }
}

/** SIGKILL the daemon unless it has exited already. */
export function killIfRunning(child: ChildProcess): void {
  if (child.exitCode === null) child.kill('SIGKILL');
}

/** Start a daemon, run `body` with it, and kill it afterwards if it is still running. */
export async function withDaemon<T>(tool: Tool, dir: string, args: string[], body: (d: Daemon) => Promise<T>): Promise<T> {
  const d = await start(tool, dir, args);
  try {
    return await body(d);
  } finally {
    d.q.close();
    killIfRunning(d.child);
  }
}

/** Resolves once the process has exited (at once if it has already). */
export function exited(child: ChildProcess): Promise<void> {
  return new Promise<void>((r) => (child.exitCode !== null || child.signalCode !== null ? r() : child.once('exit', () => r())));
}

/**
 * `quit` (with this command id), wait for the daemon to exit and for the monitor connection to
 * close (so every message the daemon sent is in `q.received`); the reply.
 */
export async function quit(d: Daemon, id?: unknown): Promise<QmpMessage> {
  const r = await d.q.execute('quit', undefined, id);
  await exited(d.child);
  await d.q.closed;
  return r;
}

/**
 * A daemon with only a monitor takes one blockdev-add per entry of `adds`: node n<i> on a fresh
 * 16 MiB qcow2 file a<i>.qcow2, the entry's members merged in (a `file` member into the file's
 * own options). The replies, in order (ids are the indexes).
 */
export async function blockdevAddReplies(tool: Tool, dir: string, adds: Array<Record<string, unknown>>): Promise<QmpMessage[]> {
  fs.mkdirSync(dir, { recursive: true });
  for (let i = 0; i < adds.length; i++) assert.equal((await qemuImg(['create', '-q', '-f', 'qcow2', `a${i}.qcow2`, '16M'], dir)).code, 0);
  return withDaemon(tool, dir, [...MONITOR], async (d) => {
    await d.q.execute('qmp_capabilities');
    const out: QmpMessage[] = [];
    for (const [i, extra] of adds.entries()) {
      const file = { driver: 'file', ...(extra.file as Record<string, unknown> | undefined), filename: `a${i}.qcow2` };
      out.push(await d.q.execute('blockdev-add', { driver: 'qcow2', 'node-name': `n${i}`, ...extra, file }, i));
    }
    await quit(d);
    return out;
  });
}

/** Run `session` against QSD, then against qchain, each in its own folder `root`/<tool>. */
export async function onBoth<T>(root: string, session: (tool: Tool, dir: string) => Promise<T>): Promise<Record<Tool, T>> {
  const res: Partial<Record<Tool, T>> = {};
  for (const tool of TOOLS) res[tool] = await session(tool, path.join(root, tool));
  return res as Record<Tool, T>;
}

/* ---------------------------------------------------------------- QMP transcripts */

export const jobEvent = (id: string, status: string) => (m: QmpMessage): boolean =>
  m.event === 'JOB_STATUS_CHANGE' && (m.data as { id: string }).id === id && (m.data as { status: string }).status === status;

/** The reply is a success. */
export function ok(r: QmpMessage): void {
  assert.ok('return' in r, JSON.stringify(r));
}

/**
 * Drop timestamps and implicit node numbers. With `progress`, also the job progress fields (offset, len) of job events and
 * query replies, and `busy` (whether the job is copying at the moment of the query): while the
 * guest writes during a mirror the amount of work depends on how the writes and the copy
 * interleave, which is timing, not behaviour.
 */
export function norm(m: QmpMessage, progress: boolean): Record<string, unknown> {
  // Implicit node names count every node QEMU ever created (protocol and internal nodes
  // included); which '#blockNNN' a node gets is not part of the interface.
  const c = JSON.parse(JSON.stringify(m).replace(/"#block\d+"/g, '"#block"')) as Record<string, unknown>;
  delete c.timestamp;
  if (c.QMP) (c.QMP as { version: unknown }).version = 'V';
  if (progress) {
    const strip = (o: unknown): void => {
      if (o && typeof o === 'object') {
        for (const k of ['offset', 'len', 'current-progress', 'total-progress', 'busy']) if (k in o) (o as Record<string, unknown>)[k] = 'N';
      }
    };
    strip(c.data);
    if (Array.isArray(c.return)) c.return.forEach(strip);
  }
  return c;
}

/** Replies in order, then events in order (the two streams may interleave differently). */
export function repliesThenEvents<T extends object>(msgs: T[]): T[] {
  return [...msgs.filter((m) => !('event' in m)), ...msgs.filter((m) => 'event' in m)];
}

/** The session's messages normalised by `norm`: replies in order, then events in order. */
export function transcript(q: QmpClient, progress = false): unknown[] {
  return repliesThenEvents(q.received.map((m) => norm(m, progress)));
}

/* ---------------------------------------------------------------- guest I/O and views */

/** The NBD URI of export `name` on `dir`/nbd.sock. */
export function nbdUri(dir: string, name = 'vda'): string {
  return `nbd+unix:///${name}?socket=${path.join(dir, 'nbd.sock')}`;
}

/** Run qemu-io commands as the guest, over the NBD export; every request must succeed. */
export async function guest(dir: string, cmds: string[]): Promise<void> {
  const w = await qemuIo(['-f', 'raw', ...cmds.flatMap((x) => ['-c', x]), nbdUri(dir)]);
  assert.equal(w.code, 0, w.stderr);
  assert.doesNotMatch(w.stdout + w.stderr, /failed|error/i, 'every guest request succeeded');
}

/** What a client reads from export `name` (qemu-img convert, or nbdcopy), through a scratch file in `dir`. */
export async function exportView(dir: string, name = 'vda', how: 'qemu-img' | 'nbdcopy' = 'qemu-img'): Promise<Buffer> {
  const out = path.join(dir, `.export-${name}-${Math.random().toString(36).slice(2)}.raw`);
  const uri = nbdUri(dir, name);
  const r = how === 'nbdcopy' ? await run('nbdcopy', [uri, out]) : await qemuImg(['convert', '-f', 'raw', '-O', 'raw', uri, out]);
  assert.equal(r.code, 0, r.stderr);
  const b = fs.readFileSync(out);
  fs.unlinkSync(out);
  return b;
}

/** The image and backing-file lines of `qemu-img info --backing-chain` for `file` (relative to `dir`). */
export async function backingChain(dir: string, file: string): Promise<string> {
  const info = await qemuImg(['info', '--backing-chain', file], dir);
  return info.stdout.split('\n').filter((l) => /^(image|backing file):/.test(l)).join('\n');
}

/** Where two buffers first differ, for assertion messages. */
export function firstDiff(a: Buffer, b: Buffer): string {
  let i = 0;
  while (i < a.length && a[i] === b[i]) i++;
  return `first difference at ${i} (${a[i]} vs ${b[i]}), lengths ${a.length}/${b.length}`;
}

/** One letter per 1 MiB cluster: the letter whose code fills it, '-' for zeros, '?' for a mix. */
export function letters(b: Buffer): string {
  let s = '';
  for (let i = 0; i < b.length; i += M) {
    const c = b.subarray(i, i + M), v = c[0];
    s += c.every((x) => x === v) ? (v === 0 ? '-' : String.fromCharCode(v)) : '?';
  }
  return s;
}

/** qemu-io command filling clusters [from, from + n) with the letter's code. */
export const put = (ch: string, from: number, n: number): string => `write -q -P 0x${ch.charCodeAt(0).toString(16)} ${from * M} ${n * M}`;
