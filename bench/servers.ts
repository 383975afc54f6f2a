/**
 * Daemon benchmark helpers: start qemu-storage-daemon or `qchain daemon` with one shared
 * command line (an NBD export of one qcow2 node whose backing chain comes from the headers, plus
 * a QMP monitor), run fio's nbd engine against the export, read a process's peak RSS.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { QCHAIN } from './util.js';

export type ServerKind = 'qchain' | 'qsd';
export const KINDS: ServerKind[] = ['qchain', 'qsd'];

export interface Server {
  kind: ServerKind;
  child: ChildProcess;
  nbdSock: string;
  qmpSock: string;
  /** nbd+unix URI of the export. */
  uri: string;
  stop(): Promise<void>;
}

/** The qemu-storage-daemon command line both servers are started with. */
export function daemonArgs(dir: string, image: string, writable: boolean): string[] {
  return [
    '--blockdev', `driver=file,node-name=top-file,filename=${path.join(dir, image)}`,
    '--blockdev', 'driver=qcow2,node-name=top,file=top-file',
    '--nbd-server', `addr.type=unix,addr.path=${path.join(dir, 'nbd.sock')}`,
    '--export', `type=nbd,id=exp0,node-name=top,name=vda,writable=${writable ? 'on' : 'off'}`,
    '--chardev', `socket,id=qmp0,path=${path.join(dir, 'qmp.sock')},server=on,wait=off`,
    '--monitor', 'chardev=qmp0',
    '--pidfile', path.join(dir, 'daemon.pid'),
  ];
}

/** Extra node flags for `node` running our daemon (e.g. --cpu-prof), from QCHAIN_BENCH_NODE_FLAGS. */
const nodeFlags = (process.env.QCHAIN_BENCH_NODE_FLAGS ?? '').split(' ').filter(Boolean);

export async function startServer(kind: ServerKind, dir: string, image: string, writable: boolean): Promise<Server> {
  const args = daemonArgs(dir, image, writable);
  const pidfile = path.join(dir, 'daemon.pid');
  fs.rmSync(pidfile, { force: true });
  const child = kind === 'qsd'
    ? spawn('qemu-storage-daemon', args, { cwd: dir, stdio: ['ignore', 'ignore', 'inherit'] })
    // As a user starts it: the executable itself (its interpreter line sets node's flags), unless
    // extra node flags are asked for.
    : nodeFlags.length
      ? spawn(process.execPath, [...nodeFlags, QCHAIN, 'daemon', ...args], { cwd: dir, stdio: ['ignore', 'ignore', 'inherit'] })
      : spawn(QCHAIN, ['daemon', ...args], { cwd: dir, stdio: ['ignore', 'ignore', 'inherit'] });
  for (let i = 0; !fs.existsSync(pidfile); i++) {
    if (child.exitCode !== null || i > 600) throw new Error(`${kind} did not start (exit ${child.exitCode})`);
    await new Promise((r) => setTimeout(r, 25));
  }
  const nbdSock = path.join(dir, 'nbd.sock');
  return {
    kind, child, nbdSock, qmpSock: path.join(dir, 'qmp.sock'), uri: `nbd+unix:///vda?socket=${nbdSock}`,
    stop: () => new Promise<void>((res) => {
      if (child.exitCode !== null) return res();
      child.once('exit', () => res());
      child.kill('SIGTERM');
    }),
  };
}

/** Peak resident set size of a running process in KiB (VmHWM). */
export function peakRssKiB(pid: number): number {
  const m = /VmHWM:\s+(\d+) kB/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
  return m ? Number(m[1]) : NaN;
}

export interface FioResult { iops: number; bwBytes: number; ios: number }

function parseFio(out: string, dir: 'read' | 'write'): FioResult {
  const j = JSON.parse(out.slice(out.indexOf('{'))) as { jobs: Array<Record<string, { iops: number; bw_bytes: number; total_ios: number }>> };
  const s = j.jobs[0][dir];
  return { iops: s.iops, bwBytes: s.bw_bytes, ios: s.total_ios };
}

/** Run fio's nbd engine against `uri` (blocking: the servers are other processes). */
export function fio(uri: string, dir: 'read' | 'write', opts: string[]): FioResult {
  const r = spawnSync('fio', ['--name=bench', '--ioengine=nbd', `--uri=${uri}`, '--output-format=json', ...opts], { encoding: 'utf8', maxBuffer: 1 << 26 });
  if (r.status !== 0) throw new Error(`fio failed (${r.status}): ${r.stderr.slice(0, 2000)}`);
  return parseFio(r.stdout, dir);
}

/** fio started in the background (for load during a job); resolves with its result. */
export function fioAsync(uri: string, dir: 'read' | 'write', opts: string[]): { done: Promise<FioResult>; child: ChildProcess } {
  const child = spawn('fio', ['--name=bench', '--ioengine=nbd', `--uri=${uri}`, '--output-format=json', ...opts], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '', err = '';
  child.stdout?.on('data', (d: Buffer) => { out += d.toString(); });
  child.stderr?.on('data', (d: Buffer) => { err += d.toString(); });
  const done = new Promise<FioResult>((res, rej) => child.on('exit', (code) => {
    if (code === 0) res(parseFio(out, dir));
    else rej(new Error(`fio failed (${code}): ${err.slice(0, 2000)}`));
  }));
  return { done, child };
}

export function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}
