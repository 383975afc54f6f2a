/**
 * QEMU's qcow2_detect_metadata_preallocation (QEMU 7.2): an image counts as metadata-preallocated
 * when clearly more of its file's clusters have a refcount than the file has blocks allocated
 * for. QEMU's block status then also asks the file where its holes are inside data clusters
 * (BDRV_BLOCK_RECURSE), so `qemu-img map` reports those ranges as `"zero": true, "data": true`.
 */
import { CorruptionError, ImageError } from '../image/errors.js';
import type { Qcow2Image } from './image.js';

const detected = new WeakMap<Qcow2Image, Promise<boolean>>();

/** Whether QEMU would treat `img` as metadata-preallocated (computed once per open image). */
export function metadataPreallocated(img: Qcow2Image): Promise<boolean> {
  let p = detected.get(img);
  if (!p) {
    p = detect(img);
    detected.set(img, p);
  }
  return p;
}

async function detect(img: Qcow2Image): Promise<boolean> {
  const fileLength = await img.storage.size();
  const realClusters = Math.floor((await img.storage.allocatedSize()) / img.clusterSize);
  const threshold = Math.max(Math.floor(realClusters * 10 / 9), realClusters + 2);
  const endCluster = Math.ceil(fileLength / img.clusterSize);
  let count = 0;
  for (let i = 0; i < endCluster && count < threshold; i++) {
    let rc: number;
    try {
      // Cached blocks answer without an await (one per refcount block, not one per cluster).
      rc = img.refcounts.getCached(i) ?? (await img.refcounts.get(i));
    } catch (e) {
      // As QEMU: a refcount that cannot be read makes the detection fail (not preallocated);
      // an unaligned refcount block is reported as corruption on the way.
      if (e instanceof CorruptionError) {
        const ti = Math.floor(i / img.refcounts.perBlock);
        await img.signalCorruption(`${e.message} (reftable index: ${ti ? `0x${ti.toString(16)}` : '0'})`).catch(() => {});
      }
      if (e instanceof ImageError) return false;
      throw e;
    }
    if (rc !== 0) count++;
  }
  return count >= threshold;
}

/**
 * The parts of the host range [offset, offset+length) that read as zero from the file itself
 * (holes, and everything from a trailing hole or the end of the file on), as file-posix's block
 * status reports them: runs of { length, zero } covering the range. Without hole queries the
 * whole range is data.
 */
export async function hostRuns(img: Qcow2Image, offset: number, length: number): Promise<Array<{ length: number; zero: boolean }>> {
  const st = img.storage;
  const end = offset + length;
  if (!st.seekData || !st.seekHole) return [{ length, zero: false }];
  const fileLength = await st.size();
  const out: Array<{ length: number; zero: boolean }> = [];
  const push = (n: number, zero: boolean): void => {
    const last = out[out.length - 1];
    if (last && last.zero === zero) last.length += n;
    else out.push({ length: n, zero });
  };
  for (let pos = offset; pos < end;) {
    if (pos >= fileLength) {
      push(end - pos, true);
      break;
    }
    const data = st.seekData(pos);
    if (data < 0) {
      // A trailing hole: QEMU marks the rest of the request zero.
      push(end - pos, true);
      break;
    }
    if (data === pos) {
      const hole = Math.min(end, st.seekHole(pos));
      push(hole - pos, false);
      pos = hole;
    } else {
      const n = Math.min(end, data) - pos;
      push(n, true);
      pos += n;
    }
  }
  return out;
}
