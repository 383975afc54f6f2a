/**
 * `qchain demo`: the seed walk-through "Backing Chain Management" (under the hood), run with the
 * qchain commands in a temporary folder: create, write, internal snapshot, write, external
 * overlay with backing_fmt, write; then `info --backing-chain`, `map`, and a per-layer picture
 * of which clusters each file holds.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { CliContext } from './context.js';
import { main } from './main.js';
import { openChain } from '../chain/open.js';
import { Qcow2Image } from '../qcow2/image.js';
import { readL1, readL2, ClusterType } from '../qcow2/entry.js';
import type { Snapshot } from '../qcow2/snapshot-table.js';

const MiB = 1024 * 1024, KiB = 1024;

/** One character per cluster of the window: what this layer (or snapshot) holds there. */
async function layerRow(img: Qcow2Image, first: number, count: number, letter: string, l1?: Buffer): Promise<string> {
  const table = l1 ?? img.l1;
  let row = '';
  for (let c = first; c < first + count; c++) {
    const l1i = Math.floor(c / img.l2Entries);
    const { offset } = readL1(table, l1i);
    if (!offset) { row += '-'; continue; }
    const e = readL2(await img.readTable(offset), c % img.l2Entries, img.geo);
    row += e.type === ClusterType.Normal || e.type === ClusterType.Compressed ? letter
      : e.type === ClusterType.ZeroPlain || e.type === ClusterType.ZeroAlloc ? '0' : '-';
  }
  return row;
}

async function snapshotL1(img: Qcow2Image, sn: Snapshot): Promise<Buffer> {
  return img.readL1Table(sn.l1TableOffset, sn.l1Size);
}

export async function demoMain(argv: string[], ctx: CliContext): Promise<number> {
  const keep = argv.includes('--keep');
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qchain-demo-'));
  const say = (s: string): void => { ctx.stdout.write(s + '\n'); };
  const run = async (...args: string[]): Promise<void> => {
    say(`\n$ qchain ${args.map((a) => (/[\s$()]/.test(a) ? `"${a}"` : a)).join(' ')}`);
    const code = await main(args, ctx);
    if (code !== 0) throw new Error(`command failed with exit status ${code}: qchain ${args.join(' ')}`);
  };
  const cwd = process.cwd();
  process.chdir(dir);
  try {
    say(`qchain demo — the "Backing Chain Management" walk-through, in ${dir}`);
    say('Create a new file, write guest data, take an internal snapshot, write more,');
    say('wrap it in an external overlay (with backing_fmt), and write even more.');
    await run('img', 'create', '-f', 'qcow2', 'base.qcow2', '100M');
    await run('io', '-c', `write ${99 * MiB - 512} ${65 * KiB}`, 'base.qcow2');
    await run('img', 'snapshot', '-c', 'one', 'base.qcow2');
    await run('io', '-c', `write ${99 * MiB - 64 * KiB + 512} 512`, 'base.qcow2');
    await run('img', 'create', '-f', 'qcow2', '-o', 'backing_file=base.qcow2,backing_fmt=qcow2', 'wrap.qcow2');
    await run('io', '-c', `write -P 0xff ${99 * MiB - 63 * KiB} ${64 * KiB}`, 'wrap.qcow2');
    await run('img', 'info', '--backing-chain', 'wrap.qcow2');
    await run('img', 'map', 'wrap.qcow2');
    await run('img', 'check', 'base.qcow2');

    // The per-layer picture: 64 KiB clusters from 98.75 MiB to 99.25 MiB.
    const chain = await openChain('wrap.qcow2', { readOnly: true });
    try {
      const [wrap, base] = chain.layers.map((l) => l.driver as Qcow2Image);
      const first = Math.floor((99 * MiB - 4 * 64 * KiB) / wrap.clusterSize), count = 8;
      say(`\nWho holds each 64 KiB cluster from offset ${first * wrap.clusterSize} (one column per cluster; '-' = not in this file):`);
      const sn = base.snapshots.find((s) => s.name === 'one');
      const rows: Array<[string, string]> = [];
      if (sn) rows.push([`base.qcow2 snapshot 'one'`, await layerRow(base, first, count, 'S', await snapshotL1(base, sn))]);
      rows.push(['base.qcow2 (active)', await layerRow(base, first, count, 'A')]);
      rows.push(['wrap.qcow2', await layerRow(wrap, first, count, 'B')]);
      const st = await chain.blockStatus(first * wrap.clusterSize, count * wrap.clusterSize);
      let guest = '';
      for (let c = 0; c < count; c++) {
        const x = st.find((e) => e.offset <= (first + c) * wrap.clusterSize && (first + c) * wrap.clusterSize < e.offset + e.length);
        guest += !x || x.kind !== 'data' ? '-' : x.depth === 0 ? 'B' : 'A';
      }
      rows.push(['guest sees', guest]);
      const w = Math.max(...rows.map((r) => r[0].length));
      for (const [name, row] of rows) say(`  ${name.padEnd(w)}  ${row}`);
      say('\nReading a cluster finds the first file from the top of the chain that holds it;');
      say("the snapshot row shows the state 'one' preserved inside base.qcow2 by copy-on-write.");
    } finally {
      await chain.close();
    }
  } finally {
    process.chdir(cwd);
    if (!keep) fs.rmSync(dir, { recursive: true, force: true });
    else say(`\n(files kept in ${dir})`);
  }
  return 0;
}
