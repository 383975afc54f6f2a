/**
 * Deleting one point in time from A ← B ← C ← D (the seeds' "which operation is more efficient"
 * question): the library's deletionCost predicts, from the maps alone, the bytes each method
 * copies — pulling B into C (safe `rebase -b A` of C) or committing C into B (`commit C`, then
 * `rebase -u -b B` of D) — and both methods are then run, with qchain and with qemu-img, on fresh
 * copies. Two chains: B large / C small (commit should win) and B small / C large (pull should).
 * The bytes each method really copied are counted from the maps afterwards (clusters C gained;
 * clusters of C's that B now holds), and the guest view of D is checked unchanged.
 * Usage: node dist/bench/deletion.js [--size-mib N] [--reps N]
 */
import fs from 'node:fs';
import path from 'node:path';
import { QCHAIN, benchDir, numOption, sh, table, timeInterleavedDetailed } from './util.js';
import { openChain } from '../src/chain/open.js';
import { deletionCost } from '../src/ops/plan.js';

const MiB = 1024 ** 2;
const sizeMiB = numOption('--size-mib', 1024);
const reps = numOption('--reps', 3);
const dir = benchDir('deletion');
const FILES = ['A.qcow2', 'B.qcow2', 'C.qcow2', 'D.qcow2'];

/** Data clusters a file holds itself, as bytes (qemu-img map, depth 0). */
function ownBytes(file: string): number {
  const m = JSON.parse(sh('qemu-img', ['map', '--output=json', file])) as Array<{ length: number; depth: number; data: boolean }>;
  return m.filter((e) => e.depth === 0 && e.data).reduce((a, e) => a + e.length, 0);
}

/** A full; B writes `bMiB` and C `cMiB` in 1 MiB extents spread over the disk; D a little. */
function build(sub: string, bMiB: number, cMiB: number): string {
  const d = path.join(dir, sub);
  fs.mkdirSync(d, { recursive: true });
  sh('qemu-img', ['create', '-q', '-f', 'qcow2', 'A.qcow2', `${sizeMiB}M`], d);
  sh('qemu-io', ['-c', `write -q -P 0x11 0 ${sizeMiB}M`, 'A.qcow2'], d);
  const fill = (file: string, mib: number, first: number, pat: number): void => {
    const step = Math.max(1, Math.floor(sizeMiB / mib));
    const cmds: string[] = [];
    for (let i = 0, off = first; i < mib && off < sizeMiB; i++, off += step) cmds.push('-c', `write -q -P 0x${pat.toString(16)} ${off}M 1M`);
    for (let i = 0; i < cmds.length; i += 2000) sh('qemu-io', [...cmds.slice(i, i + 2000), file], d);
  };
  for (const [i, f] of FILES.slice(1).entries()) sh('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', FILES[i], '-F', 'qcow2', f], d);
  fill('B.qcow2', bMiB, 0, 0x22);
  fill('C.qcow2', cMiB, 1, 0x33);
  fill('D.qcow2', 8, 3, 0x44);
  return d;
}

const copyTo = (from: string, to: string): (() => void) => (): void => {
  fs.rmSync(to, { recursive: true, force: true });
  fs.mkdirSync(to, { recursive: true });
  for (const f of FILES) fs.copyFileSync(path.join(from, f), path.join(to, f));
};

const rows: string[][] = [[
  'chain (B / C data, MiB)', 'method', 'predicted copy (MiB)', 'copied (MiB, from maps)', 'qemu-img (s)', 'qchain (s)', 'qchain / qemu-img',
]];
const mib = (n: number): string => (n / MiB).toFixed(0);

for (const [bMiB, cMiB] of [[Math.floor(sizeMiB / 2), Math.floor(sizeMiB / 16)], [Math.floor(sizeMiB / 16), Math.floor(sizeMiB / 2)]]) {
  const src = build(`src-${bMiB}-${cMiB}`, bMiB, cMiB);
  const chain = await openChain(path.join(src, 'D.qcow2'), { readOnly: true });
  let cost;
  try {
    cost = await deletionCost(chain, 2); // B is layer 2 from the top (D 0, C 1, B 2)
  } finally {
    await chain.close();
  }
  sh('qemu-img', ['convert', '-O', 'raw', 'D.qcow2', path.join(dir, 'want.raw')], src);
  const cBefore = ownBytes(path.join(src, 'C.qcow2'));
  const bBefore = ownBytes(path.join(src, 'B.qcow2'));
  const label = `${bMiB} / ${cMiB}`;

  // Pull B into C: C's backing becomes A, with what B held copied into C.
  const pull = ['rebase', '-b', 'A.qcow2', '-F', 'qcow2', 'C.qcow2'];
  const [pq, pc] = timeInterleavedDetailed([
    { cmd: 'qemu-img', args: pull, before: copyTo(src, path.join(dir, 'pq')), cwd: path.join(dir, 'pq') },
    { cmd: QCHAIN, args: ['img', ...pull], before: copyTo(src, path.join(dir, 'pc')), cwd: path.join(dir, 'pc') },
  ], reps);
  const pulled = ownBytes(path.join(dir, 'pc', 'C.qcow2')) - cBefore;
  rows.push([label, 'pull B into C', mib(cost.pullBytes), mib(pulled), pq.wall.toFixed(2), pc.wall.toFixed(2), `${(pc.wall / pq.wall).toFixed(2)}×`]);

  // Commit C into B, then D onto B (two commands each time; timed together).
  const script = (tool: string[]): string[] => ['-c', `${tool.join(' ')} commit -q C.qcow2 && ${tool.join(' ')} rebase -u -b B.qcow2 -F qcow2 D.qcow2`];
  const [cq, cc] = timeInterleavedDetailed([
    { cmd: 'sh', args: script(['qemu-img']), before: copyTo(src, path.join(dir, 'cq')), cwd: path.join(dir, 'cq') },
    { cmd: 'sh', args: script([QCHAIN, 'img']), before: copyTo(src, path.join(dir, 'cc')), cwd: path.join(dir, 'cc') },
  ], reps);
  // Every cluster C held was copied into B (new clusters of B, or B's own overwritten).
  const committed = cBefore;
  const grown = ownBytes(path.join(dir, 'cc', 'B.qcow2')) - bBefore;
  rows.push([label, `commit C into B (B grew ${mib(grown)})`, mib(cost.commitBytes), mib(committed), cq.wall.toFixed(2), cc.wall.toFixed(2), `${(cc.wall / cq.wall).toFixed(2)}×`]);

  // Every result shows D's guest view as before.
  for (const sub of ['pq', 'pc', 'cq', 'cc']) {
    const cmp = sh('qemu-img', ['compare', '-F', 'raw', path.join(dir, sub, 'D.qcow2'), path.join(dir, 'want.raw')]);
    if (!cmp.includes('identical')) throw new Error(`${sub}: D's view changed: ${cmp}`);
  }
  rows.push([label, `deletionCost says: ${cost.cheaper}`, '', '', '', '', '']);
}

console.log(`Deleting B from A ← B ← C ← D (${sizeMiB} MiB virtual, A full), best of ${reps} interleaved runs`);
console.log(table(rows));
fs.rmSync(dir, { recursive: true, force: true });
