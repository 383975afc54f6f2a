/**
 * What an NBD export serves: a named view of a chain. The chain is looked up on every request,
 * so an export follows its node when the daemon swaps the active layer (snapshot, pivot).
 */
import type { Chain } from '../chain/chain.js';

export interface DirtyBitmapView {
  /** Dirty runs within [offset, offset+length), in order, as [start, length, dirty]. */
  status(offset: number, length: number): Array<[number, number, boolean]>;
}

export interface NbdExport {
  name: string;
  description?: string;
  writable: boolean;
  /** Pass TRIM down to the image (the node's discard=unmap); otherwise TRIM succeeds and does nothing. */
  discard: boolean;
  /** Offer qemu:allocation-depth. */
  allocationDepth: boolean;
  /** The chain currently behind the export. */
  chain(): Chain;
  /**
   * Called before each request; the returned function after it. Lets the daemon hold new
   * requests and wait for running ones (a drained section around a graph change).
   */
  enter?(): Promise<() => void>;
  /** `enter` without waiting: the leave function, or null when the caller must await `enter`. */
  tryEnter?(): (() => void) | null;
  /** NBD_CMD_CACHE of a range (absent: CACHE succeeds and does nothing). */
  cache?(offset: number, length: number): Promise<void>;
  /** Exported dirty bitmaps by name. */
  bitmaps?: Map<string, DirtyBitmapView>;
}
