/**
 * A mirror's initial work, as QEMU 7.2's mirror_dirty_init decides it. sync=full must leave the
 * target equal to the source: unless the target is known to read as zeros (a drive-mirror image
 * it has just created), it is either zeroed first, when it can write zeros by unmapping (a node
 * opened with discard=unmap over qcow2 v3 or raw), or copied whole. After a zeroing, or on a
 * zero-initialised target, only what the chain holds (data or zero clusters) is copied.
 */
import type { FormatNode } from '../daemon/graph.js';
import { Qcow2Image } from '../qcow2/image.js';

export type MirrorInitial = 'all' | 'allocated' | 'none';

export interface MirrorStart {
  initial: MirrorInitial;
  /** Write zeros (unmapping) over the whole target before the copy; not counted as progress. */
  zeroTarget: boolean;
  /** The rate limit does not charge zeroed ranges (QEMU's write_zeroes_ok). */
  zeroesFree: boolean;
}

/** QEMU's bdrv_can_write_zeroes_with_unmap for the target. */
function canUnmapZeroes(target: FormatNode): boolean {
  if (!target.discard) return false;
  return !(target.driver instanceof Qcow2Image) || target.driver.header.version >= 3;
}

/**
 * `targetIsZero`: the target was created for this job (drive-mirror, mode absolute-paths), so
 * it reads as zeros (QEMU's bdrv_has_zero_init for a new qcow2 or raw file).
 */
export function mirrorStart(sync: 'full' | 'top' | 'none', target: FormatNode, targetIsZero: boolean): MirrorStart {
  const zeroesFree = canUnmapZeroes(target);
  if (sync === 'none') return { initial: 'none', zeroTarget: false, zeroesFree };
  if (sync === 'top' || targetIsZero) return { initial: 'allocated', zeroTarget: false, zeroesFree };
  return zeroesFree ? { initial: 'allocated', zeroTarget: true, zeroesFree } : { initial: 'all', zeroTarget: false, zeroesFree };
}
