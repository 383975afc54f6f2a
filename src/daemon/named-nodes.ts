/**
 * query-named-block-nodes: every node of the graph, newest first (as qemu-storage-daemon lists
 * them), format nodes with their image info and dirty bitmaps, protocol (file) nodes with the
 * file's size and allocation, whether or not a format node sits on them. Unless `flat`, a format
 * node's image info nests its backing nodes' (`backing-image`, top down) and `backing_file_depth`
 * counts them; flat listings have neither (depth 0), as QEMU's bdrv_block_device_info. Format
 * nodes show the names of node-filename.ts (json:{...} where the backing is overridden), and
 * `backing_file` is the name of the node attached below, absent when none is.
 */
import fs from 'node:fs';
import { imageInfo } from '../cli/img/info.js';
import type { BitmapRegistry } from './bitmaps.js';
import type { BlockGraph, BlockNode, FileNode, FormatNode } from './graph.js';
import { shownNames } from './node-filename.js';

const SECTOR = 512;

type Info = Record<string, unknown>;
type Shown = (n: BlockNode) => string;

/**
 * The fields every entry has, around the node-specific ones (`extra`: backing_file, then
 * dirty-bitmaps), in the order QEMU's QDict prints them (hash order, not QAPI member order).
 */
function entry(n: BlockNode, image: Info, ro: boolean, drv: string, file: string, depth = 0, extra: Info = {}): Info {
  return {
    iops_rd: 0, detect_zeroes: n.detectZeroes, image, iops_wr: 0, ro, 'node-name': n.name, backing_file_depth: depth, drv, iops: 0, bps_wr: 0,
    write_threshold: n.writeThreshold, ...extra, encrypted: false, bps: 0, bps_rd: 0, cache: { 'no-flush': n.noFlush, direct: false, writeback: true }, file,
  };
}

/** A protocol node's size and allocation: the open format node's storage if one sits on it, else the file itself. */
async function fileSizes(user: FormatNode | undefined, n: FileNode): Promise<{ size: number; allocated: number }> {
  if (user) return { size: await user.driver.storage.size(), allocated: await user.driver.storage.allocatedSize() };
  const st = await fs.promises.stat(n.filename);
  return { size: st.size, allocated: st.blocks * 512 };
}

async function fileEntry(graph: BlockGraph, n: FileNode): Promise<Info> {
  const user = [...graph.nodes.values()].find((x): x is FormatNode => x.kind === 'format' && x.fileNode === n.name);
  const { size, allocated } = await fileSizes(user, n);
  // file-posix reports its length in whole sectors (bdrv_getlength).
  const virtual = Math.ceil(size / SECTOR) * SECTOR;
  const image = { 'virtual-size': virtual, filename: n.filename, format: 'file', 'actual-size': allocated, 'dirty-flag': false };
  // An implicit protocol node is opened (and reopened) in its format node's mode; a named one keeps its own.
  const ro = n.implicit && user ? user.driver.readOnly : n.readOnly;
  return entry(n, image, ro, 'file', n.filename);
}

/**
 * A format node's image info; unless `flat`, with its backing node's nested first under
 * `backing-image` (QEMU prints that key first), down to the bottom of the chain. The backing
 * fields (backing-filename...) come from the node's own header, the nested info from the node
 * actually attached, which may differ (backing=other-node, or backing=null: no nesting).
 */
async function chainImage(n: FormatNode, flat: boolean, shown: Shown): Promise<Info> {
  // The backing fields are resolved against the real file name; the shown one may be json:{...}.
  const image = { ...await imageInfo(n.driver, n.filename), filename: shown(n) };
  return flat || !n.backing ? image : { 'backing-image': await chainImage(n.backing, false, shown), ...image };
}

/** How many backing nodes lie below `n` (QEMU's backing_file_depth in a non-flat listing). */
function depthBelow(n: FormatNode): number {
  let d = 0;
  for (let b = n.backing; b; b = b.backing) d++;
  return d;
}

async function formatEntry(n: FormatNode, bitmaps: BitmapRegistry, flat: boolean, shown: Shown): Promise<Info> {
  const extra: Info = {};
  // The node attached below, not the header's string (which the image info reports).
  if (n.backing) extra.backing_file = shown(n.backing);
  const dirty = await bitmaps.info(n);
  if (dirty.length) extra['dirty-bitmaps'] = dirty;
  return entry(n, await chainImage(n, flat, shown), n.driver.readOnly, n.format, shown(n), flat ? 0 : depthBelow(n), extra);
}

/** The listing; `flat` as the command's argument (default false). */
export async function namedNodes(graph: BlockGraph, bitmaps: BitmapRegistry, flat = false): Promise<Info[]> {
  const out: Info[] = [];
  const shown = shownNames(graph);
  // Newest node first, as QEMU lists its graph.
  for (const n of [...graph.nodes.values()].reverse()) out.push(n.kind === 'file' ? await fileEntry(graph, n) : await formatEntry(n, bitmaps, flat, shown));
  return out;
}
