/**
 * Differential and crash-safety tests against QEMU.
 *
 * 1. Seeded random differential: the same random sequence of writes / zero writes / discards is
 *    applied with `qchain io` and with `qemu-io` to two copies of a 3-deep chain; the guest views
 *    must be identical and qchain's image must pass `qemu-img check`. Three fixed seeds run by
 *    default; QCHAIN_SOAK=N runs N further seeds (base from QCHAIN_SEED_BASE, else time based).
 *
 * 2. Crash safety: `qchain io` fed commands on stdin is SIGKILLed mid-stream, repeatedly, on the
 *    same image. `qemu-img check` must never report corruption, and every write followed by a
 *    completed flush (marked by the output of a `length` command issued after the flush) must read
 *    back. At the end `qemu-img check -r leaks` must leave a clean image.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { QCHAIN, oracle, qchain, qemuImg, qemuImgSync, qemuIo, qemuIoSync, rng, scratch } from './helpers/qemu.js';

const ROOT = scratch('qchain-diffcrash-');
const K = 1024;
const CL = 64 * K;

function randInt(r: () => number, lo: number, hi: number): number {
  return lo + Math.floor(r() * (hi - lo + 1));
}

/** Build base <- mid <- top in `dir` (relative backing names). */
function buildChain(dir: string): void {
  fs.mkdirSync(dir, { recursive: true });
  qemuImgSync(['create', '-q', '-f', 'qcow2', 'base.qcow2', '16M'], dir);
  qemuIoSync(['-c', 'write -P 0x11 0 1M', '-c', 'write -P 0x22 3M 300k', '-c', 'write -P 0x33 8M 64k', '-c', 'write -z 9M 128k', '-c', 'write -P 0x44 12345678 77777', 'base.qcow2'], dir);
  qemuImgSync(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'mid.qcow2'], dir);
  qemuIoSync(['-c', 'write -P 0x55 512k 1M', '-c', 'write -z 3M 128k', '-c', 'write -z -u 8M 64k', '-c', 'write -P 0x66 10000000 123456', '-c', 'write -z 14M 100k', 'mid.qcow2'], dir);
  qemuImgSync(['create', '-q', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', 'top.qcow2'], dir);
}

const SIZE1 = 16 * 1024 * K;

/** A seeded random list of qemu-io commands for a 16 MiB image. */
function genOps(seed: number, n = 60): string[] {
  const r = rng(seed);
  const ops: string[] = [];
  const range = (): [number, number] => {
    const kind = r();
    let off: number;
    let len: number;
    if (kind < 0.3) {
      // cluster aligned
      len = randInt(r, 1, 3) * CL;
      off = randInt(r, 0, SIZE1 / CL - 4) * CL;
    } else if (kind < 0.6) {
      // crossing a 64k boundary
      len = randInt(r, 2, 200 * K);
      const boundary = randInt(r, 4, SIZE1 / CL - 4) * CL; // >= 256k > len: off stays >= 0
      off = boundary - randInt(r, 1, len - 1);
    } else {
      len = randInt(r, 1, 200 * K);
      off = randInt(r, 0, SIZE1 - len);
    }
    return [off, len];
  };
  for (let i = 0; i < n; i++) {
    const k = r();
    if (k < 0.55) {
      const [off, len] = range();
      ops.push(`write -P 0x${randInt(r, 1, 255).toString(16)} ${off} ${len}`);
    } else if (k < 0.7) {
      const [off, len] = range();
      ops.push(`write -z ${off} ${len}`);
    } else if (k < 0.85) {
      const [off, len] = range();
      ops.push(`write -z -u ${off} ${len}`);
    } else {
      const off = randInt(r, 0, SIZE1 / CL - 4) * CL;
      ops.push(`discard ${off} ${randInt(r, 1, 3) * CL}`);
    }
  }
  return ops;
}

function seeds(): number[] {
  const fixed = [1, 2, 3];
  const soak = Number(process.env.QCHAIN_SOAK ?? 0);
  if (!soak) return fixed;
  const base = Number(process.env.QCHAIN_SEED_BASE ?? Date.now() % 1_000_000_000);
  return [...fixed, ...Array.from({ length: soak }, (_, i) => base + i)];
}

describe('seeded random differential (qchain io vs qemu-io on a 3-deep chain)', oracle(), () => {
  for (const seed of seeds()) {
    test(`seed ${seed}`, async () => {
      const dir = path.join(ROOT, `diff-${seed}`);
      const tmpl = path.join(dir, 'tmpl');
      buildChain(tmpl);
      const A = path.join(dir, 'A');
      const B = path.join(dir, 'B');
      for (const d of [A, B]) {
        fs.mkdirSync(d);
        for (const f of ['base.qcow2', 'mid.qcow2', 'top.qcow2']) fs.copyFileSync(path.join(tmpl, f), path.join(d, f));
      }
      const ops = genOps(seed);
      const args = [...ops.flatMap((o) => ['-c', o]), 'top.qcow2'];
      const repro = `seed ${seed}; dir ${dir}; ops:\n${ops.join('\n')}`;
      const [a, b] = await Promise.all([qchain(['io', ...args], A), qemuIo(args, B)]);
      assert.equal(b.code, 0, `qemu-io failed (${repro}): ${b.stdout}${b.stderr}`);
      assert.equal(a.code, 0, `qchain io failed (${repro}): ${a.stdout}${a.stderr}`);
      const cmp = await qemuImg(['compare', path.join(A, 'top.qcow2'), path.join(B, 'top.qcow2')]);
      assert.equal(cmp.code, 0, `qemu-img compare differs (${repro}): ${cmp.stdout}${cmp.stderr}`);
      const chk = await qemuImg(['check', path.join(A, 'top.qcow2')]);
      assert.equal(chk.code, 0, `qemu-img check on qchain's image (${repro}): ${chk.stdout}${chk.stderr}`);
    });
  }
});

// ---------------------------------------------------------------------------------------------

const SIZE2 = 64 * 1024 * K;
const SLOT = 256 * K;
const NSLOTS = SIZE2 / SLOT;
const WRITES = 250;
const FLUSH_EVERY = 50;
const ITERATIONS = 8;

interface SlotState {
  off: number;
  len: number;
  pat: number;
  durable: boolean;
}

/** Run `qchain io img` with `input` on stdin (left open), SIGKILL after `delay` ms; return stdout. */
function runAndKill(img: string, cwd: string, input: string, delay: number): Promise<string> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [QCHAIN, 'io', img], { cwd, stdio: ['pipe', 'pipe', 'pipe'] });
    let out = '';
    child.stdout.setEncoding('utf8');
    child.stdout.on('data', (d: string) => (out += d));
    child.stderr.resume();
    child.stdin.on('error', () => {});
    child.stdin.write(input); // stdin stays open: the process waits for more commands
    const timer = setTimeout(() => child.kill('SIGKILL'), delay);
    child.on('error', reject);
    child.on('close', () => {
      clearTimeout(timer);
      resolve(out);
    });
  });
}

async function crashLoop(dir: string, img: string, seed: number): Promise<void> {
  const r = rng(seed);
  const slots = new Map<number, SlotState>();
  const file = path.join(dir, img);
  for (let it = 0; it < ITERATIONS; it++) {
    const ctx = `seed ${seed}, iteration ${it}, image ${file}`;
    // A random permutation of the slots: writes within one run never overlap.
    const order = Array.from({ length: NSLOTS }, (_, i) => i);
    for (let i = order.length - 1; i > 0; i--) {
      const j = Math.floor(r() * (i + 1));
      [order[i], order[j]] = [order[j], order[i]];
    }
    const writes: { slot: number; st: SlotState }[] = [];
    const lines: string[] = [];
    // flushIdx[k] = number of writes issued before the k-th flush+length marker
    const flushIdx: number[] = [];
    for (let i = 0; i < WRITES; i++) {
      const slot = order[i];
      const len = randInt(r, 4 * K, SLOT);
      const off = slot * SLOT + randInt(r, 0, SLOT - len);
      const pat = randInt(r, 1, 255);
      writes.push({ slot, st: { off, len, pat, durable: false } });
      lines.push(`write -P 0x${pat.toString(16)} ${off} ${len}`);
      if ((i + 1) % FLUSH_EVERY === 0) {
        lines.push('flush', 'length');
        flushIdx.push(i + 1);
      }
    }
    const delay = randInt(r, 100, 600);
    const out = await runAndKill(img, dir, lines.join('\n') + '\n', delay);
    const markers = (out.match(/64 MiB$/gm) ?? []).length;
    const durableCount = markers > 0 ? flushIdx[markers - 1] : 0;
    // Every write of this run may have happened (fully or partly): mark its slot uncertain,
    // unless it is known durable.
    writes.forEach((w, i) => slots.set(w.slot, { ...w.st, durable: i < durableCount }));

    const chk = await qemuImg(['check', file]);
    assert.ok(chk.code === 0 || chk.code === 3, `qemu-img check after SIGKILL (${ctx}, delay ${delay} ms, ${durableCount} durable writes) exit ${chk.code}: ${chk.stdout}${chk.stderr}`);

    const reads = [...slots.values()].filter((s) => s.durable).map((s) => `read -P 0x${s.pat.toString(16)} ${s.off} ${s.len}`);
    if (reads.length) {
      const v = await qemuIo(['-r', ...reads.flatMap((c) => ['-c', c]), file]);
      const bad = v.stdout.split('\n').filter((l) => /fail/i.test(l));
      assert.equal(v.code, 0, `durable writes lost (${ctx}, delay ${delay} ms): ${bad.slice(0, 10).join('; ')}${v.stderr}`);
    }
  }
  const rep = await qemuImg(['check', '-r', 'leaks', file]);
  assert.equal(rep.code, 0, `qemu-img check -r leaks (seed ${seed}, ${file}): ${rep.stdout}${rep.stderr}`);
  const again = await qemuImg(['check', file]);
  assert.equal(again.code, 0, `qemu-img check after repair (seed ${seed}, ${file}): ${again.stdout}${again.stderr}`);
}

describe('crash safety (SIGKILL during qchain io)', oracle(), () => {
  test('plain 64M image', async () => {
    const dir = path.join(ROOT, 'crash-plain');
    fs.mkdirSync(dir, { recursive: true });
    qemuImgSync(['create', '-q', '-f', 'qcow2', 'c.qcow2', '64M'], dir);
    await crashLoop(dir, 'c.qcow2', 101);
  });

  test('64M image with a backing file', async () => {
    const dir = path.join(ROOT, 'crash-backing');
    fs.mkdirSync(dir, { recursive: true });
    qemuImgSync(['create', '-q', '-f', 'qcow2', 'b.qcow2', '64M'], dir);
    qemuIoSync(['-c', 'write -P 0x77 0 2M', '-c', 'write -P 0x78 20M 3M', '-c', 'write -P 0x79 50000000 1000000', 'b.qcow2'], dir);
    qemuImgSync(['create', '-q', '-f', 'qcow2', '-b', 'b.qcow2', '-F', 'qcow2', 'c.qcow2'], dir);
    await crashLoop(dir, 'c.qcow2', 202);
  });
});
