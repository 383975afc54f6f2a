/**
 * qemu-img convert --bitmaps: before the target is created, the source's bitmaps are checked
 * (convert_check_bitmaps: an inconsistent, in-use bitmap stops the convert unless skipped); after
 * the copy, every persistent bitmap is added to the target with the same name, granularity and
 * enabled state, then merged from the source (convert_copy_bitmaps).
 */
import type { BlockDriver } from '../image/driver.js';
import { BitmapError, type Qcow2Bitmaps } from '../qcow2/bitmaps.js';
import { Qcow2Image } from '../qcow2/image.js';

/** The driver's persistent bitmaps, or null when it cannot have any (bdrv_supports_persistent_dirty_bitmap: qcow2 v3). */
export function persistentBitmaps(d: BlockDriver): Qcow2Bitmaps | null {
  return d instanceof Qcow2Image && d.version >= 3 ? d.bitmaps : null;
}

/** convert_check_bitmaps, once the source supports bitmaps. */
export function checkBitmaps(src: Qcow2Bitmaps, skipBroken: boolean): void {
  if (skipBroken) return;
  const bad = src.list().find((b) => b.inconsistent);
  if (bad) throw new BitmapError(`Cannot copy inconsistent bitmap '${bad.name}'`, "Try --skip-broken-bitmaps, or use 'qemu-img bitmap --remove' to delete it\n");
}

/** convert_copy_bitmaps; `warn` gets QEMU's warning for each inconsistent bitmap skipped. */
export async function copyBitmaps(src: Qcow2Bitmaps, dst: Qcow2Bitmaps, warn: (msg: string) => void): Promise<void> {
  // Added last to first: each add goes to the front, so the target lists them as QEMU's copy does.
  for (const b of [...src.list()].reverse()) {
    if (b.inconsistent) {
      warn(`Skipping inconsistent bitmap '${b.name}'`);
      continue;
    }
    dst.add(b.name, 2 ** b.granularityBits, b.enabled);
    await dst.merge(b.name, src, b.name);
  }
}
