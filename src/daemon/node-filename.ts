/**
 * The file name a node shows in query replies, as QEMU's bdrv_refresh_filename makes it: the
 * plain file name, unless a format node's backing is overridden, i.e. the node attached below it
 * (or the lack of one) is not what its header would open: then a `json:{...}` pseudo-filename
 * holding the options that rebuild the node, its file child and its backing child.
 *
 * Invariant: a format node's backing counts as overridden exactly when its `autoBacking` (QEMU's
 * auto_backing_file) differs from the shown name of its backing node, or is not '' while no
 * backing node is attached. Only what the replies show changes; the node keeps its real file name.
 */
import type { BlockGraph, BlockNode, FormatNode } from './graph.js';

type Opts = { [k: string]: string | Opts | null };

/** QEMU's compact JSON: ', ' between members, ': ' after keys. */
function qemuJson(o: Opts | string | null): string {
  if (o === null || typeof o === 'string') return JSON.stringify(o);
  return `{${Object.entries(o).map(([k, v]) => `${JSON.stringify(k)}: ${qemuJson(v)}`).join(', ')}}`;
}

/**
 * The names nodes show (`file`, image `filename`, their overlays' `backing_file`), for one reply:
 * memoised, as a chain's names depend on the names below (one walk per node, not per chain).
 */
export function shownNames(graph: BlockGraph): (n: BlockNode) => string {
  const memo = new Map<BlockNode, string>();
  /** Whether the backing below `n` is not the one its header names (bdrv_backing_overridden). */
  const overridden = (n: FormatNode): boolean => (n.backing ? n.autoBacking !== shown(n.backing) : n.autoBacking !== '');
  /** A node's full open options (bs->full_open_options), members in the order QEMU prints them. */
  const options = (n: BlockNode): Opts => {
    if (n.kind === 'filter') return { driver: n.drv, file: options(n.child) };
    if (n.kind === 'file') return { driver: 'file', filename: n.filename };
    const file = n.fileNode === null ? undefined : graph.nodes.get(n.fileNode);
    const fileOpts = file ? options(file) : { driver: 'file', filename: n.filename };
    // The backing child is named only when overridden; `null` forces no backing.
    if (!overridden(n)) return { driver: n.format, file: fileOpts };
    return { backing: n.backing ? options(n.backing) : null, driver: n.format, file: fileOpts };
  };
  const shown = (n: BlockNode): string => {
    let s = memo.get(n);
    // A job's filter shows the name of the node it filters (mirror_top, commit_top and
    // copy-before-write take their child's, an implicit node its child's), except a named
    // copy-on-read filter: its options (QEMU's json: pseudo-filename).
    if (n.kind === 'filter') return n.implicit || n.drv !== 'copy-on-read' ? shown(n.child) : `json:${qemuJson(options(n))}`;
    if (s === undefined) {
      s = n.kind === 'file' || !overridden(n) ? n.filename : `json:${qemuJson(options(n))}`;
      memo.set(n, s);
    }
    return s;
  };
  return shown;
}
