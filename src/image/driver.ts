/**
 * The format-driver contract: a driver answers "where does this guest offset live" for its own
 * layer (block status), reads and writes its own data, and allocates. Backing chains are composed
 * above drivers (src/chain), which hand each driver a reader for the layers below it for COW.
 */
import type { Storage } from '../storage/storage.js';

export type ExtentKind = 'data' | 'zero' | 'unallocated';

/** A run of guest bytes with one status in one layer. */
export interface Extent {
  offset: number;
  length: number;
  kind: ExtentKind;
  /** Host offset in the layer's file for data (and preallocated zero) extents, when it is a plain mapping. */
  hostOffset?: number;
  /** Data stored compressed (no plain host offset). */
  compressed?: boolean;
}

/** Reads the guest view of everything below a layer (used for copy-on-write). */
export interface BackingReader {
  readonly size: number;
  read(buf: Buffer, offset: number): Promise<void>;
  /**
   * Whether [offset, offset+length) of the layers below reads as zero by their metadata alone
   * (zero clusters, unallocated down to the bottom, past a shorter backing file's end): what
   * QEMU's qcow2 is_zero() asks before it zeroes a partial cluster whole. Optional: without it
   * a caller must assume data.
   */
  readsZero?(offset: number, length: number): Promise<boolean>;
}

export interface WriteOptions {
  /**
   * Called once the write's host location is decided (its clusters allocated), before its data
   * reaches the file; a caller laying a fresh image out in guest order (convert without -W) may
   * then let the next write allocate while this one's data is still in flight. Not called when
   * the write fails before that point; callers treat completion as placement too.
   */
  onPlaced?: () => void;
  /**
   * Awaited after placement, before the write's data goes to the file (possibly more than once
   * for a write spanning several tables: it must be idempotent); lets a caller bound the data
   * writes in flight without holding up the next write's allocation.
   */
  beforeData?: () => Promise<void>;
  /** Not reported to the image's dirty trackers: a copy-on-read write (QEMU's sets no dirty bit). */
  untracked?: boolean;
}

export interface WriteZeroesOptions {
  /** Deallocate where possible (qemu-io `write -z -u`). */
  mayUnmap?: boolean;
  /** Not reported to the image's dirty trackers (see WriteOptions). */
  untracked?: boolean;
}

/** Options of a resize (qemu-img resize --shrink / --preallocation). */
export interface ResizeOptions {
  shrink?: boolean;
  preallocation?: 'off' | 'metadata' | 'falloc' | 'full';
}

export interface BlockDriver {
  readonly format: 'qcow2' | 'raw' | 'qcow';
  readonly storage: Storage;
  readonly readOnly: boolean;
  /** Guest-visible size in bytes. */
  readonly size: number;
  /** Allocation granularity (qcow2 cluster size, or subcluster size with extended L2; 512 for raw). */
  readonly granularity: number;
  /** Backing file name as stored in the image, and its format. */
  readonly backingFile: string | null;
  readonly backingFormat: string | null;
  /** The reader for the layers below, attached by the chain (null = reads beyond this layer are zero). */
  backing: BackingReader | null;

  /**
   * Whether host bytes [hostOffset, hostOffset+length) of a data run read as zero by the file's
   * own block status, where QEMU asks the file (qcow2 images it treats as metadata-preallocated:
   * holes). Optional: without it data is data.
   */
  hostReadsZero?(hostOffset: number, length: number): Promise<boolean>;
  /** Status of this layer only, covering [offset, offset+length) with maximal runs (may stop early at a bound). */
  blockStatus(offset: number, length: number): Promise<Extent[]>;
  /** Reads guest data of this layer for a range whose extents are 'data' or 'zero' (unallocated reads as zero). */
  readOwn(buf: Buffer, offset: number): Promise<void>;
  /**
   * Synchronous mapping for the read fast path: the one extent of this layer covering all of
   * [offset, offset+length) when that is answerable without I/O (mapping cached, within one
   * cluster, nothing to validate asynchronously); undefined means "take the normal path".
   */
  mapSync?(offset: number, length: number): Extent | undefined;
  write(buf: Buffer, offset: number, opts?: WriteOptions): Promise<void>;
  writeZeroes(offset: number, length: number, opts?: WriteZeroesOptions): Promise<void>;
  discard(offset: number, length: number): Promise<void>;
  flush(): Promise<void>;
  close(): Promise<void>;
  /** Change the guest-visible size (shrinking only with opts.shrink). */
  resize?(size: number, opts?: ResizeOptions): Promise<void>;
}
