/**
 * Compressed cluster writes, as QEMU's qcow2_co_pwritev_compressed_part/_task do them.
 *
 * Rules (QEMU 7.2):
 * - the offset is cluster-aligned and the length a whole number of clusters, except that the
 *   request may end at the (unaligned) end of the image; the last cluster is then zero-padded
 *   before compression. Anything else fails with EINVAL.
 * - a cluster whose compressed form is not strictly smaller than a cluster is written
 *   uncompressed through the normal write path (which may overwrite allocated clusters);
 * - a compressed cluster may only replace an entry without a host offset (unallocated or a plain
 *   zero cluster), otherwise EIO ("Compression can't overwrite anything").
 *
 * Space comes from qcow2_alloc_bytes: compressed streams are packed at byte granularity into the
 * "current" host cluster; a stream that does not fit continues into the next cluster if the next
 * free cluster directly follows, otherwise starts in a fresh one. Every host cluster a stream
 * touches gets one reference per stream. A cluster whose refcount is at the maximum is not
 * continued; one freed meanwhile is while still free (as QEMU), not once another allocation
 * took it (QEMU 7.2 would pack the stream into a cluster it no longer owns).
 *
 * Crash safety: refcounts are raised first (allocation), then the compressed bytes are written,
 * then the L2 entries point at them. A crash in between leaks clusters, never loses data.
 *
 * Compression runs on a worker pool (one per image, created on first use) in a prepare step that
 * needs no lock, so a caller can compress many requests in parallel and commit them in order.
 */
import { ImageError } from '../image/errors.js';
import { CompressPool } from './compress-pool.js';
import { ClusterType, readL2, writeCompressedL2 } from './entry.js';
import type { Qcow2Image } from './image.js';

/** A request whose clusters have been compressed (null = write that cluster uncompressed). */
export interface PreparedCompressed {
  offset: number;
  data: Buffer;
  streams: Array<Buffer | null>;
}

/** Per-image state: the worker pool and qcow2_alloc_bytes' free_byte_offset. */
interface State {
  pool: CompressPool | null;
  /** Next free byte in the partly used host cluster (0 = none). */
  freeByte: number;
}

const states = new WeakMap<Qcow2Image, State>();

function stateOf(img: Qcow2Image): State {
  let s = states.get(img);
  if (!s) {
    s = { pool: null, freeByte: 0 };
    states.set(img, s);
  }
  return s;
}

function poolOf(img: Qcow2Image): CompressPool {
  const s = stateOf(img);
  s.pool ??= new CompressPool();
  return s.pool;
}

/** Stop the image's compression workers (called on close). */
export async function closeCompressedWriter(img: Qcow2Image): Promise<void> {
  const s = states.get(img);
  if (s?.pool) await s.pool.close();
  states.delete(img);
}

/** Validate a compressed request as QEMU does (EINVAL for unaligned requests). */
function checkAlignment(img: Qcow2Image, offset: number, length: number): void {
  const cs = img.clusterSize;
  if (offset % cs !== 0) throw new ImageError('Invalid argument', 'EINVAL');
  if (length % cs !== 0 && offset + length !== img.size) throw new ImageError('Invalid argument', 'EINVAL');
}

/** Compress every cluster of the request (the last one zero-padded when the image ends inside it). */
export async function prepareCompressed(img: Qcow2Image, data: Buffer, offset: number): Promise<PreparedCompressed> {
  img.checkRange(offset, data.length);
  checkAlignment(img, offset, data.length);
  const cs = img.clusterSize;
  const pool = poolOf(img);
  const jobs: Array<Promise<Buffer | null>> = [];
  for (let p = 0; p < data.length; p += cs) {
    let cluster = data.subarray(p, Math.min(data.length, p + cs));
    if (cluster.length < cs) {
      const padded = Buffer.alloc(cs);
      cluster.copy(padded);
      cluster = padded;
    }
    jobs.push(pool.compress(img.compressionType, cluster));
  }
  return { offset, data, streams: await Promise.all(jobs) };
}

/** Write a prepared request: compressed streams packed into host clusters, the rest uncompressed. */
export async function commitCompressed(img: Qcow2Image, req: PreparedCompressed): Promise<void> {
  const finish = await reserveCompressed(img, req);
  await finish();
}

/**
 * First half of a commit, the part that must run in request order for a reproducible layout:
 * take the range lock, write the uncompressible clusters, allocate space for the streams
 * (refcounts on disk). Returns the second half, which writes the streams and then the L2
 * entries and releases the lock; it may overlap with the next request's first half.
 */
export async function reserveCompressed(img: Qcow2Image, req: PreparedCompressed): Promise<() => Promise<void>> {
  const { offset, data, streams } = req;
  img.checkRange(offset, data.length);
  if (data.length === 0) return async () => {};
  const cs = img.clusterSize;
  const release = await img.lockClusters(offset, data.length);
  const finishers: Array<() => Promise<void>> = [];
  const finishAll = async (): Promise<void> => {
    try {
      for (const f of finishers) await f();
    } finally {
      release();
    }
  };
  try {
    await img.markDirty();
    // Clusters are handled in guest order, one L2 table at a time.
    let k = 0;
    while (k < streams.length) {
      const l1i = Math.floor((offset + k * cs) / img.l2Coverage);
      let n = 0;
      while (k + n < streams.length && Math.floor((offset + (k + n) * cs) / img.l2Coverage) === l1i) n++;
      const f = await reserveTable(img, req, k, n, l1i);
      if (f) finishers.push(f);
      k += n;
    }
  } catch (e) {
    // What was reserved is completed (it is valid data), then the error is reported.
    await finishAll().catch(() => {});
    throw e;
  }
  return finishAll;
}

/** Clusters [k, k+n) of the request, all mapped by L2 table `l1i`: reserve now, finish later. */
async function reserveTable(img: Qcow2Image, req: PreparedCompressed, k: number, n: number, l1i: number): Promise<(() => Promise<void>) | null> {
  const cs = img.clusterSize;
  // Uncompressible clusters go through the normal write path, a contiguous run at a time.
  for (let i = k; i < k + n; i++) {
    if (req.streams[i] !== null) continue;
    let j = i + 1;
    while (j < k + n && req.streams[j] === null) j++;
    await img.writeUnlocked(req.data.subarray(i * cs, Math.min(req.data.length, j * cs)), req.offset + i * cs);
    i = j;
  }
  const idxs: number[] = [];
  for (let i = k; i < k + n; i++) if (req.streams[i] !== null) idxs.push(i);
  if (idxs.length === 0) return null;
  const { offset: l2Off, table } = await img.writableL2(l1i);
  const entryIndex = (i: number): number => Math.floor((req.offset + i * cs) / cs) % img.l2Entries;
  let hosts: number[];
  try {
    for (const i of idxs) {
      const old = readL2(table, entryIndex(i), img.geo);
      await img.validateEntry(old, l2Off, entryIndex(i));
      // Compression can't overwrite anything: the entry must have no host offset.
      if (old.type === ClusterType.Compressed || old.host !== 0) throw new ImageError('Input/output error', 'EIO');
    }
    // Allocation raises the refcounts (on disk) before anything points at the bytes.
    hosts = await img.meta.run(() => allocStreams(img, idxs.map((i) => (req.streams[i] as Buffer).length)));
  } catch (e) {
    img.l2.unpin(l2Off);
    throw e;
  }
  return async () => {
    try {
      // Data first, one write per host-contiguous run.
      let runStart = 0;
      for (let j = 1; j <= idxs.length; j++) {
        const prev = hosts[j - 1] + (req.streams[idxs[j - 1]] as Buffer).length;
        if (j < idxs.length && hosts[j] === prev) continue;
        const bufs = idxs.slice(runStart, j).map((i) => req.streams[i] as Buffer);
        await (bufs.length === 1 ? img.storage.write(bufs[0], hosts[runStart]) : img.storage.writev(bufs, hosts[runStart]));
        runStart = j;
      }
      // Then the L2 entries (compressed entries never carry COPIED; extended L2 bitmaps are 0).
      // An entry is set in memory only once its data is written, so any sector write of this
      // table (ours or a neighbour's) only ever exposes written data.
      await img.meta.run(async () => {
        let lo = Infinity, hi = -1;
        idxs.forEach((i, j) => {
          const idx = entryIndex(i);
          writeCompressedL2(table, idx, img.geo, hosts[j], (req.streams[i] as Buffer).length);
          lo = Math.min(lo, idx);
          hi = Math.max(hi, idx);
        });
        img.lastCompressed = null;
        await img.writeL2Range(l2Off, table, lo, hi);
      });
    } finally {
      img.l2.unpin(l2Off);
    }
  };
}

/**
 * Where qcow2_alloc_bytes would put `sizes`, if the new clusters it takes are the run starting
 * at cluster index `base` (contiguous with the partly used cluster or not). Returns the stream
 * offsets, the references each new cluster gets, the references added to the partly used
 * cluster, and the next free byte.
 */
function layout(cs: number, max: number, start: number, startRc: number, base: number, sizes: number[]):
  { offsets: number[]; counts: number[]; startAdds: number; next: number } {
  const offsets: number[] = [];
  const counts: number[] = [];
  let off = start, startAdds = 0;
  const refOf = (ci: number): number => (start && ci === Math.floor(start / cs) ? startRc + startAdds : counts[ci - base]);
  const addRef = (ci: number): void => {
    if (start && ci === Math.floor(start / cs)) startAdds++;
    else counts[ci - base] = (counts[ci - base] ?? 0) + 1;
  };
  for (const size of sizes) {
    if (off && refOf(Math.floor(off / cs)) >= max) off = 0;
    const free = off ? cs - (off % cs) : 0;
    if (!off || free < size) {
      const fresh = base + counts.length;
      counts.push(0);
      if (off && Math.ceil(off / cs) === fresh) addRef(Math.floor(off / cs));
      else off = fresh * cs;
      addRef(fresh);
    } else addRef(Math.floor(off / cs));
    offsets.push(off);
    off = (off + size) % cs === 0 ? 0 : off + size;
  }
  return { offsets, counts, startAdds, next: off };
}

/**
 * qcow2_alloc_bytes for a batch of streams, with one cluster allocation and one refcount update
 * per touched range. Caller holds the metadata mutex.
 */
async function allocStreams(img: Qcow2Image, sizes: number[]): Promise<number[]> {
  const cs = img.clusterSize;
  const rc = img.refcounts;
  const st = stateOf(img);
  const max = rc.bits >= 53 ? Number.MAX_SAFE_INTEGER : 2 ** rc.bits - 1;
  // Per stream when counts cannot be shared, or the run would be too long to find in one piece.
  const maxRun = Math.max(1, Math.floor(rc.perBlock / 2));
  const total = sizes.reduce((x, y) => x + y, 0);
  let start = st.freeByte, startRc = 0;
  if (start) {
    startRc = await rc.get(Math.floor(start / cs));
    if (!continues(img, start, startRc, max)) start = 0;
  }
  // A partly used cluster that is free again (freed meanwhile) could be taken by the batch's own
  // run, which QEMU's first stream counts before searching: per stream then too.
  if (max < 2 || Math.ceil(total / cs) + 1 > maxRun || (start && startRc === 0)) {
    const out: number[] = [];
    for (const size of sizes) out.push(await allocBytes(img, size));
    return out;
  }
  // The run may or may not directly follow the partly used cluster: plan for both, allocate the larger.
  const near = start ? Math.ceil(start / cs) : -1;
  const far = layout(cs, max, start, startRc, Number.MAX_SAFE_INTEGER / cs / 2, sizes);
  let plan = far;
  let base = -1;
  if (far.counts.length > 0) {
    base = (await rc.alloc(far.counts.length)) / cs;
    await img.checkOverlap(base * cs, far.counts.length);
    if (base === near) {
      plan = layout(cs, max, start, startRc, base, sizes);
      const unused = far.counts.length - plan.counts.length;
      if (unused > 0) await rc.free((base + plan.counts.length) * cs, unused);
    } else {
      plan = layout(cs, max, start, startRc, base, sizes);
    }
    // alloc() counted one reference per new cluster; add the rest.
    if (plan.counts.some((c) => c !== 1)) await rc.addEach(base, plan.counts.map((c) => c - 1));
  }
  if (plan.startAdds > 0) await rc.update(Math.floor(start / cs), 1, plan.startAdds);
  setFreeByte(img, plan.next);
  return plan.offsets;
}

/**
 * qcow2_alloc_bytes: reserve `size` bytes (0 < size < cluster size) for one compressed stream
 * and count the reference in every host cluster it touches. Caller holds the metadata mutex.
 */
async function allocBytes(img: Qcow2Image, size: number): Promise<number> {
  const cs = img.clusterSize;
  const rc = img.refcounts;
  const st = stateOf(img);
  const max = rc.bits >= 53 ? Number.MAX_SAFE_INTEGER : 2 ** rc.bits - 1;
  let off = st.freeByte;
  if (off) {
    const cur = await rc.get(Math.floor(off / cs));
    if (!continues(img, off, cur, max)) off = 0;
  }
  const freeInCluster = off ? cs - (off % cs) : 0;
  if (!off || freeInCluster < size) {
    const fresh = await rc.alloc(1); // refcount 1: this stream's reference to the new cluster
    await img.checkOverlap(fresh, 1);
    if (off && Math.ceil(off / cs) * cs === fresh) {
      await rc.update(Math.floor(off / cs), 1, 1); // the stream also uses the rest of the old one
    } else {
      off = fresh;
    }
  } else {
    await rc.update(Math.floor(off / cs), 1, 1);
  }
  setFreeByte(img, (off + size) % cs === 0 ? 0 : off + size);
  return off;
}

/**
 * Whether qcow2_alloc_bytes goes on in the partly used cluster of byte `off`, whose refcount is
 * `rc`: not at the maximum (QEMU), nor when the cluster was freed and then taken by another
 * allocation (QEMU 7.2 would write the stream into it; qchain starts a new cluster). A freed
 * cluster still free is continued, as QEMU does.
 */
function continues(img: Qcow2Image, off: number, rc: number, max: number): boolean {
  if (rc >= max) return false;
  return rc === 0 || !img.refcounts.freedSince(Math.floor(off / img.clusterSize));
}

/** Remember the next free byte, following its cluster's refcount (see continues). */
function setFreeByte(img: Qcow2Image, next: number): void {
  stateOf(img).freeByte = next;
  if (next) img.refcounts.watch(Math.floor(next / img.clusterSize));
}

/** Compress and write `data` at `offset` (whole clusters, or up to the end of the image). */
export async function writeCompressed(img: Qcow2Image, data: Buffer, offset: number): Promise<void> {
  await commitCompressed(img, await prepareCompressed(img, data, offset));
}
