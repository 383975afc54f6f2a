/**
 * Creating qcow2 images with the layout qemu-img 7.2 produces: header in cluster 0, refcount
 * table in cluster 1, first refcount block in cluster 2, L1 table next (exactly l1_size*8 bytes
 * written), then optional preallocation.
 */
import type { Storage } from '../storage/storage.js';
import { ImageError } from '../image/errors.js';
import * as C from './constants.js';
import { serializeHeader, type Qcow2Header } from './header.js';
import { Qcow2Image } from './image.js';

export type Preallocation = 'off' | 'metadata' | 'falloc' | 'full';

export interface Qcow2CreateOptions {
  size: number;
  clusterSize?: number;
  /** 2 (compat 0.10) or 3 (compat 1.1, default). */
  version?: 2 | 3;
  refcountBits?: number;
  lazyRefcounts?: boolean;
  extendedL2?: boolean;
  compressionType?: 'zlib' | 'zstd';
  backingFile?: string | null;
  backingFormat?: string | null;
  preallocation?: Preallocation;
}

/** Validates options the way qemu-img does (same messages). Returns normalised values. */
export function validateCreateOptions(o: Qcow2CreateOptions): Required<Omit<Qcow2CreateOptions, 'backingFile' | 'backingFormat'>> & { backingFile: string | null; backingFormat: string | null } {
  // The checks and their order are qcow2_co_create's (QEMU 7.2): the first failing one is reported.
  const clusterSize = o.clusterSize ?? 65536;
  const version = o.version ?? 3;
  if (o.extendedL2 && version < 3) {
    throw new ImageError('Extended L2 entries are only supported with compatibility level 1.1 and above (use version=v3 or greater)');
  }
  const bits = Math.log2(clusterSize);
  if (!Number.isInteger(bits) || bits < C.MIN_CLUSTER_BITS || bits > C.MAX_CLUSTER_BITS) {
    throw new ImageError('Cluster size must be a power of two between 512 and 2048k');
  }
  if (o.extendedL2 && clusterSize < 16384) throw new ImageError('Extended L2 entries are only supported with cluster sizes of at least 16384 bytes');
  if (o.backingFile && (o.preallocation ?? 'off') !== 'off' && !o.extendedL2) {
    throw new ImageError('Backing file and preallocation can only be used at the same time if extended_l2 is on');
  }
  if (o.backingFormat && !o.backingFile) throw new ImageError('Backing format cannot be used without backing file');
  if (version < 3 && o.lazyRefcounts) {
    throw new ImageError('Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)');
  }
  const refcountBits = o.refcountBits ?? 16;
  if (!Number.isInteger(Math.log2(refcountBits)) || refcountBits > 64 || refcountBits < 1) {
    throw new ImageError('Refcount width must be a power of two and may not exceed 64 bits');
  }
  if (version < 3 && refcountBits !== 16) {
    throw new ImageError('Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)');
  }
  const compressionType = o.compressionType ?? 'zlib';
  if (compressionType !== 'zlib' && version < 3) {
    throw new ImageError('Non-zlib compression type is only supported with compatibility level 1.1 and above (use version=v3 or greater)');
  }
  if (o.backingFile && !o.backingFormat) throw new ImageError('Backing file specified without backing format');
  if (o.size < 0) throw new ImageError('Invalid image size specified');
  const l2Entries = clusterSize / (o.extendedL2 ? 16 : 8);
  const l1Size = Math.ceil(o.size / (clusterSize * l2Entries));
  if (l1Size * 8 > C.MAX_L1_SIZE) throw new ImageError("The image size is too large for file format 'qcow2' (try using a larger cluster size)");
  // Guest offsets are exact JavaScript integers: qchain's own limit, below QEMU's (2^61 with 2 MiB clusters).
  if (!Number.isSafeInteger(Math.ceil(o.size / 512) * 512)) throw new ImageError('Image sizes above 8 PiB (2^53 bytes) are not supported by qchain');
  return {
    size: Math.ceil(o.size / 512) * 512, clusterSize, version, refcountBits, lazyRefcounts: !!o.lazyRefcounts, extendedL2: !!o.extendedL2,
    compressionType, backingFile: o.backingFile ?? null, backingFormat: o.backingFormat ?? null, preallocation: o.preallocation ?? 'off',
  };
}

/** Write a new qcow2 image into `storage` (which should be empty). Returns the opened image (read-write). */
export async function createQcow2(storage: Storage, opts: Qcow2CreateOptions): Promise<Qcow2Image> {
  const o = validateCreateOptions(opts);
  const cs = o.clusterSize;
  const clusterBits = Math.log2(cs);
  const refcountOrder = Math.log2(o.refcountBits);
  let incompatible = 0;
  if (o.compressionType === 'zstd') incompatible |= C.INCOMPAT_COMPRESSION;
  if (o.extendedL2) incompatible |= C.INCOMPAT_EXTL2;
  const header: Qcow2Header = {
    version: o.version, backingFileOffset: 0, backingFileSize: 0, clusterBits, size: 0, cryptMethod: 0,
    l1Size: 0, l1TableOffset: 0, refcountTableOffset: cs, refcountTableClusters: 1, nbSnapshots: 0, snapshotsOffset: 0,
    incompatible: BigInt(incompatible), compatible: BigInt(o.lazyRefcounts ? C.COMPAT_LAZY_REFCOUNTS : 0), autoclear: 0n,
    refcountOrder, headerLength: 0, compressionType: o.compressionType === 'zstd' ? 1 : 0, unknownFields: Buffer.alloc(0),
    backingFile: null, backingFormat: null, bitmapsExt: null, dataFile: null, unknownExtensions: [], featureNames: [],
  };
  // Minimal valid image: header, refcount table, one refcount block counting clusters 0..2.
  await storage.truncate(0);
  await storage.write(serializeHeader(header), 0);
  const rt = Buffer.alloc(cs);
  rt.writeUInt32BE(0, 0);
  rt.writeUInt32BE(2 * cs, 4);
  await storage.write(rt, cs);
  const rb = Buffer.alloc(cs);
  const probe = { clusterBits, refcountOrder };
  const { Refcounts } = await import('./refcount.js');
  const enc = new Refcounts(storage, probe, 0, 0, []);
  for (let i = 0; i < 3; i++) enc.encodeInto(rb, i, 1);
  await storage.write(rb, 2 * cs);

  const img = await Qcow2Image.open(storage, {});
  // Size the image: allocate the L1 table through the normal allocator.
  const l2Entries = cs / (o.extendedL2 ? 16 : 8);
  const l1Size = Math.ceil(o.size / (cs * l2Entries));
  if (l1Size > 0) {
    const l1Off = await img.refcounts.alloc(Math.ceil((l1Size * 8) / cs));
    await storage.write(Buffer.alloc(l1Size * 8), l1Off);
    img.header.l1TableOffset = l1Off;
  }
  img.header.l1Size = l1Size;
  img.l1 = Buffer.alloc(l1Size * 8);
  img.header.size = o.size;
  img.header.backingFile = o.backingFile;
  img.header.backingFormat = o.backingFile ? o.backingFormat : null;
  await img.writeHeader();
  if (o.preallocation !== 'off') await img.preallocate(o.preallocation);
  return img;
}
