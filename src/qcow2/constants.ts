/** On-disk constants of the qcow2 format (docs/interop/qcow2.txt) and the limits QEMU enforces. */
export const QCOW2_MAGIC = 0x514649fb;

export const MIN_CLUSTER_BITS = 9;
export const MAX_CLUSTER_BITS = 21;
export const V2_HEADER_LENGTH = 72;
export const V3_MIN_HEADER_LENGTH = 104;
/** QEMU 7.2 writes the compression_type field plus padding: 112 bytes. */
export const V3_HEADER_LENGTH = 112;

export const MAX_REFTABLE_SIZE = 8 * 1024 * 1024; // QCOW_MAX_REFTABLE_SIZE
export const MAX_L1_SIZE = 32 * 1024 * 1024; // QCOW_MAX_L1_SIZE (bytes)
export const MAX_SNAPSHOTS = 65536;
export const MAX_SNAPSHOTS_SIZE = 64 * 1024 * 1024;
export const MAX_SNAPSHOT_EXTRA_DATA = 1024;
export const MAX_BACKING_FILE_NAME = 1023;
export const MAX_CHAIN_DEPTH = 1000;

// Incompatible feature bits.
export const INCOMPAT_DIRTY = 1 << 0;
export const INCOMPAT_CORRUPT = 1 << 1;
export const INCOMPAT_DATA_FILE = 1 << 2;
export const INCOMPAT_COMPRESSION = 1 << 3;
export const INCOMPAT_EXTL2 = 1 << 4;
export const INCOMPAT_MASK = 0x1f;
// Compatible feature bits.
export const COMPAT_LAZY_REFCOUNTS = 1 << 0;
// Autoclear feature bits.
export const AUTOCLEAR_BITMAPS = 1 << 0;
export const AUTOCLEAR_DATA_FILE_RAW = 1 << 1;

// Header extension types.
export const EXT_END = 0x00000000;
export const EXT_BACKING_FORMAT = 0xe2792aca;
export const EXT_FEATURE_TABLE = 0x6803f857;
export const EXT_BITMAPS = 0x23852875;
export const EXT_CRYPTO = 0x0537be77;
export const EXT_DATA_FILE = 0x44415441;

/** Feature names in the order QEMU writes its feature name table. */
export const FEATURE_TABLE: ReadonlyArray<readonly [type: number, bit: number, name: string]> = [
  [0, 0, 'dirty bit'],
  [0, 1, 'corrupt bit'],
  [0, 2, 'external data file'],
  [0, 3, 'compression type'],
  [0, 4, 'extended L2 entries'],
  [1, 0, 'lazy refcounts'],
  [2, 0, 'bitmaps'],
  [2, 1, 'raw external data'],
];

// L1/L2 entry bits, split into the high and low 32-bit words so the data path never needs BigInt.
/** Bit 63: refcount is exactly one (high word bit 31). */
export const HI_COPIED = 0x80000000;
/** Bit 62: compressed cluster (high word bit 30). */
export const HI_COMPRESSED = 0x40000000;
/** Bits 9..55 of an entry hold a cluster-aligned host offset: high word mask. */
export const HI_OFFSET_MASK = 0x00ffffff;
export const LO_OFFSET_MASK = 0xfffffe00;
/** Bit 0 of a standard L2 entry: reads as zero. */
export const LO_ZERO = 0x1;

export const TWO32 = 0x100000000;
