/**
 * The daemon served over NBD: `qchain daemon` vs qemu-storage-daemon, same command line, same
 * images, one real client (fio's nbd engine, nbdcopy) for both. Runs are interleaved
 * (qchain, QSD, qchain, ...) and medians reported.
 *
 *   read    4 KiB random reads, QD 32, through chains of depth 1, 16 and 64
 *   write   4 KiB random allocating writes (each cluster of a fresh overlay once) over a full base
 *   seq     sequential 1 MiB read and write throughput with nbdcopy
 *   commit  live active commit of a 1 GiB top while fio writes at a steady rate: READY, pivot
 *   rss     peak RSS serving a 1 TiB image after touching 4 KiB per 64 MiB of it (every L2 table)
 *
 * Usage: node dist/bench/daemon.js [read|write|seq|commit|rss ...] [--runtime S] [--reps N] [--size-mib N] [--depths 1,16,64]
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { benchDir, numOption, sh, table, warmCache } from './util.js';
import { KINDS, fio, fioAsync, median, peakRssKiB, startServer, type ServerKind } from './servers.js';
import { QmpClient, type QmpMessage } from '../test/helpers/qmp-client.js';

const argv = process.argv.slice(2);
const optNames = new Set(['--runtime', '--reps', '--size-mib', '--depths']);
const SECTIONS = ['read', 'write', 'seq', 'commit', 'rss'];
const wanted = argv.filter((a, i) => !a.startsWith('-') && !optNames.has(argv[i - 1]));
const sections = wanted.length ? wanted : SECTIONS;
const runtime = numOption('--runtime', 10);
const reps = numOption('--reps', 3);
const sizeMiB = numOption('--size-mib', 1024);
const depthsArg = argv.indexOf('--depths');
const depths = depthsArg >= 0 ? argv[depthsArg + 1].split(',').map(Number) : [1, 16, 64];
const MiB = 1024 * 1024;
const CLUSTER = 65536;
const dir = benchDir('daemon');

/**
 * Run `measure` for each server `reps` times, interleaved; the per-server medians. Dirty page
 * cache is written back before each run, so no server's writes are throttled for another's.
 */
async function interleaved(measure: (k: ServerKind) => Promise<number>): Promise<Record<ServerKind, number>> {
  const got: Record<ServerKind, number[]> = { qchain: [], qsd: [] };
  for (let i = 0; i < reps; i++) {
    for (const k of KINDS) {
      spawnSync('sync');
      got[k].push(await measure(k));
    }
  }
  return { qchain: median(got.qchain), qsd: median(got.qsd) };
}

const r2 = (x: number): string => x.toFixed(2);
const ratio = (a: number, b: number): string => `${r2(a / b)}×`;

/** d0: a full base; d1..d63: overlays holding 16 scattered clusters each, so reads descend. */
function buildChain(): void {
  sh('qemu-img', ['create', '-q', '-f', 'qcow2', 'd0.qcow2', `${sizeMiB}M`], dir);
  const fill: string[] = [];
  for (let off = 0; off < sizeMiB; off += 64) fill.push('-c', `write -q -P 0x5a ${off * MiB} ${64 * MiB}`);
  sh('qemu-io', [...fill, 'd0.qcow2'], dir);
  const clusters = sizeMiB * MiB / CLUSTER;
  for (let d = 1; d < 64; d++) {
    sh('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', `d${d - 1}.qcow2`, '-F', 'qcow2', `d${d}.qcow2`], dir);
    const w: string[] = [];
    for (let i = 0; i < 16; i++) w.push('-c', `write -q -P ${d} ${((d * 7919 + i * 104729) % clusters) * CLUSTER} 64k`);
    sh('qemu-io', [...w, `d${d}.qcow2`], dir);
  }
}

async function readBench(): Promise<string[][]> {
  const rows = [['test', 'qchain', 'QSD', 'qchain/QSD']];
  const iops: Record<number, Record<ServerKind, number>> = {};
  for (const depth of depths) {
    iops[depth] = await interleaved(async (k) => {
      warmCache(Array.from({ length: depth }, (_, d) => path.join(dir, `d${d}.qcow2`)));
      const s = await startServer(k, dir, `d${depth - 1}.qcow2`, false);
      try {
        return fio(s.uri, 'read', ['--rw=randread', '--bs=4k', '--iodepth=32', '--time_based', `--runtime=${runtime}`, '--ramp_time=1', `--size=${sizeMiB}M`, '--randrepeat=0']).iops;
      } finally {
        await s.stop();
      }
    });
    rows.push([`4K randread QD32, depth ${depth} (IOPS)`, iops[depth].qchain.toFixed(0), iops[depth].qsd.toFixed(0), ratio(iops[depth].qchain, iops[depth].qsd)]);
  }
  if (iops[1] && iops[64]) rows.push(['depth-64 / depth-1 IOPS', r2(iops[64].qchain / iops[1].qchain), r2(iops[64].qsd / iops[1].qsd), '']);
  return rows;
}

/** An iolog writing 4 KiB at a random place in every cluster of [0, size), clusters in random order. */
function allocatingLog(file: string): number {
  const n = sizeMiB * MiB / CLUSTER;
  const order = Array.from({ length: n }, (_, i) => i);
  let seed = 12345;
  const rnd = (): number => ((seed = (seed * 1103515245 + 12345) >>> 0) / 2 ** 32);
  for (let i = n - 1; i > 0; i--) {
    const j = Math.floor(rnd() * (i + 1));
    [order[i], order[j]] = [order[j], order[i]];
  }
  const lines = ['fio version 2 iolog', 'nbd add', 'nbd open'];
  for (const c of order) lines.push(`nbd write ${c * CLUSTER + Math.floor(rnd() * 16) * 4096} 4096`);
  lines.push('nbd close');
  fs.writeFileSync(file, lines.join('\n') + '\n');
  return n;
}

async function writeBench(): Promise<string[][]> {
  const log = path.join(dir, 'alloc.log');
  const n = allocatingLog(log);
  const w = await interleaved(async (k) => {
    fs.rmSync(path.join(dir, 'ov.qcow2'), { force: true });
    sh('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'd0.qcow2', '-F', 'qcow2', 'ov.qcow2'], dir);
    warmCache([path.join(dir, 'd0.qcow2')]);
    const s = await startServer(k, dir, 'ov.qcow2', true);
    try {
      return fio(s.uri, 'write', [`--read_iolog=${log}`, '--iodepth=32']).iops;
    } finally {
      await s.stop();
    }
  });
  return [[`4K random allocating writes QD32, ${n} (IOPS)`, w.qchain.toFixed(0), w.qsd.toFixed(0), ratio(w.qchain, w.qsd)]];
}

function seconds(fn: () => void): number {
  const t0 = process.hrtime.bigint();
  fn();
  return Number(process.hrtime.bigint() - t0) / 1e9;
}

async function seqBench(): Promise<string[][]> {
  const raw = path.join(dir, 'src.raw');
  if (!fs.existsSync(raw)) sh('qemu-img', ['convert', '-O', 'raw', 'd0.qcow2', raw], dir);
  const bytes = sizeMiB * MiB;
  const rd = await interleaved(async (k) => {
    warmCache([path.join(dir, 'd0.qcow2')]);
    const s = await startServer(k, dir, 'd0.qcow2', false);
    try {
      return bytes / MiB / seconds(() => sh('nbdcopy', ['--request-size=1048576', s.uri, 'null:']));
    } finally {
      await s.stop();
    }
  });
  const wr = await interleaved(async (k) => {
    fs.rmSync(path.join(dir, 'w.qcow2'), { force: true });
    sh('qemu-img', ['create', '-q', '-f', 'qcow2', 'w.qcow2', `${sizeMiB}M`], dir);
    warmCache([raw]);
    const s = await startServer(k, dir, 'w.qcow2', true);
    try {
      return bytes / MiB / seconds(() => sh('nbdcopy', ['--request-size=1048576', raw, s.uri]));
    } finally {
      await s.stop();
    }
  });
  return [
    [`nbdcopy 1 MiB sequential read, depth 1 (MiB/s)`, rd.qchain.toFixed(0), rd.qsd.toFixed(0), ratio(rd.qchain, rd.qsd)],
    [`nbdcopy 1 MiB sequential write, new image (MiB/s)`, wr.qchain.toFixed(0), wr.qsd.toFixed(0), ratio(wr.qchain, wr.qsd)],
  ];
}

const jobStatus = (status: string) => (m: QmpMessage): boolean =>
  m.event === 'JOB_STATUS_CHANGE' && (m.data as { status: string }).status === status;

async function commitBench(): Promise<string[][]> {
  const times: Record<ServerKind, { ready: number[]; pivot: number[] }> = { qchain: { ready: [], pivot: [] }, qsd: { ready: [], pivot: [] } };
  for (let i = 0; i < reps; i++) {
    for (const k of KINDS) {
      for (const f of ['cb.qcow2', 'ct.qcow2']) fs.rmSync(path.join(dir, f), { force: true });
      sh('qemu-img', ['create', '-q', '-f', 'qcow2', 'cb.qcow2', '1G'], dir);
      sh('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'cb.qcow2', '-F', 'qcow2', 'ct.qcow2'], dir);
      const fill: string[] = [];
      for (let off = 0; off < 1024; off += 64) fill.push('-c', `write -q -P 0x7e ${off * MiB} ${64 * MiB}`);
      sh('qemu-io', [...fill, 'ct.qcow2'], dir);
      const s = await startServer(k, dir, 'ct.qcow2', true);
      const load = fioAsync(s.uri, 'write', ['--rw=randwrite', '--bs=4k', '--iodepth=4', '--rate_iops=500', '--time_based', '--runtime=600', '--size=1G']);
      load.done.catch(() => {});
      const q = await QmpClient.connect(s.qmpSock);
      try {
        await q.execute('qmp_capabilities');
        await new Promise((r) => setTimeout(r, 1000)); // the load is running
        const t0 = Date.now();
        const rep = await q.execute('block-commit', { 'job-id': 'c', device: 'top' });
        if ('error' in rep) throw new Error(`${k} block-commit: ${JSON.stringify(rep.error)}`);
        await q.waitFor(jobStatus('ready'), 300000);
        const tReady = Date.now();
        await q.execute('job-complete', { id: 'c' });
        await q.waitFor(jobStatus('concluded'), 300000);
        const tDone = Date.now();
        times[k].ready.push((tReady - t0) / 1000);
        times[k].pivot.push((tDone - t0) / 1000);
      } finally {
        q.close();
        load.child.kill('SIGINT');
        await load.done.catch(() => {});
        await s.stop();
      }
    }
  }
  const m = (k: ServerKind, w: 'ready' | 'pivot'): number => median(times[k][w]);
  return [
    ['active commit 1 GiB under 500 write IOPS: to READY (s)', r2(m('qchain', 'ready')), r2(m('qsd', 'ready')), ratio(m('qsd', 'ready'), m('qchain', 'ready'))],
    ['active commit 1 GiB under 500 write IOPS: to pivot done (s)', r2(m('qchain', 'pivot')), r2(m('qsd', 'pivot')), ratio(m('qsd', 'pivot'), m('qchain', 'pivot'))],
  ];
}

async function rssBench(): Promise<string[][]> {
  const rss: Record<ServerKind, number> = { qchain: 0, qsd: 0 };
  for (const k of KINDS) {
    fs.rmSync(path.join(dir, 'big.qcow2'), { force: true });
    sh('qemu-img', ['create', '-q', '-f', 'qcow2', 'big.qcow2', '1T'], dir);
    const s = await startServer(k, dir, 'big.qcow2', true);
    try {
      // 4 KiB every 64 MiB over the whole TiB: 16384 clusters, all 2048 L2 tables.
      fio(s.uri, 'write', [`--rw=write:${64 * MiB - 4096}`, '--bs=4k', '--iodepth=32', '--size=1T', '--io_size=64M']);
      fio(s.uri, 'read', ['--rw=randread', '--bs=4k', '--iodepth=32', '--time_based', `--runtime=${runtime}`, '--size=1T']);
      rss[k] = peakRssKiB(s.child.pid as number) / 1024;
    } finally {
      await s.stop();
    }
  }
  fs.rmSync(path.join(dir, 'big.qcow2'), { force: true });
  return [['peak RSS, 1 TiB image, 4 KiB per 64 MiB touched + random reads (MiB)', rss.qchain.toFixed(0), rss.qsd.toFixed(0), ratio(rss.qchain, rss.qsd)]];
}

const rows: string[][] = [['test', 'qchain', 'QSD', 'qchain/QSD (commit: QSD/qchain time)']];
try {
  if (sections.some((x) => ['read', 'write', 'seq'].includes(x))) buildChain();
  for (const sec of sections) {
    const fn = { read: readBench, write: writeBench, seq: seqBench, commit: commitBench, rss: rssBench }[sec];
    if (!fn) throw new Error(`unknown section '${sec}' (known: ${SECTIONS.join(', ')})`);
    const got = (await fn()).slice(sec === 'read' ? 1 : 0);
    for (const r of got) console.log(r.join(' | '));
    rows.push(...got);
  }
} finally {
  fs.rmSync(dir, { recursive: true, force: true });
}
console.log(`daemon bench: ${sizeMiB} MiB images, fio nbd engine ${runtime} s per run, median of ${reps} interleaved runs`);
console.log(table(rows));
