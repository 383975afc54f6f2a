/**
 * Choosing how to delete a point in time. In a chain A ← B ← C ← D the state "when C was
 * created" lives in A+B; dropping it means merging B and C, either by pulling B into C
 * (C' = B+C, then A ← C' ← D) or by committing C into B (B' = B+C, then D is rebased -u onto
 * B', which copies nothing because B' shows what C showed). The costs follow from the maps:
 *   pull   copies what B holds where C holds nothing;
 *   commit copies everything C holds.
 */
import type { Chain } from '../chain/chain.js';
import type { BlockDriver } from '../image/driver.js';

export interface DeletionCost {
  /** Bytes copied by pulling B into C (block-stream with base A). */
  pullBytes: number;
  /** Bytes copied by committing C into B. */
  commitBytes: number;
  cheaper: 'pull' | 'commit' | 'equal';
}

/** Allocated (data or zero) runs of one layer within [from, to). */
async function allocated(d: BlockDriver, from: number, to: number): Promise<Array<[number, number]>> {
  const out: Array<[number, number]> = [];
  const end = Math.min(to, d.size);
  if (end <= from) return out;
  for (const x of await d.blockStatus(from, end - from)) {
    if (x.kind === 'unallocated') continue;
    const last = out[out.length - 1];
    if (last && last[1] === x.offset) last[1] = x.offset + x.length;
    else out.push([x.offset, x.offset + x.length]);
  }
  return out;
}

const total = (rs: Array<[number, number]>): number => rs.reduce((a, [s, e]) => a + e - s, 0);

/** Bytes of `a` not covered by `b` (both sorted, disjoint runs). */
function minus(a: Array<[number, number]>, b: Array<[number, number]>): number {
  let n = 0, j = 0;
  for (const [s, e] of a) {
    let p = s;
    while (j < b.length && b[j][1] <= p) j++;
    for (let k = j; k < b.length && b[k][0] < e; k++) {
      if (b[k][0] > p) n += b[k][0] - p;
      p = Math.max(p, b[k][1]);
    }
    if (p < e) n += e - p;
  }
  return n;
}

/**
 * Cost of deleting the point in time held by the boundary between layer `lower` (B) and the
 * layer above it (C = lower - 1) of `chain` (depth 0 = the active layer).
 */
export async function deletionCost(chain: Chain, lower: number): Promise<DeletionCost> {
  if (lower < 1 || lower >= chain.depth) throw new RangeError(`no layer pair above depth ${lower}`);
  const b = chain.layers[lower].driver, c = chain.layers[lower - 1].driver;
  let pullBytes = 0, commitBytes = 0;
  // Window by window, so memory stays bounded whatever the image size.
  const WINDOW = 64 * 1024 * 1024;
  for (let p = 0; p < c.size; p += WINDOW) {
    const cAlloc = await allocated(c, p, p + WINDOW);
    pullBytes += minus(await allocated(b, p, Math.min(c.size, p + WINDOW)), cAlloc);
    commitBytes += total(cAlloc);
  }
  return { pullBytes, commitBytes, cheaper: pullBytes < commitBytes ? 'pull' : commitBytes < pullBytes ? 'commit' : 'equal' };
}
