/** The raw format driver: guest offset = host offset, everything allocated, sparse where the file system allows. */
import type { Storage } from '../storage/storage.js';
import type { BackingReader, BlockDriver, Extent, ResizeOptions, WriteOptions, WriteZeroesOptions } from '../image/driver.js';
import { ImageError } from '../image/errors.js';

export class RawImage implements BlockDriver {
  readonly format = 'raw' as const;
  readonly granularity = 512;
  readonly backingFile = null;
  readonly backingFormat = null;
  backing: BackingReader | null = null;
  /** Set when the format was probed: writes must not turn sector 0 into another format's header. */
  restrictBlock0 = false;
  private closed = false;

  private constructor(readonly storage: Storage, readonly readOnly: boolean, public size: number) {}

  static async open(storage: Storage, opts: { readOnly?: boolean } = {}): Promise<RawImage> {
    // Like QEMU, the virtual size is the file size rounded up to whole sectors.
    return new RawImage(storage, !!opts.readOnly || storage.readOnly, Math.ceil((await storage.size()) / 512) * 512);
  }

  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    const end = Math.min(offset + length, this.size);
    if (end <= offset) return [];
    const { seekData, seekHole } = this.storage;
    if (!seekData || !seekHole) return [{ offset, length: end - offset, kind: 'data', hostOffset: offset }];
    // Holes of a sparse file read as zero (QEMU's file driver reports them as zero, offset valid).
    const out: Extent[] = [];
    const push = (a: number, b: number, kind: 'data' | 'zero'): void => {
      if (b > a) out.push({ offset: a, length: b - a, kind, hostOffset: a });
    };
    let pos = offset;
    while (pos < end) {
      let data = seekData.call(this.storage, pos);
      if (data < 0 || data > end) data = end;
      push(pos, data, 'zero');
      if (data >= end) break;
      const hole = Math.min(end, Math.max(data + 1, seekHole.call(this.storage, data)));
      push(data, hole, 'data');
      pos = hole;
    }
    return out;
  }

  async readOwn(buf: Buffer, offset: number): Promise<void> {
    await this.storage.read(buf, offset);
  }

  async readExtent(dst: Buffer, x: Extent): Promise<void> {
    await this.storage.read(dst, x.offset);
  }

  private check(offset: number, length: number): void {
    if (this.readOnly) throw new ImageError('Permission denied', 'EACCES');
    if (this.closed) throw new ImageError('Image is closed');
    if (offset < 0 || offset + length > this.size) throw new ImageError('Input/output error', 'EIO');
  }

  async write(buf: Buffer, offset: number, opts?: WriteOptions): Promise<void> {
    this.check(offset, buf.length);
    // A raw file's layout is the guest's: every write is placed from the start.
    opts?.onPlaced?.();
    if (opts?.beforeData) await opts.beforeData();
    if (this.restrictBlock0 && offset < 512) {
      const first = Buffer.alloc(512);
      await this.storage.read(first, 0);
      buf.copy(first, offset, 0, Math.min(buf.length, 512 - offset));
      // qcow2 (version >= 2) or qcow (version 1) header: the next probe would not say raw.
      if (first.readUInt32BE(0) === 0x514649fb && first.readUInt32BE(4) >= 1) throw new ImageError('Operation not permitted', 'EPERM');
    }
    await this.storage.write(buf, offset);
  }

  async writeZeroes(offset: number, length: number, _opts?: WriteZeroesOptions): Promise<void> {
    this.check(offset, length);
    if (length === 0) return;
    // Like QEMU's file driver, zeroing deallocates where the host can punch holes.
    if (this.storage.punchHole) return this.storage.punchHole(offset, length);
    const chunk = Buffer.alloc(Math.min(length, 4 * 1024 * 1024));
    for (let p = 0; p < length; p += chunk.length) {
      const n = Math.min(chunk.length, length - p);
      await this.storage.write(chunk.subarray(0, n), offset + p);
    }
  }

  async discard(offset: number, length: number): Promise<void> {
    this.check(offset, length);
    // Discard punches a hole where the host supports it (as qemu-io's file driver does); it is
    // advisory, so without the primitive it does nothing.
    if (this.storage.punchHole && length > 0) await this.storage.punchHole(offset, length);
  }

  /** Truncate or extend the file to exactly `size` bytes (falloc/full write zeros over the new area). */
  async resize(size: number, opts: ResizeOptions = {}): Promise<void> {
    if (this.readOnly) throw new ImageError('Permission denied', 'EACCES');
    const prealloc = opts.preallocation ?? 'off';
    if (prealloc === 'metadata') throw new ImageError('Unsupported preallocation mode: metadata', 'ENOTSUP');
    const old = await this.storage.size();
    if (size < this.size && !opts.shrink) throw new ImageError('Use the --shrink option to perform a shrink operation.', 'EINVAL');
    if (size < old && prealloc !== 'off') throw new ImageError("Preallocation can't be used for shrinking an image", 'EINVAL');
    await this.storage.truncate(size);
    if (size > old && prealloc !== 'off') {
      const zero = Buffer.alloc(Math.min(size - old, 4 * 1024 * 1024));
      for (let p = old; p < size; p += zero.length) await this.storage.write(zero.subarray(0, Math.min(zero.length, size - p)), p);
    }
    this.size = Math.ceil(size / 512) * 512;
  }

  async flush(): Promise<void> {
    await this.storage.flush();
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    if (!this.readOnly) await this.storage.flush();
    await this.storage.close();
  }
}
