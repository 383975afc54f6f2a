/**
 * qcow2 compressed-cluster codec.
 *
 * A compressed cluster is stored in the image as a byte stream that starts at
 * the descriptor's host offset; the descriptor only records a sector count, so
 * the slice a reader gets is rounded up to the next 512-byte boundary and
 * usually carries the beginning of the NEXT compressed cluster after it. Both
 * decoders below therefore stop as soon as one cluster's worth of output has
 * been produced and ignore whatever follows.
 *
 * compression_type 0 (zlib): raw DEFLATE, no zlib header, window 2^12.
 *   QEMU compresses with deflateInit2(Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12,
 *   9, Z_DEFAULT_STRATEGY) and decompresses with inflateInit2(-12) + a single
 *   inflate(Z_FINISH); it accepts the result iff the output buffer was filled
 *   completely (Z_STREAM_END or Z_BUF_ERROR with avail_out == 0). We mirror
 *   that: the first clusterSize bytes of the stream are the cluster, the
 *   stream need not end there, and producing fewer bytes is an error.
 *
 * compression_type 1 (zstd): one zstd frame per cluster (QEMU uses
 *   ZSTD_compressStream2(ZSTD_e_end) at the default level 3, which records the
 *   frame content size and no checksum). QEMU decompresses with
 *   ZSTD_decompressStream, so it continues into further frames (skippable
 *   frames are skipped) until clusterSize bytes are produced, and rejects a
 *   frame that would overflow the cluster. The wasm zstd binding only offers
 *   one-shot decompression, which fails on trailing bytes, so we measure each
 *   frame exactly (zstdFrameLength) and decode just that subarray.
 *
 * Compression: QEMU calls the compressor with an output buffer of
 * cluster_size - 1 bytes (qcow2_co_pwritev_compressed_task:
 * `qcow2_co_compress(bs, out_buf, s->cluster_size - 1, buf, s->cluster_size)`)
 * and writes the cluster uncompressed when that does not fit (-ENOMEM).
 * compressCluster therefore returns null unless compressed.length <= size - 1,
 * i.e. strictly smaller than the cluster.
 */
import zlib from 'node:zlib';
import type * as ZstdWasm from '@bokuweb/zstd-wasm';

export const COMPRESSION_ZLIB = 0;
export const COMPRESSION_ZSTD = 1;
export type CompressionType = 0 | 1;

/** The largest qcow2 cluster size (cluster_bits <= 21). */
const MAX_CLUSTER_SIZE = 2 * 1024 * 1024;

/** QEMU's deflate/inflate window: windowBits -12 (raw, 4 KiB window). */
const ZLIB_WINDOW_BITS = 12;
const ZLIB_MEM_LEVEL = 9;
/** ZSTD_CLEVEL_DEFAULT, what QEMU uses. */
const ZSTD_LEVEL = 3;

const ZSTD_MAGIC = 0xfd2fb528;
const ZSTD_SKIPPABLE_MAGIC = 0x184d2a50; // low 4 bits are free
const ZSTD_SKIPPABLE_MASK = 0xfffffff0;
/** ZSTD_BLOCKSIZE_MAX: no block (compressed size, raw size, RLE size) exceeds it. */
const ZSTD_BLOCK_SIZE_MAX = 128 * 1024;

// ---------------------------------------------------------------------------
// zstd wasm initialisation (once, lazily)

let zstdReady: Promise<void> | null = null;
/** The codec, loaded on first use (the wasm module costs start-up time most commands never need). */
let zstd: typeof ZstdWasm | null = null;

/**
 * Initialise the zstd wasm module. Idempotent; called implicitly by the
 * codec functions. A failed initialisation is not cached, so it can be retried.
 */
export function initZstd(): Promise<void> {
  if (zstdReady === null) {
    zstdReady = import('@bokuweb/zstd-wasm').then(async (m) => {
      await m.init();
      zstd = m;
    }).catch((err: unknown) => {
      zstdReady = null;
      throw err;
    });
  }
  return zstdReady;
}

// ---------------------------------------------------------------------------
// errors

function decompressError(type: CompressionType, cause: unknown): Error {
  const name = type === COMPRESSION_ZSTD ? 'zstd' : 'zlib';
  return new Error(`Failed to decompress cluster (${name})`, { cause });
}

function checkClusterSize(clusterSize: number): void {
  if (!Number.isSafeInteger(clusterSize) || clusterSize <= 0 || clusterSize > MAX_CLUSTER_SIZE) {
    throw new RangeError(`invalid cluster size ${clusterSize}`);
  }
}

function checkType(type: number): asserts type is CompressionType {
  if (type !== COMPRESSION_ZLIB && type !== COMPRESSION_ZSTD) {
    throw new RangeError(`unknown compression type ${type}`);
  }
}

// ---------------------------------------------------------------------------
// public API

/**
 * Decode one compressed cluster. `src` is the raw sector-rounded slice from the
 * image (may carry trailing bytes). Throws Error with a one-line message
 * ("Failed to decompress cluster (zlib|zstd)", details in `cause`) on corrupt
 * input. The result is exactly clusterSize bytes.
 */
export async function decompressCluster(
  type: CompressionType,
  src: Buffer,
  clusterSize: number,
): Promise<Buffer> {
  checkType(type);
  checkClusterSize(clusterSize);
  if (type === COMPRESSION_ZLIB) {
    try {
      return inflateCluster(src, clusterSize);
    } catch (err) {
      if (!isBufferTooLarge(err)) throw decompressError(type, err);
    }
    // The stream produces more than clusterSize bytes. QEMU accepts the first
    // clusterSize bytes (its output buffer is simply full); only a streaming
    // inflate can stop there. Valid images never get here.
    try {
      return await inflatePrefix(src, clusterSize);
    } catch (err) {
      throw decompressError(type, err);
    }
  }
  await initZstd();
  try {
    return zstdDecodeCluster(src, clusterSize);
  } catch (err) {
    throw decompressError(type, err);
  }
}

/**
 * Compress one full cluster (data.length is the cluster size). Returns null if
 * the compressed form would not be strictly smaller than the cluster (the
 * caller then writes it uncompressed), as QEMU does.
 */
export async function compressCluster(type: CompressionType, data: Buffer): Promise<Buffer | null> {
  checkType(type);
  checkClusterSize(data.length);
  let out: Buffer;
  if (type === COMPRESSION_ZLIB) {
    out = zlib.deflateRawSync(data, {
      level: zlib.constants.Z_DEFAULT_COMPRESSION,
      windowBits: ZLIB_WINDOW_BITS,
      memLevel: ZLIB_MEM_LEVEL,
      strategy: zlib.constants.Z_DEFAULT_STRATEGY,
    });
  } else {
    await initZstd();
    const u8 = (zstd as typeof ZstdWasm).compress(data, ZSTD_LEVEL);
    out = Buffer.from(u8.buffer, u8.byteOffset, u8.byteLength);
  }
  // QEMU's output buffer is cluster_size - 1 bytes.
  return out.length <= data.length - 1 ? out : null;
}

/** Parsed shape of one zstd (or skippable) frame. */
export interface ZstdFrameInfo {
  /** Exact byte length of the frame, header to checksum inclusive. */
  length: number;
  /** True for a skippable frame (magic 0x184D2A5?), which carries no content. */
  skippable: boolean;
  /** Frame_Content_Size from the header, or null if not recorded. */
  contentSize: number | null;
}

/**
 * Exact byte length of the zstd frame starting at `offset` (a skippable frame
 * counts as a frame). Throws on malformed or truncated input.
 */
export function zstdFrameLength(buf: Buffer, offset = 0): number {
  return zstdFrameInfo(buf, offset).length;
}

/**
 * Walk the zstd frame starting at `offset` without decoding it: frame header,
 * then 3-byte block headers up to the last block, then the optional checksum.
 * Throws on malformed or truncated input.
 */
export function zstdFrameInfo(buf: Buffer, offset = 0): ZstdFrameInfo {
  if (!Number.isSafeInteger(offset) || offset < 0) throw new RangeError(`invalid offset ${offset}`);
  const end = buf.length;
  const need = (pos: number, n: number, what: string): void => {
    if (pos + n > end) {
      throw new Error(`zstd frame at ${offset} truncated in ${what} (needs ${pos + n - offset} bytes, ${end - offset} available)`);
    }
  };

  need(offset, 4, 'magic');
  const magic = buf.readUInt32LE(offset);
  if (((magic & ZSTD_SKIPPABLE_MASK) >>> 0) === ZSTD_SKIPPABLE_MAGIC) {
    need(offset, 8, 'skippable frame header');
    const length = 8 + buf.readUInt32LE(offset + 4);
    need(offset, length, 'skippable frame');
    return { length, skippable: true, contentSize: null };
  }
  if (magic !== ZSTD_MAGIC) {
    throw new Error(`not a zstd frame at ${offset} (magic 0x${magic.toString(16).padStart(8, '0')})`);
  }

  // Frame_Header_Descriptor
  need(offset, 5, 'frame header');
  const fhd = buf[offset + 4]!;
  const fcsFlag = fhd >> 6;
  const singleSegment = (fhd >> 5) & 1;
  const reserved = (fhd >> 3) & 1;
  const hasChecksum = (fhd >> 2) & 1;
  const didFlag = fhd & 3;
  if (reserved) throw new Error(`zstd frame at ${offset} has the reserved header bit set`);

  const windowDescSize = singleSegment ? 0 : 1;
  const didSize = [0, 1, 2, 4][didFlag]!;
  const fcsSize = [singleSegment ? 1 : 0, 2, 4, 8][fcsFlag]!;
  let pos = offset + 5 + windowDescSize + didSize;
  need(offset + 5, windowDescSize + didSize + fcsSize, 'frame header');

  let contentSize: number | null;
  switch (fcsSize) {
    case 0: contentSize = null; break;
    case 1: contentSize = buf[pos]!; break;
    case 2: contentSize = buf.readUInt16LE(pos) + 256; break;
    case 4: contentSize = buf.readUInt32LE(pos); break;
    default: contentSize = Number(buf.readBigUInt64LE(pos)); break; // may round above 2^53; only compared
  }
  pos += fcsSize;

  // Blocks: Last_Block (bit 0), Block_Type (bits 1-2), Block_Size (bits 3-23).
  for (;;) {
    need(pos, 3, 'block header');
    const header = buf[pos]! | (buf[pos + 1]! << 8) | (buf[pos + 2]! << 16);
    pos += 3;
    const last = header & 1;
    const blockType = (header >> 1) & 3;
    const blockSize = header >>> 3;
    if (blockType === 3) throw new Error(`zstd frame at ${offset} has a reserved block type`);
    if (blockSize > ZSTD_BLOCK_SIZE_MAX) {
      throw new Error(`zstd frame at ${offset} has an oversized block (${blockSize} bytes)`);
    }
    // Raw (0) and compressed (2) blocks store Block_Size bytes; RLE (1) stores one.
    const stored = blockType === 1 ? 1 : blockSize;
    need(pos, stored, 'block');
    pos += stored;
    if (last) break;
  }
  if (hasChecksum) {
    need(pos, 4, 'checksum');
    pos += 4;
  }
  return { length: pos - offset, skippable: false, contentSize };
}

// ---------------------------------------------------------------------------
// zlib

function isBufferTooLarge(err: unknown): boolean {
  return err instanceof RangeError && (err as NodeJS.ErrnoException).code === 'ERR_BUFFER_TOO_LARGE';
}

/**
 * Fast path: one synchronous inflate into a single clusterSize + 1 byte output
 * chunk. Z_SYNC_FLUSH makes a stream that is cut short return what it has
 * instead of failing, so "filled exactly" is checked here, like QEMU does.
 * Bytes after the end of the deflate stream are ignored by zlib (Node only
 * looks for further members in gunzip mode). If the stream would produce more
 * than clusterSize bytes, Node throws ERR_BUFFER_TOO_LARGE (handled by the
 * caller).
 */
function inflateCluster(src: Buffer, clusterSize: number): Buffer {
  const out = zlib.inflateRawSync(src, {
    windowBits: ZLIB_WINDOW_BITS,
    finishFlush: zlib.constants.Z_SYNC_FLUSH,
    chunkSize: clusterSize + 1,
    maxOutputLength: clusterSize,
  });
  if (out.length !== clusterSize) {
    throw new Error(`deflate stream ends after ${out.length} of ${clusterSize} bytes`);
  }
  return out;
}

/** Slow path: inflate until clusterSize bytes are out, then stop reading. */
function inflatePrefix(src: Buffer, clusterSize: number): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const out = Buffer.allocUnsafe(clusterSize);
    let have = 0;
    let settled = false;
    const inflater = zlib.createInflateRaw({
      windowBits: ZLIB_WINDOW_BITS,
      finishFlush: zlib.constants.Z_SYNC_FLUSH,
    });
    const finish = (err: Error | null): void => {
      if (settled) return;
      settled = true;
      inflater.destroy();
      if (err) reject(err);
      else resolve(out);
    };
    inflater.on('data', (chunk: Buffer) => {
      const take = Math.min(chunk.length, clusterSize - have);
      chunk.copy(out, have, 0, take);
      have += take;
      if (have === clusterSize) finish(null);
    });
    inflater.on('error', (err: Error) => finish(err));
    inflater.on('end', () =>
      finish(new Error(`deflate stream ends after ${have} of ${clusterSize} bytes`)),
    );
    inflater.end(src);
  });
}

// ---------------------------------------------------------------------------
// zstd

/**
 * Decode frames from the start of `src` until exactly clusterSize bytes are
 * produced. Each frame is measured first and handed to the one-shot decoder
 * alone, with an output capacity of at most the bytes still missing (the
 * decoder sizes its output from Frame_Content_Size, which we bound first, or
 * from defaultHeapSize when the header has none).
 */
function zstdDecodeCluster(src: Buffer, clusterSize: number): Buffer {
  const parts: Uint8Array[] = [];
  let produced = 0;
  let pos = 0;
  while (produced < clusterSize) {
    if (pos >= src.length) {
      throw new Error(`input ends after ${produced} of ${clusterSize} bytes`);
    }
    const frame = zstdFrameInfo(src, pos);
    if (!frame.skippable) {
      const remaining = clusterSize - produced;
      if (frame.contentSize !== null && frame.contentSize > remaining) {
        throw new Error(`zstd frame content size ${frame.contentSize} exceeds the ${remaining} bytes left in the cluster`);
      }
      // The binding throws if the frame decodes to more than the capacity.
      const part = (zstd as typeof ZstdWasm).decompress(src.subarray(pos, pos + frame.length), { defaultHeapSize: remaining });
      if (part.length > remaining) throw new Error('zstd frame overflows the cluster');
      if (part.length > 0) parts.push(part);
      produced += part.length;
    }
    pos += frame.length;
  }
  // Common case: one frame holding the whole cluster; wrap it without copying.
  if (parts.length === 1) {
    const p = parts[0]!;
    return Buffer.from(p.buffer, p.byteOffset, p.byteLength);
  }
  return Buffer.concat(parts, clusterSize);
}
