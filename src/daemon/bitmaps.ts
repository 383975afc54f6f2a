/**
 * The daemon's dirty bitmaps (QEMU's BdrvDirtyBitmap on a node): persistent ones are the qcow2
 * driver's own (loaded on open, tracked by the driver, stored on close), the others live in
 * memory and track the node's writes here. QMP's block-dirty-bitmap-* commands, the checks and
 * messages of QEMU 7.2, and the "frozen" state a backup job puts a bitmap in (a successor records
 * writes meanwhile; the job decides at its end what the bitmap becomes).
 *
 * Protocol (file) nodes hold in-memory bitmaps too, as QEMU allows them on any node: they track
 * the writes that reach the file, i.e. the host writes (data and metadata) of every format node
 * sitting on it, and the guest writes of an export of the file node itself (its raw view, see
 * BlockGraph.fileView). They grow with the file, as QEMU's bdrv_dirty_bitmap_truncate when a
 * write ends past the end.
 */
import fs from 'node:fs';
import { QmpError, type BlockGraph, type FileNode, type FormatNode } from './graph.js';
import type { Storage } from '../storage/storage.js';
import { DirtyBitmap } from '../qcow2/dirty-bitmap.js';
import { Qcow2Image } from '../qcow2/image.js';
import { BitmapError, type MemBitmap } from '../qcow2/bitmaps.js';
import { watchWrites } from '../chain/chain.js';
import { CommandError } from '../qmp/server.js';

let lastSeq = 0;
/**
 * Creation order across a node's named bitmaps and the jobs' anonymous ones (QEMU keeps one
 * list per node, newest first).
 */
export function nextBitmapSeq(): number {
  return ++lastSeq;
}

export class NodeBitmap {
  /** In use by a job or an export. */
  busy = false;
  /** When it joined the node's list (see nextBitmapSeq); 0 for those loaded with the image. */
  seq = nextBitmapSeq();
  /** During a backup: the bitmap as it was at the job's start (what the job copies). */
  frozen: DirtyBitmap | null = null;
  private ownEnabled: boolean;
  private ownData: DirtyBitmap | null;

  constructor(readonly name: string, readonly granularity: number, readonly persistent: boolean,
    public mem: MemBitmap | null, data: DirtyBitmap | null, enabled: boolean) {
    this.ownData = data;
    this.ownEnabled = enabled;
  }

  get enabled(): boolean {
    return this.mem ? this.mem.enabled : this.ownEnabled;
  }

  set enabled(v: boolean) {
    if (this.mem) this.mem.enabled = v;
    else this.ownEnabled = v;
  }

  /** The live content (the successor while frozen). */
  get data(): DirtyBitmap {
    const d = this.mem ? this.mem.data : this.ownData;
    if (!d) throw new QmpError(`Bitmap '${this.name}' is not loaded`);
    return d;
  }

  set data(d: DirtyBitmap) {
    if (this.mem) this.mem.data = d;
    else this.ownData = d;
  }

  get inconsistent(): boolean {
    return this.mem?.inconsistent ?? false;
  }

  /** Dirty bytes (whole granules), as bdrv_get_dirty_count. */
  count(): number {
    if (this.inconsistent) return 0;
    return dirtyBytes(this.frozen ?? this.data, this.granularity);
  }
}

/** The bytes of the whole granules a bitmap marks (bdrv_get_dirty_count). */
export function dirtyBytes(d: DirtyBitmap, granularity: number): number {
  return d.dirtyRanges().reduce((a, [off, len]) => {
    const first = Math.floor(off / granularity), end = Math.ceil((off + len) / granularity);
    return a + (end - first) * granularity;
  }, 0);
}

/** bdrv_dirty_bitmap_check's flags. */
export const BUSY = 1, RO = 2, INCONSISTENT = 4;
export const DEFAULT = BUSY | RO | INCONSISTENT, ALLOW_RO = BUSY | INCONSISTENT;

/** A node that may hold dirty bitmaps: a format node, or a protocol node (in-memory bitmaps only). */
export type BitmapNode = FormatNode | FileNode;

/** A protocol node's length as QEMU's file-posix has it: the open file's, in whole sectors. */
async function fileLength(graph: BlockGraph, n: FileNode): Promise<number> {
  const st = fileStorages(graph, n)[0];
  const size = st ? await st.size() : (await fs.promises.stat(n.filename)).size;
  return Math.ceil(size / 512) * 512;
}

/** The open files a protocol node's writes go through: its format nodes' storages and its own export view's. */
function fileStorages(graph: BlockGraph, n: FileNode): Storage[] {
  const out: Storage[] = [];
  for (const x of graph.nodes.values()) if (x.kind === 'format' && x.fileNode === n.name) out.push(x.driver.storage);
  const v = graph.fileViews.get(n.name);
  if (v) out.push(v.driver.storage);
  return out;
}

const INCONSISTENT_HINT = 'Try block-dirty-bitmap-remove to delete this bitmap from disk';

export class BitmapRegistry {
  private readonly lists = new WeakMap<BitmapNode, NodeBitmap[]>();
  private readonly loading = new WeakMap<BitmapNode, Promise<NodeBitmap[]>>();

  /** Each node's write tracker for its in-memory bitmaps (bound to its driver handle). */
  private readonly trackers = new WeakMap<BitmapNode, (offset: number, length: number) => void>();

  constructor(private readonly graph: BlockGraph) {
    graph.reopenHooks.push((node) => this.rebind(node));
  }

  /**
   * A format node got a driver handle (added over a protocol node, reopened) or a protocol node
   * an export view: the protocol node's bitmaps watch that file too.
   */
  bindFile(fileNodeName: string | null): void {
    if (fileNodeName === null) return;
    const f = this.graph.nodes.get(fileNodeName);
    if (f?.kind !== 'file') return;
    const track = this.trackers.get(f);
    if (!track) return;
    for (const st of fileStorages(this.graph, f)) {
      if (st.writeObservers && !st.writeObservers.includes(track)) st.writeObservers.push(track);
    }
  }

  /**
   * The node has a new driver handle (reopen): persistent bitmaps take the new handle's copies
   * (stored by the old one, loaded by the new), in-memory bitmaps keep recording through it.
   */
  private async rebind(node: FormatNode): Promise<void> {
    this.bindFile(node.fileNode);
    const l = this.lists.get(node);
    const track = this.trackers.get(node);
    if (!l || !track) return;
    const d = node.driver;
    if (d instanceof Qcow2Image) d.writeTrackers.push(track);
    else watchWrites(d, track);
    if (!(d instanceof Qcow2Image) || !d.bitmaps) return;
    d.bitmaps.nodeName = node.name;
    for (const b of l) {
      if (!b.persistent) continue;
      const m = d.bitmaps.list().find((x) => x.name === b.name);
      if (!m) continue;
      if (!m.inconsistent && !m.data) m.data = await d.bitmaps.content(m);
      b.mem = m;
    }
  }

  /** The node's bitmaps, newest first (the driver's persistent ones picked up on first use). */
  list(node: BitmapNode): Promise<NodeBitmap[]> {
    const l = this.lists.get(node);
    if (l) return Promise.resolve(l);
    // Concurrent first uses share one load (and one write tracker).
    let p = this.loading.get(node);
    if (!p) {
      p = this.load(node).finally(() => this.loading.delete(node));
      this.loading.set(node, p);
    }
    return p;
  }

  private async load(node: BitmapNode): Promise<NodeBitmap[]> {
    const l: NodeBitmap[] = [];
    if (node.kind === 'file') {
      this.lists.set(node, l);
      // Writes past the end grow the file and its bitmaps (QEMU's bdrv_co_write_req_finish).
      this.trackers.set(node, (offset: number, length: number): void => {
        const end = Math.ceil((offset + length) / 512) * 512;
        for (const b of l) {
          if (end > b.data.size) b.data = b.data.resized(end);
          if (b.enabled) b.data.set(offset, length);
        }
      });
      this.bindFile(node.name);
      return l;
    }
    const d = node.driver;
    if (d instanceof Qcow2Image && d.bitmaps) {
      d.bitmaps.nodeName = node.name;
      for (const m of d.bitmaps.list()) {
        if (!m.inconsistent && !m.data) m.data = await d.bitmaps.content(m);
        const b = new NodeBitmap(m.name, 2 ** m.granularityBits, true, m, null, m.enabled);
        // Loaded at the node's open in QEMU, however late qchain reads them.
        b.seq = 0;
        l.unshift(b);
      }
    }
    this.lists.set(node, l);
    const track = (offset: number, length: number): void => {
      for (const b of l) if (!b.persistent && b.enabled) b.data.set(offset, length);
    };
    this.trackers.set(node, track);
    if (d instanceof Qcow2Image) d.writeTrackers.push(track);
    else watchWrites(d, track);
    return l;
  }

  /**
   * A backup's successor takes the bitmap's place (bdrv_dirty_bitmap_abdicate): the bitmap now
   * dates from the successor's creation (`seq`), among the node's bitmaps newest first.
   */
  takeSuccessorPlace(node: BitmapNode, b: NodeBitmap, seq: number): void {
    b.seq = seq;
    this.lists.get(node)?.sort((x, y) => y.seq - x.seq);
  }

  /** A bitmap of a node (block_dirty_bitmap_lookup). */
  async lookup(nodeName: string, name: string): Promise<{ node: BitmapNode; bitmap: NodeBitmap }> {
    const node = this.bitmapNode(nodeName);
    const bitmap = (await this.list(node)).find((b) => b.name === name);
    if (!bitmap) throw new QmpError(`Dirty bitmap '${name}' not found`);
    return { node, bitmap };
  }

  /** The first node down the chain from `node` holding a bitmap `name` (NBD export lookup). */
  async findInChain(node: FormatNode, name: string): Promise<{ node: FormatNode; bitmap: NodeBitmap } | null> {
    for (let n: FormatNode | null = node; n; n = n.backing) {
      const b = (await this.list(n)).find((x) => x.name === name);
      if (b) return { node: n, bitmap: b };
    }
    return null;
  }

  private bitmapNode(name: string): BitmapNode {
    const n = this.graph.node(name);
    if (n.kind === 'filter') throw new QmpError(`Dirty bitmap '${name}' not found`);
    return n;
  }

  /** A node's length (what merge compares): the image's virtual size, or the file's. */
  async size(node: BitmapNode): Promise<number> {
    return node.kind === 'format' ? node.driver.size : fileLength(this.graph, node);
  }

  /** Persistent bitmaps loaded from a read-only image (or of a node reopened read-only under an overlay) are read-only. */
  readOnly(node: BitmapNode, b: NodeBitmap): boolean {
    if (!b.persistent) return false;
    return (b.mem?.readOnly ?? false) || this.graph.parentsOf(node).some((p) => p.backing === node);
  }

  /** bdrv_dirty_bitmap_check. */
  check(node: BitmapNode, b: NodeBitmap, flags: number): void {
    if (flags & BUSY && b.busy) throw new QmpError(`Bitmap '${b.name}' is currently in use by another operation and cannot be used`);
    if (flags & RO && this.readOnly(node, b)) throw new QmpError(`Bitmap '${b.name}' is readonly and cannot be modified`);
    if (flags & INCONSISTENT && b.inconsistent) throw new QmpError(`Bitmap '${b.name}' is inconsistent and cannot be used\n${INCONSISTENT_HINT}`);
  }

  /** block-dirty-bitmap-add. */
  async add(nodeName: string, name: string, granularity: number | undefined, persistent: boolean, disabled: boolean): Promise<NodeBitmap> {
    const any = this.graph.node(nodeName);
    if (name === '') throw new QmpError('Bitmap name cannot be empty');
    if (granularity !== undefined && (granularity < 0 || granularity > 0xffffffff)) throw new CommandError("Parameter 'granularity' expects uint32_t");
    if (granularity !== undefined && (granularity < 512 || !Number.isInteger(Math.log2(granularity)))) {
      throw new QmpError('Granularity must be power of 2 and at least 512');
    }
    if (persistent && !(any.kind === 'format' && any.driver instanceof Qcow2Image && any.driver.bitmaps)) {
      throw new QmpError(`Can't store persistent bitmaps to ${any.name}: Operation not supported`);
    }
    if (any.kind === 'filter') throw new QmpError(`Node '${any.name}' is not a format node`);
    const node = any;
    if (node.kind === 'file') {
      // file-posix has no bdrv_get_info: QEMU's default granularity is 64 KiB.
      const list = await this.list(node);
      if (list.some((b) => b.name === name)) throw new QmpError(`Bitmap already exists: ${name}`);
      const g = granularity ?? 65536;
      const b = new NodeBitmap(name, g, false, null, new DirtyBitmap(await fileLength(this.graph, node), Math.log2(g), 65536), !disabled);
      list.unshift(b);
      return b;
    }
    const d = node.driver;
    const gran = granularity ?? (d instanceof Qcow2Image ? Math.min(65536, Math.max(4096, d.clusterSize)) : 4096);
    const list = await this.list(node);
    if (list.some((b) => b.name === name)) throw new QmpError(`Bitmap already exists: ${name}`);
    if (persistent && d instanceof Qcow2Image && d.bitmaps) {
      try {
        d.bitmaps.add(name, gran, !disabled);
      } catch (e) {
        if (e instanceof BitmapError) throw new QmpError(e.message);
        throw e;
      }
      const m = d.bitmaps.lookup(name);
      const b = new NodeBitmap(name, gran, true, m, null, !disabled);
      list.unshift(b);
      return b;
    }
    if (list.some((b) => b.name === name)) throw new QmpError(`Bitmap already exists: ${name}`);
    const b = new NodeBitmap(name, gran, false, null, new DirtyBitmap(d.size, Math.log2(gran), 65536), !disabled);
    list.unshift(b);
    return b;
  }

  /** Forget a bitmap (and its on-disk entry if persistent). */
  async drop(node: BitmapNode, b: NodeBitmap): Promise<void> {
    const list = await this.list(node);
    const i = list.indexOf(b);
    if (i >= 0) list.splice(i, 1);
    if (node.kind === 'file') return;
    const d = node.driver;
    if (b.persistent && d instanceof Qcow2Image && d.bitmaps) {
      try {
        await d.bitmaps.remove(b.name);
      } catch (e) {
        if (e instanceof BitmapError) throw new QmpError(e.message);
        throw e;
      }
    }
  }

  /** block-dirty-bitmap-remove. */
  async remove(nodeName: string, name: string): Promise<void> {
    const { node, bitmap } = await this.lookup(nodeName, name);
    this.check(node, bitmap, BUSY | RO);
    await this.drop(node, bitmap);
  }

  /** A bitmap's length (bdrv_dirty_bitmap_size): its node's virtual size, or its file's as it grew. */
  private bitmapSize(node: BitmapNode, b: NodeBitmap): number {
    return node.kind === 'format' ? node.driver.size : b.data.size;
  }

  /**
   * The sources of a merge into `target` on `node`: names on the target's node, or {node, name}.
   * QEMU 7.2's block_dirty_bitmap_merge merges each source straight into the target
   * (bdrv_merge_dirty_bitmap): per source, the lookup, the target's state, the source's state
   * (in use, inconsistent), then the sizes; with no source the target is not checked at all.
   */
  async sources(node: BitmapNode, target: NodeBitmap, list: unknown): Promise<NodeBitmap[]> {
    if (!Array.isArray(list)) throw new QmpError("Parameter 'bitmaps' is missing");
    const out: NodeBitmap[] = [];
    for (const s of list) {
      let found: { node: BitmapNode; bitmap: NodeBitmap };
      if (typeof s === 'string') {
        found = await this.lookup(node.name, s);
      } else if (s && typeof s === 'object') {
        const o = s as { node?: unknown; name?: unknown };
        if (typeof o.node !== 'string') throw new QmpError("Parameter 'node' is missing");
        if (typeof o.name !== 'string') throw new QmpError("Parameter 'name' is missing");
        const n = this.graph.node(o.node);
        if (n.kind === 'filter') throw new QmpError(`Dirty bitmap '${o.name}' not found`);
        found = await this.lookup(n.name, o.name);
      } else {
        throw new QmpError("Invalid parameter type for 'bitmaps[0]', expected: object");
      }
      this.check(node, target, DEFAULT);
      this.check(found.node, found.bitmap, ALLOW_RO);
      const dst = this.bitmapSize(node, target), src = this.bitmapSize(found.node, found.bitmap);
      if (dst !== src) {
        throw new QmpError(`Bitmaps are of different sizes (destination size is ${dst}, source size is ${src}) and can't be merged`);
      }
      out.push(found.bitmap);
    }
    return out;
  }

  /** Query entries (BlockDirtyInfo), newest first. */
  async info(node: BitmapNode): Promise<Array<Record<string, unknown>>> {
    return (await this.list(node)).map((b) => ({
      name: b.name, recording: b.enabled, persistent: b.persistent, busy: b.busy, granularity: b.granularity, count: b.count(),
      ...(b.inconsistent ? { inconsistent: true } : {}),
    }));
  }
}

/** Copy of a bitmap's content (for undo). */
export function cloneBitmap(d: DirtyBitmap): DirtyBitmap {
  const c = new DirtyBitmap(d.size, d.granularityBits, d.chunkBytes);
  c.merge(d);
  return c;
}

/** What an NBD export serves as qemu:dirty-bitmap:NAME: the bitmap's live content. */
export function bitmapView(b: NodeBitmap): { status(offset: number, length: number): Array<[number, number, boolean]> } {
  return {
    status(offset: number, length: number): Array<[number, number, boolean]> {
      const out: Array<[number, number, boolean]> = [];
      const end = offset + length;
      let at = offset;
      for (const [s, l] of b.data.dirtyRanges()) {
        const a = Math.max(s, offset), z = Math.min(s + l, end);
        if (z <= a) {
          if (s >= end) break;
          continue;
        }
        if (a > at) out.push([at, a - at, false]);
        out.push([a, z - a, true]);
        at = z;
      }
      if (at < end) out.push([at, end - at, false]);
      return out;
    },
  };
}
