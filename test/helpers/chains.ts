/**
 * Chains described as letter tables (one cluster per character), built with QEMU's own tools,
 * copied side by side for "qchain vs qemu-img" runs, and read back as guest views.
 *   'A'..'Z'  the cluster is written with that byte     '-'  unallocated
 *   '0'       the cluster is a zero cluster (write -z)
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { qemuImg, qemuImgSync, qemuIoSync, qemuRawView, scratch } from './qemu.js';

export const CLUSTER = 64 * 1024;

export interface Layer {
  name: string;
  /** Letter row; its length is the image size in clusters. */
  row: string;
  /** Extra qemu-img create options (-o ...). */
  opts?: string[];
  /** Backing format recorded in the overlay (default qcow2). */
  fmt?: 'qcow2' | 'raw';
}

/** The seed's chain: base <- sn1 <- sn2 <- `top`. */
export function seedChain(top: string): Layer[] {
  return [
    { name: 'base.qcow2', row: 'AAAA--------' },
    { name: 'sn1.qcow2', row: '--BBBB------' },
    { name: 'sn2.qcow2', row: '-----CCCC---' },
    { name: top, row: 'D-------DD--' },
  ];
}

/** Create the chain bottom first: layers[0] is the base, each next one backed by the previous. */
export function buildChain(dir: string, layers: Layer[]): void {
  layers.forEach((l, i) => {
    const file = `${l.name}`;
    const size = `${l.row.length * CLUSTER}`;
    if (l.fmt === 'raw') qemuImgSync(['create', '-q', '-f', 'raw', file, size], dir);
    else if (i === 0) qemuImgSync(['create', '-q', '-f', 'qcow2', ...(l.opts ?? []), file, size], dir);
    else {
      const below = layers[i - 1];
      qemuImgSync(['create', '-q', '-f', 'qcow2', ...(l.opts ?? []), '-b', below.name, '-F', below.fmt ?? 'qcow2', file, size], dir);
    }
    const cmds: string[] = [];
    for (let c = 0; c < l.row.length; c++) {
      const ch = l.row[c];
      if (ch === '-') continue;
      if (ch === '0') cmds.push('-c', `write -q -z ${c * CLUSTER} ${CLUSTER}`);
      else cmds.push('-c', `write -q -P 0x${ch.charCodeAt(0).toString(16)} ${c * CLUSTER} ${CLUSTER}`);
    }
    if (cmds.length) qemuIoSync([...(l.fmt === 'raw' ? ['-f', 'raw'] : []), ...cmds, file], dir);
  });
}

/** Copy every regular file of `from` into a fresh folder `to`. */
export function copyDir(from: string, to: string): void {
  fs.mkdirSync(to, { recursive: true });
  for (const f of fs.readdirSync(from)) {
    const p = path.join(from, f);
    if (fs.statSync(p).isFile()) fs.copyFileSync(p, path.join(to, f));
  }
}

/**
 * `layers` built in src/ of a fresh scratch folder (then changed by `prepare`, if given) and
 * copied to q/ (for qemu-img) and c/ (for qchain).
 */
export function sideBySideDirs(layers: Layer[], prepare?: (src: string) => void): { src: string; q: string; c: string } {
  const dir = scratch();
  const src = path.join(dir, 'src');
  fs.mkdirSync(src);
  buildChain(src, layers);
  prepare?.(src);
  const q = path.join(dir, 'q'), c = path.join(dir, 'c');
  copyDir(src, q);
  copyDir(src, c);
  return { src, q, c };
}

/** The guest view as letters per cluster: the byte if the cluster is uniform, '-' for zeros, '?' if mixed. */
export function letters(view: Buffer, cluster = CLUSTER): string {
  let s = '';
  for (let p = 0; p < view.length; p += cluster) {
    const c = view.subarray(p, Math.min(view.length, p + cluster));
    const first = c[0];
    const uniform = c.equals(Buffer.alloc(c.length, first));
    s += !uniform ? '?' : first === 0 ? '-' : String.fromCharCode(first);
  }
  return s;
}

/** Guest view (QEMU reading) of each named image in `dir`. */
export async function views(dir: string, names: string[]): Promise<Map<string, Buffer>> {
  const m = new Map<string, Buffer>();
  for (const n of names) m.set(n, await qemuRawView(path.join(dir, n)));
  return m;
}

/** Each named image shows the same guest view in `q` and in `c`; the views in `c`. */
export async function sameViews(q: string, c: string, names: string[]): Promise<Map<string, Buffer>> {
  const vq = await views(q, names), vc = await views(c, names);
  for (const n of names) assert.ok(vq.get(n)?.equals(vc.get(n) as Buffer), `guest view of ${n}: qemu ${letters(vq.get(n) as Buffer)} qchain ${letters(vc.get(n) as Buffer)}`);
  return vc;
}

/** `qemu-img check` exit status and output for an image. */
export async function check(file: string): Promise<{ code: number; out: string }> {
  const r = await qemuImg(['check', file]);
  return { code: r.code, out: r.stdout + r.stderr };
}

/** Backing file name recorded in an image (qemu-img info JSON). */
export async function backingOf(file: string): Promise<string | null> {
  const r = await qemuImg(['info', '--output=json', '-U', file]);
  const j = JSON.parse(r.stdout) as { 'backing-filename'?: string };
  return j['backing-filename'] ?? null;
}

/**
 * `qchain img ARGS` run in this process (no Node start-up per call), from directory `cwd`.
 * Tests in one file run one at a time, so changing the working directory here is safe.
 */
export async function qchainImg(args: string[], cwd: string): Promise<{ code: number; stdout: string; stderr: string }> {
  const { imgMain } = await import('../../src/cli/img/main.js');
  let stdout = '', stderr = '';
  const text = (c: string | Uint8Array): string => (typeof c === 'string' ? c : Buffer.from(c).toString('utf8'));
  const ctx = { stdout: { write: (c: string | Uint8Array) => { stdout += text(c); return true; } }, stderr: { write: (c: string | Uint8Array) => { stderr += text(c); return true; } } };
  const before = process.cwd();
  process.chdir(cwd);
  try {
    const code = await imgMain(args, ctx);
    return { code, stdout, stderr };
  } finally {
    process.chdir(before);
  }
}

/** `qemu-img map` of an image as one entry per cluster (depth/zero/data), independent of host layout. */
export function mapShape(dir: string, file: string, cluster = CLUSTER): string[] {
  const m = JSON.parse(qemuImgSync(['map', '--output=json', file], dir)) as Array<{ start: number; length: number; depth: number; zero: boolean; data: boolean }>;
  const out: string[] = [];
  for (const e of m) for (let p = e.start; p < e.start + e.length; p += cluster) out.push(`${p / cluster}:${e.depth}${e.zero ? 'z' : ''}${e.data ? 'd' : ''}`);
  return out;
}
