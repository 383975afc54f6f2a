/**
 * A node's write options bound to the objects doing its I/O, as QEMU applies them to every
 * request on the node (bdrv_aligned_pwritev, bdrv_co_write_req_prepare):
 * - detect-zeroes (format nodes): a write whose buffer is all zeroes becomes a zero write, which
 *   may deallocate with detect-zeroes=unmap (blockdev checks require discard=unmap for it);
 * - the write threshold: the first write, zero write or discard through the node ending past it
 *   fires BLOCK_WRITE_THRESHOLD {node-name, write-threshold, amount-exceeded} and disarms it.
 *   On a format node that counts guest offsets: guest writes from exports and jobs' writes into
 *   the node alike (they all call the driver). On a protocol node it counts the host writes the
 *   format driver above makes to the file (data and metadata), watched in the storage itself.
 *
 * A format node's driver gets own write/writeZeroes/discard methods only while one of these is
 * set, so a node without them keeps its driver's methods untouched (nothing on the hot path).
 */
import type { BlockDriver, WriteOptions, WriteZeroesOptions } from '../image/driver.js';
import { isZero } from '../util/zero.js';
import { QmpError, type BlockGraph, type FileNode, type FormatNode, type NodeWriteOptions } from './graph.js';

export type EmitEvent = (name: string, data: Record<string, unknown>) => void;

type Methods = Pick<BlockDriver, 'write' | 'writeZeroes' | 'discard'>;
const METHODS = ['write', 'writeZeroes', 'discard'] as const;

/** The threshold fires for a request ending at `end`: event, then disarmed (QEMU's bdrv_write_threshold_check_write). */
function exceeded(n: NodeWriteOptions & { name: string }, end: number, emit: EmitEvent): void {
  const t = n.writeThreshold;
  n.writeThreshold = 0;
  emit('BLOCK_WRITE_THRESHOLD', { 'node-name': n.name, 'write-threshold': t, 'amount-exceeded': end - t });
}

/** Armed: QEMU compares as uint64, so a negative value (2^64 + v) is never passed. */
const armed = (t: number): boolean => t > 0;

/** Bind `node`'s detect-zeroes and write threshold to its current driver, and its protocol node's threshold to the file. */
export function bindNode(graph: BlockGraph, node: FormatNode, emit: EmitEvent): void {
  const d = node.driver as BlockDriver & Partial<Record<(typeof METHODS)[number], unknown>>;
  for (const m of METHODS) if (Object.prototype.hasOwnProperty.call(d, m)) delete d[m];
  if (node.detectZeroes !== 'off' || armed(node.writeThreshold)) {
    const proto = Object.getPrototypeOf(d) as Methods;
    const check = (end: number): void => {
      if (armed(node.writeThreshold) && end > node.writeThreshold) {
        exceeded(node, end, emit);
        if (node.detectZeroes === 'off') bindNode(graph, node, emit);
      }
    };
    const mayUnmap = node.detectZeroes === 'unmap';
    d.write = (buf: Buffer, offset: number, opts?: WriteOptions): Promise<void> => {
      check(offset + buf.length);
      if (node.detectZeroes !== 'off' && isZero(buf)) return proto.writeZeroes.call(d, offset, buf.length, mayUnmap ? { mayUnmap } : {});
      return proto.write.call(d, buf, offset, opts);
    };
    d.writeZeroes = (offset: number, length: number, opts?: WriteZeroesOptions): Promise<void> => {
      check(offset + length);
      return proto.writeZeroes.call(d, offset, length, opts);
    };
    d.discard = (offset: number, length: number): Promise<void> => {
      check(offset + length);
      return proto.discard.call(d, offset, length);
    };
  }
  const f = node.fileNode === null ? undefined : graph.nodes.get(node.fileNode);
  if (f?.kind === 'file') bindFile(f, node, emit);
}

/** Arm (or disarm) a protocol node's threshold on the file of the format node sitting on it. */
function bindFile(f: FileNode, user: FormatNode, emit: EmitEvent): void {
  const st = user.driver.storage;
  if (!st.watchWritesAbove) return;
  if (armed(f.writeThreshold)) st.watchWritesAbove(f.writeThreshold, (end) => exceeded(f, end, emit));
  else st.watchWritesAbove(Infinity, null);
}

/**
 * Copy-on-read writes (block-stream into its top): QEMU makes them below the node's request
 * checks (bdrv_co_do_copy_on_readv calls the driver directly), so the node's write threshold and
 * detect-zeroes do not see them, nor do dirty bitmaps (bdrv_driver_pwritev sets no dirty bit),
 * and a buffer of zeroes is always written as a zero write.
 */
export function copyOnReadWrite(d: BlockDriver, buf: Buffer, offset: number): Promise<void> {
  const own = Object.getPrototypeOf(d) as Methods;
  return isZero(buf) ? own.writeZeroes.call(d, offset, buf.length, { untracked: true }) : own.write.call(d, buf, offset, { untracked: true });
}

export function copyOnReadZeroes(d: BlockDriver, offset: number, length: number): Promise<void> {
  return (Object.getPrototypeOf(d) as Methods).writeZeroes.call(d, offset, length, { untracked: true });
}

/** block-set-write-threshold: set (0: clear) a node's threshold and bind it. */
export function setWriteThreshold(graph: BlockGraph, name: string, threshold: number, emit: EmitEvent): void {
  const n = graph.nodes.get(name);
  // QEMU looks the node up by node name only, with this text.
  if (!n) throw new QmpError(`Device '${name}' not found`);
  n.writeThreshold = threshold;
  if (n.kind === 'format') bindNode(graph, n, emit);
  else for (const u of graph.parentsOf(n)) if (u.fileNode === n.name) bindNode(graph, u, emit);
}
