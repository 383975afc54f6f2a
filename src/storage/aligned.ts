/**
 * Memory aligned for O_DIRECT. Node's Buffers come from malloc and are not page-aligned (the
 * kernel refuses them with EINVAL); a WebAssembly.Memory is mapped by V8 on its own pages, so its
 * bytes start on a page boundary. Buffers cut from such memory at multiples of DIRECT_ALIGN may
 * be written with O_DIRECT.
 */

/** Alignment of offsets, lengths and addresses for direct I/O (covers 512 B and 4 KiB sectors). */
export const DIRECT_ALIGN = 4096;

const WASM_PAGE = 65536;
/** Backing stores known to start on a page boundary. */
const alignedStores = new WeakSet<ArrayBuffer>();

/**
 * Released buffers by size, for reuse: each WebAssembly.Memory reserves a large stretch of
 * address space (V8 surrounds it with guard regions), so bulk operations hand theirs back.
 */
const spare = new Map<number, Buffer[]>();
const SPARE_PER_SIZE = 16;

/** A buffer of `size` bytes whose address is page-aligned (a released one when there is one). */
export function alignedBuffer(size: number): Buffer {
  const reused = spare.get(size)?.pop();
  if (reused) return reused;
  const pages = Math.max(1, Math.ceil(size / WASM_PAGE));
  const store = new WebAssembly.Memory({ initial: pages, maximum: pages }).buffer;
  alignedStores.add(store);
  return Buffer.from(store, 0, size);
}

/** Hand back a buffer from alignedBuffer that its user no longer reads or writes. */
export function releaseAligned(buf: Buffer): void {
  if (buf.byteOffset !== 0 || !alignedStores.has(buf.buffer as ArrayBuffer)) return;
  let list = spare.get(buf.length);
  if (!list) spare.set(buf.length, list = []);
  if (list.length < SPARE_PER_SIZE) list.push(buf);
}

/** Whether the kernel accepts `buf` as a direct I/O buffer (address and length aligned). */
export function isDirectBuffer(buf: Buffer): boolean {
  return (buf.byteOffset & (DIRECT_ALIGN - 1)) === 0 && (buf.length & (DIRECT_ALIGN - 1)) === 0 &&
    alignedStores.has(buf.buffer as ArrayBuffer);
}
