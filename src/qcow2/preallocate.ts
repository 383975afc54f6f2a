/**
 * preallocation=metadata as QEMU 7.2's preallocate_co (qcow2_co_create's truncate and
 * qcow2_co_truncate): the guest range is handed to qcow2_alloc_host_offset in requests of at most
 * INT_MAX bytes (rounded down to clusters); each request gathers host clusters as the write path
 * does (handle_copied keeps COPIED clusters where they continue the request's host range,
 * handle_alloc takes new ones at the range's end when free there, qcow2_alloc_clusters_at, or as
 * one run from the free cluster index, qcow2_alloc_clusters), one L2 table at a time, the table
 * allocated first (get_cluster_table). The request ends where its host range cannot continue.
 * Then each allocation is linked (qcow2_alloc_cluster_link_l2): the parts of its first and last
 * cluster outside the range are copied on write (perform_cow, calculate_l2_meta's regions: to the
 * cluster's edge, or to the subcluster's edge for unallocated extended-L2 entries), the entries
 * point at the clusters (COPIED; subcluster bitmaps unchanged), the clusters they held are
 * released. Finally the file is extended (sparse) to the end of the last request's range.
 *
 * All clusters come from the image's allocator (Refcounts.alloc/allocAt, writableL2), so refcount
 * blocks and refcount table growth happen where QEMU's allocator puts them.
 */
import { ClusterType, hasClusters, readL2, writeL2, type L2Entry } from './entry.js';
import type { Qcow2Image } from './image.js';

const INT_MAX = 0x7fffffff;
/** BDRV_REQUEST_MAX_BYTES: INT_MAX rounded down to 512. */
const REQUEST_MAX_BYTES = INT_MAX - 511;

/** qcow2_get_subcluster_type's answers. */
const enum Sub { Normal, ZeroAlloc, UnallocatedAlloc, ZeroPlain, UnallocatedPlain, Compressed }

/** One allocation to link (QCowL2Meta): clusters [guest, guest + n clusters) at host `host`. */
interface Meta {
  l1i: number;
  idx: number;
  guest: number;
  host: number;
  olds: L2Entry[];
  keepOld: boolean;
  /** Copy-on-write regions, byte offsets from the first cluster's start: [from, to). */
  cowStart: [number, number];
  cowEnd: [number, number];
}

/** Preallocate (metadata) guest bytes [from, to) of an image whose L1 table covers `to`. */
export async function preallocateMetadata(img: Qcow2Image, from: number, to: number): Promise<void> {
  const cs = img.clusterSize;
  const step = Math.floor(INT_MAX / cs) * cs;
  let offset = from, bytes = to - from, lastHost = 0, lastBytes = 0;
  while (bytes > 0) {
    const req = Math.min(bytes, step);
    const { host, got, metas } = await allocHostOffset(img, offset, req);
    for (const m of metas) await link(img, m);
    lastHost = host;
    lastBytes = got;
    bytes -= got;
    offset += got;
  }
  // preallocate_co: the file reaches at least the end of the last request's host range.
  if (lastHost + lastBytes > (await img.storage.size())) await img.storage.truncate(lastHost + lastBytes);
}

function needsNewAlloc(e: L2Entry): boolean {
  return !((e.type === ClusterType.Normal || e.type === ClusterType.ZeroAlloc) && e.copied);
}

function subType(img: Qcow2Image, e: L2Entry, sc: number): Sub {
  if (e.type === ClusterType.Compressed) return Sub.Compressed;
  if (!img.extL2) {
    switch (e.type) {
      case ClusterType.Normal: return Sub.Normal;
      case ClusterType.ZeroAlloc: return Sub.ZeroAlloc;
      case ClusterType.ZeroPlain: return Sub.ZeroPlain;
      default: return Sub.UnallocatedPlain;
    }
  }
  const alloc = (e.allocBits >>> sc) & 1, zero = (e.zeroBits >>> sc) & 1;
  if (e.host) return alloc ? Sub.Normal : zero ? Sub.ZeroAlloc : Sub.UnallocatedAlloc;
  return zero ? Sub.ZeroPlain : Sub.UnallocatedPlain;
}

/** ctz32 / clz32 as QEMU's (32 for 0). */
function ctz32(v: number): number {
  return v === 0 ? 32 : 31 - Math.clz32(v & -v);
}

/**
 * qcow2_alloc_host_offset for guest bytes [offset, offset + bytes): the host offset of the start,
 * how many bytes from there are contiguous on the host (at least one cluster's worth), and the
 * allocations to link.
 */
async function allocHostOffset(img: Qcow2Image, offset: number, bytes: number): Promise<{ host: number; got: number; metas: Meta[] }> {
  const cs = img.clusterSize;
  const maxReq = Math.floor(REQUEST_MAX_BYTES / cs);
  const metas: Meta[] = [];
  let start = offset, remaining = bytes, cur = 0;
  let clusterOff: number | null = null, host: number | null = null;
  for (;;) {
    if (host === null && clusterOff !== null) host = clusterOff;
    start += cur;
    remaining -= cur;
    if (clusterOff !== null) clusterOff += cur;
    if (remaining === 0) break;
    cur = remaining;
    const inC = start % cs;
    const gc = Math.floor(start / cs);
    const l1i = Math.floor(gc / img.l2Entries), idx = gc % img.l2Entries;
    const nb = Math.min(Math.ceil((inC + cur) / cs), img.l2Entries - idx, maxReq);
    // get_cluster_table (allocates or copies the table), then the entries it holds for the range.
    const { offset: l2Off, table } = await img.writableL2(l1i);
    const olds: L2Entry[] = [];
    try {
      for (let i = 0; i < nb; i++) {
        const e = readL2(table, idx + i, img.geo);
        if (!img.entryValid(e)) await img.validateEntry(e, l2Off, idx + i);
        olds.push(e);
      }
    } finally {
      img.l2.unpin(l2Off);
    }
    if (!needsNewAlloc(olds[0])) {
      // handle_copied: COPIED clusters are kept if they continue the range on the host.
      const first = olds[0].host;
      if (first % cs !== 0) {
        await img.signalCorruption(`${olds[0].type === ClusterType.ZeroAlloc ? 'Preallocated zero' : 'Data'} cluster offset 0x${first.toString(16)} unaligned (guest offset: ${start ? `0x${start.toString(16)}` : '0'})`);
      }
      if (clusterOff !== null && first !== clusterOff) break;
      let keep = 0;
      while (keep < nb && !needsNewAlloc(olds[keep]) && olds[keep].host === first + keep * cs) keep++;
      cur = Math.min(cur, keep * cs - inC);
      const m = l2Meta(img, first, start, cur, l1i, idx, olds.slice(0, keep), true);
      if (m) metas.push(m);
      clusterOff = first + inC;
      continue;
    }
    // handle_alloc: new clusters for the entries that need one.
    let n = 0;
    while (n < nb && needsNewAlloc(olds[n])) n++;
    let at: number;
    if (clusterOff === null) {
      at = await img.meta.run(() => img.refcounts.alloc(n));
    } else {
      at = clusterOff - inC;
      n = await img.meta.run(() => img.refcounts.allocAt(at, n));
      if (n === 0) break;
    }
    await img.checkOverlap(at, n);
    cur = Math.min(cur, Math.min(cur + inC, n * cs) - inC);
    metas.push(l2Meta(img, at, start, cur, l1i, idx, olds.slice(0, n), false) as Meta);
    clusterOff = at + inC;
  }
  return { host: host as number, got: bytes - remaining, metas };
}

/**
 * calculate_l2_meta: the allocation of guest bytes [guest, guest + bytes) at host cluster `host`,
 * with the copy-on-write regions of its first and last cluster; null when kept clusters need
 * neither copy nor entry change.
 */
function l2Meta(img: Qcow2Image, host: number, guest: number, bytes: number, l1i: number, idx: number, olds: L2Entry[], keepOld: boolean): Meta | null {
  const cs = img.clusterSize, scs = img.subclusterSize, spc = cs / scs;
  const startTo = guest % cs, endFrom = startTo + bytes;
  const nb = Math.ceil(endFrom / cs);
  const metaOlds = olds.slice(0, nb);
  if (keepOld) {
    // Kept clusters whose written subclusters are all allocated need nothing (skip_cow).
    let skip = true;
    for (let i = 0; i < nb && skip; i++) {
      const a = Math.max(startTo, i * cs) - i * cs, b = Math.min(endFrom, (i + 1) * cs) - i * cs;
      const firstSc = Math.floor(a / scs), lastSc = Math.floor((b - 1) / scs);
      for (let s = firstSc; s <= lastSc; s++) {
        if (subType(img, metaOlds[i], s) !== Sub.Normal) {
          skip = false;
          break;
        }
      }
    }
    if (skip) return null;
  }
  const firstE = metaOlds[0];
  let sc = Math.floor(startTo / scs);
  let startFrom: number;
  const t0 = subType(img, firstE, sc);
  if (!keepOld) {
    if (t0 === Sub.Compressed) startFrom = 0;
    else if (t0 === Sub.ZeroPlain || t0 === Sub.UnallocatedPlain) startFrom = sc * scs;
    else startFrom = img.extL2 ? Math.min(sc, ctz32(firstE.allocBits >>> 0)) * scs : 0;
  } else {
    startFrom = t0 === Sub.Normal ? startTo : sc * scs;
  }
  const lastE = metaOlds[nb - 1];
  sc = Math.floor(((guest + bytes - 1) % cs) / scs);
  const t1 = subType(img, lastE, sc);
  let endTo: number;
  if (!keepOld) {
    if (t1 === Sub.Compressed) endTo = Math.ceil(endFrom / cs) * cs;
    else if (t1 === Sub.ZeroPlain || t1 === Sub.UnallocatedPlain) endTo = Math.ceil(endFrom / scs) * scs;
    else {
      endTo = Math.ceil(endFrom / cs) * cs;
      if (img.extL2) endTo -= Math.min(spc - sc - 1, Math.clz32(lastE.allocBits >>> 0)) * scs;
    }
  } else {
    endTo = t1 === Sub.Normal ? endFrom : Math.ceil(endFrom / scs) * scs;
  }
  return { l1i, idx, guest: guest - startTo, host, olds: metaOlds, keepOld, cowStart: [startFrom, startTo], cowEnd: [endFrom, endTo] };
}

/** qcow2_alloc_cluster_link_l2 for a preallocated range: copy on write, entries, old clusters released. */
async function link(img: Qcow2Image, m: Meta): Promise<void> {
  const cs = img.clusterSize;
  // perform_cow: the regions are read through the old entries (backing data where unallocated).
  for (const [a, b] of [m.cowStart, m.cowEnd]) {
    if (b <= a) continue;
    const buf = Buffer.alloc(b - a);
    for (let p = a; p < b;) {
      const ci = Math.floor(p / cs);
      const n = Math.min(b, (ci + 1) * cs) - p;
      await img.fillOld(buf.subarray(p - a, p - a + n), m.olds[ci], m.guest + ci * cs, p - ci * cs);
      p += n;
    }
    await img.storage.write(buf, m.host + a);
  }
  const { offset: l2Off, table } = await img.writableL2(m.l1i);
  try {
    await img.meta.run(async () => {
      let lo = Infinity, hi = -1;
      for (let i = 0; i < m.olds.length; i++) {
        const e = m.olds[i];
        const h = m.host + i * cs;
        // Subcluster bitmaps stay as they are (preallocated clusters are not written).
        const want = { copied: true, allocBits: e.allocBits, zeroBits: e.zeroBits };
        if (m.keepOld && e.type === ClusterType.Normal && e.copied && e.host === h) continue;
        writeL2(table, m.idx + i, img.geo, h, want);
        lo = Math.min(lo, m.idx + i);
        hi = Math.max(hi, m.idx + i);
      }
      if (hi >= 0) await img.writeL2Range(l2Off, table, lo, hi);
      // Only entries that held a cluster have one to release (no await per unallocated entry).
      if (!m.keepOld) for (const e of m.olds) if (hasClusters(e)) await img.freeEntryClusters(e);
    });
  } finally {
    img.l2.unpin(l2Off);
  }
}
