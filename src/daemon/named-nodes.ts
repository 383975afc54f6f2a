/**
 * query-named-block-nodes: every node of the graph, newest first (as qemu-storage-daemon lists
 * them), format nodes with their image info and dirty bitmaps, protocol (file) nodes with the
 * file's size and allocation, whether or not a format node sits on them.
 */
import fs from 'node:fs';
import { imageInfo } from '../cli/img/info.js';
import type { BitmapRegistry } from './bitmaps.js';
import type { BlockGraph, FileNode, FormatNode } from './graph.js';

const SECTOR = 512;

/** The fields every entry has, around the node-specific ones (QEMU's member order). */
function entry(image: Record<string, unknown>, ro: boolean, name: string, drv: string, file: string, extra: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    iops_rd: 0, detect_zeroes: 'off', image, iops_wr: 0, ro, 'node-name': name, backing_file_depth: 0, drv, iops: 0, bps_wr: 0,
    write_threshold: 0, ...extra, encrypted: false, bps: 0, bps_rd: 0, cache: { 'no-flush': false, direct: false, writeback: true }, file,
  };
}

/** A protocol node's size and allocation: the open format node's storage if one sits on it, else the file itself. */
async function fileSizes(user: FormatNode | undefined, n: FileNode): Promise<{ size: number; allocated: number }> {
  if (user) return { size: await user.driver.storage.size(), allocated: await user.driver.storage.allocatedSize() };
  const st = await fs.promises.stat(n.filename);
  return { size: st.size, allocated: st.blocks * 512 };
}

async function fileEntry(graph: BlockGraph, n: FileNode): Promise<Record<string, unknown>> {
  const user = [...graph.nodes.values()].find((x): x is FormatNode => x.kind === 'format' && x.fileNode === n.name);
  const { size, allocated } = await fileSizes(user, n);
  // file-posix reports its length in whole sectors (bdrv_getlength).
  const virtual = Math.ceil(size / SECTOR) * SECTOR;
  const image = { 'virtual-size': virtual, filename: n.filename, format: 'file', 'actual-size': allocated, 'dirty-flag': false };
  // An implicit protocol node is opened (and reopened) in its format node's mode; a named one keeps its own.
  const ro = n.implicit && user ? user.driver.readOnly : n.readOnly;
  return entry(image, ro, n.name, 'file', n.filename);
}

async function formatEntry(n: FormatNode, bitmaps: BitmapRegistry): Promise<Record<string, unknown>> {
  const image = await imageInfo(n.driver, n.filename);
  const e = entry(image, n.driver.readOnly, n.name, n.format, n.filename, n.driver.backingFile ? { backing_file: n.driver.backingFile } : {});
  const dirty = await bitmaps.info(n);
  return dirty.length ? { ...e, 'dirty-bitmaps': dirty } : e;
}

export async function namedNodes(graph: BlockGraph, bitmaps: BitmapRegistry): Promise<Array<Record<string, unknown>>> {
  const out: Array<Record<string, unknown>> = [];
  // Newest node first, as QEMU lists its graph.
  for (const n of [...graph.nodes.values()].reverse()) out.push(n.kind === 'file' ? await fileEntry(graph, n) : await formatEntry(n, bitmaps));
  return out;
}
