/**
 * The state of a qemu-io run (the "BlockBackend"): the open chain with the options it was opened
 * with, and the request primitives with the block layer's rules that qemu-io shows through:
 * bounds checks (EIO), a device ejected after a fatal corruption event (ENOMEDIUM), the
 * `discard=ignore` mode, copy-on-read, the write restriction on block 0 of a probed raw image,
 * and the "no fallback" zero writes (`write -z -n`).
 *
 * @module
 */
import path from 'node:path';
import type { Sink } from '../context.js';
import { Chain } from '../../chain/chain.js';
import { openChain, relockChain, type ImageFormat } from '../../chain/open.js';
import type { BlockDriver, Extent } from '../../image/driver.js';
import { Qcow2Image } from '../../qcow2/image.js';
import { createQcow2 } from '../../qcow2/create.js';
import { RawImage } from '../../raw/raw.js';
import { MemoryStorage } from '../../storage/memory.js';
import { IoErrno, errnoOf, strerror } from './errno.js';

/** BDRV_REQUEST_MAX_BYTES: the largest single request (INT_MAX rounded down to 512). */
export const MAX_REQUEST = 2147483136;
/** BLOCK_PROBE_BUF_SIZE: the bytes a format probe looks at (and the raw write restriction). */
const PROBE_SIZE = 512;
/** MAX_BOUNCE_BUFFER of the copy-on-read path (32768 sectors). */
const MAX_BOUNCE = 32768 * 512;

/** How to open an image (the qemu-io command line / `open` command flags). */
export interface OpenRequest {
  /** The image file name; null for `open` without a path. */
  file: string | null;
  /** Driver name given with -f / `-o driver=` (any string; only qcow2 and raw exist here). */
  format?: string;
  readOnly: boolean;
  /** -s: writes go to a temporary overlay that is thrown away. */
  snapshot: boolean;
  /** -C: copy-on-read. */
  copyOnRead: boolean;
  /** Discard mode: true = unmap (qemu-io's default), false = ignore. */
  unmap: boolean;
  /** -U */
  forceShare: boolean;
  /** Linux native AIO (-k, -i native): needs O_DIRECT (-n, -t none/directsync). */
  nativeAio?: boolean;
  /** The cache mode bypasses the host page cache (-n, -t none, -t directsync). */
  directCache?: boolean;
  /** `-o key=value` options other than driver (refused: the drivers take no options here). */
  extraOptions?: Array<[string, string]>;
}

/** What happened to a block-status query: the extents found, and the error that stopped it. */
export interface StatusResult {
  extents: Extent[];
  /** Where the error struck (extents cover everything before it). */
  errorAt?: number;
  error?: unknown;
}

const ZERO_CHUNK = Buffer.alloc(1024 * 1024);

/** `buffer_is_zero()`. */
export function isZero(buf: Buffer): boolean {
  for (let p = 0; p < buf.length; p += ZERO_CHUNK.length) {
    const n = Math.min(ZERO_CHUNK.length, buf.length - p);
    if (!buf.subarray(p, p + n).equals(ZERO_CHUNK.subarray(0, n))) return false;
  }
  return true;
}

/** Would these first bytes of a raw image probe as another format (QEMU's `bdrv_probe_all`)? */
function probesAsOtherFormat(head: Buffer): boolean {
  if (head.length >= 8 && head.readUInt32BE(0) === 0x514649fb) {
    const version = head.readUInt32BE(4);
    return version >= 1; // qcow (v1) or qcow2 (v2+)
  }
  const starts = (s: string): boolean => head.subarray(0, s.length).equals(Buffer.from(s, 'latin1'));
  return starts('QED\0') || starts('LUKS\xba\xbe') || starts('conectix') || starts('vhdxfile') ||
    starts('KDMV') || starts('COWD') || starts('WithoutFreeSpace') || starts('Bochs Virtual HD Image');
}

export class IoSession {
  chain: Chain | null = null;
  /** The name the image was opened with. */
  filename = '';
  readOnly = false;
  copyOnRead = false;
  unmap = true;
  snapshot = false;
  /** The format was probed as raw (writes to block 0 are restricted). */
  probedRaw = false;
  /** The device was ejected by a fatal corruption event: every request fails with ENOMEDIUM. */
  ejected = false;
  /** `quit` was given. */
  quit = false;
  /** A corruption event was reported (QEMU reports only the first one). */
  private corruptionReported = false;
  /** Completions of asynchronous requests that failed at submission (reported at the next poll). */
  private aioFailed: Array<() => void> = [];
  /** Asynchronous requests in flight (they complete when the requests are drained). */
  private aioInFlight: Array<{ read: boolean; run: () => Promise<void> }> = [];

  constructor(readonly stdout: Sink, readonly stderr: Sink) {}

  out(s: string): void {
    this.stdout.write(s);
  }

  err(s: string): void {
    this.stderr.write(s);
  }

  /** `error_report()`: `qemu-io: msg`. */
  report(msg: string): void {
    this.stderr.write(`qemu-io: ${msg}\n`);
  }

  /** Diagnostic lines from the engine (corruption events, refcount repairs). */
  readonly log = (line: string): void => {
    if (/^qcow2: (Marking image as corrupt|Image is corrupt)/.test(line)) {
      // QEMU reports one corruption event per image and suppresses the rest.
      if (this.corruptionReported) return;
      this.corruptionReported = true;
      // QEMU prints hexadecimal values with %#x, which prints a zero as "0".
      line = line.replace(/\b0x0+(?![0-9a-fA-F])/g, '0');
      if (line.startsWith('qcow2: Marking image as corrupt')) this.ejected = true;
    }
    // Warnings carry their own line ends (QEMU's warn_report + error_printf).
    this.stderr.write(line.startsWith('warning: ') ? `qemu-io: ${line}` : line + '\n');
  };

  /** `blk_getlength()`. */
  length(): number {
    if (!this.chain || this.ejected) throw new IoErrno('ENOMEDIUM');
    return this.chain.size;
  }

  // ---- open / close ----------------------------------------------------------------------------

  /**
   * Open an image the way qemu-io's `openfile()` does. On failure the message is printed
   * (`qemu-io: can't open device F: reason`) and false returned.
   */
  async open(req: OpenRequest): Promise<boolean> {
    if (this.chain) {
      this.report("file open already, try 'help close'");
      return false;
    }
    const where = req.file !== null ? ` device ${req.file}` : '';
    const fail = (reason: string): false => {
      this.report(`can't open${where}: ${reason}`);
      return false;
    };
    let format: ImageFormat | undefined;
    if (req.format !== undefined) {
      if (req.format !== 'qcow2' && req.format !== 'raw') return fail(`Unknown driver '${req.format}'`);
      format = req.format;
    }
    if (req.file === null) {
      return fail(req.format === undefined ? 'Must specify either driver or file' : 'A block device must be specified for "file"');
    }
    if (req.forceShare && !req.readOnly) return fail('force-share=on can only be used with read-only images');
    if (req.copyOnRead && req.readOnly) return fail("Can't use copy-on-read on read-only device");
    if (req.nativeAio && !req.directCache) {
      return fail('aio=native was specified, but it requires cache.direct=on, which was not specified.');
    }
    const file = req.file;
    if (file === '') return fail("The 'file' block driver requires a file name");
    let chain: Chain;
    try {
      chain = await openChain(file, { format, readOnly: req.readOnly || req.snapshot, log: this.log, forceShare: req.forceShare });
    } catch (e) {
      return fail(openFailureReason(file, e));
    }
    if (req.extraOptions && req.extraOptions.length > 0) {
      const fmt = chain.top.format;
      await chain.close().catch(() => {});
      return fail(`Block format '${fmt}' does not support the option '${req.extraOptions[0][0]}'`);
    }
    if (req.snapshot) {
      try {
        chain = await withTemporaryOverlay(chain, file);
      } catch (e) {
        await chain.close().catch(() => {});
        return fail(e instanceof Error ? e.message : String(e));
      }
    }
    this.chain = chain;
    this.filename = file;
    this.readOnly = req.readOnly;
    this.copyOnRead = req.copyOnRead;
    this.unmap = req.unmap;
    if (chain.top instanceof Qcow2Image) chain.top.passDiscardRequests = req.unmap && !req.readOnly;
    this.snapshot = req.snapshot;
    this.ejected = false;
    this.corruptionReported = false;
    this.probedRaw = format === undefined && !req.snapshot && chain.top.format === 'raw';
    // (The warning about a probed raw image comes from the engine, through the log callback.)
    return true;
  }

  /** Close the image (flushes, clears the dirty bit). Errors are reported and returned as false. */
  async close(): Promise<boolean> {
    await this.drain();
    const chain = this.chain;
    this.chain = null;
    this.ejected = false;
    if (!chain) return true;
    try {
      await chain.close();
      return true;
    } catch (e) {
      if (errnoOf(e) === null) throw e;
      this.report(e instanceof Error ? e.message : String(e));
      return false;
    }
  }

  /**
   * Reopen with another read-only mode (`reopen -r/-w`). The new chain is opened before the old
   * one is closed, so a failure leaves the image as it was.
   */
  async reopen(readOnly: boolean): Promise<boolean> {
    await this.drain();
    const chain = this.chain;
    if (!chain) return false;
    if (readOnly === this.readOnly) {
      await chain.flush();
      return true;
    }
    if (this.snapshot) {
      this.readOnly = readOnly;
      return true;
    }
    let next: Chain;
    try {
      await chain.flush();
      // The new chain takes its locks once the old one has let go of them (same-process OFD
      // locks of two open files conflict like any others).
      next = await openChain(this.filename, { format: chain.top.format, readOnly, log: this.log, noLock: true });
    } catch (e) {
      this.report(openFailureReason(this.filename, e));
      return false;
    }
    await chain.close().catch(() => {});
    this.chain = next;
    this.readOnly = readOnly;
    try {
      relockChain(next, { readOnly });
    } catch (e) {
      this.report(openFailureReason(this.filename, e));
      return false;
    }
    if (readOnly && this.copyOnRead) this.copyOnRead = false;
    return true;
  }

  // ---- asynchronous requests -------------------------------------------------------------------

  /**
   * Submit an asynchronous request (aio_read / aio_write). The request is checked now; a request
   * that fails the check completes at the next event loop iteration (`poll`, i.e. while a later
   * synchronous request waits), and so does a read; a write completes when the requests are
   * drained (aio_flush, sleep, close, exit). This is how qemu-io's completions usually interleave
   * with later commands (in QEMU it depends on timing).
   */
  submitAio(offset: bigint | number, bytes: number, anyLength: boolean, read: boolean, onError: (errno: string) => void, run: () => Promise<void>): void {
    try {
      if (!this.chain || this.ejected) throw new IoErrno('ENOMEDIUM');
      if (anyLength) this.checkLarge(offset, bytes);
      else this.check(offset, bytes);
    } catch (e) {
      const code = errnoOf(e);
      if (code === null) throw e;
      this.aioFailed.push(() => onError(code));
      return;
    }
    this.aioInFlight.push({ read, run });
  }

  /**
   * One event loop iteration: the completions of failed requests (newest first, as QEMU runs
   * its bottom halves), then the asynchronous reads in flight.
   */
  async poll(): Promise<void> {
    const failed = this.aioFailed;
    this.aioFailed = [];
    for (let i = failed.length - 1; i >= 0; i--) failed[i]();
    const reads = this.aioInFlight.filter((r) => r.read);
    if (reads.length === 0) return;
    this.aioInFlight = this.aioInFlight.filter((r) => !r.read);
    for (const r of reads) await r.run();
  }

  /** Complete every asynchronous request (`blk_drain_all()`). */
  async drain(): Promise<void> {
    const failed = this.aioFailed;
    this.aioFailed = [];
    for (let i = failed.length - 1; i >= 0; i--) failed[i]();
    while (this.aioInFlight.length > 0) {
      const r = this.aioInFlight.shift() as { run: () => Promise<void> };
      await r.run();
    }
  }

  // ---- requests --------------------------------------------------------------------------------

  /** `blk_check_byte_request()`: ENOMEDIUM for an ejected device, EIO beyond the end. */
  private check(offset: bigint | number, bytes: number): number {
    if (!this.chain || this.ejected) throw new IoErrno('ENOMEDIUM');
    if (bytes < 0 || bytes > MAX_REQUEST) throw new IoErrno('EIO');
    const off = BigInt(offset);
    const size = BigInt(this.chain.size);
    if (off < 0n || off > size || size - off < BigInt(bytes)) throw new IoErrno('EIO');
    return Number(off);
  }

  /** A guest read of `bytes` at `offset` (copy-on-read when enabled). */
  async read(offset: bigint | number, bytes: number): Promise<Buffer> {
    const off = this.check(offset, bytes);
    const buf = Buffer.alloc(bytes);
    if (bytes === 0) return buf;
    await this.poll();
    const chain = this.chain as Chain;
    if (this.copyOnRead) await this.copyOnReadRange(off, bytes);
    await chain.read(buf, off);
    return buf;
  }

  /**
   * `bdrv_co_do_copy_on_readv()`: every cluster the read touches that the top layer does not
   * hold is read through the chain and written to the top (as zeroes when it reads as zero).
   */
  private async copyOnReadRange(offset: number, bytes: number): Promise<void> {
    const chain = this.chain as Chain;
    const top = chain.top;
    const cs = top instanceof Qcow2Image ? top.clusterSize : top.granularity;
    const size = chain.size;
    let pos = Math.floor(offset / cs) * cs;
    const end = Math.min(Math.ceil((offset + bytes) / cs) * cs, size);
    while (pos < end) {
      let limit = end;
      if (top instanceof Qcow2Image) limit = Math.min(limit, (Math.floor(pos / top.l2Coverage) + 1) * top.l2Coverage);
      const exts = await top.blockStatus(pos, limit - pos);
      const first = exts[0];
      if (!first || first.length <= 0) break;
      let pnum = Math.min(first.length, limit - pos);
      if (first.kind === 'unallocated') {
        pnum = Math.min(pnum, MAX_BOUNCE);
        const bounce = Buffer.alloc(pnum);
        await chain.read(bounce, pos);
        if (isZero(bounce)) await chain.writeZeroes(pos, pnum, { mayUnmap: false });
        else await chain.write(bounce, pos);
      }
      pos += pnum;
    }
  }

  /** A guest write. */
  async write(offset: bigint | number, data: Buffer): Promise<void> {
    const off = this.check(offset, data.length);
    if (data.length === 0) return;
    await this.poll();
    const chain = this.chain as Chain;
    if (this.probedRaw && off < PROBE_SIZE) {
      // raw_co_pwritev(): a write must not make block 0 probe as another format.
      const head = Buffer.alloc(Math.min(PROBE_SIZE, chain.size));
      await chain.read(head, 0);
      data.copy(head, off, 0, Math.min(data.length, head.length - off));
      if (probesAsOtherFormat(head)) throw new IoErrno('EPERM');
    }
    await chain.write(data, off);
  }

  /** A zero write (`write -z`, with `-u` may unmap, with `-n` refuse the slow fallback). */
  async writeZeroes(offset: bigint | number, bytes: number, mayUnmap: boolean, noFallback: boolean): Promise<void> {
    if (!this.chain || this.ejected) throw new IoErrno('ENOMEDIUM');
    if (bytes < 0) throw new IoErrno('EIO');
    const off = this.checkLarge(offset, bytes);
    if (bytes === 0) return;
    await this.poll();
    const chain = this.chain;
    if (noFallback && !(await this.zeroesWithoutFallback(off, bytes))) throw new IoErrno('ENOTSUP');
    await chain.writeZeroes(off, bytes, { mayUnmap });
  }

  /** Bounds check for requests that may exceed MAX_REQUEST (zero writes with -n). */
  private checkLarge(offset: bigint | number, bytes: number): number {
    const chain = this.chain as Chain;
    const off = BigInt(offset);
    const size = BigInt(chain.size);
    if (off < 0n || off > size || size - off < BigInt(bytes)) throw new IoErrno('EIO');
    return Number(off);
  }

  /**
   * Whether the driver can zero the range efficiently (QEMU's BDRV_REQ_NO_FALLBACK): raw files
   * always can (a probed raw image only at 512-byte alignment); qcow2 v2 has no zero flag; qcow2 v3
   * can zero a partial (sub)cluster only when the rest of it already reads as zero and it holds no
   * data of its own.
   */
  private async zeroesWithoutFallback(offset: number, bytes: number): Promise<boolean> {
    const chain = this.chain as Chain;
    const top = chain.top;
    if (top instanceof RawImage) {
      return !this.probedRaw || (offset % 512 === 0 && bytes % 512 === 0);
    }
    if (!(top instanceof Qcow2Image)) return false;
    if (top.version < 3) return false;
    const g = top.granularity;
    const size = chain.size;
    const end = offset + bytes;
    const frags: Array<[number, number]> = [];
    const headEnd = Math.min(end, Math.ceil(offset / g) * g);
    if (offset % g !== 0) frags.push([offset, headEnd]);
    const tailStart = Math.floor(end / g) * g;
    if (end % g !== 0 && tailStart >= headEnd && tailStart > offset) frags.push([tailStart, end]);
    for (const [a, b] of frags) {
      const head = a % g;
      const tail = b === size ? 0 : Math.ceil(b / g) * g - b;
      if (head === 0 && tail === 0) continue;
      if (!(await this.readsAsZero(a - head, head)) || !(await this.readsAsZero(b, tail))) return false;
      const own = await top.blockStatus(a - head, 1);
      if (own[0]?.kind === 'data') return false;
    }
    return true;
  }

  /** `is_zero()`: block status of the whole chain says zero (not: the data happens to be zero). */
  private readsAsZero(offset: number, bytes: number): Promise<boolean> {
    return bytes === 0 ? Promise.resolve(true) : (this.chain as Chain).readsZeroFrom(0, offset, bytes);
  }

  /** A compressed write (`write -c`). */
  async writeCompressed(offset: bigint | number, data: Buffer): Promise<void> {
    const off = this.check(offset, data.length);
    const top = (this.chain as Chain).top as BlockDriver & { writeCompressed?: (buf: Buffer, offset: number) => Promise<void> };
    if (top.format !== 'qcow2' || typeof top.writeCompressed !== 'function') throw new IoErrno('ENOTSUP');
    await top.writeCompressed(data, off);
  }

  /** A discard (a no-op in discard=ignore mode). */
  async discard(offset: bigint | number, bytes: number): Promise<void> {
    const off = this.check(offset, bytes);
    if (bytes === 0 || !this.unmap) return;
    await this.poll();
    await (this.chain as Chain).discard(off, bytes);
  }

  async flush(): Promise<void> {
    if (!this.chain || this.ejected) throw new IoErrno('ENOMEDIUM');
    await this.chain.flush();
  }

  /**
   * Block status of the top layer over [offset, end). Stops at the first error, after narrowing
   * it down to the granule that fails (what QEMU's request-by-request loop would have reported).
   */
  async topStatus(offset: number, end: number): Promise<StatusResult> {
    if (!this.chain || this.ejected) throw new IoErrno('ENOMEDIUM');
    await this.poll();
    const top = this.chain.top;
    const extents: Extent[] = [];
    const gran = Math.max(512, top.granularity);
    const collect = async (a: number, b: number): Promise<void> => {
      let pos = a;
      while (pos < b) {
        const exts = await top.blockStatus(pos, b - pos);
        if (exts.length === 0) return;
        for (const x of exts) {
          const s = Math.max(x.offset, pos), e = Math.min(x.offset + x.length, b);
          if (e > s) extents.push({ ...x, offset: s, length: e - s });
        }
        const last = exts[exts.length - 1];
        const next = last.offset + last.length;
        if (next <= pos) return;
        pos = next;
      }
    };
    const walk = async (a: number, b: number): Promise<{ at: number; error: unknown } | null> => {
      const mark = extents.length;
      try {
        await collect(a, b);
        return null;
      } catch (e) {
        extents.length = mark;
        if (errnoOf(e) === null) throw e;
        if (b - a <= gran) return { at: a, error: e };
        const mid = Math.max(a + gran, Math.floor((a + (b - a) / 2) / gran) * gran);
        const left = await walk(a, mid);
        if (left) return left;
        const right = await walk(mid, b);
        return right ?? { at: b, error: e };
      }
    };
    const failed = await walk(offset, end);
    return failed ? { extents, errorAt: failed.at, error: failed.error } : { extents };
  }

  /** Resize the image (`truncate`: blk_truncate without --shrink's guard). */
  async truncate(size: number, prealloc: 'off' | 'metadata' | 'falloc' | 'full'): Promise<void> {
    if (!this.chain || this.ejected) throw new IoErrno('ENOMEDIUM');
    const top = this.chain.top;
    if (typeof top.resize === 'function') {
      await top.resize(size, { shrink: true, preallocation: prealloc });
      this.chain.invalidate();
      return;
    }
    throw new Error('Image format driver does not support resize');
  }
}

/**
 * The reason qemu-io shows after `can't open device F: `. The engine's messages read
 * `Could not open 'F': <reason>`; QEMU keeps that prefix only for errors of the file itself
 * (`Could not open 'F': No such file or directory`).
 */
export function openFailureReason(file: string, e: unknown): string {
  const msg = e instanceof Error ? e.message : String(e);
  const prefix = `Could not open '${file}': `;
  if (!msg.startsWith(prefix)) return msg;
  const rest = msg.slice(prefix.length);
  const code = errnoOf(e);
  if (code && (rest === strerror(code) || rest === code)) return prefix + strerror(code);
  return rest;
}

/** `-s`: put a temporary qcow2 overlay (in memory, discarded on close) on top of the chain. */
async function withTemporaryOverlay(base: Chain, file: string): Promise<Chain> {
  const storage = new MemoryStorage('snapshot');
  const overlay = await createQcow2(storage, {
    size: base.size,
    backingFile: path.resolve(file),
    backingFormat: base.top.format,
  });
  return new Chain([{ driver: overlay, filename: storage.name }, ...base.layers]);
}
