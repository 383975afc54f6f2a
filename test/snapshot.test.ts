/**
 * Internal snapshots (qemu-img snapshot -c/-a/-d) against QEMU as the judge:
 *   1. QEMU creates snapshots, we apply/delete; a copy gets the same steps from qemu-img:
 *      `qemu-img check` clean, same guest view, same snapshot views, same `snapshot -l` and `map`;
 *   2. mixed: each step done by a random tool (qchain or QEMU) vs QEMU alone;
 *   3. the "under the hood" walk-through: same `map` as qemu-img at each step, and applying the
 *      internal snapshot on the base restores the old data;
 *   4. seeded random differential: random writes/zero writes/discards (qchain io vs qemu-io)
 *      interleaved with snapshot create/apply/delete (qchain img vs qemu-img), across cluster
 *      sizes, extended L2, refcount widths and v2;
 *   5. SIGKILL of `qchain img snapshot -c` / `-d` at random moments: refcounts never below the
 *      references, the active view and every listed snapshot intact, clean after repair;
 *   plus the exact qemu-img messages and exit codes of the error paths.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { Qcow2Image } from '../src/qcow2/image.js';
import { FileStorage } from '../src/storage/file.js';
import { createSnapshot } from '../src/qcow2/snapshot.js';
import { applySnapshot, deleteSnapshot } from '../src/qcow2/snapshot-manage.js';
import { QCHAIN, oracle, qchain, qemuImg, qemuImgSync, qemuIo, qemuIoSync, qemuRawView, rng, scratch } from './helpers/qemu.js';

const ROOT = scratch('qchain-snapshot-');
const K = 1024;

/** `qemu-img snapshot -l` with the dates blanked (they are wall-clock times). */
async function list(file: string): Promise<string> {
  const r = await qemuImg(['snapshot', '-l', file]);
  assert.equal(r.code, 0, r.stderr);
  return r.stdout.replace(/\d{4}-\d\d-\d\d \d\d:\d\d:\d\d/g, 'DATE');
}

interface MapEntry { start: number; length: number; depth: number; present: boolean; zero: boolean; data: boolean; offset?: number }

/**
 * `qemu-img map --output=json`, with the zero flag of data extents dropped and neighbours merged:
 * QEMU derives that flag from holes in the host file (SEEK_HOLE), which depend on how the bytes
 * were written, not on the qcow2 metadata.
 */
async function mapJson(file: string): Promise<string> {
  const r = await qemuImg(['map', '--output=json', file]);
  assert.equal(r.code, 0, r.stderr);
  const out: MapEntry[] = [];
  for (const e of JSON.parse(r.stdout) as MapEntry[]) {
    if (e.data) e.zero = false;
    const l = out[out.length - 1];
    if (l && l.depth === e.depth && l.present === e.present && l.zero === e.zero && l.data === e.data &&
      (l.offset === undefined ? e.offset === undefined : e.offset === l.offset + l.length)) l.length += e.length;
    else out.push(e);
  }
  return JSON.stringify(out);
}

async function assertClean(file: string, ctx: string): Promise<void> {
  const r = await qemuImg(['check', file]);
  assert.equal(r.code, 0, `qemu-img check (${ctx}): ${r.stdout}${r.stderr}`);
  assert.match(r.stdout, /No errors were found on the image/, ctx);
}

/** The guest view of an internal snapshot, as QEMU reads it. */
async function snapshotView(file: string, name: string): Promise<Buffer> {
  const out = `${file}.${name}.snap.raw`;
  const r = await qemuImg(['convert', '-l', `snapshot.name=${name}`, '-O', 'raw', file, out]);
  assert.equal(r.code, 0, r.stderr);
  const b = fs.readFileSync(out);
  fs.unlinkSync(out);
  return b;
}

function snapshotNames(listing: string): string[] {
  return listing.split('\n').slice(2).filter((l) => l.trim()).map((l) => l.split(/\s+/)[1]);
}

/** Same guest view, snapshot list, allocation map and snapshot contents; ours passes check. */
async function assertSame(ours: string, theirs: string, ctx: string, deep = true, map = deep): Promise<void> {
  const [ca, cb] = await Promise.all([qemuImg(['check', ours]), qemuImg(['check', theirs])]);
  // Clean when QEMU's is; otherwise (e.g. the cluster QEMU leaks on a failed create) the same report.
  if (cb.code === 0) await assertClean(ours, ctx);
  else {
    // Same verdict and leak count (which clusters leak depends on the data layout).
    const verdict = (r: { code: number; stdout: string }): string => `${r.code} ${/\d+ leaked clusters/.exec(r.stdout)?.[0] ?? ''} ${/\d+ errors/.exec(r.stdout)?.[0] ?? ''}`;
    assert.equal(verdict(ca), verdict(cb), `check (${ctx}): ${ca.stdout}${ca.stderr}`);
  }
  const cmp = await qemuImg(['compare', ours, theirs]);
  assert.equal(cmp.code, 0, `guest views differ (${ctx}): ${cmp.stdout}${cmp.stderr}`);
  const [la, lb] = await Promise.all([list(ours), list(theirs)]);
  assert.equal(la, lb, `snapshot -l (${ctx})`);
  if (map) {
    const [ma, mb] = await Promise.all([mapJson(ours), mapJson(theirs)]);
    assert.equal(ma, mb, `map (${ctx})`);
  }
  if (!deep) return;
  for (const n of snapshotNames(la)) {
    const [va, vb] = await Promise.all([snapshotView(ours, n), snapshotView(theirs, n)]);
    assert.ok(va.equals(vb), `snapshot ${n} content (${ctx})`);
  }
}

async function ok(p: Promise<{ code: number; stdout: string; stderr: string }>, what: string): Promise<void> {
  const r = await p;
  assert.equal(r.code, 0, `${what}: ${r.stdout}${r.stderr}`);
}

interface Config {
  name: string;
  opts: string;
}

const CONFIGS: Config[] = [
  { name: '64k', opts: 'cluster_size=65536' },
  { name: '4k refcount_bits=64', opts: 'cluster_size=4096,refcount_bits=64' },
  { name: 'extended_l2 32k', opts: 'cluster_size=32768,extended_l2=on' },
  { name: 'v2 8k', opts: 'compat=0.10,cluster_size=8192' },
];

/** A 4 MiB image with data, zeros, compressed clusters and two QEMU-made snapshots. */
function qemuSnapshotted(dir: string, cfg: Config): string {
  fs.mkdirSync(dir, { recursive: true });
  const f = path.join(dir, 't.qcow2');
  qemuImgSync(['create', '-q', '-f', 'qcow2', '-o', cfg.opts, f, '4M']);
  qemuIoSync(['-c', 'write -P 0x11 0 1M', '-c', 'write -c -P 0x22 1M 256k', '-c', 'write -z 2M 128k', '-c', 'write -P 0x33 3000000 70000', f]);
  qemuImgSync(['snapshot', '-c', 's1', f]);
  qemuIoSync(['-c', 'write -P 0x44 512k 1M', '-c', 'discard 1M 64k', '-c', 'write -P 0x55 3M 4k', f]);
  qemuImgSync(['snapshot', '-c', 's2', f]);
  qemuIoSync(['-c', 'write -P 0x66 0 64k', '-c', 'write -z 3M 512k', f]);
  return f;
}

function twin(f: string): string {
  const g = f.replace(/\.qcow2$/, '.ref.qcow2');
  fs.copyFileSync(f, g);
  return g;
}

describe('QEMU-made snapshots applied and deleted by qchain', oracle(), () => {
  for (const cfg of CONFIGS) {
    test(cfg.name, async () => {
      const f = qemuSnapshotted(path.join(ROOT, `q-${cfg.name.replace(/\W+/g, '_')}`), cfg);
      const g = twin(f);
      const steps: string[][] = [['-a', 's1'], ['-d', 's1'], ['-a', '2'], ['-d', 's2']];
      for (const [i, s] of steps.entries()) {
        await ok(qchain(['img', 'snapshot', ...s, f]), `qchain ${s.join(' ')}`);
        await ok(qemuImg(['snapshot', ...s, g]), `qemu-img ${s.join(' ')}`);
        await assertSame(f, g, `${cfg.name}: after ${s.join(' ')}`, i < 2, true);
      }
    });
  }

  test('apply changes the virtual size to the snapshot\'s (shrink and grow)', async () => {
    const dir = path.join(ROOT, 'resize');
    fs.mkdirSync(dir);
    const f = path.join(dir, 'r.qcow2');
    qemuImgSync(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', f, '1M']);
    qemuIoSync(['-c', 'write -P 5 0 1M', f]);
    qemuImgSync(['snapshot', '-c', 'small', f]);
    qemuImgSync(['resize', '-q', f, '64M']);
    qemuIoSync(['-c', 'write -P 7 40M 64k', f]);
    qemuImgSync(['snapshot', '-c', 'big', f]);
    const g = twin(f);
    for (const s of ['small', 'big', 'small']) {
      await ok(qchain(['img', 'snapshot', '-a', s, f]), `qchain -a ${s}`);
      await ok(qemuImg(['snapshot', '-a', s, g]), `qemu-img -a ${s}`);
      await assertSame(f, g, `after -a ${s}`, false, true);
    }
  });

  test('apply grows an active L1 table smaller than the snapshot\'s', async () => {
    const dir = path.join(ROOT, 'grow-l1');
    fs.mkdirSync(dir);
    const f = path.join(dir, 'g.qcow2');
    qemuImgSync(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', f, '64M']);
    qemuIoSync(['-c', 'write -P 3 0 1M', '-c', 'write -P 4 40M 64k', f]);
    qemuImgSync(['snapshot', '-c', 'big', f]);
    qemuImgSync(['resize', '-q', '--shrink', f, '4M']);
    // QEMU never shrinks the L1 table; cut it to the 2 entries 4 MiB needs (the rest are zero).
    const fd = fs.openSync(f, 'r+');
    const n = Buffer.alloc(4);
    n.writeUInt32BE(2);
    fs.writeSync(fd, n, 0, 4, 36);
    fs.closeSync(fd);
    await assertClean(f, 'crafted');
    const g = twin(f);
    await ok(qchain(['img', 'snapshot', '-a', 'big', f]), 'qchain -a big');
    await ok(qemuImg(['snapshot', '-a', 'big', g]), 'qemu-img -a big');
    await assertSame(f, g, 'after -a big', true, true);
    const hdr = (x: string): string => fs.readFileSync(x).subarray(24, 48).toString('hex');
    assert.equal(hdr(f), hdr(g), 'size, L1 size and L1 offset in the header');
  });
});

describe('library use in one process (no stale caches)', oracle(), () => {
  test('create, write, apply, write, delete on one open image', async () => {
    const dir = path.join(ROOT, 'lib');
    fs.mkdirSync(dir);
    const f = path.join(dir, 'l.qcow2');
    qemuImgSync(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096,extended_l2=off', f, '8M']);
    qemuIoSync(['-c', 'write -P 0x11 0 2M', '-c', 'write -c -P 0x12 4M 64k', f]);
    const g = twin(f);
    const img = await Qcow2Image.open(await FileStorage.open(f));
    const pat = (v: number, n: number): Buffer => Buffer.alloc(n, v);
    await createSnapshot(img, { name: 'a' });
    await img.write(pat(0x21, 3 * K * K), 512 * K); // COW over shared tables and clusters
    await createSnapshot(img, { name: 'b' });
    await img.write(pat(0x22, 64 * K), 4 * K * K); // over the compressed cluster
    await applySnapshot(img, 'a');
    const back = Buffer.alloc(2 * K * K);
    await img.readOwn(back, 0);
    assert.ok(back.equals(pat(0x11, 2 * K * K)), 'snapshot a read back through the same handle');
    await img.write(pat(0x23, 100 * K), 1000 * K); // the cached tables must be the applied ones
    await deleteSnapshot(img, null, 'b');
    await img.write(pat(0x24, 8 * K), 8 * K);
    await img.close();
    const q = (args: string[]): string => qemuImgSync(['snapshot', ...args, g]);
    q(['-c', 'a']);
    qemuIoSync(['-c', `write -P 0x21 ${512 * K} ${3 * K * K}`, g]);
    q(['-c', 'b']);
    qemuIoSync(['-c', `write -P 0x22 ${4 * K * K} ${64 * K}`, g]);
    q(['-a', 'a']);
    qemuIoSync(['-c', `write -P 0x23 ${1000 * K} ${100 * K}`, '-c', `write -P 0x24 ${8 * K} ${8 * K}`, g]);
    q(['-d', 'b']);
    await assertSame(f, g, 'library sequence', true, false);
  });
});

describe('mixed tools', oracle(), () => {
  test('we create, QEMU applies and deletes, and the other way round', async () => {
    const dir = path.join(ROOT, 'mixed');
    const cfg = CONFIGS[2];
    const f = qemuSnapshotted(dir, cfg);
    const g = twin(f);
    // [tool for f, args, data written afterwards with qemu-io on both]
    const steps: Array<['q' | 'Q', string[], string | null]> = [
      ['q', ['-c', 'ours1'], 'write -P 0x77 100k 300k'],
      ['Q', ['-a', 'ours1'], 'write -P 0x78 2M 64k'],
      ['q', ['-a', 's1'], null],
      ['Q', ['-c', 'theirs'], 'write -z 0 1M'],
      ['q', ['-d', 'theirs'], null],
      ['q', ['-c', 'ours2'], 'discard 0 2M'],
      ['Q', ['-d', 'ours1'], null],
      ['q', ['-a', 'ours2'], null],
      ['Q', ['-d', 's2'], null],
    ];
    for (const [tool, args, io] of steps) {
      const ctx = `${tool === 'q' ? 'qchain' : 'qemu-img'} ${args.join(' ')}`;
      await ok(tool === 'q' ? qchain(['img', 'snapshot', ...args, f]) : qemuImg(['snapshot', ...args, f]), ctx);
      await ok(qemuImg(['snapshot', ...args, g]), `reference: ${ctx}`);
      if (io) {
        await ok(qemuIo(['-c', io, f]), io);
        await ok(qemuIo(['-c', io, g]), io);
      }
      await assertSame(f, g, ctx, false);
    }
    await assertSame(f, g, 'end');
  });
});

describe('"under the hood" walk-through', oracle(), () => {
  test('map equals qemu-img at each step; applying "one" on the base restores the data', async () => {
    const dir = path.join(ROOT, 'hood');
    const A = path.join(dir, 'A'), B = path.join(dir, 'B');
    for (const d of [A, B]) fs.mkdirSync(d, { recursive: true });
    const step = async (ctx: string, ours: string[], theirs: string[] | null, file: string): Promise<void> => {
      await ok(qchain(ours, A), `qchain ${ours.join(' ')}`);
      await ok(theirs ? qemuImg(theirs, B) : qemuIo(ours.slice(1).filter((x) => x !== '-q'), B), ctx);
      const [ma, mb] = await Promise.all([mapJson(path.join(A, file)), mapJson(path.join(B, file))]);
      assert.equal(ma, mb, `map after ${ctx}`);
      await assertClean(path.join(A, file), ctx);
    };
    const sizeOf = 100 * K * K;
    await step('create', ['img', 'create', '-q', '-f', 'qcow2', 'base.qcow2', '100M'], ['create', '-q', '-f', 'qcow2', 'base.qcow2', '100M'], 'base.qcow2');
    await step('first write', ['io', '-c', `write -P 0x01 ${sizeOf - K * K - 512} 512`, 'base.qcow2'], null, 'base.qcow2');
    await step('snapshot one', ['img', 'snapshot', '-c', 'one', 'base.qcow2'], ['snapshot', '-c', 'one', 'base.qcow2'], 'base.qcow2');
    await step('second write', ['io', '-c', `write -P 0x02 ${sizeOf - K * K - 512} 1024`, 'base.qcow2'], null, 'base.qcow2');
    await step('overlay', ['img', 'create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'wrapper.qcow2'],
      ['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'wrapper.qcow2'], 'wrapper.qcow2');
    await step('write 0xff', ['io', '-c', `write -P 0xff ${sizeOf - K * K} 512`, 'wrapper.qcow2'], null, 'wrapper.qcow2');
    assert.equal(await list(path.join(A, 'base.qcow2')), await list(path.join(B, 'base.qcow2')));
    await step('apply one', ['img', 'snapshot', '-a', 'one', 'base.qcow2'], ['snapshot', '-a', 'one', 'base.qcow2'], 'base.qcow2');
    const at = sizeOf - K * K - 512;
    const base = await qemuIo(['-r', '-c', `read -P 0x01 ${at} 512`, '-c', `read -P 0 ${at + 512} 512`, 'base.qcow2'], A);
    assert.doesNotMatch(base.stdout, /fail/i, `first write restored, second gone: ${base.stdout}`);
    const top = await qemuIo(['-r', '-c', `read -P 0xff ${at + 512} 512`, '-c', `read -P 0x01 ${at} 512`, 'wrapper.qcow2'], A);
    assert.doesNotMatch(top.stdout, /fail/i, `overlay data over the restored base: ${top.stdout}`);
    await assertSame(path.join(A, 'base.qcow2'), path.join(B, 'base.qcow2'), 'after apply', false, true);
  });
});

// ---------------------------------------------------------------------------------------------

const RSIZE = 4 * K * K;

function randInt(r: () => number, lo: number, hi: number): number {
  return lo + Math.floor(r() * (hi - lo + 1));
}

function ioOp(r: () => number): string {
  const len = r() < 0.4 ? randInt(r, 1, 3) * 64 * K : randInt(r, 1, 150 * K);
  const off = r() < 0.4 ? randInt(r, 0, RSIZE / (64 * K) - 4) * 64 * K : randInt(r, 0, RSIZE - len);
  const k = r();
  if (k < 0.6) return `write -P 0x${randInt(r, 1, 255).toString(16)} ${off} ${len}`;
  if (k < 0.75) return `write -z ${off} ${len}`;
  if (k < 0.85) return `write -z -u ${off} ${len}`;
  return `discard ${off} ${len}`;
}

const RANDOM_CONFIGS: Array<Config & { seed: number; steps: number }> = [
  { name: '64k', opts: 'cluster_size=65536', seed: 11, steps: 6 },
  { name: '4k refcount_bits=2', opts: 'cluster_size=4096,refcount_bits=2', seed: 12, steps: 5 },
  { name: 'extended_l2 64k refcount_bits=8', opts: 'cluster_size=65536,extended_l2=on,refcount_bits=8', seed: 13, steps: 5 },
  { name: 'v2 16k', opts: 'compat=0.10,cluster_size=16384', seed: 14, steps: 4 },
  { name: '512b refcount_bits=1', opts: 'cluster_size=512,refcount_bits=1', seed: 15, steps: 2 },
];

describe('seeded random differential (snapshot ops interleaved with I/O)', oracle(), () => {
  for (const cfg of RANDOM_CONFIGS) {
    test(`${cfg.name}, seed ${cfg.seed}`, async () => {
      const dir = path.join(ROOT, `rand-${cfg.seed}`);
      fs.mkdirSync(dir);
      const f = path.join(dir, 'r.qcow2');
      qemuImgSync(['create', '-q', '-f', 'qcow2', '-o', cfg.opts, f, String(RSIZE)]);
      qemuIoSync(['-c', 'write -P 0x10 0 1M', '-c', 'write -P 0x20 3M 200k', f]);
      const g = twin(f);
      const r = rng(cfg.seed);
      const names: string[] = [];
      let made = 0;
      const log: string[] = [];
      for (let i = 0; i < cfg.steps; i++) {
        const ops = Array.from({ length: randInt(r, 1, 4) }, () => ioOp(r));
        const io = ops.flatMap((o) => ['-c', o]);
        log.push(...ops);
        const [a, b] = await Promise.all([qchain(['io', ...io, f]), qemuIo([...io, g])]);
        assert.equal(b.code, 0, b.stderr);
        assert.equal(a.code, 0, `qchain io (${log.join('; ')}): ${a.stdout}${a.stderr}`);
        const k = r();
        let args: string[];
        if (!names.length || k < 0.4) {
          const n = `s${++made}`;
          names.push(n);
          args = ['-c', n];
        } else if (k < 0.75) {
          args = ['-a', names[randInt(r, 0, names.length - 1)]];
        } else {
          args = ['-d', names.splice(randInt(r, 0, names.length - 1), 1)[0]];
        }
        log.push(`snapshot ${args.join(' ')}`);
        const [sa, sb] = await Promise.all([qchain(['img', 'snapshot', ...args, f]), qemuImg(['snapshot', ...args, g])]);
        // With 1-bit refcounts QEMU refuses snapshots of allocated data: we must fail the same way.
        assert.equal(sa.code, sb.code, `exit code (${log.join('; ')}): ${sa.stderr} vs ${sb.stderr}`);
        assert.equal(sa.stderr, sb.stderr, `stderr (${log.join('; ')})`);
        if (sb.code !== 0 && args[0] === '-c') names.pop();
        // No map comparison: the write path allocates differently from QEMU when free space is fragmented.
        await assertSame(f, g, `${cfg.name} seed ${cfg.seed}: ${log.join('; ')}`, i === cfg.steps - 1, false);
      }
    });
  }
});

// ---------------------------------------------------------------------------------------------

/**
 * Run qchain with `args` on `file` and SIGKILL it at the `killAt`-th change event of the file
 * (inotify, one per write or so), or never with killAt 0. Resolves with the exit code (null if
 * killed) and the number of change events seen.
 */
function runAndKill(args: string[], file: string, killAt: number): Promise<{ code: number | null; events: number }> {
  return new Promise((resolve, reject) => {
    let events = 0;
    const child = spawn(process.execPath, [QCHAIN, ...args], { stdio: ['ignore', 'ignore', 'ignore'] });
    const watcher = fs.watch(file, () => {
      if (++events === killAt) child.kill('SIGKILL');
    });
    child.on('error', reject);
    child.on('close', (code) => {
      // Late events of a finished run still count (the probe run measures them all).
      setTimeout(() => {
        watcher.close();
        resolve({ code, events });
      }, 50);
    });
  });
}

/**
 * What `qemu-img check` may report after a kill: leaks, and COPIED flags that disagree with a
 * refcount (unavoidable between the refcount and the L2 write; QEMU has the same window). Never a
 * refcount below the number of references, nor anything else.
 */
function assertOnlyHarmless(out: string, ctx: string): void {
  for (const line of out.split('\n')) {
    if (!/^ERROR/.test(line)) continue;
    const m = /^ERROR OFLAG_COPIED (data|L2) cluster: .*refcount=\d+$/.exec(line);
    assert.ok(m, `unexpected check error after kill (${ctx}): ${line}\n${out}`);
  }
}

describe('crash safety (SIGKILL during qchain img snapshot -c / -d)', oracle(), () => {
  test('many allocated clusters, 512-byte clusters', async () => {
    const dir = path.join(ROOT, 'crash');
    fs.mkdirSync(dir);
    const f = path.join(dir, 'c.qcow2');
    qemuImgSync(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512', f, '8M']);
    // Half of every 64 KiB written: 8192 data clusters in runs of 64, 256 L2 tables.
    const writes: string[] = [];
    for (let off = 0; off < 8 * K * K; off += 64 * K) writes.push('-c', `write -P 0x${((off >> 16) % 250 + 1).toString(16)} ${off} 32k`);
    qemuIoSync([...writes, f]);
    const active = await qemuRawView(f);
    const snaps = new Map<string, Buffer>();
    // Change events of undisturbed runs, to spread the kills over them.
    const probe = twin(f);
    const created = await runAndKill(['img', 'snapshot', '-c', 'probe', probe], probe, 0);
    assert.equal(created.code, 0);
    const deleted = await runAndKill(['img', 'snapshot', '-d', 'probe', probe], probe, 0);
    assert.equal(deleted.code, 0);
    const r = rng(77);
    let made = 0;
    let killed = 0;
    // 12 runs, more while fewer than 6 were killed mid-way (a run may finish before its kill lands).
    for (let it = 0; it < 12 || (killed < 6 && it < 40); it++) {
      const del = snaps.size > 0 && r() < 0.45;
      const name = del ? [...snaps.keys()][randInt(r, 0, snaps.size - 1)] : `k${++made}`;
      const args = ['img', 'snapshot', del ? '-d' : '-c', name, f];
      const total = (del ? deleted : created).events;
      const killAt = randInt(r, 1, Math.max(1, total));
      const { code } = await runAndKill(args, f, killAt);
      if (code === null) killed++;
      const ctx = `iteration ${it}: ${args.slice(2, 4).join(' ')} killed at change event ${killAt} of ~${total} (${code === null ? 'killed' : `exit ${code}`})`;
      const chk = await qemuImg(['check', f]);
      assert.ok([0, 2, 3].includes(chk.code), `check exit ${chk.code} (${ctx}): ${chk.stdout}${chk.stderr}`);
      assertOnlyHarmless(chk.stderr + chk.stdout, ctx);
      if (process.env.QCHAIN_DEBUG) console.log(ctx, chk.code, (chk.stderr.match(/^ERROR/gm) ?? []).length, 'errors');
      // The snapshot table switched atomically: the snapshot is there or not, never half.
      const listed = snapshotNames(await list(f));
      if (listed.includes(name) && !del) snaps.set(name, active);
      if (!listed.includes(name)) snaps.delete(name);
      assert.deepEqual(listed.sort(), [...snaps.keys()].sort(), ctx);
      const rep = await qemuImg(['check', '-r', 'all', f]);
      assert.ok(rep.code === 0, `repair (${ctx}): ${rep.stdout}${rep.stderr}`);
      await assertClean(f, `after repair, ${ctx}`);
      assert.ok((await qemuRawView(f)).equals(active), `active view (${ctx})`);
    }
    for (const [n, v] of snaps) assert.ok((await snapshotView(f, n)).equals(v), `snapshot ${n} content`);
    assert.ok(killed >= 6, `only ${killed} runs were killed mid-way`);
  });
});

// ---------------------------------------------------------------------------------------------

describe('error paths match qemu-img', oracle(), () => {
  test('messages and exit codes', async () => {
    const dir = path.join(ROOT, 'errors');
    fs.mkdirSync(dir);
    qemuImgSync(['create', '-q', '-f', 'qcow2', 'e.qcow2', '1M'], dir);
    qemuImgSync(['snapshot', '-c', 'a', 'e.qcow2'], dir);
    qemuImgSync(['snapshot', '-c', '1', 'e.qcow2'], dir); // name "1" vs id 1
    qemuImgSync(['create', '-q', '-f', 'raw', 'r.raw', '1M'], dir);
    qemuImgSync(['create', '-q', '-f', 'qcow2', '-o', 'refcount_bits=2', 'o.qcow2', '1M'], dir);
    qemuIoSync(['-c', 'write 0 64k', 'o.qcow2'], dir);
    qemuImgSync(['snapshot', '-c', 'x', 'o.qcow2'], dir);
    qemuImgSync(['snapshot', '-c', 'y', 'o.qcow2'], dir);
    // A snapshot whose L1 table lies past EOF (7.2 reads it as zeros and goes on).
    qemuImgSync(['create', '-q', '-f', 'qcow2', 'eof.qcow2', '1M'], dir);
    qemuIoSync(['-c', 'write 0 64k', 'eof.qcow2'], dir);
    qemuImgSync(['snapshot', '-c', 's1', 'eof.qcow2'], dir);
    {
      const fd = fs.openSync(path.join(dir, 'eof.qcow2'), 'r+');
      const h = Buffer.alloc(72);
      fs.readSync(fd, h, 0, 72, 0);
      const at = Buffer.alloc(8);
      at.writeUInt32BE(0x10000000, 4);
      fs.writeSync(fd, at, 0, 8, Number(h.readBigUInt64BE(64)));
      fs.closeSync(fd);
    }
    const cases: string[][] = [
      ['-a', 's1', 'eof.qcow2'], ['-d', 's1', 'eof.qcow2'],
      ['-a', 'nope', 'e.qcow2'], ['-d', 'nope', 'e.qcow2'], ['-d', '2', 'e.qcow2'],
      ['-a', 'x', 'r.raw'], ['-d', 'x', 'r.raw'], ['-c', 'x', 'r.raw'], ['-l', 'r.raw'],
      ['-a', 'x', '-f', 'raw', 'r.raw'],
      ['-U', '-a', 'a', 'e.qcow2'], ['-U', '-d', 'a', 'e.qcow2'], ['-U', '-c', 'b', 'e.qcow2'],
      ['-a', 'a', 'missing.qcow2'], ['-a', 'x', 'o.qcow2'], ['-c', 'z', 'o.qcow2'],
      ['-a', '1', 'e.qcow2'], ['-d', '1', 'e.qcow2'], ['-l', 'e.qcow2'],
    ];
    for (const c of cases) {
      const ref = path.join(dir, 'ref');
      fs.rmSync(ref, { recursive: true, force: true });
      fs.mkdirSync(ref);
      for (const n of ['e.qcow2', 'r.raw', 'o.qcow2', 'eof.qcow2'].filter((x) => c.includes(x))) fs.copyFileSync(path.join(dir, n), path.join(ref, n));
      const ours = path.join(dir, 'ours');
      fs.rmSync(ours, { recursive: true, force: true });
      fs.mkdirSync(ours);
      for (const n of ['e.qcow2', 'r.raw', 'o.qcow2', 'eof.qcow2'].filter((x) => c.includes(x))) fs.copyFileSync(path.join(dir, n), path.join(ours, n));
      const [a, b] = await Promise.all([qchain(['img', 'snapshot', ...c], ours), qemuImg(['snapshot', ...c], ref)]);
      assert.equal(a.code, b.code, `exit code of snapshot ${c.join(' ')}: ${a.stderr}`);
      assert.equal(a.stderr, b.stderr, `stderr of snapshot ${c.join(' ')}`);
      assert.equal(a.stdout.replace(/\d{4}-\d\d-\d\d \d\d:\d\d:\d\d/g, 'D'), b.stdout.replace(/\d{4}-\d\d-\d\d \d\d:\d\d:\d\d/g, 'D'), `stdout of snapshot ${c.join(' ')}`);
      if (fs.existsSync(path.join(ours, c[c.length - 1])) && c[c.length - 1].endsWith('.qcow2')) {
        assert.equal(await list(path.join(ours, c[c.length - 1])), await list(path.join(ref, c[c.length - 1])), `list after ${c.join(' ')}`);
        const [ca, cb] = await Promise.all([qemuImg(['check', path.join(ours, c[c.length - 1])]), qemuImg(['check', path.join(ref, c[c.length - 1])])]);
        assert.equal(ca.stdout + ca.stderr, cb.stdout + cb.stderr, `check after ${c.join(' ')}`);
      }
    }
  });
});
