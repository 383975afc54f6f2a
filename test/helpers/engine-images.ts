/**
 * Images built by QEMU itself (qemu-img create/convert/snapshot, qemu-io writes), for the engine
 * read tests and for "we write into a QEMU-made image" tests. Every builder is seeded.
 */
import fs from 'node:fs';
import path from 'node:path';
import { qemuImg, qemuIo, qemuRawView, rng } from './qemu.js';
import { genOps, fillRandom, type Op, type OpGenOptions } from './engine-util.js';

export interface BuiltImage {
  name: string;
  /** The top image (the one to open). */
  top: string;
  /** Every qcow2 file of the chain (to `qemu-img check`). */
  qcow2Files: string[];
  /** Whether our block status should equal `qemu-img map` (no raw layers, no preallocation). */
  compareMap: boolean;
  /** Guest views captured right before each internal snapshot was taken. */
  snapshots?: Array<{ name: string; view: Buffer }>;
  seed: number;
  /** Geometry of the top image (for further random ops). */
  clusterSize: number;
  l2Coverage: number;
  granularity: number;
  version: 2 | 3;
  size: number;
}

async function must(p: Promise<{ code: number; stdout: string; stderr: string }>, what: string): Promise<string> {
  const r = await p;
  if (r.code !== 0) throw new Error(`${what} failed (exit ${r.code}): ${r.stderr}${r.stdout}`);
  return r.stdout;
}

export async function create(file: string, size: number | null, opts: Record<string, string | number> = {}, backing?: { file: string; fmt: string }): Promise<void> {
  const o = Object.entries(opts).map(([k, v]) => `${k}=${v}`).join(',');
  const args = ['create', '-q', '-f', 'qcow2'];
  if (o) args.push('-o', o);
  if (backing) args.push('-b', backing.file, '-F', backing.fmt);
  args.push(file);
  if (size !== null) args.push(String(size));
  await must(qemuImg(args), `qemu-img create ${path.basename(file)}`);
}

/** Run qemu-io commands in one process (in chunks, to keep argv small); any failed command throws. */
export async function qio(file: string, cmds: string[], fmt = 'qcow2'): Promise<void> {
  for (let i = 0; i < cmds.length; i += 200) {
    const args = ['-f', fmt];
    for (const c of cmds.slice(i, i + 200)) args.push('-c', c);
    args.push(file);
    const out = await must(qemuIo(args), `qemu-io ${path.basename(file)}`);
    if (/failed|error/i.test(out)) throw new Error(`qemu-io ${path.basename(file)}: ${out.split('\n').filter((l) => /failed|error/i.test(l)).join('; ')}`);
  }
}

/** Source files for `write -s` (random data of varied seeds), created once per folder. */
function sources(dir: string, maxLen: number, seed: number): string[] {
  const out: string[] = [];
  for (let k = 0; k < 6; k++) {
    const f = path.join(dir, `src-${seed}-${k}-${maxLen}.bin`);
    if (!fs.existsSync(f)) fs.writeFileSync(f, fillRandom(Buffer.allocUnsafe(maxLen), seed * 31 + k + 1));
    out.push(f);
  }
  return out;
}

/** Random qemu-io commands: random-data and pattern writes, zero writes (with/without -u), discards. */
export function qioOps(dir: string, r: () => number, n: number, o: OpGenOptions & { v2?: boolean }): string[] {
  const maxLen = Math.min(o.size, o.maxLen ?? Math.max(3 * o.clusterSize + 4096, 256 * 1024));
  const srcs = sources(dir, maxLen, Math.floor(r() * 1000));
  return genOps(r, n, { ...o, maxLen }).map((op: Op) => {
    switch (op.kind) {
      case 'write':
        return r() < 0.6 ? `write -q -s ${srcs[Math.floor(r() * srcs.length)]} ${op.off} ${op.len}` : `write -q -P ${1 + Math.floor(r() * 254)} ${op.off} ${op.len}`;
      case 'zero': return `write -q -z${op.unmap ? ' -u' : ''} ${op.off} ${op.len}`;
      case 'discard': return `discard -q ${op.off} ${op.len}`;
    }
  });
}

const MiB = 1024 * 1024;

function geo(size: number, cs: number, extL2 = false, version: 2 | 3 = 3): Pick<BuiltImage, 'clusterSize' | 'l2Coverage' | 'granularity' | 'version' | 'size'> {
  return { clusterSize: cs, l2Coverage: (cs / (extL2 ? 16 : 8)) * cs, granularity: extL2 ? cs / 32 : cs, version, size };
}

/** Raw source with random, compressible (text-like), zero and 0xff regions, cluster-sized pieces. */
function mixedRaw(file: string, size: number, seed: number, piece: number): void {
  const r = rng(seed);
  const b = Buffer.alloc(size);
  const words = ['qcow2', 'cluster', 'refcount', 'snapshot', 'backing', 'chain', 'L2 table', 'zstd', 'deflate', '\n'];
  for (let p = 0; p < size; p += piece) {
    const k = r();
    const seg = b.subarray(p, Math.min(size, p + piece));
    if (k < 0.3) fillRandom(seg, Math.floor(r() * 0xffffffff));
    else if (k < 0.7) {
      let q = 0;
      while (q < seg.length) q += seg.write(words[Math.floor(r() * words.length)] + ' ', q);
    } else if (k < 0.8) seg.fill(0xff);
    else if (k < 0.9) {
      // Half random half zero (partly compressible).
      fillRandom(seg.subarray(0, seg.length >> 1), Math.floor(r() * 0xffffffff));
    }
    // else zero
  }
  fs.writeFileSync(file, b);
}

export type Builder = (dir: string, seed: number) => Promise<BuiltImage>;

export const builders: Record<string, Builder> = {
  async 'compressed-zlib-64k'(dir, seed) {
    const src = path.join(dir, 'czl.raw');
    const top = path.join(dir, 'czl.qcow2');
    mixedRaw(src, 16 * MiB, seed, 40 * 1024);
    await must(qemuImg(['convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=65536', src, top]), 'convert -c');
    // A few partial overwrites: QEMU rewrites those compressed clusters uncompressed.
    const r = rng(seed + 1);
    await qio(top, qioOps(dir, r, 20, { size: 16 * MiB, clusterSize: 65536, l2Coverage: 512 * MiB, granularity: 65536, weights: { write: 4, zero: 1, discard: 1 } }));
    return { name: 'compressed-zlib-64k', top, qcow2Files: [top], compareMap: true, seed, ...geo(16 * MiB, 65536) };
  },
  async 'compressed-zlib-4k'(dir, seed) {
    const src = path.join(dir, 'czl4.raw');
    const top = path.join(dir, 'czl4.qcow2');
    mixedRaw(src, 8 * MiB, seed, 6 * 1024);
    await must(qemuImg(['convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=4096', src, top]), 'convert -c');
    return { name: 'compressed-zlib-4k', top, qcow2Files: [top], compareMap: true, seed, ...geo(8 * MiB, 4096) };
  },
  async 'compressed-zstd-64k'(dir, seed) {
    const src = path.join(dir, 'czs.raw');
    const top = path.join(dir, 'czs.qcow2');
    mixedRaw(src, 16 * MiB, seed, 50 * 1024);
    await must(qemuImg(['convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=65536,compression_type=zstd', src, top]), 'convert -c zstd');
    const r = rng(seed + 1);
    await qio(top, qioOps(dir, r, 20, { size: 16 * MiB, clusterSize: 65536, l2Coverage: 512 * MiB, granularity: 65536 }));
    return { name: 'compressed-zstd-64k', top, qcow2Files: [top], compareMap: true, seed, ...geo(16 * MiB, 65536) };
  },
  async 'compressed-zstd-2M'(dir, seed) {
    const src = path.join(dir, 'czs2.raw');
    const top = path.join(dir, 'czs2.qcow2');
    mixedRaw(src, 16 * MiB, seed, 1536 * 1024);
    await must(qemuImg(['convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=2M,compression_type=zstd', src, top]), 'convert -c zstd 2M');
    return { name: 'compressed-zstd-2M', top, qcow2Files: [top], compareMap: true, seed, ...geo(16 * MiB, 2 * MiB) };
  },
  async 'extl2-64k'(dir, seed) {
    const top = path.join(dir, 'xl2.qcow2');
    await create(top, 16 * MiB, { extended_l2: 'on', cluster_size: 65536 });
    const r = rng(seed);
    // Subcluster-sized writes at odd offsets, then random ops.
    const cmds: string[] = [];
    for (let i = 0; i < 40; i++) {
      const len = r() < 0.5 ? 2048 : 4096;
      const off = Math.floor(r() * (16 * MiB - 8192)) | 1;
      cmds.push(r() < 0.8 ? `write -q -P ${1 + (i % 250)} ${off} ${len}` : `write -q -z ${off - (off % 2048)} ${len}`);
    }
    cmds.push(...qioOps(dir, r, 80, { size: 16 * MiB, clusterSize: 65536, l2Coverage: 256 * MiB, granularity: 2048 }));
    await qio(top, cmds);
    return { name: 'extl2-64k', top, qcow2Files: [top], compareMap: true, seed, ...geo(16 * MiB, 65536, true) };
  },
  async 'extl2-over-backing'(dir, seed) {
    const base = path.join(dir, 'xb-base.qcow2');
    const top = path.join(dir, 'xb-top.qcow2');
    await create(base, 16 * MiB, { cluster_size: 65536 });
    const r = rng(seed);
    await qio(base, [`write -q -P 0x11 0 16M`, ...qioOps(dir, r, 30, { size: 16 * MiB, clusterSize: 65536, l2Coverage: 512 * MiB, granularity: 65536, weights: { write: 1, zero: 0, discard: 0 } })]);
    await create(top, null, { extended_l2: 'on', cluster_size: 32768 }, { file: 'xb-base.qcow2', fmt: 'qcow2' });
    const cmds: string[] = [];
    for (let i = 0; i < 60; i++) {
      const len = [1024, 2048, 3072, 4096, 1000][i % 5];
      const off = Math.floor(r() * (16 * MiB - 8192));
      const k = r();
      cmds.push(k < 0.6 ? `write -q -P ${0x40 + (i % 100)} ${off | 1} ${len}` : k < 0.8 ? `write -q -z ${off - (off % 1024)} ${len}` : `write -q -z -u ${off - (off % 1024)} ${len * 8}`);
    }
    cmds.push(...qioOps(dir, r, 60, { size: 16 * MiB, clusterSize: 32768, l2Coverage: 2048 * 32768, granularity: 1024 }));
    await qio(top, cmds);
    return { name: 'extl2-over-backing', top, qcow2Files: [base, top], compareMap: true, seed, ...geo(16 * MiB, 32768, true) };
  },
  async 'internal-snapshots'(dir, seed) {
    const top = path.join(dir, 'snap.qcow2');
    await create(top, 16 * MiB, { cluster_size: 65536 });
    const r = rng(seed);
    const g = { size: 16 * MiB, clusterSize: 65536, l2Coverage: 512 * MiB, granularity: 65536 };
    await qio(top, [`write -q -P 0x21 0 6M`, ...qioOps(dir, r, 50, { ...g, weights: { write: 8, zero: 1, discard: 1 } })]);
    const snaps: Array<{ name: string; view: Buffer }> = [];
    snaps.push({ name: 's1', view: await qemuRawView(top) });
    await must(qemuImg(['snapshot', '-c', 's1', top]), 'snapshot -c s1');
    await qio(top, qioOps(dir, r, 50, g));
    snaps.push({ name: 's2', view: await qemuRawView(top) });
    await must(qemuImg(['snapshot', '-c', 's2', top]), 'snapshot -c s2');
    await qio(top, qioOps(dir, r, 50, g));
    return { name: 'internal-snapshots', top, qcow2Files: [top], compareMap: true, snapshots: snaps, seed, ...geo(16 * MiB, 65536) };
  },
  async 'v2-chain'(dir, seed) {
    const base = path.join(dir, 'v2-base.qcow2');
    const top = path.join(dir, 'v2-top.qcow2');
    await create(base, 8 * MiB, { compat: '0.10', cluster_size: 4096 });
    const r = rng(seed);
    await qio(base, [`write -q -P 0x33 0 8M`, ...qioOps(dir, r, 60, { size: 8 * MiB, clusterSize: 4096, l2Coverage: 512 * 4096, granularity: 4096 })]);
    await create(top, null, { compat: '0.10', cluster_size: 65536 }, { file: 'v2-base.qcow2', fmt: 'qcow2' });
    await qio(top, qioOps(dir, r, 80, { size: 8 * MiB, clusterSize: 65536, l2Coverage: 512 * MiB, granularity: 65536 }));
    return { name: 'v2-chain', top, qcow2Files: [base, top], compareMap: true, seed, ...geo(8 * MiB, 65536, false, 2) };
  },
  async 'prealloc-metadata'(dir, seed) { return prealloc(dir, seed, 'metadata'); },
  async 'prealloc-falloc'(dir, seed) { return prealloc(dir, seed, 'falloc'); },
  async 'prealloc-full'(dir, seed) { return prealloc(dir, seed, 'full'); },
  async 'refcount-bits-1'(dir, seed) {
    const top = path.join(dir, 'rc1.qcow2');
    await create(top, 8 * MiB, { refcount_bits: 1, cluster_size: 4096 });
    await qio(top, qioOps(dir, rng(seed), 120, { size: 8 * MiB, clusterSize: 4096, l2Coverage: 2 * MiB, granularity: 4096 }));
    return { name: 'refcount-bits-1', top, qcow2Files: [top], compareMap: true, seed, ...geo(8 * MiB, 4096) };
  },
  async 'refcount-bits-64-snapshot'(dir, seed) {
    const top = path.join(dir, 'rc64.qcow2');
    await create(top, 8 * MiB, { refcount_bits: 64, cluster_size: 512 });
    const r = rng(seed);
    const g = { size: 8 * MiB, clusterSize: 512, l2Coverage: 64 * 512, granularity: 512, maxLen: 64 * 1024 };
    await qio(top, qioOps(dir, r, 100, g));
    await must(qemuImg(['snapshot', '-c', 'snap', top]), 'snapshot');
    await qio(top, qioOps(dir, r, 60, g));
    return { name: 'refcount-bits-64-snapshot', top, qcow2Files: [top], compareMap: true, seed, ...geo(8 * MiB, 512) };
  },
  async 'cluster-512'(dir, seed) {
    const top = path.join(dir, 'c512.qcow2');
    await create(top, 8 * MiB, { cluster_size: 512 });
    await qio(top, qioOps(dir, rng(seed), 200, { size: 8 * MiB, clusterSize: 512, l2Coverage: 64 * 512, granularity: 512, maxLen: 96 * 1024 }));
    return { name: 'cluster-512', top, qcow2Files: [top], compareMap: true, seed, ...geo(8 * MiB, 512) };
  },
  async 'cluster-2M'(dir, seed) {
    const top = path.join(dir, 'c2m.qcow2');
    await create(top, 32 * MiB, { cluster_size: '2M' });
    await qio(top, qioOps(dir, rng(seed), 40, { size: 32 * MiB, clusterSize: 2 * MiB, l2Coverage: 256 * 1024 * 2 * MiB, granularity: 2 * MiB }));
    return { name: 'cluster-2M', top, qcow2Files: [top], compareMap: true, seed, ...geo(32 * MiB, 2 * MiB) };
  },
  async 'three-deep-zero-mask'(dir, seed) {
    const base = path.join(dir, 'z-base.qcow2');
    const mid = path.join(dir, 'z-mid.qcow2');
    const top = path.join(dir, 'z-top.qcow2');
    const r = rng(seed);
    await create(base, 16 * MiB, { cluster_size: 65536 });
    await qio(base, ['write -q -P 0xaa 0 16M']);
    await create(mid, null, { cluster_size: 16384 }, { file: 'z-base.qcow2', fmt: 'qcow2' });
    await qio(mid, ['write -q -z 1M 2M', 'write -q -z -u 4M 1M', 'discard -q 6M 1M', 'write -q -z 8191 70000', 'write -q -P 0xbb 10M 1M',
      ...qioOps(dir, r, 40, { size: 16 * MiB, clusterSize: 16384, l2Coverage: 2048 * 16384, granularity: 16384 })]);
    await create(top, null, { cluster_size: 4096 }, { file: 'z-mid.qcow2', fmt: 'qcow2' });
    await qio(top, ['write -q -P 0xcc 1536K 1M', 'write -q -z 10M 512K', 'discard -q 12M 64K',
      ...qioOps(dir, r, 60, { size: 16 * MiB, clusterSize: 4096, l2Coverage: 512 * 4096, granularity: 4096 })]);
    return { name: 'three-deep-zero-mask', top, qcow2Files: [base, mid, top], compareMap: true, seed, ...geo(16 * MiB, 4096) };
  },
  async 'raw-base-chain'(dir, seed) {
    const base = path.join(dir, 'rb.raw');
    const mid = path.join(dir, 'rb-mid.qcow2');
    const top = path.join(dir, 'rb-top.qcow2');
    mixedRaw(base, 8 * MiB, seed, 24 * 1024);
    const r = rng(seed);
    await create(mid, null, { cluster_size: 65536 }, { file: 'rb.raw', fmt: 'raw' });
    await qio(mid, qioOps(dir, r, 40, { size: 8 * MiB, clusterSize: 65536, l2Coverage: 512 * MiB, granularity: 65536 }));
    await create(top, 12 * MiB, { cluster_size: 4096, compat: '0.10' }, { file: 'rb-mid.qcow2', fmt: 'qcow2' });
    await qio(top, qioOps(dir, r, 60, { size: 12 * MiB, clusterSize: 4096, l2Coverage: 512 * 4096, granularity: 4096 }));
    return { name: 'raw-base-chain', top, qcow2Files: [mid, top], compareMap: false, seed, ...geo(12 * MiB, 4096, false, 2) };
  },
  async 'overlay-larger-than-backing'(dir, seed) {
    const base = path.join(dir, 'ol-base.qcow2');
    const top = path.join(dir, 'ol-top.qcow2');
    await create(base, 4 * MiB, { cluster_size: 65536 });
    await qio(base, ['write -q -P 0x5c 0 4M']);
    await create(top, 12 * MiB, { cluster_size: 65536 }, { file: 'ol-base.qcow2', fmt: 'qcow2' });
    // Cross the backing's end with a partial-cluster write (COW reads past the backing end = zeros).
    await qio(top, ['write -q -P 0x7e 4190000 10000', 'write -q -P 0x7f 8M 4096',
      ...qioOps(dir, rng(seed), 20, { size: 12 * MiB, clusterSize: 65536, l2Coverage: 512 * MiB, granularity: 65536, weights: { write: 4, zero: 1, discard: 1 } })]);
    return { name: 'overlay-larger-than-backing', top, qcow2Files: [base, top], compareMap: true, seed, ...geo(12 * MiB, 65536) };
  },
};

async function prealloc(dir: string, seed: number, mode: string): Promise<BuiltImage> {
  const top = path.join(dir, `pre-${mode}.qcow2`);
  await create(top, 8 * MiB, { preallocation: mode, cluster_size: 65536 });
  await qio(top, qioOps(dir, rng(seed), 60, { size: 8 * MiB, clusterSize: 65536, l2Coverage: 512 * MiB, granularity: 65536 }));
  // With preallocation=metadata QEMU also asks the file for holes (zero+data runs): not comparable.
  return { name: `prealloc-${mode}`, top, qcow2Files: [top], compareMap: mode !== 'metadata', seed, ...geo(8 * MiB, 65536) };
}
