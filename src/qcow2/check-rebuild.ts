/**
 * `check -r all` refcount rebuild, as QEMU 7.2's rebuild_refcount_structure: the counted
 * references (one big in-memory refblock) are written out as new refblocks and a new reftable,
 * placed first-fit in the clusters the counts leave free (growing the image only when none are),
 * and the header is switched to them. The old structure is not freed here: it is still counted,
 * so the caller's next comparison finds it leaked and repairs it, as QEMU's does.
 */
import type { Qcow2Image } from './image.js';
import { TWO32 } from './constants.js';

/** Largest reftable the rebuild builds in memory (bytes). */
const MAX_REBUILT_REFTABLE = 128 * 1024 * 1024;
import { Refcounts } from './refcount.js';
import type { SparseCounts } from './sparse-counts.js';
import { preWriteOverlapCheck } from './overlap.js';
import { CheckFailedError } from './check-snapshots.js';
import { CorruptionError } from '../image/errors.js';

/** The overlap check before a write of the rebuild; a hit ends the check (QEMU: EIO). */
async function guard(img: Qcow2Image, off: number, len: number, snapshotsSize: number, what: string, report: (l: string) => void): Promise<void> {
  try {
    await preWriteOverlapCheck(img, off, len, snapshotsSize);
  } catch (e) {
    if (!(e instanceof CorruptionError)) throw e;
    report(`qemu-img: ERROR writing ${what}: Input/output error`);
    throw new CheckFailedError('EIO');
  }
}

/** The in-memory refcount table (QEMU's imrt): counts per cluster, growing on allocation. */
class Imrt {
  private counts: SparseCounts;
  constructor(counts: SparseCounts, public size: number) {
    this.counts = counts.clone();
  }
  get(c: number): number { return c < this.size ? this.counts.get(c) : 0; }
  set(c: number, v: number): void {
    if (c >= this.size) this.size = c + 1;
    this.counts.set(c, v);
  }
  grow(size: number): void {
    this.size = Math.max(this.size, size);
  }
  /** The first counted cluster in [from, end), or `end`. */
  nextUsed(from: number, end: number): number {
    return this.counts.nextNonZero(from, Math.min(end, this.size));
  }
  /** alloc_clusters_imrt: `count` contiguous free clusters from *firstFree on, marked used. */
  alloc(count: number, firstFree: { v: number }): number {
    let cluster = firstFree.v, free = 0, firstGap = true;
    for (; cluster < this.size && free < count; cluster++) {
      if (!this.get(cluster)) {
        free++;
        if (firstGap) {
          firstFree.v = cluster;
          firstGap = false;
        }
      } else free = 0;
    }
    if (free < count) this.grow(cluster + count - free);
    cluster -= free;
    for (let i = 0; i < count; i++) this.set(cluster + i, 1);
    return cluster;
  }
}

export async function rebuildRefcountStructure(img: Qcow2Image, counts: SparseCounts, nbClusters: number, snapshotsSize: number,
  report: (l: string) => void): Promise<void> {
  const cs = img.clusterSize;
  const rc = img.refcounts;
  const perBlock = rc.perBlock;
  // QEMU empties (writes back) its refcount block cache first.
  await img.meta.run(() => rc.writePending());
  const imrt = new Imrt(counts, nbClusters);
  const enc = new Refcounts(img.storage, { clusterBits: img.clusterBits, refcountOrder: img.header.refcountOrder }, 0, 0, []);
  const table: number[] = [];

  /** rebuild_refcounts_write_refblocks: returns whether the reftable had to grow. */
  const writeRefblocks = async (first: number, end: number): Promise<boolean> => {
    const firstFree = { v: 0 };
    let grown = false;
    for (let cluster = first; cluster < end; cluster++) {
      if (!imrt.get(cluster)) {
        // Jump over uncounted clusters (end only grows when a block is allocated).
        const n = imrt.nextUsed(cluster, end);
        if (n >= end) break;
        cluster = n;
      }
      const bi = Math.floor(cluster / perBlock), start = bi * perBlock;
      let at = table[bi] ?? 0;
      if (!at) {
        // Never inside a refblock already written.
        if (firstFree.v < start) firstFree.v = start;
        const ci = imrt.alloc(1, firstFree);
        if (ci >= end) end = ci + 1; // the block counting this block must be written too
        if (table.length <= bi) {
          const entries = Math.ceil(((bi + 1) * 8) / cs) * (cs / 8);
          // Bounded memory (QEMU allocates what it needs; it could not even open past 8 MiB).
          if (entries * 8 > MAX_REBUILT_REFTABLE) {
            report('qemu-img: ERROR allocating reftable memory');
            throw new CheckFailedError('ENOMEM');
          }
          while (table.length < entries) table.push(0);
          grown = true;
        }
        at = ci * cs;
        table[bi] = at;
      }
      const buf = Buffer.alloc(cs);
      for (let k = 0; k < perBlock; k++) {
        const v = imrt.get(start + k);
        if (v) enc.encodeInto(buf, k, v);
      }
      await guard(img, at, cs, snapshotsSize, 'refblock', report);
      await img.storage.write(buf, at);
      cluster = start + perBlock - 1;
    }
    return grown;
  };

  await writeRefblocks(0, nbClusters);
  let tableOff: number, tableClusters: number;
  let grown: boolean;
  do {
    tableClusters = Math.ceil((table.length * 8) / cs);
    tableOff = imrt.alloc(tableClusters, { v: 0 }) * cs;
    grown = await writeRefblocks(tableOff / cs, tableOff / cs + tableClusters);
  } while (grown);
  const raw = Buffer.alloc(table.length * 8);
  table.forEach((o, i) => {
    raw.writeUInt32BE(Math.floor(o / TWO32), i * 8);
    raw.writeUInt32BE(o >>> 0, i * 8 + 4);
  });
  await guard(img, tableOff, raw.length, snapshotsSize, 'reftable', report);
  await img.storage.write(raw, tableOff);
  await img.storage.flush();
  rc.table = table;
  rc.farEntries.clear();
  rc.tableOffset = tableOff;
  rc.tableClusters = tableClusters;
  rc.dropCache();
  await rc.onTableMoved(tableOff, tableClusters);
}
