/**
 * One QMP script run side by side against qemu-storage-daemon and `qchain daemon` over the same
 * images: base.qcow2 <- mid.qcow2 <- top.qcow2 (16 MiB, 4 MiB of data each, top exported as
 * 'vda'), empty 16 MiB tgt.qcow2 and tgt2.qcow2, an 8 MiB small.qcow2, each a format node over
 * its own protocol node. Every reply is recorded with timing-dependent values masked; job
 * events are recorded per job (their interleaving across jobs is timing), without the
 * paused/running pairs drained sections cause and with progress masked.
 *
 * Masked: implicit node names ('#blockNNN' -> '#block'); command ids; job progress and state in
 * query-block-jobs/query-jobs (offset, len, busy, status, ready, paused); `actual-size`, and
 * protocol nodes' `virtual-size` (files grow as jobs write them); the `count` of a job's
 * anonymous copy bitmap on its source (recording false: how much is left to copy) and of a
 * mirror's (recording true on a node under mirror_top: how much is dirty now).
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { qemuImg, qemuIo, scratch } from './qemu.js';
import { norm, onBoth, qcow2Node, quit, serve, withDaemon, type Daemon, type Tool } from './live-qmp.js';
import type { QmpMessage } from './qmp-client.js';

export type X = (cmd: string, args?: Record<string, unknown>) => Promise<QmpMessage>;
export type Step = (x: X, d: Daemon, dir: string) => Promise<void>;

/** The images (see the header). */
export async function images(dir: string): Promise<void> {
  fs.mkdirSync(dir, { recursive: true });
  const img = async (args: string[]): Promise<void> => assert.equal((await qemuImg(args, dir)).code, 0);
  await img(['create', '-q', '-f', 'qcow2', 'base.qcow2', '16M']);
  await img(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'mid.qcow2']);
  await img(['create', '-q', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', 'top.qcow2']);
  for (const t of ['tgt', 'tgt2']) await img(['create', '-q', '-f', 'qcow2', `${t}.qcow2`, '16M']);
  await img(['create', '-q', '-f', 'qcow2', 'small.qcow2', '8M']);
  for (const [f, off] of [['base.qcow2', 0], ['mid.qcow2', 4], ['top.qcow2', 8]] as const) {
    const r = await qemuIo(['-f', 'qcow2', '-c', `write -q -P ${off + 1} ${off}M 4M`, f], dir);
    assert.equal(r.code, 0, r.stderr);
  }
}

/** The daemons' command line: the chain linked by node name, the other images, top exported. */
export const ARGS = [...qcow2Node('base'), ...qcow2Node('mid', ',backing=base'), ...qcow2Node('top', ',backing=mid'),
  ...qcow2Node('tgt'), ...qcow2Node('tgt2'), ...qcow2Node('small'), ...serve('top')];

const JOB_TIMING = ['offset', 'len', 'busy', 'status', 'ready', 'paused', 'current-progress', 'total-progress'];

/** A reply with the timing-dependent values masked (see the header). */
export function masked(r: QmpMessage, jobQuery: boolean): Record<string, unknown> {
  // Implicit names inside error texts too.
  const n = JSON.parse(JSON.stringify(norm(r, false)).replace(/#block\d+/g, '#block')) as Record<string, unknown>;
  delete n.id;
  const walk = (o: unknown, underMirror: boolean): void => {
    if (Array.isArray(o)) o.forEach((v) => walk(v, underMirror));
    else if (o && typeof o === 'object') {
      const rec = o as Record<string, unknown>;
      if ('actual-size' in rec) rec['actual-size'] = 'N';
      if (rec.format === 'file') rec['virtual-size'] = 'N';
      const bitmaps = rec['dirty-bitmaps'];
      if (Array.isArray(bitmaps) && rec.drv !== 'copy-before-write') {
        for (const b of bitmaps as Array<Record<string, unknown>>) if (!('name' in b) && (!b.recording || underMirror)) b.count = 'N';
      }
      if (jobQuery) for (const k of JOB_TIMING) if (k in rec) rec[k] = 'N';
      for (const v of Object.values(rec)) walk(v, underMirror || rec.drv === 'mirror_top');
    }
  };
  walk(n.return, false);
  return n;
}

/** Job events per job id (see the header). */
function jobEvents(received: QmpMessage[]): string[] {
  const per = new Map<string, string[]>();
  for (const m of received) {
    if (typeof m.event !== 'string' || !/JOB/.test(m.event)) continue;
    const data = m.data as { id?: string; device?: string; status?: string };
    if (data.status === 'paused' || data.status === 'running') continue;
    const id = data.id ?? data.device ?? '';
    const l = per.get(id) ?? [];
    l.push(JSON.stringify(norm(m, true)));
    per.set(id, l);
  }
  return [...per.keys()].sort().flatMap((k) => per.get(k) ?? []);
}

/** Run the steps against `tool`: the masked replies, one line per command, then the job events. */
export async function session(tool: Tool, dir: string, steps: Step[], after?: (dir: string) => Promise<string[]>): Promise<string[]> {
  await images(dir);
  const out = await withDaemon(tool, dir, ARGS, async (d) => {
    const lines: string[] = [];
    const x: X = async (cmd, a) => {
      const r = await d.q.execute(cmd, a, lines.length);
      lines.push(`${cmd} ${JSON.stringify(a ?? {})} -> ${JSON.stringify(masked(r, cmd === 'query-block-jobs' || cmd === 'query-jobs'))}`);
      return r;
    };
    await x('qmp_capabilities');
    for (const s of steps) await s(x, d, dir);
    await quit(d);
    return [...lines, ...jobEvents(d.q.received)];
  });
  return after ? [...out, ...await after(dir)] : out;
}

/** Run the script on both daemons: the same lines, member order included; QSD's lines. */
export async function same(steps: Step[], after?: (dir: string) => Promise<string[]>): Promise<{ lines: string[]; root: string }> {
  const root = scratch();
  const res = await onBoth(root, (tool, dir) => session(tool, dir, steps, after));
  for (let i = 0; i < Math.max(res.qemu.length, res.qchain.length); i++) {
    if (res.qchain[i] !== res.qemu[i]) {
      if (process.env.QCHAIN_DEBUG) fs.writeFileSync(path.join(os.tmpdir(), 'job-script-debug.json'), JSON.stringify(res));
      if (process.env.QCHAIN_DEBUG) for (const t of ['qemu', 'qchain'] as const) console.log(t, res[t].slice(Math.max(0, i - 3), i + 1).join('\n'));
      const [ours, want] = [res.qchain[i] ?? '', res.qemu[i] ?? ''];
      const where = ours.includes(' -> ') && want.includes(' -> ') ? firstDiff(replyOf(ours), replyOf(want), '') : '';
      assert.fail(`line ${i} (${want.split(' -> ')[0]}): ${where || `qchain ${ours.slice(0, 600)}\n  QSD ${want.slice(0, 600)}`}`);
    }
  }
  return { lines: res.qemu, root };
}

/** The reply part of a line. */
export const replyOf = (line: string): Record<string, unknown> => JSON.parse(line.slice(line.indexOf(' -> ') + 4)) as Record<string, unknown>;

/** Where two replies first differ (member order included), for the failure message. */
export function firstDiff(ours: unknown, want: unknown, at: string): string {
  if (ours && want && typeof ours === 'object' && typeof want === 'object') {
    const a = Object.keys(ours), b = Object.keys(want);
    if (a.join() !== b.join()) return `${at}: members ${JSON.stringify(a)} vs QSD's ${JSON.stringify(b)}`;
    for (const k of a) {
      const d = firstDiff((ours as Record<string, unknown>)[k], (want as Record<string, unknown>)[k], `${at}.${k}`);
      if (d) return d;
    }
    return '';
  }
  return JSON.stringify(ours) === JSON.stringify(want) ? '' : `${at}: ${JSON.stringify(ours)} vs QSD's ${JSON.stringify(want)}`;
}
