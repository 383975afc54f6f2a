/**
 * Fuzzer: seeded structure-aware mutations of a qcow2 image held in memory. Each mutator picks a
 * structure located by fuzz-layout (a header field, an extension, an L1/L2/refcount/snapshot/bitmap
 * entry, metadata bytes) and a hostile value for it (boundaries, off-by-one, huge, random, offsets
 * of other metadata, unaligned, past EOF). Every change is recorded as a byte patch, so a failing
 * case is printed as a self-contained recipe (see fuzz-regressions.ts) that does not depend on
 * this generator staying the same.
 */
import { parseLayout, EXT_TYPES, type Field, type Layout } from './fuzz-layout.js';
import { rng } from './qemu.js';

/** One byte-level change: write `hex` at `off`, or cut/extend the file to `truncate` bytes. */
export type Patch = { off: number; hex: string } | { truncate: number };

export class Rand {
  private readonly r: () => number;
  constructor(seed: number) { this.r = rng(seed); }
  next(): number { return this.r(); }
  int(lo: number, hi: number): number { return lo + Math.floor(this.r() * (hi - lo + 1)); }
  chance(p: number): boolean { return this.r() < p; }
  pick<T>(a: readonly T[]): T { return a[Math.floor(this.r() * a.length)]; }
  bits(n: number): bigint {
    let v = 0n;
    for (let i = 0; i < n; i += 16) v = (v << 16n) | BigInt(this.int(0, 0xffff));
    return v & ((1n << BigInt(n)) - 1n);
  }
}

/** An image buffer that records each change it receives. */
export class Image {
  patches: Patch[] = [];
  notes: string[] = [];
  constructor(public buf: Buffer) {}

  write(off: number, data: Buffer): void {
    // Patches stay inside the file (truncate() is what changes its length).
    if (off < 0 || off >= this.buf.length) return;
    data = data.subarray(0, this.buf.length - off);
    data.copy(this.buf, off);
    this.patches.push({ off, hex: data.toString('hex') });
  }

  setInt(off: number, width: number, v: bigint): void {
    const b = Buffer.alloc(width);
    const masked = v & ((1n << BigInt(8 * width)) - 1n);
    for (let i = 0; i < width; i++) b[i] = Number((masked >> BigInt(8 * (width - 1 - i))) & 0xffn);
    this.write(off, b);
  }

  getInt(off: number, width: number): bigint {
    let v = 0n;
    for (let i = 0; i < width; i++) v = (v << 8n) | BigInt(off + i < this.buf.length ? this.buf[off + i] : 0);
    return v;
  }

  truncate(len: number): void {
    const b = Buffer.alloc(len);
    this.buf.copy(b, 0, 0, Math.min(len, this.buf.length));
    this.buf = b;
    this.patches.push({ truncate: len });
  }
}

export function applyPatches(buf: Buffer, patches: readonly Patch[]): Buffer {
  const img = new Image(Buffer.from(buf));
  for (const p of patches) {
    if ('truncate' in p) img.truncate(p.truncate);
    else img.write(p.off, Buffer.from(p.hex, 'hex'));
  }
  return img.buf;
}

/** A hostile value for an integer of `width` bytes whose current value is `v`. */
function hostile(R: Rand, L: Layout, width: number, v: bigint, offsetLike = false): bigint {
  const bits = BigInt(8 * width);
  const max = (1n << bits) - 1n;
  const cs = BigInt(L.clusterSize);
  const eof = BigInt(L.size);
  const cands: (() => bigint)[] = [
    () => 0n, () => 1n, () => max, () => max - 1n, () => 1n << (bits - 1n), () => (1n << (bits - 1n)) - 1n,
    () => v + 1n, () => v - 1n, () => v ^ (1n << BigInt(R.int(0, Number(bits) - 1))), () => R.bits(Number(bits)),
    () => v * 2n, () => v + cs, () => v - cs, () => 1n << BigInt(R.int(0, Number(bits) - 1)),
    () => (1n << BigInt(R.int(1, Number(bits) - 1))) - 1n, () => BigInt(R.int(0, 70000)),
  ];
  if (width === 8) cands.push(() => 1n << 62n, () => 1n << 56n, () => 0x00fffffffffffe00n, () => (1n << 55n) + cs);
  if (offsetLike || width >= 4) {
    const metas = L.metaClusters.map(BigInt);
    cands.push(
      () => eof, () => eof + cs, () => (eof / cs) * cs, () => eof - 8n, () => R.pick(metas),
      () => R.pick(metas) + 8n, () => v + 512n, () => v + 8n, () => BigInt(L.l1Off), () => BigInt(L.reftableOff),
      () => (BigInt(R.int(0, 1 << 20)) * cs),
    );
  }
  return R.pick(cands)() & max;
}

type Mutator = (R: Rand, img: Image, L: Layout) => void;

function mutateField(R: Rand, img: Image, L: Layout, f: Field, what: string, offsetLike = false): void {
  const v = img.getInt(f.off, f.width);
  const nv = hostile(R, L, f.width, v, offsetLike);
  img.setInt(f.off, f.width, nv);
  img.notes.push(`${what}.${f.name} 0x${v.toString(16)} -> 0x${nv.toString(16)}`);
}

const SMALL_HEADER: Record<string, number[]> = {
  version: [0, 1, 2, 3, 4, 0xffffffff],
  cluster_bits: [0, 8, 9, 12, 16, 20, 21, 22, 31, 32, 63, 64, 255],
  refcount_order: [0, 1, 3, 4, 6, 7, 8, 31, 64],
  header_length: [0, 72, 96, 100, 104, 105, 112, 120, 4096, 65536],
  compression_type: [0, 1, 2, 255],
  crypt_method: [0, 1, 2, 3],
};

const header: Mutator = (R, img, L) => {
  const f = R.pick(L.header);
  const small = SMALL_HEADER[f.name];
  if (small && R.chance(0.5)) {
    const v = img.getInt(f.off, f.width);
    const nv = BigInt(R.pick(small));
    img.setInt(f.off, f.width, nv);
    img.notes.push(`header.${f.name} 0x${v.toString(16)} -> 0x${nv.toString(16)}`);
    return;
  }
  if (f.name.endsWith('features') && R.chance(0.6)) {
    const v = img.getInt(f.off, 8);
    const nv = v ^ (1n << BigInt(R.chance(0.7) ? R.int(0, 5) : R.int(0, 63)));
    img.setInt(f.off, 8, nv);
    img.notes.push(`header.${f.name} 0x${v.toString(16)} -> 0x${nv.toString(16)}`);
    return;
  }
  mutateField(R, img, L, f, 'header', f.name.includes('offset'));
};

/** A freshly made extension body of `type` (plausible but hostile contents). */
function extBody(R: Rand, L: Layout, type: number): Buffer {
  switch (type) {
    case EXT_TYPES.backingFormat: return Buffer.from(R.pick(['qcow2', 'raw', 'vmdk', '', 'qcow2\0x', 'q'.repeat(R.int(1, 300))]));
    case EXT_TYPES.featureTable: {
      const n = R.int(0, 8);
      const b = Buffer.alloc(48 * n);
      for (let i = 0; i < n; i++) {
        b[48 * i] = R.int(0, 3);
        b[48 * i + 1] = R.pick([0, 1, 2, 3, 4, 63, 64, 255]);
        b.write(R.chance(0.5) ? 'x'.repeat(46) : `feat${i}`, 48 * i + 2, 'latin1');
      }
      return b;
    }
    case EXT_TYPES.bitmaps: {
      const b = Buffer.alloc(24);
      b.writeUInt32BE(R.pick([0, 1, 2, 65535, 65536, 0xffffffff]), 0);
      b.writeBigUInt64BE(BigInt(R.pick([0, 24, 32, 64, 1 << 16, 64 << 20])), 8);
      b.writeBigUInt64BE(BigInt(R.pick(L.metaClusters.concat([L.size, L.size + L.clusterSize, 8]))), 16);
      return b;
    }
    case EXT_TYPES.crypto: {
      const b = Buffer.alloc(16);
      b.writeBigUInt64BE(BigInt(R.pick([0, L.clusterSize, L.size])), 0);
      b.writeBigUInt64BE(BigInt(R.pick([0, 1, 1 << 20])), 8);
      return b;
    }
    case EXT_TYPES.dataFile: return Buffer.from(R.pick(['data.raw', '', '/dev/null', 'a.qcow2']));
    default: {
      const b = Buffer.alloc(R.int(0, 64));
      for (let i = 0; i < b.length; i++) b[i] = R.int(0, 255);
      return b;
    }
  }
}

const ALL_EXT = Object.values(EXT_TYPES) as number[];

const extension: Mutator = (R, img, L) => {
  const exts = L.extensions;
  const k = R.int(0, 5);
  if (exts.length === 0 || k === 0) {
    // Append an extension where the end marker was (keeping a new end marker if it fits).
    const type = R.chance(0.8) ? R.pick(ALL_EXT) : R.int(0, 0xffffffff);
    const body = extBody(R, L, type);
    const at = Math.max(L.extEnd - 8, L.version >= 3 ? L.headerLength : 72);
    const rec = Buffer.alloc(8 + Math.ceil(body.length / 8) * 8 + 8);
    rec.writeUInt32BE(type, 0);
    rec.writeUInt32BE(R.chance(0.8) ? body.length : R.pick([0, body.length + 1, 0xffffffff, L.clusterSize]), 4);
    body.copy(rec, 8);
    if (at + rec.length > L.clusterSize) return;
    img.write(at, rec);
    img.notes.push(`ext add 0x${type.toString(16)} len ${body.length} at ${at}`);
    return;
  }
  const e = R.pick(exts);
  if (k === 1) {
    const nv = Number(hostile(R, L, 4, BigInt(e.len)));
    img.setInt(e.off + 4, 4, BigInt(nv));
    img.notes.push(`ext 0x${e.type.toString(16)} len ${e.len} -> ${nv}`);
  } else if (k === 2) {
    const nv = R.chance(0.6) ? R.pick(ALL_EXT.concat([0])) : R.int(0, 0xffffffff);
    img.setInt(e.off, 4, BigInt(nv));
    img.notes.push(`ext 0x${e.type.toString(16)} type -> 0x${nv.toString(16)}`);
  } else if (k === 3 && e.type === EXT_TYPES.bitmaps && e.len >= 24) {
    const f = R.pick<Field>([
      { name: 'nb_bitmaps', off: e.off + 8, width: 4 }, { name: 'reserved', off: e.off + 12, width: 4 },
      { name: 'bitmap_directory_size', off: e.off + 16, width: 8 }, { name: 'bitmap_directory_offset', off: e.off + 24, width: 8 },
    ]);
    mutateField(R, img, L, f, 'bitmaps_ext', f.name.includes('offset'));
  } else {
    // Replace the contents (fresh body of the same or another type, or random bytes in place).
    if (e.len > 0 && R.chance(0.5)) {
      const n = R.int(1, Math.min(8, e.len));
      for (let i = 0; i < n; i++) {
        const at = e.off + 8 + R.int(0, e.len - 1);
        img.write(at, Buffer.from([R.int(0, 255)]));
      }
      img.notes.push(`ext 0x${e.type.toString(16)} ${n} random bytes`);
    } else {
      const body = extBody(R, L, e.type);
      const room = Math.min(L.clusterSize, L.size) - (e.off + 8);
      if (body.length > room) return;
      img.setInt(e.off + 4, 4, BigInt(body.length));
      img.write(e.off + 8, body);
      img.notes.push(`ext 0x${e.type.toString(16)} body replaced (${body.length} bytes)`);
    }
  }
};

const backingName: Mutator = (R, img, L) => {
  if (L.backingNameOff <= 0 || L.backingNameLen === 0) return header(R, img, L);
  const n = R.int(1, 4);
  for (let i = 0; i < n; i++) {
    const at = L.backingNameOff + R.int(0, L.backingNameLen - 1);
    img.write(at, Buffer.from([R.pick([0, 0x2f, 0x2e, R.int(0, 255)])]));
  }
  img.notes.push(`backing name: ${n} bytes changed`);
};

const L1_FLAGS = [1n << 63n, 1n << 62n, 1n << 56n, 1n, 0x100n, 0x1ffn];

function entryValue(R: Rand, img: Image, L: Layout, v: bigint, offMask: bigint): bigint {
  switch (R.int(0, 4)) {
    case 0: return v ^ R.pick(L1_FLAGS);
    case 1: return (v & ~offMask) | (hostile(R, L, 8, v & offMask, true) & offMask);
    case 2: return (v & ~offMask) | ((v & offMask) + BigInt(R.pick([8, 512, L.clusterSize, -L.clusterSize])));
    case 3: return hostile(R, L, 8, v, true);
    default: return (v & (1n << 63n)) | BigInt(R.pick(L.metaClusters));
  }
}

const OFF_MASK = 0x00fffffffffffe00n;

const l1Entry: Mutator = (R, img, L) => {
  if (L.l1Off < 0 || L.l1Size === 0) return header(R, img, L);
  const used: number[] = [];
  for (let i = 0; i < L.l1Size; i++) if (img.getInt(L.l1Off + 8 * i, 8) !== 0n) used.push(i);
  const i = used.length && R.chance(0.8) ? R.pick(used) : R.int(0, L.l1Size - 1);
  const at = L.l1Off + 8 * i;
  const v = img.getInt(at, 8);
  const nv = entryValue(R, img, L, v, OFF_MASK);
  img.setInt(at, 8, nv);
  img.notes.push(`L1[${i}] 0x${v.toString(16)} -> 0x${nv.toString(16)}`);
};

const l2Entry: Mutator = (R, img, L) => {
  if (L.l2Tables.length === 0) return l1Entry(R, img, L);
  const t = R.pick(L.l2Tables);
  const esz = L.extendedL2 ? 16 : 8;
  const n = L.clusterSize / esz;
  const used: number[] = [];
  for (let i = 0; i < n; i++) if (img.getInt(t + esz * i, 8) !== 0n || (esz === 16 && img.getInt(t + esz * i + 8, 8) !== 0n)) used.push(i);
  const i = used.length && R.chance(0.85) ? R.pick(used) : R.int(0, n - 1);
  const at = t + esz * i;
  const v = img.getInt(at, 8);
  const compressed = (v & (1n << 62n)) !== 0n;
  let nv: bigint;
  const k = R.int(0, 6);
  if (esz === 16 && k <= 1) {
    // Subcluster bitmap: allocation bits (low 32) and zero bits (high 32), possibly overlapping.
    const bm = img.getInt(at + 8, 8);
    const nb = R.pick([bm ^ (1n << BigInt(R.int(0, 63))), 0xffffffffffffffffn, 0xffffffffn, 0xffffffff00000000n, R.bits(64), bm | (bm << 32n), 0n]);
    img.setInt(at + 8, 8, nb);
    img.notes.push(`L2@${t}[${i}] bitmap 0x${bm.toString(16)} -> 0x${nb.toString(16)}`);
    return;
  }
  if (k === 2 || (compressed && k <= 4)) {
    // Compressed descriptor: x = 62 - (cluster_bits - 8) offset bits, then sector count - 1.
    const x = 62n - BigInt(L.clusterBits - 8);
    const offMask = (1n << x) - 1n;
    const host = R.chance(0.5) ? (v & offMask) + BigInt(R.pick([-1, 1, 511, 512, -512])) : hostile(R, L, 8, v & offMask, true);
    const secs = R.chance(0.5) ? (v >> x) & ((1n << (62n - x)) - 1n) : R.bits(Number(62n - x));
    nv = (1n << 62n) | (R.chance(0.1) ? 1n << 63n : 0n) | (secs << x) | (host & offMask);
  } else if (k === 3) {
    nv = v ^ R.pick([1n, 1n << 62n, 1n << 63n, 0x1fen, 1n << 56n]);
  } else {
    nv = entryValue(R, img, L, v, OFF_MASK);
  }
  img.setInt(at, 8, nv);
  img.notes.push(`L2@${t}[${i}] 0x${v.toString(16)} -> 0x${nv.toString(16)}`);
};

const reftable: Mutator = (R, img, L) => {
  if (L.reftableOff < 0 || L.reftableEntries === 0) return header(R, img, L);
  const used: number[] = [];
  for (let i = 0; i < L.reftableEntries; i++) if (img.getInt(L.reftableOff + 8 * i, 8) !== 0n) used.push(i);
  const i = used.length && R.chance(0.8) ? R.pick(used) : R.int(0, L.reftableEntries - 1);
  const at = L.reftableOff + 8 * i;
  const v = img.getInt(at, 8);
  const nv = entryValue(R, img, L, v, 0xfffffffffffffe00n);
  img.setInt(at, 8, nv);
  img.notes.push(`reftable[${i}] 0x${v.toString(16)} -> 0x${nv.toString(16)}`);
};

const refblock: Mutator = (R, img, L) => {
  if (L.refblocks.length === 0) return reftable(R, img, L);
  const rb = R.pick(L.refblocks);
  const bits = 2 ** Math.min(L.refcountOrder, 6);
  const per = (L.clusterSize * 8) / bits;
  const used = Math.min(per, Math.ceil(L.size / L.clusterSize) + 2);
  const i = R.chance(0.8) ? R.int(0, used - 1) : R.int(0, per - 1);
  const max = (1n << BigInt(bits)) - 1n;
  const nv = R.pick([0n, 1n, 2n, max, max - 1n, R.bits(bits)]);
  if (bits >= 8) {
    img.setInt(rb + (i * bits) / 8, bits / 8, nv);
  } else {
    const byteAt = rb + Math.floor((i * bits) / 8);
    const shift = BigInt((i * bits) % 8);
    const old = img.getInt(byteAt, 1);
    img.setInt(byteAt, 1, (old & ~(max << shift)) | ((nv & max) << shift));
  }
  img.notes.push(`refblock@${rb}[${i}] (${bits} bits) -> ${nv}`);
};

const snapshot: Mutator = (R, img, L) => {
  if (L.snapshots.length === 0) return header(R, img, L);
  const s = R.pick(L.snapshots);
  const k = R.int(0, 5);
  if (k <= 2) {
    const f = R.pick(s.fields);
    mutateField(R, img, L, f, 'snapshot', f.name === 'l1_table_offset');
  } else if (k === 3 && s.l1Off >= 0 && s.l1Size > 0) {
    const i = R.int(0, s.l1Size - 1);
    const at = s.l1Off + 8 * i;
    const v = img.getInt(at, 8);
    const nv = entryValue(R, img, L, v, OFF_MASK);
    img.setInt(at, 8, nv);
    img.notes.push(`snapshot L1[${i}] 0x${v.toString(16)} -> 0x${nv.toString(16)}`);
  } else if (k === 4) {
    const f: Field = R.pick([{ name: 'id_str_size', off: s.off + 12, width: 2 }, { name: 'name_size', off: s.off + 14, width: 2 }, { name: 'extra_data_size', off: s.off + 36, width: 4 }]);
    const v = img.getInt(f.off, f.width);
    const nv = BigInt(R.pick([0, 1, 7, 8, 15, 16, 17, 23, 24, 25, 255, 1023, 1024, 1025, 65535])) + (R.chance(0.3) ? v : 0n);
    img.setInt(f.off, f.width, nv);
    img.notes.push(`snapshot.${f.name} 0x${v.toString(16)} -> 0x${nv.toString(16)}`);
  } else {
    const len = 40 + s.extraLen + 16;
    const at = s.off + R.int(0, len - 1);
    img.write(at, Buffer.from([R.int(0, 255)]));
    img.notes.push(`snapshot entry byte @${at}`);
  }
};

const bitmap: Mutator = (R, img, L) => {
  if (L.bitmaps.length === 0) return extension(R, img, L);
  const bm = R.pick(L.bitmaps);
  if (R.chance(0.6)) {
    const f = R.pick(bm.fields);
    if (f.name === 'flags' && R.chance(0.6)) {
      const v = img.getInt(f.off, 4);
      const nv = v ^ BigInt(R.pick([1, 2, 4, 8, 0x80000000]));
      img.setInt(f.off, 4, nv);
      img.notes.push(`bitmap.flags 0x${v.toString(16)} -> 0x${nv.toString(16)}`);
      return;
    }
    if (f.name === 'granularity_bits' && R.chance(0.6)) {
      const nv = BigInt(R.pick([0, 8, 9, 16, 31, 32, 63, 64, 255]));
      img.setInt(f.off, 1, nv);
      img.notes.push(`bitmap.granularity_bits -> ${nv}`);
      return;
    }
    mutateField(R, img, L, f, 'bitmap', f.name.includes('offset'));
  } else if (bm.tableOff >= 0 && bm.tableSize > 0) {
    const i = R.int(0, Math.min(bm.tableSize, (L.size - bm.tableOff) / 8) - 1);
    const at = bm.tableOff + 8 * i;
    const v = img.getInt(at, 8);
    const nv = R.chance(0.3) ? v ^ 1n : entryValue(R, img, L, v, OFF_MASK);
    img.setInt(at, 8, nv);
    img.notes.push(`bitmap table[${i}] 0x${v.toString(16)} -> 0x${nv.toString(16)}`);
  } else {
    const at = bm.off + R.int(0, 31);
    img.write(at, Buffer.from([R.int(0, 255)]));
    img.notes.push(`bitmap dir byte @${at}`);
  }
};

const byteFlips: Mutator = (R, img, L) => {
  const n = R.int(1, 16);
  for (let i = 0; i < n; i++) {
    const c = R.pick(L.metaClusters);
    const at = c + R.int(0, Math.min(L.clusterSize, L.size - c) - 1);
    const old = img.buf[at] ?? 0;
    img.write(at, Buffer.from([R.chance(0.5) ? old ^ (1 << R.int(0, 7)) : R.int(0, 255)]));
  }
  img.notes.push(`${n} random byte flips in metadata`);
};

const truncation: Mutator = (R, img, L) => {
  const len = R.pick([0, 7, 71, 72, 103, 104, L.clusterSize - 1, L.clusterSize, R.int(0, L.size), L.size - 1, L.size - 512, L.size + 1, L.size + L.clusterSize * R.int(1, 4)]);
  img.truncate(Math.max(0, len));
  img.notes.push(`file length ${L.size} -> ${len}`);
};

const MUTATORS: [Mutator, number][] = [
  [header, 14], [extension, 8], [backingName, 2], [l1Entry, 10], [l2Entry, 16], [reftable, 7], [refblock, 8],
  [snapshot, 8], [bitmap, 7], [byteFlips, 12], [truncation, 3],
];
const TOTAL = MUTATORS.reduce((s, [, w]) => s + w, 0);

/** Apply 1 to 3 seeded mutations to `buf` (re-reading the layout after each). */
export function mutate(buf: Buffer, R: Rand): Image {
  const img = new Image(Buffer.from(buf));
  const n = R.chance(0.6) ? 1 : R.int(2, 3);
  for (let i = 0; i < n; i++) {
    const L = parseLayout(img.buf);
    let x = R.next() * TOTAL;
    const m = MUTATORS.find(([, w]) => (x -= w) < 0)?.[0] ?? header;
    m(R, img, L);
  }
  return img;
}
