/**
 * Fuzzer: a minimal, independent qcow2 walker that locates the structures worth mutating in an
 * image held in memory (header fields, header extensions, L1/L2 entries, refcount table and blocks,
 * snapshot table entries and their L1 tables, the bitmap directory and bitmap tables). It reads
 * only what lies inside the buffer and never trusts a field beyond that, so it can also describe
 * an already-mutated image. Offsets are byte positions in the file (docs/interop/qcow2.txt).
 */

/** One integer field somewhere in the file (big-endian). */
export interface Field {
  name: string;
  off: number;
  width: 1 | 2 | 4 | 8;
}

export interface Extension {
  /** Offset of the 4-byte type; the length follows, then the data. */
  off: number;
  type: number;
  len: number;
}

export interface SnapshotEntry {
  off: number;
  /** Offsets of the fixed fields of this entry. */
  fields: Field[];
  extraOff: number;
  extraLen: number;
  l1Off: number;
  l1Size: number;
}

export interface BitmapEntry {
  off: number;
  fields: Field[];
  tableOff: number;
  tableSize: number;
}

export interface Layout {
  size: number;
  version: number;
  clusterBits: number;
  clusterSize: number;
  extendedL2: boolean;
  refcountOrder: number;
  headerLength: number;
  header: Field[];
  extensions: Extension[];
  /** Where the extension area ends (first byte past the end marker, or the cluster end). */
  extEnd: number;
  backingNameOff: number;
  backingNameLen: number;
  l1Off: number;
  l1Size: number;
  /** File offsets of L2 tables referenced by the active L1 (inside the file). */
  l2Tables: number[];
  reftableOff: number;
  reftableEntries: number;
  refblocks: number[];
  snapshots: SnapshotEntry[];
  bitmapDirOff: number;
  bitmapDirSize: number;
  bitmaps: BitmapEntry[];
  /** Cluster-aligned file offsets of every metadata cluster found. */
  metaClusters: number[];
}

export const HEADER_FIELDS: Field[] = [
  { name: 'magic', off: 0, width: 4 },
  { name: 'version', off: 4, width: 4 },
  { name: 'backing_file_offset', off: 8, width: 8 },
  { name: 'backing_file_size', off: 16, width: 4 },
  { name: 'cluster_bits', off: 20, width: 4 },
  { name: 'size', off: 24, width: 8 },
  { name: 'crypt_method', off: 32, width: 4 },
  { name: 'l1_size', off: 36, width: 4 },
  { name: 'l1_table_offset', off: 40, width: 8 },
  { name: 'refcount_table_offset', off: 48, width: 8 },
  { name: 'refcount_table_clusters', off: 56, width: 4 },
  { name: 'nb_snapshots', off: 60, width: 4 },
  { name: 'snapshots_offset', off: 64, width: 8 },
  { name: 'incompatible_features', off: 72, width: 8 },
  { name: 'compatible_features', off: 80, width: 8 },
  { name: 'autoclear_features', off: 88, width: 8 },
  { name: 'refcount_order', off: 96, width: 4 },
  { name: 'header_length', off: 100, width: 4 },
  { name: 'compression_type', off: 104, width: 1 },
];

export const EXT_TYPES = {
  backingFormat: 0xe2792aca,
  featureTable: 0x6803f857,
  bitmaps: 0x23852875,
  crypto: 0x0537be77,
  dataFile: 0x44415441,
} as const;

const OFFSET_MASK = 0x00fffffffffffe00n;

function u32(b: Buffer, off: number): number {
  return off + 4 <= b.length ? b.readUInt32BE(off) : 0;
}

function u64(b: Buffer, off: number): bigint {
  return off + 8 <= b.length ? b.readBigUInt64BE(off) : 0n;
}

/** A bigint file offset as a number, or -1 when it cannot be a position inside `b`. */
function inFile(b: Buffer, v: bigint, len = 1): number {
  if (v <= 0n || v + BigInt(len) > BigInt(b.length)) return -1;
  return Number(v);
}

export function parseLayout(b: Buffer): Layout {
  const version = u32(b, 4);
  const clusterBits = Math.min(Math.max(u32(b, 20), 9), 21);
  const clusterSize = 2 ** clusterBits;
  const incompat = u64(b, 72);
  const headerLength = version >= 3 ? u32(b, 100) : 72;
  const refcountOrder = version >= 3 ? u32(b, 96) : 4;
  const header = HEADER_FIELDS.filter((f) => version >= 3 || f.off < 72);
  const L: Layout = {
    size: b.length, version, clusterBits, clusterSize, extendedL2: (incompat & 16n) !== 0n,
    refcountOrder, headerLength, header, extensions: [], extEnd: 0,
    backingNameOff: Number(u64(b, 8) & 0xffffffffn), backingNameLen: u32(b, 16),
    l1Off: -1, l1Size: 0, l2Tables: [], reftableOff: -1, reftableEntries: 0, refblocks: [],
    snapshots: [], bitmapDirOff: -1, bitmapDirSize: 0, bitmaps: [], metaClusters: [0],
  };
  const meta = new Set<number>([0]);
  const addMeta = (off: number, len: number): void => {
    if (off < 0) return;
    for (let c = Math.floor(off / clusterSize) * clusterSize; c < off + len && c < b.length; c += clusterSize) meta.add(c);
  };

  // Header extensions: from the end of the header to the end marker, inside the first cluster.
  let p = Math.min(Math.max(headerLength, 72), clusterSize);
  const extLimit = Math.min(clusterSize, b.length);
  while (p + 8 <= extLimit && L.extensions.length < 64) {
    const type = u32(b, p);
    const len = u32(b, p + 4);
    if (type === 0) { p += 8; break; }
    L.extensions.push({ off: p, type, len });
    p += 8 + Math.ceil(len / 8) * 8;
  }
  L.extEnd = Math.min(p, extLimit);

  // Active L1 and the L2 tables it references.
  const l1Size = u32(b, 36);
  const l1Off = inFile(b, u64(b, 40));
  if (l1Off >= 0) {
    L.l1Off = l1Off;
    L.l1Size = Math.min(l1Size, Math.floor((b.length - l1Off) / 8));
    addMeta(l1Off, L.l1Size * 8);
    for (let i = 0; i < L.l1Size && L.l2Tables.length < 4096; i++) {
      const l2 = inFile(b, u64(b, l1Off + 8 * i) & OFFSET_MASK, clusterSize);
      if (l2 >= 0) { L.l2Tables.push(l2); addMeta(l2, clusterSize); }
    }
  }

  // Refcount table and blocks.
  const rtOff = inFile(b, u64(b, 48));
  if (rtOff >= 0) {
    L.reftableOff = rtOff;
    L.reftableEntries = Math.min(u32(b, 56) * clusterSize / 8, Math.floor((b.length - rtOff) / 8));
    addMeta(rtOff, L.reftableEntries * 8);
    for (let i = 0; i < L.reftableEntries && L.refblocks.length < 4096; i++) {
      const rb = inFile(b, u64(b, rtOff + 8 * i) & ~0x1ffn, clusterSize);
      if (rb >= 0) { L.refblocks.push(rb); addMeta(rb, clusterSize); }
    }
  }

  // Snapshot table.
  const nbSnap = u32(b, 60);
  let sp = inFile(b, u64(b, 64));
  for (let i = 0; sp >= 0 && i < Math.min(nbSnap, 256) && sp + 40 <= b.length; i++) {
    const idLen = b.readUInt16BE(sp + 12);
    const nameLen = b.readUInt16BE(sp + 14);
    const extraLen = u32(b, sp + 36);
    const fields: Field[] = [
      { name: 'l1_table_offset', off: sp, width: 8 },
      { name: 'l1_size', off: sp + 8, width: 4 },
      { name: 'id_str_size', off: sp + 12, width: 2 },
      { name: 'name_size', off: sp + 14, width: 2 },
      { name: 'date_sec', off: sp + 16, width: 4 },
      { name: 'date_nsec', off: sp + 20, width: 4 },
      { name: 'vm_clock_nsec', off: sp + 24, width: 8 },
      { name: 'vm_state_size', off: sp + 32, width: 4 },
      { name: 'extra_data_size', off: sp + 36, width: 4 },
    ];
    if (extraLen >= 8) fields.push({ name: 'vm_state_size_large', off: sp + 40, width: 8 });
    if (extraLen >= 16) fields.push({ name: 'disk_size', off: sp + 48, width: 8 });
    if (extraLen >= 24) fields.push({ name: 'icount', off: sp + 56, width: 8 });
    const sl1 = inFile(b, u64(b, sp));
    const sl1Size = sl1 >= 0 ? Math.min(u32(b, sp + 8), Math.floor((b.length - sl1) / 8)) : 0;
    L.snapshots.push({ off: sp, fields, extraOff: sp + 40, extraLen, l1Off: sl1, l1Size: sl1Size });
    addMeta(sp, 40 + extraLen + idLen + nameLen);
    addMeta(sl1, sl1Size * 8);
    sp += Math.ceil((40 + extraLen + idLen + nameLen) / 8) * 8;
  }

  // Bitmap directory (from the bitmaps extension) and bitmap tables.
  const bext = L.extensions.find((e) => e.type === EXT_TYPES.bitmaps);
  if (bext && bext.len >= 24) {
    const nb = u32(b, bext.off + 8);
    const dirSize = Number(u64(b, bext.off + 16) & 0xffffffffn);
    const dirOff = inFile(b, u64(b, bext.off + 24));
    if (dirOff >= 0) {
      L.bitmapDirOff = dirOff;
      L.bitmapDirSize = Math.min(dirSize, b.length - dirOff);
      addMeta(dirOff, L.bitmapDirSize);
      let q = dirOff;
      for (let i = 0; i < Math.min(nb, 64) && q + 24 <= b.length && q < dirOff + L.bitmapDirSize; i++) {
        const tableOff = inFile(b, u64(b, q));
        const tableSize = u32(b, q + 8);
        const nameLen = b.readUInt16BE(q + 18);
        const extra = u32(b, q + 20);
        L.bitmaps.push({
          off: q, tableOff, tableSize,
          fields: [
            { name: 'bitmap_table_offset', off: q, width: 8 },
            { name: 'bitmap_table_size', off: q + 8, width: 4 },
            { name: 'flags', off: q + 12, width: 4 },
            { name: 'type', off: q + 16, width: 1 },
            { name: 'granularity_bits', off: q + 17, width: 1 },
            { name: 'name_size', off: q + 18, width: 2 },
            { name: 'extra_data_size', off: q + 20, width: 4 },
          ],
        });
        if (tableOff >= 0) addMeta(tableOff, Math.min(tableSize * 8, b.length - tableOff));
        q += Math.ceil((24 + extra + nameLen) / 8) * 8;
      }
    }
  }
  L.metaClusters = [...meta].sort((x, y) => x - y);
  return L;
}
