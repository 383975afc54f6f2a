/**
 * qcow (version 1) images, read-only as QEMU 7.2's block/qcow.c reads them: a two-level table
 * (L1 in memory, L2 tables of 2^l2_bits entries read where the L1 entry points, at any
 * alignment), entries naming a host offset, or bit 63 set for a zlib cluster whose compressed
 * size sits in the bits above the offset. Writes are refused (the header stays untouched).
 */
import type { Storage } from '../storage/storage.js';
import type { BackingReader, BlockDriver, Extent } from '../image/driver.js';
import { ImageError } from '../image/errors.js';
import { Lru } from '../util/lru.js';
import { decompressCluster, COMPRESSION_ZLIB } from '../qcow2/compress.js';
import { parseQcowHeader, QCOW_HEADER_SIZE, type QcowHeader } from './header.js';

const COMPRESSED = 1n << 63n;
const EIO = (): ImageError => new ImageError('Input/output error', 'EIO');
const ROFS = (): ImageError => new ImageError('qchain reads qcow (v1) images only: Operation not supported', 'ENOTSUP');

/** One L2 entry: 0 (unallocated), a plain host offset, or a compressed cluster. */
interface Entry { raw: bigint; compressed: boolean }

export class QcowImage implements BlockDriver {
  readonly format = 'qcow' as const;
  readonly backingFormat = null;
  backing: BackingReader | null = null;
  readonly size: number;
  readonly clusterSize: number;
  readonly granularity: number;
  readonly encrypted: boolean;
  private readonly l2Entries: number;
  private readonly l2Cache = new Lru<bigint, Buffer>(16);
  private clusterCache: { offset: bigint; data: Buffer } | null = null;

  private constructor(readonly storage: Storage, readonly readOnly: boolean, private readonly h: QcowHeader,
    private readonly l1: Buffer, readonly backingFile: string | null) {
    this.size = Number(h.size / 512n) * 512;
    this.clusterSize = 2 ** h.clusterBits;
    this.granularity = this.clusterSize;
    this.l2Entries = 2 ** h.l2Bits;
    this.encrypted = h.cryptMethod !== 0;
  }

  /** Open as qcow_open does; `noIo` (info) opens encrypted images without their key. */
  static async open(storage: Storage, opts: { readOnly?: boolean; noIo?: boolean } = {}): Promise<QcowImage> {
    const hb = Buffer.alloc(QCOW_HEADER_SIZE);
    await storage.read(hb, 0);
    const h = parseQcowHeader(hb);
    if (h.size / 512n * 512n > BigInt(Number.MAX_SAFE_INTEGER)) throw new ImageError('Image too large');
    if (h.cryptMethod && !opts.noIo) throw new ImageError("Parameter 'encrypt.key-secret' is required for cipher");
    const l1 = Buffer.alloc(h.l1Size * 8);
    await storage.read(l1, safe(h.l1TableOffset));
    let backingFile: string | null = null;
    if (h.backingFileOffset !== 0n) {
      if (h.backingFileSize > 1023) throw new ImageError('Backing file name too long');
      const nb = Buffer.alloc(h.backingFileSize);
      await storage.read(nb, safe(h.backingFileOffset));
      // A C string: the name ends at the first NUL byte.
      const end = nb.indexOf(0);
      backingFile = nb.subarray(0, end < 0 ? nb.length : end).toString('utf8');
      if (backingFile === '') backingFile = null;
    }
    return new QcowImage(storage, !!opts.readOnly, h, l1, backingFile);
  }

  /** The L2 entry for guest offset `off` (QEMU's get_cluster_offset without allocation). */
  private async entry(off: number): Promise<Entry> {
    const cs = this.clusterSize;
    const l1i = Math.floor(off / (cs * this.l2Entries));
    const l2Off = this.l1.readBigUInt64BE(l1i * 8);
    if (l2Off === 0n) return { raw: 0n, compressed: false };
    let t = this.l2Cache.get(l2Off);
    if (!t) {
      t = Buffer.alloc(this.l2Entries * 8);
      await this.storage.read(t, safe(l2Off));
      this.l2Cache.set(l2Off, t);
    }
    const raw = t.readBigUInt64BE((Math.floor(off / cs) % this.l2Entries) * 8);
    return { raw, compressed: (raw & COMPRESSED) !== 0n };
  }

  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    const cs = this.clusterSize;
    const out: Extent[] = [];
    const end = Math.min(this.size, offset + length);
    for (let pos = offset; pos < end;) {
      const n = Math.min(end, (Math.floor(pos / cs) + 1) * cs) - pos;
      const e = await this.entry(pos);
      const x: Extent = e.raw === 0n ? { offset: pos, length: n, kind: 'unallocated' }
        : e.compressed || this.encrypted ? { offset: pos, length: n, kind: 'data', compressed: e.compressed }
          : { offset: pos, length: n, kind: 'data', hostOffset: safe(e.raw | BigInt(pos % cs)) };
      const last = out[out.length - 1];
      const contiguous = last && last.kind === x.kind && !last.compressed && !x.compressed &&
        (last.hostOffset === undefined ? x.hostOffset === undefined : x.hostOffset === last.hostOffset + last.length);
      if (contiguous) last.length += n;
      else out.push(x);
      pos += n;
    }
    return out;
  }

  async readOwn(buf: Buffer, offset: number): Promise<void> {
    const cs = this.clusterSize;
    for (let done = 0; done < buf.length;) {
      const pos = offset + done;
      const inCluster = pos % cs;
      const n = Math.min(buf.length - done, cs - inCluster);
      const dst = buf.subarray(done, done + n);
      const e = await this.entry(pos);
      if (e.raw === 0n) {
        if (this.backing) await this.backing.read(dst, pos);
        else dst.fill(0);
      } else if (e.compressed) {
        (await this.decompress(e.raw)).copy(dst, 0, inCluster, inCluster + n);
      } else {
        if ((e.raw & 511n) !== 0n) throw EIO();
        await this.storage.read(dst, safe(e.raw) + inCluster);
      }
      done += n;
    }
  }

  /** decompress_cluster: the compressed size is in the bits above the offset; the last cluster is cached. */
  private async decompress(raw: bigint): Promise<Buffer> {
    const bits = BigInt(63 - this.h.clusterBits);
    const coffset = raw & ((1n << bits) - 1n);
    if (this.clusterCache?.offset === coffset) return this.clusterCache.data;
    const csize = Number((raw >> bits) & BigInt(this.clusterSize - 1));
    const src = Buffer.alloc(csize);
    await this.storage.read(src, safe(coffset));
    let data: Buffer;
    try {
      data = await decompressCluster(COMPRESSION_ZLIB, src, this.clusterSize);
    } catch {
      throw EIO();
    }
    this.clusterCache = { offset: coffset, data };
    return data;
  }

  async write(): Promise<void> { throw ROFS(); }
  async writeZeroes(): Promise<void> { throw ROFS(); }
  async discard(): Promise<void> { throw ROFS(); }
  async flush(): Promise<void> {
    if (!this.readOnly) await this.storage.flush();
  }
  async close(): Promise<void> {
    await this.storage.close();
  }
}

/** A host offset as a number; past 2^53 (beyond any file) it reads as zeros. */
function safe(v: bigint): number {
  return v > BigInt(Number.MAX_SAFE_INTEGER) ? Number.MAX_SAFE_INTEGER : Number(v);
}
