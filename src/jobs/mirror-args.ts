/**
 * blockdev-mirror / drive-mirror arguments QEMU 7.2 checks in its generated visitor (before any
 * node is looked up, in schema order: sync, then granularity) and in blockdev_mirror_common.
 */
import { QmpError } from '../daemon/graph.js';
import type { Args } from '../qmp/server.js';

/** MirrorSyncMode: incremental and bitmap pass the visitor; mirror_start refuses them (mirrorSyncSupported). */
const SYNC = ['full', 'top', 'none', 'incremental', 'bitmap'];

/** The visitor's checks: sync's enum, granularity's type (uint32). */
export function mirrorArgTypes(a: Args): void {
  const sync = a.sync;
  if (typeof sync === 'string' && !SYNC.includes(sync)) throw new QmpError(`Parameter 'sync' does not accept value '${sync}'`);
  const g = a.granularity;
  if (g === undefined) return;
  if (typeof g !== 'number' || !Number.isInteger(g)) throw new QmpError("Parameter 'granularity' expects uint64");
  if (g < 0 || g > 0xffffffff) throw new QmpError("Parameter 'granularity' expects uint32_t");
}

/** mirror_start's first check, once blockdev_mirror_common's are passed. */
export function mirrorSyncSupported(sync: string): void {
  if (sync === 'incremental' || sync === 'bitmap') throw new QmpError(`Sync mode '${sync}' not supported`);
}

/** blockdev_mirror_common's checks: the granularity asked for (0 or absent: the default), or undefined. */
export function mirrorGranularity(a: Args): number | undefined {
  mirrorArgTypes(a);
  const g = a.granularity as number | undefined;
  if (!g) return undefined;
  if (g < 512 || g > 64 * 1024 * 1024) throw new QmpError("Parameter 'granularity' expects a value in range [512B, 64MB]");
  if (g & (g - 1)) throw new QmpError("Parameter 'granularity' expects a power of 2");
  return g;
}
