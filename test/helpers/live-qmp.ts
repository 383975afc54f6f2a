/**
 * Helpers for live QMP scripts run against qemu-storage-daemon and `qchain daemon` alike: start
 * either daemon with the same command line, guest I/O over the NBD export, transcripts of
 * replies and events with what legitimately differs normalised, 1 MiB-per-letter image views.
 */
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { QCHAIN, qemuIo } from './qemu.js';
import { QmpClient, type QmpMessage, waitForSocket } from './qmp-client.js';

export const QSD = '/usr/bin/qemu-storage-daemon';
export const M = 1024 * 1024;
export type Tool = 'qemu' | 'qchain';


/** One qcow2 image as node `node`, exported writable as 'vda' on nbd.sock, QMP on qmp.sock. */
export function daemonArgs(fileName: string, node: string): string[] {
  return [
    '--blockdev', `driver=file,node-name=${node}-file,filename=${fileName}`,
    '--blockdev', `driver=qcow2,node-name=${node},file=${node}-file`,
    '--nbd-server', 'addr.type=unix,addr.path=nbd.sock',
    '--export', `type=nbd,id=exp0,node-name=${node},name=vda,writable=on`,
    '--chardev', 'socket,id=qmp0,path=qmp.sock,server=on,wait=off',
    '--monitor', 'chardev=qmp0',
  ];
}

/** Start QSD or `qchain daemon` in `dir` (stderr to daemon.err) and connect to its monitor. */
export async function start(tool: Tool, dir: string, args: string[]): Promise<{ child: ChildProcess; q: QmpClient }> {
  const err = fs.openSync(path.join(dir, 'daemon.err'), 'w');
  const child = tool === 'qemu' ? spawn(QSD, args, { cwd: dir, stdio: ['ignore', 'ignore', err] })
    : spawn(process.execPath, [QCHAIN, 'daemon', ...args], { cwd: dir, stdio: ['ignore', 'ignore', err] });
  fs.closeSync(err);
  await waitForSocket(path.join(dir, 'qmp.sock'), child);
  await waitForSocket(path.join(dir, 'nbd.sock'), child);
  const q = await QmpClient.connect(path.join(dir, 'qmp.sock'));
  await q.waitFor((m) => 'QMP' in m);
  return { child, q };
}

export const jobEvent = (id: string, status: string) => (m: QmpMessage): boolean =>
  m.event === 'JOB_STATUS_CHANGE' && (m.data as { id: string }).id === id && (m.data as { status: string }).status === status;

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
export function transcript(q: QmpClient, progress = false): unknown[] {
  const msgs = q.received.map((m) => norm(m, progress));
  return [...msgs.filter((m) => !('event' in m)), ...msgs.filter((m) => 'event' in m)];
}

/** Run qemu-io commands as the guest, over the NBD export; every request must succeed. */
export async function guest(dir: string, cmds: string[]): Promise<void> {
  const w = await qemuIo(['-f', 'raw', ...cmds.flatMap((x) => ['-c', x]), `nbd+unix:///vda?socket=${path.join(dir, 'nbd.sock')}`]);
  assert.equal(w.code, 0, w.stderr);
  assert.doesNotMatch(w.stdout + w.stderr, /failed|error/i, 'every guest request succeeded');
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
