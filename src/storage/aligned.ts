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

/** A buffer of `size` bytes (rounded up to 64 KiB) whose address is page-aligned. */
export function alignedBuffer(size: number): Buffer {
  const pages = Math.max(1, Math.ceil(size / WASM_PAGE));
  const store = new WebAssembly.Memory({ initial: pages, maximum: pages }).buffer;
  alignedStores.add(store);
  return Buffer.from(store, 0, size);
}

/** Whether the kernel accepts `buf` as a direct I/O buffer (address and length aligned). */
export function isDirectBuffer(buf: Buffer): boolean {
  return (buf.byteOffset & (DIRECT_ALIGN - 1)) === 0 && (buf.length & (DIRECT_ALIGN - 1)) === 0 &&
    alignedStores.has(buf.buffer as ArrayBuffer);
}
