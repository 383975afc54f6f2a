/**
 * Seeded random differential over the offline verbs: the same random sequence of guest writes,
 * commits (with and without -b, -d), rebases (safe, -u, -b ""), internal snapshots (create,
 * apply, delete), resizes and amends is applied by qchain to one copy of a random chain and by
 * qemu-img/qemu-io to another. Every step must give the same exit status, and at the end every
 * file of the chain must show the same guest view and qchain's files must pass `qemu-img check`.
 * Fixed seeds in CI; QCHAIN_OPS_SOAK=N runs N more (from QCHAIN_SEED_BASE, else time based).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { oracle, qchain, qemuImg, qemuIo, qemuRawView, rng, scratch, type RunResult } from './helpers/qemu.js';

const K = 1024, M = 1024 * K;

interface Step { tool: 'img' | 'io'; args: string[]; label: string }

function pick<T>(r: () => number, xs: T[]): T {
  return xs[Math.floor(r() * xs.length)];
}

/** Build a random chain l0 <- l1 <- ... in `dir` with qemu's tools; returns the file names. */
async function buildChain(dir: string, r: () => number): Promise<string[]> {
  const depth = 2 + Math.floor(r() * 3); // 2..4 files
  const files: string[] = [];
  for (let i = 0; i < depth; i++) {
    const name = `l${i}.qcow2`;
    const cs = pick(r, ['4k', '64k', '64k', '128k']);
    const compat = r() < 0.2 ? '0.10' : '1.1';
    const size = pick(r, ['8M', '8M', '12M']);
    const args = ['create', '-q', '-f', 'qcow2', '-o', `cluster_size=${cs},compat=${compat}`];
    if (i > 0) args.push('-b', files[i - 1], '-F', 'qcow2');
    args.push(name, size);
    const c = await qemuImg(args, dir);
    assert.equal(c.code, 0, c.stderr);
    const ws: string[] = [];
    for (let k = 0; k < 4; k++) ws.push('-c', randomWrite(r, 8 * M));
    const w = await qemuIo([...ws, name], dir);
    assert.equal(w.code, 0, w.stderr);
    files.push(name);
  }
  return files;
}

function randomWrite(r: () => number, size: number): string {
  const len = Math.max(512, Math.floor(r() * 600 * K));
  const off = Math.floor(r() * (size - len));
  const kind = r();
  if (kind < 0.15) return `write -z ${off} ${len}`;
  if (kind < 0.25) return `discard ${off} ${len}`;
  return `write -P 0x${(1 + Math.floor(r() * 254)).toString(16)} ${off} ${len}`;
}

/** The next random operation on the chain `files` (top last); may change the list. */
function nextStep(r: () => number, files: string[], snaps: string[]): Step {
  const top = files[files.length - 1];
  const x = r();
  if (x < 0.3) return { tool: 'io', args: ['-c', randomWrite(r, 8 * M), top], label: 'write' };
  if (x < 0.4 && files.length >= 2) {
    const d = r() < 0.3 ? ['-d'] : [];
    return { tool: 'img', args: ['commit', '-q', ...d, top], label: `commit ${d.join('')}` };
  }
  if (x < 0.47 && files.length >= 3) {
    const base = files[Math.floor(r() * (files.length - 2))];
    return { tool: 'img', args: ['commit', '-q', '-b', base, top], label: 'commit -b' };
  }
  if (x < 0.57 && files.length >= 3) {
    // Drop the layer below the top, safely.
    const nb = files[files.length - 3];
    files.splice(files.length - 2, 1);
    return { tool: 'img', args: ['rebase', '-q', '-b', nb, '-F', 'qcow2', top], label: 'rebase' };
  }
  if (x < 0.6 && files.length >= 2) {
    files.splice(0, files.length - 1);
    return { tool: 'img', args: ['rebase', '-q', '-b', '', top], label: 'rebase -b ""' };
  }
  if (x < 0.63 && files.length >= 3) {
    const nb = files[files.length - 3];
    files.splice(files.length - 2, 1);
    return { tool: 'img', args: ['rebase', '-q', '-u', '-b', nb, '-F', 'qcow2', top], label: 'rebase -u' };
  }
  if (x < 0.72) {
    const name = `s${snaps.length}`;
    snaps.push(name);
    return { tool: 'img', args: ['snapshot', '-c', name, top], label: 'snapshot -c' };
  }
  if (x < 0.78 && snaps.length) return { tool: 'img', args: ['snapshot', '-a', pick(r, snaps), top], label: 'snapshot -a' };
  if (x < 0.84 && snaps.length) {
    const name = snaps.splice(Math.floor(r() * snaps.length), 1)[0];
    return { tool: 'img', args: ['snapshot', '-d', name, top], label: 'snapshot -d' };
  }
  if (x < 0.9) return { tool: 'img', args: ['resize', '-q', top, pick(r, ['+1M', '+64k', '9M', '+3M'])], label: 'resize' };
  const o = pick(r, ['lazy_refcounts=on', 'lazy_refcounts=off', 'refcount_bits=8', 'refcount_bits=16', 'compat=1.1', 'compat=0.10']);
  return { tool: 'img', args: ['amend', '-q', '-o', o, top], label: `amend ${o}` };
}

async function runSeed(seed: number): Promise<void> {
  const root = scratch('qchain-opsdiff-');
  const r = rng(seed);
  const qd = path.join(root, 'qemu'), cd = path.join(root, 'qchain');
  fs.mkdirSync(qd);
  const files = await buildChain(qd, r);
  fs.cpSync(qd, cd, { recursive: true });
  const all = [...files];
  const snaps: string[] = [];
  const log: string[] = [];
  for (let i = 0; i < 10; i++) {
    const s = nextStep(r, files, snaps);
    const q: RunResult = s.tool === 'img' ? await qemuImg(s.args, qd) : await qemuIo(s.args, qd);
    const m: RunResult = await qchain([s.tool, ...s.args], cd);
    log.push(`${s.label}: ${s.args.join(' ')} -> qemu ${q.code} qchain ${m.code}`);
    assert.equal(m.code, q.code, `seed ${seed}, step ${i} (${s.label})\n${log.join('\n')}\nqemu: ${q.stderr}\nqchain: ${m.stderr}`);
    if (s.tool === 'img' && s.args[0] === 'snapshot' && s.args[1] === '-c' && q.code !== 0) snaps.pop();
  }
  for (const f of all) {
    const [a, b] = [await qemuRawView(path.join(qd, f)), await qemuRawView(path.join(cd, f))];
    assert.ok(a.equals(b), `seed ${seed}: guest view of ${f} differs\n${log.join('\n')}`);
    const c = await qemuImg(['check', path.join(cd, f)]);
    assert.equal(c.code, 0, `seed ${seed}: qemu-img check ${f}: ${c.stdout}${c.stderr}\n${log.join('\n')}`);
  }
}

const SEEDS = [1, 2, 3, 4];
const soak = Number(process.env.QCHAIN_OPS_SOAK ?? 0);
const base = Number(process.env.QCHAIN_SEED_BASE ?? Date.now() % 1e6);
for (let i = 0; i < soak; i++) SEEDS.push(base + i);

for (const seed of SEEDS) {
  test(`random verb sequence, seed ${seed}: qchain and qemu-img agree`, oracle(), () => runSeed(seed));
}
