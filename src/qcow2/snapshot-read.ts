/**
 * Reading the internal snapshot table as QEMU 7.2's qcow2_do_read_snapshots does: entry by entry
 * from the file, bytes past its end reading as zeros (so a table beyond EOF, or entries longer than
 * the file, still open), with QEMU's two limits (extra data per entry, total table size). In repair
 * mode (`check -r all`) the limits are enforced by discarding instead of failing.
 */
import type { Storage } from '../storage/storage.js';
import { ImageError } from '../image/errors.js';
import { MAX_SNAPSHOTS_SIZE, MAX_SNAPSHOT_EXTRA_DATA } from './constants.js';
import type { Snapshot } from './snapshot-table.js';

/** Fixed part of an entry, and the extra data QEMU 7.2 knows (vm_state_size_large, disk_size, icount). */
const HEADER_BYTES = 40;
const KNOWN_EXTRA = 24;
const INT_MAX = 0x7fffffff;

export interface SnapshotTableRead {
  list: Snapshot[];
  /** Bytes from the table start to the end of the last entry (unpadded): QEMU's snapshots_size. */
  size: number;
  /** Repair mode: entries whose extra data was cut to the limit. */
  extraDropped: number;
  /** Repair mode: entries dropped off the end (table too big). */
  reduced: number;
}

export interface ReadSnapshotOptions {
  /** Discard what exceeds the limits (QEMU's repair) instead of failing. */
  repair?: boolean;
  /** Receives QEMU's "Discarding ..." lines in repair mode. */
  log?: (line: string) => void;
}

/**
 * Sequential reads through a window (entries are read in order, mostly adjacent), sized for the
 * expected table (a typical entry is under 128 bytes) up to 1 MiB.
 */
class Window {
  private buf = Buffer.alloc(0);
  private start = 0;
  private readonly chunk: number;
  constructor(private readonly storage: Storage, count: number) {
    this.chunk = Math.min(1024 * 1024, Math.max(4096, count * 128));
  }
  async get(offset: number, length: number): Promise<Buffer> {
    if (offset >= this.start && offset + length <= this.start + this.buf.length) {
      return this.buf.subarray(offset - this.start, offset - this.start + length);
    }
    this.buf = Buffer.alloc(Math.max(length, this.chunk));
    this.start = offset;
    await this.storage.read(this.buf, offset);
    return this.buf.subarray(0, length);
  }
}

const u64 = (b: Buffer, o: number): number => b.readUInt32BE(o) * 0x100000000 + b.readUInt32BE(o + 4);
const roundUp8 = (n: number): number => Math.ceil(n / 8) * 8;
/** QEMU keeps ids and names as C strings: they end at the first NUL. */
const cString = (b: Buffer): string => {
  const z = b.indexOf(0);
  return b.toString('utf8', 0, z < 0 ? b.length : z);
};

/** Both limits fail with EFBIG in QEMU (no errno here: an errno marks file-level open errors). */
function tooMuchExtra(i: number): ImageError {
  return new ImageError(`Too much extra metadata in snapshot table entry ${i}\nYou can force-remove this extra metadata with qemu-img check -r all`);
}

function tooBig(overhanging: number): ImageError {
  return new ImageError(`Snapshot table is too big\nYou can force-remove all ${overhanging} overhanging snapshots with qemu-img check -r all`);
}

export async function readSnapshotTable(storage: Storage, tableOffset: number, count: number, opts: ReadSnapshotOptions = {}): Promise<SnapshotTableRead> {
  const out: SnapshotTableRead = { list: [], size: 0, extraDropped: 0, reduced: 0 };
  const w = new Window(storage, count);
  let off = 0; // relative to the table start
  let tableLength = 0;
  for (let i = 0; i < count; i++) {
    const pre = off; // QEMU's pre_sn_offset: the previous entry's unpadded end
    tableLength = roundUp8(tableLength);
    off = roundUp8(off);
    const h = Buffer.from(await w.get(tableOffset + off, HEADER_BYTES));
    const rawExtra = h.readUInt32BE(36);
    let extraSize = rawExtra;
    if (rawExtra > MAX_SNAPSHOT_EXTRA_DATA) {
      if (!opts.repair) throw tooMuchExtra(i);
      opts.log?.(`Discarding too much extra metadata in snapshot table entry ${i} (${rawExtra} > ${MAX_SNAPSHOT_EXTRA_DATA})`);
      out.extraDropped++;
      extraSize = MAX_SNAPSHOT_EXTRA_DATA;
    }
    const idLen = h.readUInt16BE(12), nameLen = h.readUInt16BE(14);
    const idOff = off + HEADER_BYTES + rawExtra; // the file position skips all of the extra data
    const end = idOff + idLen + nameLen;
    tableLength += HEADER_BYTES + extraSize + idLen + nameLen;
    if (tableLength > MAX_SNAPSHOTS_SIZE || end > INT_MAX) {
      if (!opts.repair) throw tooBig(count - i);
      opts.log?.(`Discarding ${count - i} overhanging snapshots (snapshot table is too big)`);
      out.reduced += count - i;
      off = pre;
      break;
    }
    const extra = Buffer.from(await w.get(tableOffset + off + HEADER_BYTES, extraSize));
    const ids = await w.get(tableOffset + idOff, idLen + nameLen);
    let vmStateSize = h.readUInt32BE(32);
    if (extraSize >= 8) vmStateSize = u64(extra, 0);
    const l1Big = h.readBigUInt64BE(0);
    out.list.push({
      l1TableOffset: u64(h, 0), l1Size: h.readUInt32BE(8),
      ...(l1Big > BigInt(Number.MAX_SAFE_INTEGER) ? { l1TableOffsetBig: l1Big } : {}),
      id: cString(ids.subarray(0, idLen)),
      name: cString(ids.subarray(idLen)),
      dateSec: h.readUInt32BE(16), dateNsec: h.readUInt32BE(20),
      vmClockNsec: u64(h, 24), vmStateSize,
      extraUnknown: Buffer.from(extra.subarray(Math.min(KNOWN_EXTRA, extraSize))),
      diskSize: extraSize >= 16 ? u64(extra, 8) : null,
      icount: extraSize >= 24 ? (extra.readUInt32BE(16) === 0xffffffff ? -1 : u64(extra, 16)) : -1,
    });
    off = end;
  }
  out.size = off;
  return out;
}
