/**
 * block_resize, as qemu-storage-daemon answers it: the node is looked up by node-name (a
 * `device` names a BlockBackend, of which the daemon has none), nodes used as a backing file or
 * by a job are blocked ("Device '(null)' is in use", QEMU's own text), and a node whose users do
 * not share resize (an export, or the format node on a protocol node) is a permission conflict.
 * Format nodes shrink and grow (qcow2 sizes in multiples of 512); unused protocol nodes
 * truncate their file. Exports added afterwards see the new size.
 */
import fs from 'node:fs/promises';
import { QmpError, type BlockGraph } from './graph.js';
import { optInt, optStr, type Args } from '../qmp/server.js';

export interface ResizeHost {
  graph: BlockGraph;
  /** Whether an export serves the node. */
  exported(node: string): boolean;
  /** Whether a job holds the node. */
  busy(node: string): boolean;
}

export async function blockResize(h: ResizeHost, a: Args): Promise<void> {
  const device = optStr(a, 'device'), nodeName = optStr(a, 'node-name');
  const size = optInt(a, 'size');
  if (size === undefined) throw new QmpError("Parameter 'size' is missing");
  const n = nodeName !== undefined ? h.graph.nodes.get(nodeName) : undefined;
  if (!n) throw new QmpError(`Cannot find device='${device ?? ''}' nor node-name='${nodeName ?? ''}'`);
  if (size < 0) throw new QmpError("Parameter 'size' expects a >0 size");
  const conflict = (by: string): QmpError => new QmpError(`Permission conflict on node '${n.name}': permissions 'resize' are both required by ` +
    `an unnamed block device (uses node '${n.name}' as 'root' child) and unshared by ${by}.`);
  if (n.kind === 'file') {
    const user = [...h.graph.nodes.values()].find((x) => x.kind === 'format' && x.fileNode === n.name);
    if (user) throw conflict(`node '${user.name}' (uses node '${n.name}' as 'file' child)`);
    await fs.truncate(n.filename, size).catch((e: NodeJS.ErrnoException) => { throw new QmpError(e.message); });
    return;
  }
  if (n.kind === 'filter' || h.graph.parentsOf(n).some((p) => p.backing === n) || h.busy(n.name)) throw new QmpError("Device '(null)' is in use");
  if (h.exported(n.name)) throw conflict(`an unnamed block device (uses node '${n.name}' as 'root' child)`);
  if (!n.driver.resize) throw new QmpError('Image format driver does not support resize');
  if (n.driver.readOnly) throw new QmpError('Block node is read-only');
  try {
    await n.driver.resize(size, { shrink: true });
  } catch (e) {
    throw new QmpError(e instanceof Error ? e.message : String(e));
  }
  h.graph.changed();
}
