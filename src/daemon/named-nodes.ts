/**
 * query-named-block-nodes: every node of the graph, newest first (as qemu-storage-daemon lists
 * them), format nodes with their image info and dirty bitmaps, protocol (file) nodes with the
 * file's size, allocation and dirty bitmaps, whether or not a format node sits on them. Unless `flat`, a format
 * node's image info nests its backing nodes' (`backing-image`, top down) and `backing_file_depth`
 * counts them; flat listings have neither (depth 0), as QEMU's bdrv_block_device_info. Format
 * nodes show the names of node-filename.ts (json:{...} where the backing is overridden), and
 * `backing_file` is the name of the node attached below, absent when none is. A running job's
 * filter node (job-filter.ts) is listed as QEMU lists it, and nested where QEMU inserted it.
 */
import fs from 'node:fs';
import { imageInfo } from '../cli/img/info.js';
import type { BitmapRegistry } from './bitmaps.js';
import type { BlockGraph, BlockNode, FileNode, FilterNode, FormatNode, NodeWriteOptions } from './graph.js';
import { shownNames } from './node-filename.js';

const SECTOR = 512;

type Info = Record<string, unknown>;
type Shown = (n: BlockNode) => string;

/**
 * The fields every entry has, around the node-specific ones (`extra`: backing_file, then
 * dirty-bitmaps), in the order QEMU's QDict prints them (hash order, not QAPI member order).
 */
function entry(image: Info, ro: boolean, name: string, drv: string, file: string, depth = 0, extra: Info = {}, w: NodeWriteOptions): Info {
  return {
    iops_rd: 0, detect_zeroes: w.detectZeroes, image, iops_wr: 0, ro, 'node-name': name, backing_file_depth: depth, drv, iops: 0, bps_wr: 0,
    write_threshold: w.writeThreshold, ...extra, encrypted: false, bps: 0, bps_rd: 0, cache: { 'no-flush': w.noFlush, direct: false, writeback: true }, file,
  };
}

/** A protocol node's size and allocation: the open format node's storage if one sits on it, else the file itself. */
async function fileSizes(user: FormatNode | undefined, n: FileNode): Promise<{ size: number; allocated: number }> {
  if (user) return { size: await user.driver.storage.size(), allocated: await user.driver.storage.allocatedSize() };
  const st = await fs.promises.stat(n.filename);
  return { size: st.size, allocated: st.blocks * 512 };
}

async function fileEntry(graph: BlockGraph, n: FileNode, bitmaps: BitmapRegistry): Promise<Info> {
  const user = [...graph.nodes.values()].find((x): x is FormatNode => x.kind === 'format' && x.fileNode === n.name);
  const { size, allocated } = await fileSizes(user, n);
  // file-posix reports its length in whole sectors (bdrv_getlength).
  const virtual = Math.ceil(size / SECTOR) * SECTOR;
  const image = { 'virtual-size': virtual, filename: n.filename, format: 'file', 'actual-size': allocated, 'dirty-flag': false };
  // An implicit protocol node is opened (and reopened) in its format node's mode; a named one keeps its own.
  const ro = n.implicit && user ? user.driver.readOnly : n.readOnly;
  const dirty = await bitmaps.info(n);
  return entry(image, ro, n.name, 'file', n.filename, 0, dirty.length ? { 'dirty-bitmaps': dirty } : {}, n);
}

/**
 * The node listed below a format node: its backing node, or the commit_top filter a running
 * intermediate commit put over that node (QEMU inserts it between the top and its overlay).
 */
type Below = (n: FormatNode | FilterNode) => FormatNode | FilterNode | null;

/**
 * The node listed under a filter: filters put over the same node stack, each newer one between
 * the older ones and the node (QEMU inserts a filter between a node and all its parents).
 */
function underFilter(graph: BlockGraph, f: FilterNode): FormatNode | FilterNode {
  let next: FilterNode | null = null;
  for (const x of graph.nodes.values()) {
    if (x.kind !== 'filter' || x === f || x.child !== f.child || (x.seq ?? 0) <= (f.seq ?? 0)) continue;
    if (!next || (x.seq ?? 0) < (next.seq ?? 0)) next = x;
  }
  return next ?? f.child;
}

function belowOf(graph: BlockGraph): Below {
  const between = new Map<FormatNode, FilterNode>();
  for (const x of graph.nodes.values()) if (x.kind === 'filter' && x.drv === 'commit_top') between.set(x.child, x);
  return (n) => (n.kind === 'filter' ? underFilter(graph, n) : n.backing ? between.get(n.backing) ?? n.backing : null);
}

/**
 * A filter's image info, as QEMU prints it for a filter driver: the filtered node's size, name,
 * cluster size and allocation (bdrv_get_info and the allocated size pass through filters), the
 * filter's driver as the format, no format-specific or backing fields.
 */
async function filterImage(f: FilterNode, shown: Shown): Promise<Info> {
  const ci = await imageInfo(f.child.driver, f.child.filename);
  const image: Info = { 'virtual-size': ci['virtual-size'], filename: shown(f) };
  if ('cluster-size' in ci) image['cluster-size'] = ci['cluster-size'];
  image.format = f.drv;
  if ('actual-size' in ci) image['actual-size'] = ci['actual-size'];
  image['dirty-flag'] = false;
  return image;
}

/**
 * A node's image info; unless `flat`, with the node listed below nested first under
 * `backing-image` (QEMU prints that key first), down to the bottom of the chain. A format node's
 * backing fields (backing-filename...) come from its own header, the nested info from the node
 * actually attached, which may differ (backing=other-node, or backing=null: no nesting). A
 * filter nests the node it filters (QEMU puts any filtered child there).
 */
async function chainImage(n: FormatNode | FilterNode, flat: boolean, shown: Shown, below: Below): Promise<Info> {
  if (n.kind === 'filter') {
    const image = await filterImage(n, shown);
    return flat ? image : { 'backing-image': await chainImage(below(n) ?? n.child, false, shown, below), ...image };
  }
  // The backing fields are resolved against the real file name; the shown one may be json:{...}.
  const image = { ...await imageInfo(n.driver, n.filename), filename: shown(n) };
  const b = below(n);
  return flat || !b ? image : { 'backing-image': await chainImage(b, false, shown, below), ...image };
}

/** How many nodes lie below `n` (QEMU's backing_file_depth in a non-flat listing). */
function depthBelow(n: FormatNode | FilterNode, below: Below): number {
  let d = 0;
  for (let b = below(n); b; b = below(b)) d++;
  return d;
}

async function formatEntry(graph: BlockGraph, n: FormatNode, bitmaps: BitmapRegistry, flat: boolean, shown: Shown, below: Below): Promise<Info> {
  const extra: Info = {};
  // The node attached below, not the header's string (which the image info reports).
  if (n.backing) extra.backing_file = shown(n.backing);
  // Running jobs' anonymous bitmaps among the named ones, newest first (QEMU's one list per node).
  const named = await bitmaps.list(n), infos = await bitmaps.info(n);
  const dirty = [...graph.jobBitmaps.filter((b) => b.node === n).map((b) => ({ seq: b.seq, info: b.info() })),
    ...named.map((b, i) => ({ seq: b.seq, info: infos[i] }))].sort((a, b) => b.seq - a.seq).map((x) => x.info);
  if (dirty.length) extra['dirty-bitmaps'] = dirty;
  return entry(await chainImage(n, flat, shown, below), n.driver.readOnly, n.name, n.format, shown(n), flat ? 0 : depthBelow(n, below), extra, n);
}

/** A job's filter node: no backing_file (a filter has no backing file name of its own). */
async function filterEntry(f: FilterNode, flat: boolean, shown: Shown, below: Below): Promise<Info> {
  const extra: Info = {};
  const dirty = f.bitmaps?.() ?? [];
  if (dirty.length) extra['dirty-bitmaps'] = dirty;
  return entry(await chainImage(f, flat, shown, below), f.readOnly, f.name, f.drv, shown(f), flat ? 0 : depthBelow(f, below), extra, f);
}

/** The listing; `flat` as the command's argument (default false). */
export async function namedNodes(graph: BlockGraph, bitmaps: BitmapRegistry, flat = false): Promise<Info[]> {
  const out: Info[] = [];
  const shown = shownNames(graph);
  const below = belowOf(graph);
  // Newest node first, as QEMU lists its graph.
  for (const n of [...graph.nodes.values()].reverse()) {
    out.push(n.kind === 'file' ? await fileEntry(graph, n, bitmaps) : n.kind === 'filter' ? await filterEntry(n, flat, shown, below) : await formatEntry(graph, n, bitmaps, flat, shown, below));
  }
  return out;
}
