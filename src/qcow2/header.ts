/**
 * qcow2 header and header extensions: parsing with QEMU's validation (same limits, same messages)
 * and serialisation in the order QEMU 7.2 writes them, so a rewritten header is byte-identical.
 */
import * as C from './constants.js';
import { ImageError } from '../image/errors.js';
import { parseBitmapsExt } from './bitmap-format.js';

export interface HeaderExtension {
  type: number;
  data: Buffer;
}

export interface Qcow2Header {
  version: 2 | 3;
  backingFileOffset: number;
  backingFileSize: number;
  clusterBits: number;
  size: number;
  cryptMethod: number;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  nbSnapshots: number;
  snapshotsOffset: number;
  /** Feature masks; only the low 32 bits carry defined features, the high words are kept for refusal/preservation. */
  incompatible: bigint;
  compatible: bigint;
  autoclear: bigint;
  refcountOrder: number;
  headerLength: number;
  compressionType: number;
  /** Bytes of the header beyond the fields we know (header_length > 112), preserved on rewrite. */
  unknownFields: Buffer;
  backingFile: string | null;
  backingFormat: string | null;
  /** Bitmaps extension payload, kept byte for byte. */
  bitmapsExt: Buffer | null;
  /** External data file name (refused on open, kept for messages). */
  dataFile: string | null;
  /** Extensions we do not interpret, preserved in order. */
  unknownExtensions: HeaderExtension[];
  /** The feature name table found in the file (names for unknown bits). */
  featureNames: Array<{ type: number; bit: number; name: string }>;
  /**
   * The virtual size is within one L1 entry's reach of 2^64: QEMU's L1 checks pass (its index
   * wraps) and the open fails once the driver has opened ("Could not refresh total sector count").
   */
  sizeTooLarge?: boolean;
}

const u64 = (b: Buffer, o: number): bigint => b.readBigUInt64BE(o);
/** Reads a u64 that must be a safe JS number; values above 2^53 are reported as `tooBig`. */
/**
 * A table QEMU accepts (it ends by INT64_MAX) and qchain can name: below 2^53, or past it (beyond
 * any file: it reads as zeros, writes fail) at an offset a number holds exactly.
 */
function farTableOk(off: bigint, bytes: number): boolean {
  if (off + BigInt(bytes) > (1n << 63n) - 1n) return false;
  return off + BigInt(bytes) <= BigInt(Number.MAX_SAFE_INTEGER) || BigInt(Number(off)) === off;
}


/** How the image is opened (QEMU's open flags that change the header checks). */
export interface HeaderOpenOptions {
  /** BDRV_O_CHECK: opened to be checked (or repaired). */
  check?: boolean;
  /** BDRV_O_RDWR. */
  writable?: boolean;
  /** BDRV_O_NO_IO (info): no data will be read, so encryption keys and data files are not needed. */
  noIo?: boolean;
}

/** Parse and validate the header found in the first cluster (`buf` holds at least 2 MiB or the whole file). */
/** `check`: opened for checking (QEMU's BDRV_O_CHECK): a missing refcount table is left to the check to report. */
export function parseHeader(buf: Buffer, fileSize: number, opts: HeaderOpenOptions = {}): Qcow2Header {
  if (buf.length < C.V2_HEADER_LENGTH || buf.readUInt32BE(0) !== C.QCOW2_MAGIC) {
    throw new ImageError('Image is not in qcow2 format');
  }
  const version = buf.readUInt32BE(4);
  if (version !== 2 && version !== 3) throw new ImageError(`Unsupported qcow2 version ${version}`);
  const clusterBits = buf.readUInt32BE(20);
  if (clusterBits < C.MIN_CLUSTER_BITS || clusterBits > C.MAX_CLUSTER_BITS) {
    throw new ImageError(`Unsupported cluster size: 2^${clusterBits}`);
  }
  const clusterSize = 2 ** clusterBits;
  let incompatible = 0n, compatible = 0n, autoclear = 0n, refcountOrder = 4, headerLength = C.V2_HEADER_LENGTH;
  let compressionType = 0;
  let unknownFields = Buffer.alloc(0);
  if (version === 3) {
    incompatible = u64(buf, 72);
    compatible = u64(buf, 80);
    autoclear = u64(buf, 88);
    refcountOrder = buf.readUInt32BE(96);
    headerLength = buf.readUInt32BE(100);
    if (headerLength < C.V3_MIN_HEADER_LENGTH) throw new ImageError('qcow2 header too short');
    if (headerLength > clusterSize) throw new ImageError('qcow2 header exceeds cluster size');
    if (headerLength > 104) compressionType = buf[104];
    if (headerLength > C.V3_HEADER_LENGTH) unknownFields = Buffer.from(buf.subarray(C.V3_HEADER_LENGTH, headerLength));
  }
  const backingFileOffsetBig = u64(buf, 8);
  if (backingFileOffsetBig > BigInt(clusterSize)) throw new ImageError('Invalid backing file offset');
  const backingFileOffset = Number(backingFileOffsetBig);
  const backingFileSize = buf.readUInt32BE(16);

  const h: Qcow2Header = {
    version, backingFileOffset, backingFileSize, clusterBits,
    size: 0, cryptMethod: buf.readUInt32BE(32), l1Size: buf.readUInt32BE(36),
    l1TableOffset: 0, refcountTableOffset: 0, refcountTableClusters: buf.readUInt32BE(56),
    nbSnapshots: buf.readUInt32BE(60), snapshotsOffset: 0,
    incompatible, compatible, autoclear, refcountOrder, headerLength, compressionType, unknownFields,
    backingFile: null, backingFormat: null, bitmapsExt: null, dataFile: null, unknownExtensions: [], featureNames: [],
  };

  // QEMU's validate_compression_type(), before the feature bits are looked at.
  if (compressionType > 1) throw new ImageError(`qcow2: unknown compression type: ${compressionType}`);
  if (((incompatible & BigInt(C.INCOMPAT_COMPRESSION)) !== 0n)) {
    if (compressionType === 0) throw new ImageError('qcow2: Compression type incompatible feature bit must not be set');
  } else if (compressionType !== 0) {
    throw new ImageError('qcow2: Compression type incompatible feature bit must be set');
  }

  const unknownIncompat = incompatible & ~BigInt(C.INCOMPAT_MASK);
  if (unknownIncompat !== 0n) {
    // QEMU reads the extensions for the feature name table only, ignoring their errors.
    try { readExtensions(buf, h, clusterSize, opts); } catch { /* the names read so far are used */ }
    const names: string[] = [];
    let rest = unknownIncompat;
    for (const f of h.featureNames) {
      if (f.type === 0 && f.bit >= 5 && (unknownIncompat >> BigInt(f.bit)) & 1n) {
        names.push(f.name);
        rest &= ~(1n << BigInt(f.bit));
      }
    }
    if (rest !== 0n) names.push(`Unknown incompatible feature: ${rest.toString(16)}`);
    throw new ImageError(`Unsupported qcow2 feature(s): ${names.join(', ')}`);
  }
  // Corrupt images may be written to only to be repaired (QEMU's BDRV_O_CHECK).
  if (opts.writable && !opts.check && (incompatible & BigInt(C.INCOMPAT_CORRUPT)) !== 0n) {
    throw new ImageError('qcow2: Image is corrupt; cannot be opened read/write');
  }
  // Extended L2: 32 subclusters per cluster, each at least 512 bytes.
  if (((incompatible & BigInt(C.INCOMPAT_EXTL2)) !== 0n) && clusterBits < 14) {
    throw new ImageError(`Unsupported subcluster size: ${clusterSize / 32}`);
  }
  if (refcountOrder > 6) throw new ImageError('Reference count entry width too large; may not exceed 64 bits');

  const rtOff = u64(buf, 48);
  if (h.refcountTableClusters === 0 && !opts.check) throw new ImageError('Image does not contain a reference count table');
  if (h.refcountTableClusters * clusterSize > C.MAX_REFTABLE_SIZE) throw new ImageError('Reference count table too large');
  if (rtOff % BigInt(clusterSize) !== 0n || !farTableOk(rtOff, h.refcountTableClusters * clusterSize)) {
    throw new ImageError('Reference count table offset invalid');
  }
  h.refcountTableOffset = Number(rtOff);

  // Check mode leaves the snapshot table pointer to the check (qcow2_check_read_snapshot_table).
  if (h.nbSnapshots > C.MAX_SNAPSHOTS && !opts.check) throw new ImageError('Snapshot table too large');
  const snOff = u64(buf, 64);
  // QEMU's qcow2_validate_table bound is INT64_MAX; qchain reads tables below 2^53 only, but an
  // empty table's offset is never used, so only QEMU's own bound applies to it.
  const snLimit = h.nbSnapshots === 0 ? (1n << 63n) - 1n : BigInt(Number.MAX_SAFE_INTEGER);
  if ((snOff % BigInt(clusterSize) !== 0n || snOff > snLimit) && !opts.check) throw new ImageError('Snapshot table offset invalid');
  h.snapshotsOffset = Number(snOff);

  if (h.l1Size * 8 > C.MAX_L1_SIZE) throw new ImageError('Active L1 table too large');
  const l1Off = u64(buf, 40);
  if (l1Off % BigInt(clusterSize) !== 0n || !farTableOk(l1Off, h.l1Size * 8)) {
    throw new ImageError('Active L1 table offset invalid');
  }
  h.l1TableOffset = Number(l1Off);
  // Virtual size (QEMU's order: after the tables are validated).
  const sizeBig = u64(buf, 24);
  const l2Bits = clusterBits - 3 - ((incompatible & BigInt(C.INCOMPAT_EXTL2)) !== 0n ? 1 : 0);
  // QEMU's size_to_l1 in 64-bit arithmetic: a size within one L1 entry's reach of 2^64 wraps to
  // a small index; the open then fails later, when the block layer refreshes the sector count.
  const l1Shift = BigInt(clusterBits + l2Bits);
  const l1Index = ((sizeBig + (1n << l1Shift) - 1n) & ((1n << 64n) - 1n)) >> l1Shift;
  if (l1Index > 0x7fffffffn) throw new ImageError('Image is too big');
  if (BigInt(h.l1Size) < l1Index) throw new ImageError('L1 table is too small');
  const wrapped = sizeBig + (1n << l1Shift) - 1n >= 1n << 64n;
  // Guest offsets are exact JavaScript integers (qchain's own limit, 8 PiB).
  if (sizeBig > BigInt(Number.MAX_SAFE_INTEGER) && !wrapped) throw new ImageError('Image is too big');
  h.size = wrapped ? 0 : Number(sizeBig);
  if (wrapped) h.sizeTooLarge = true;

  // qcow2_update_options: the encryption method must be one QEMU knows.
  if (h.cryptMethod > 2) throw new ImageError(`Unsupported encryption method ${h.cryptMethod | 0}`);

  readExtensions(buf, h, clusterSize, opts);

  if (!opts.noIo && (incompatible & BigInt(C.INCOMPAT_DATA_FILE)) !== 0n) {
    throw new ImageError(h.dataFile === null ? "'data-file' is required for this image" : 'External data files are not supported by qchain');
  }
  if (!opts.noIo && (autoclear & BigInt(C.AUTOCLEAR_DATA_FILE_RAW)) !== 0n) throw new ImageError('data-file-raw requires a data file');
  // Encryption: qchain has no keys, so an encrypted image fails where QEMU's open without a
  // key-secret does (the LUKS one on its crypto header extension, read above).
  if (h.cryptMethod !== 0) {
    if (opts.noIo) throw new ImageError('Encrypted images are not supported by qchain');
    if (h.cryptMethod === 1) throw new ImageError(KEY_SECRET);
    throw new ImageError(`Missing CRYPTO header for crypt method ${h.cryptMethod}`);
  }

  if (backingFileOffset !== 0) {
    if (backingFileSize > C.MAX_BACKING_FILE_NAME || backingFileSize > clusterSize - backingFileOffset) {
      throw new ImageError('Backing file name too long');
    }
    const raw = buf.subarray(backingFileOffset, backingFileOffset + backingFileSize);
    const nul = raw.indexOf(0);
    // QEMU treats the name as a C string: it ends at the first NUL byte.
    h.backingFile = raw.toString('utf8', 0, nul < 0 ? raw.length : nul);
  }
  void fileSize;
  return h;
}

const KEY_SECRET = "Parameter 'encrypt.key-secret' is required for cipher";

function readExtensions(buf: Buffer, h: Qcow2Header, clusterSize: number, opts: HeaderOpenOptions): void {
  const end = h.backingFileOffset !== 0 ? h.backingFileOffset : clusterSize;
  let off = h.headerLength;
  const seen = new Set<number>();
  while (off < end) {
    if (off + 8 > end) throw new ImageError('qcow2_read_extension: ERROR: pread fail from offset ' + off);
    const type = buf.readUInt32BE(off);
    const len = buf.readUInt32BE(off + 4);
    off += 8;
    if (type === C.EXT_END) return;
    if (len > end - off) throw new ImageError('Header extension too large');
    const data = Buffer.from(buf.subarray(off, off + len));
    off += Math.ceil(len / 8) * 8;
    if (seen.has(type)) continue;
    seen.add(type);
    switch (type) {
      case C.EXT_BACKING_FORMAT:
        if (len >= 16) throw new ImageError(`ERROR: ext_backing_format: len=${len} too large (>=16)`);
        h.backingFormat = data.toString('utf8', 0, data.indexOf(0) < 0 ? data.length : data.indexOf(0));
        break;
      case C.EXT_FEATURE_TABLE:
        for (let i = 0; i + 48 <= len; i += 48) {
          const nameBytes = data.subarray(i + 2, i + 48);
          const nul = nameBytes.indexOf(0);
          h.featureNames.push({ type: data[i], bit: data[i + 1], name: nameBytes.toString('utf8', 0, nul < 0 ? 46 : nul) });
        }
        break;
      case C.EXT_BITMAPS:
        if (len !== 24) throw new ImageError('bitmaps_ext: Invalid extension length');
        // Its fields are checked only while the autoclear bit says the extension is valid.
        if ((h.autoclear & BigInt(C.AUTOCLEAR_BITMAPS)) !== 0n) parseBitmapsExt(data, clusterSize);
        h.bitmapsExt = data;
        break;
      case C.EXT_DATA_FILE:
        h.dataFile = data.toString('utf8');
        break;
      case C.EXT_CRYPTO:
        if (h.cryptMethod !== 2) throw new ImageError('CRYPTO header extension only expected with LUKS encryption method');
        if (len !== 16) throw new ImageError(`CRYPTO header extension size ${len}, but expected size 16`);
        if (data.readBigUInt64BE(0) % BigInt(clusterSize) !== 0n) {
          throw new ImageError(`Encryption header offset '${data.readBigUInt64BE(0)}' is not a multiple of cluster size '${clusterSize}'`);
        }
        // The LUKS header would be opened here; without a key-secret that fails.
        throw new ImageError(opts.noIo ? 'Encrypted images are not supported by qchain' : KEY_SECRET);
        break;
      default:
        h.unknownExtensions.push({ type, data });
    }
  }
}

function pushExt(parts: Buffer[], type: number, data: Buffer): void {
  const head = Buffer.alloc(8);
  head.writeUInt32BE(type >>> 0, 0);
  head.writeUInt32BE(data.length, 4);
  parts.push(head, data, Buffer.alloc((8 - (data.length % 8)) % 8));
}

/**
 * Serialise the header into one full cluster, exactly as QEMU's qcow2_update_header lays it out:
 * fields, extensions (backing format, data file, feature table, bitmaps, unknown), end marker, backing name.
 * Updates h.headerLength / backingFileOffset / backingFileSize to what was written.
 */
export function serializeHeader(h: Qcow2Header): Buffer {
  const clusterSize = 2 ** h.clusterBits;
  const out = Buffer.alloc(clusterSize);
  const headerLength = h.version === 3 ? C.V3_HEADER_LENGTH + h.unknownFields.length : C.V2_HEADER_LENGTH;
  h.headerLength = headerLength;
  const parts: Buffer[] = [];
  for (const e of h.unknownExtensions) if (e.type === C.EXT_CRYPTO) pushExt(parts, e.type, e.data);
  if (h.backingFormat) pushExt(parts, C.EXT_BACKING_FORMAT, Buffer.from(h.backingFormat, 'utf8'));
  // Only an image with an external data file keeps its name (QEMU's has_data_file()).
  if (h.dataFile && (h.incompatible & BigInt(C.INCOMPAT_DATA_FILE)) !== 0n) pushExt(parts, C.EXT_DATA_FILE, Buffer.from(h.dataFile, 'utf8'));
  // QEMU 7.2 writes the feature name table only for clusters of 8 KiB and more (observed).
  if (h.version === 3 && clusterSize >= 8192) {
    const ft = Buffer.alloc(48 * C.FEATURE_TABLE.length);
    C.FEATURE_TABLE.forEach(([type, bit, name], i) => {
      ft[i * 48] = type;
      ft[i * 48 + 1] = bit;
      ft.write(name, i * 48 + 2, 'utf8');
    });
    pushExt(parts, C.EXT_FEATURE_TABLE, ft);
  }
  // Present only while valid: a read-write open drops an extension whose autoclear bit is off.
  if (h.bitmapsExt) pushExt(parts, C.EXT_BITMAPS, h.bitmapsExt);
  for (const e of h.unknownExtensions) if (e.type !== C.EXT_CRYPTO) pushExt(parts, e.type, e.data);
  parts.push(Buffer.alloc(8)); // end marker
  const exts = Buffer.concat(parts);
  let off = headerLength;
  if (off + exts.length > clusterSize) throw new ImageError('Header extensions do not fit in the first cluster');
  exts.copy(out, off);
  off += exts.length;
  if (h.backingFile) {
    const name = Buffer.from(h.backingFile, 'utf8');
    if (off + name.length > clusterSize) throw new ImageError('Backing file name too long');
    name.copy(out, off);
    h.backingFileOffset = off;
    h.backingFileSize = name.length;
  } else {
    h.backingFileOffset = 0;
    h.backingFileSize = 0;
  }
  out.writeUInt32BE(C.QCOW2_MAGIC, 0);
  out.writeUInt32BE(h.version, 4);
  out.writeBigUInt64BE(BigInt(h.backingFileOffset), 8);
  out.writeUInt32BE(h.backingFileSize, 16);
  out.writeUInt32BE(h.clusterBits, 20);
  out.writeBigUInt64BE(BigInt(Math.floor(h.size / 512) * 512), 24); // QEMU writes total_sectors * 512
  out.writeUInt32BE(h.cryptMethod, 32);
  out.writeUInt32BE(h.l1Size, 36);
  out.writeBigUInt64BE(BigInt(h.l1TableOffset), 40);
  out.writeBigUInt64BE(BigInt(h.refcountTableOffset), 48);
  out.writeUInt32BE(h.refcountTableClusters, 56);
  out.writeUInt32BE(h.nbSnapshots, 60);
  out.writeBigUInt64BE(BigInt(h.snapshotsOffset), 64);
  if (h.version === 3) {
    out.writeBigUInt64BE(h.incompatible, 72);
    out.writeBigUInt64BE(h.compatible, 80);
    out.writeBigUInt64BE(h.autoclear, 88);
    out.writeUInt32BE(h.refcountOrder, 96);
    out.writeUInt32BE(headerLength, 100);
    out[104] = h.compressionType;
    h.unknownFields.copy(out, C.V3_HEADER_LENGTH);
  }
  return out;
}
