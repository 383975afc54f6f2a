/**
 * Seeded random differential for commit and rebase: random 3–4 deep chains (mixed cluster sizes,
 * v2/v3, partial-cluster writes, zero writes, discards, shorter lower layers), then the same
 * command applied by qemu-img and by qchain to copies: every file's guest view must be identical
 * and every image `qemu-img check` clean.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { oracle, qemuImg, qemuImgSync, qemuIoSync, rng, scratch } from './helpers/qemu.js';
import { check, copyDir, letters, mapShape, qchainImg, views } from './helpers/chains.js';

const K = 1024;

function randInt(r: () => number, lo: number, hi: number): number {
  return lo + Math.floor(r() * (hi - lo + 1));
}

/** Build a random chain l0 ← l1 ← ... in `dir`; returns the file names bottom first and their sizes. */
function randomChain(dir: string, r: () => number): { names: string[]; sizes: number[] } {
  const depth = randInt(r, 3, 4);
  const top = randInt(r, 16, 32) * 64 * K;
  const names: string[] = [], sizes: number[] = [];
  for (let i = 0; i < depth; i++) {
    const name = `l${i}.qcow2`;
    // Lower layers are sometimes shorter than the top (never longer: commit cannot shrink).
    const size = i < depth - 1 && r() < 0.25 ? Math.max(64 * K, top - randInt(r, 1, 8) * 64 * K) : top;
    const o: string[] = [];
    const cs = [65536, 65536, 4096, 512, 131072][randInt(r, 0, 4)];
    const kind = r();
    const extra = kind < 0.2 ? ',compat=0.10' : kind < 0.35 && cs >= 16384 ? ',extended_l2=on' : kind < 0.45 ? ',lazy_refcounts=on' : '';
    o.push('-o', `cluster_size=${cs}${extra}`);
    const back = i > 0 ? ['-b', names[i - 1], '-F', 'qcow2'] : [];
    qemuImgSync(['create', '-q', '-f', 'qcow2', ...o, ...back, name, `${size}`], dir);
    const cmds: string[] = [];
    for (let w = randInt(r, 3, 12); w > 0; w--) {
      const off = randInt(r, 0, size / 512 - 1) * 512;
      const len = Math.min(size - off, randInt(r, 1, 384) * 512);
      const kind = r();
      if (kind < 0.15) cmds.push('-c', `write -q -z ${off} ${len}`);
      else if (kind < 0.22) cmds.push('-c', `discard -q ${off} ${len}`);
      else cmds.push('-c', `write -q -P 0x${randInt(r, 0x41, 0x5a).toString(16)} ${off} ${len}`);
    }
    qemuIoSync([...cmds, name], dir);
    names.push(name);
    sizes.push(size);
  }
  return { names, sizes };
}

/** Commands for one chain: commits into any lower layer (growing is left to the resize tests), rebases onto any layer. */
function randomOps(r: () => number, names: string[], sizes: number[]): string[][] {
  const top = names[names.length - 1];
  const ops: string[][] = [];
  const n = names.length;
  const candidates: string[][] = [
    ['commit', top],
    ['commit', '-d', top],
    ['commit', '-b', names[0], top],
    ['commit', '-b', names[randInt(r, 0, n - 2)], top],
    ['commit', names[n - 2]],
    ['rebase', '-b', names[randInt(r, 0, n - 3)], '-F', 'qcow2', top],
    ['rebase', '-b', '', top],
    ['rebase', '-b', '', names[n - 2]],
    ['rebase', '-u', '-b', names[0], '-F', 'qcow2', top],
  ];
  const ok = (c: string[]): boolean => {
    if (c[0] !== 'commit') return true;
    // A commit target must be at least as large as the committed image (no resize here).
    const img = names.indexOf(c[c.length - 1]);
    const bi = c.includes('-b') ? names.indexOf(c[c.indexOf('-b') + 1]) : img - 1;
    return sizes[bi] >= sizes[img];
  };
  const usable = candidates.filter(ok);
  for (let i = 0; i < 3; i++) ops.push(usable[randInt(r, 0, usable.length - 1)]);
  return ops;
}

test('random chains: commit/rebase by qchain and qemu-img give identical views, check clean', oracle(), async () => {
  const root = scratch();
  // QCHAIN_RANDOM_SEEDS=first:count runs more seeds locally.
  const env = /^(\d+):(\d+)$/.exec(process.env.QCHAIN_RANDOM_SEEDS ?? '');
  const seeds = env ? Array.from({ length: Number(env[2]) }, (_, i) => Number(env[1]) + i) : [11, 22, 33];
  for (const seed of seeds) {
    const r = rng(seed);
    const src = path.join(root, `s${seed}`);
    fs.mkdirSync(src);
    const { names, sizes } = randomChain(src, r);
    for (const [k, op] of randomOps(r, names, sizes).entries()) {
      const q = path.join(root, `s${seed}-${k}-q`), c = path.join(root, `s${seed}-${k}-c`);
      copyDir(src, q);
      copyDir(src, c);
      const what = `seed ${seed}: ${op.join(' ')}`;
      const rq = await qemuImg(op, q);
      const rc = await qchainImg(op, c);
      assert.equal(rc.code, rq.code, `${what}: ${rc.stderr} / ${rq.stderr}`);
      assert.equal(rc.stderr, rq.stderr, what);
      const vq = await views(q, names), vc = await views(c, names);
      for (const n of names) {
        assert.ok((vc.get(n) as Buffer).equals(vq.get(n) as Buffer), `${what}: view of ${n}\n qemu   ${letters(vq.get(n) as Buffer)}\n qchain ${letters(vc.get(n) as Buffer)}`);
        // Files the command did not write are QEMU's own; check the ones it changed.
        if (fs.readFileSync(path.join(c, n)).equals(fs.readFileSync(path.join(src, n)))) continue;
        const ck = await check(path.join(c, n));
        assert.equal(ck.code, 0, `${what}: check ${n}: ${ck.out}`);
      }
      if (op[0] === 'rebase') {
        // Same sectors allocated in the rebased image (host layout aside).
        const f = op[op.length - 1];
        assert.deepEqual(mapShape(c, f, 512), mapShape(q, f, 512), `${what}: allocation in ${f}`);
      }
      for (const d of [q, c]) fs.rmSync(d, { recursive: true, force: true });
    }
  }
});
