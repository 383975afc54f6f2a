import { Storage, StorageError } from './storage.js';

/** A growable in-memory container, for tests and scratch images. */
export class MemoryStorage implements Storage {
  private buf: Buffer;
  private len: number;
  constructor(readonly name = 'memory', initial?: Buffer, readonly readOnly = false) {
    this.buf = initial ? Buffer.from(initial) : Buffer.alloc(0);
    this.len = this.buf.length;
  }

  /** A snapshot copy of the current contents. */
  contents(): Buffer {
    return Buffer.from(this.buf.subarray(0, this.len));
  }

  private ensure(n: number): void {
    if (n <= this.buf.length) return;
    const grown = Buffer.alloc(Math.max(n, this.buf.length * 2, 65536));
    this.buf.copy(grown, 0, 0, this.len);
    this.buf = grown;
  }

  async read(buf: Buffer, offset: number): Promise<void> {
    const end = Math.min(this.len, offset + buf.length);
    const n = Math.max(0, end - offset);
    if (n > 0) this.buf.copy(buf, 0, offset, end);
    if (n < buf.length) buf.fill(0, n);
  }

  async write(buf: Buffer, offset: number): Promise<void> {
    if (this.readOnly) throw new StorageError(`${this.name}: read-only`, 'EROFS');
    this.ensure(offset + buf.length);
    buf.copy(this.buf, offset);
    this.len = Math.max(this.len, offset + buf.length);
  }

  async punchHole(offset: number, length: number): Promise<void> {
    if (this.readOnly) throw new StorageError(`${this.name}: read-only`, 'EROFS');
    const end = Math.min(this.len, offset + length);
    if (end > offset) this.buf.fill(0, offset, end);
  }

  async writev(bufs: Buffer[], offset: number): Promise<void> {
    let p = offset;
    for (const b of bufs) {
      await this.write(b, p);
      p += b.length;
    }
  }

  async size(): Promise<number> { return this.len; }
  async allocatedSize(): Promise<number> { return this.len; }

  async truncate(length: number): Promise<void> {
    if (length > this.len) {
      this.ensure(length);
      this.buf.fill(0, this.len, length);
    }
    this.len = length;
  }

  async flush(): Promise<void> {}
  async close(): Promise<void> {}
}
