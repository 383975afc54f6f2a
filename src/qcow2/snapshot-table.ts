/** The internal snapshot table: parsing (with QEMU's limits) and serialisation. */
import { ImageError } from '../image/errors.js';
import { MAX_SNAPSHOTS_SIZE, MAX_SNAPSHOT_EXTRA_DATA } from './constants.js';

export interface Snapshot {
  l1TableOffset: number;
  l1Size: number;
  id: string;
  name: string;
  dateSec: number;
  dateNsec: number;
  vmClockNsec: number;
  vmStateSize: number;
  /** Extra data beyond the fields we know, kept on rewrite. */
  extraUnknown: Buffer;
  /** Virtual disk size at snapshot time (v3 extra data), or null if absent. */
  diskSize: number | null;
  icount: number;
}

function u64(b: Buffer, o: number): number {
  return b.readUInt32BE(o) * 0x100000000 + b.readUInt32BE(o + 4);
}

/** QEMU's error with its hint line (check reports it as a failed snapshot table read, EFBIG). */
function tooMuchExtra(i: number): ImageError {
  return new ImageError(`Too much extra metadata in snapshot table entry ${i}\nYou can force-remove this extra metadata with qemu-img check -r all`);
}

export function parseSnapshotTable(buf: Buffer, count: number, clusterSize: number): Snapshot[] {
  const out: Snapshot[] = [];
  let off = 0;
  for (let i = 0; i < count; i++) {
    if (off + 40 > buf.length) throw new ImageError('Snapshot table is too big');
    const l1TableOffset = u64(buf, off);
    const l1Size = buf.readUInt32BE(off + 8);
    const idLen = buf.readUInt16BE(off + 12), nameLen = buf.readUInt16BE(off + 14);
    const extraSize = buf.readUInt32BE(off + 36);
    if (extraSize > MAX_SNAPSHOT_EXTRA_DATA) throw tooMuchExtra(i);
    const extraOff = off + 40;
    const end = extraOff + extraSize + idLen + nameLen;
    if (end > buf.length || end > MAX_SNAPSHOTS_SIZE) throw new ImageError('Snapshot table is too big');
    const extra = buf.subarray(extraOff, extraOff + extraSize);
    let vmStateSize = buf.readUInt32BE(off + 32);
    if (extraSize >= 8) vmStateSize = u64(extra, 0);
    const diskSize = extraSize >= 16 ? u64(extra, 8) : null;
    const icount = extraSize >= 24 ? (extra.readUInt32BE(16) === 0xffffffff ? -1 : u64(extra, 16)) : -1;
    // The L1 fields are checked where the table is used (apply, delete, check), as QEMU does:
    // a bad entry does not keep the image from opening.
    out.push({
      l1TableOffset, l1Size,
      id: buf.toString('utf8', extraOff + extraSize, extraOff + extraSize + idLen),
      name: buf.toString('utf8', extraOff + extraSize + idLen, end),
      dateSec: buf.readUInt32BE(off + 16), dateNsec: buf.readUInt32BE(off + 20),
      vmClockNsec: u64(buf, off + 24), vmStateSize,
      extraUnknown: Buffer.from(extra.subarray(Math.min(24, extraSize))),
      diskSize, icount,
    });
    off = Math.ceil(end / 8) * 8;
  }
  return out;
}

/** Bytes the table occupies (to size the read before parsing). Walks the headers only. */
export function snapshotTableLength(buf: Buffer, count: number): number {
  let off = 0;
  for (let i = 0; i < count; i++) {
    if (off + 40 > buf.length) return -1;
    const idLen = buf.readUInt16BE(off + 12), nameLen = buf.readUInt16BE(off + 14);
    const extraSize = buf.readUInt32BE(off + 36);
    // QEMU checks each entry's extra data size as soon as its fixed part is read.
    if (extraSize > MAX_SNAPSHOT_EXTRA_DATA) throw tooMuchExtra(i);
    off = Math.ceil((off + 40 + extraSize + idLen + nameLen) / 8) * 8;
  }
  return off;
}

export function serializeSnapshotTable(list: Snapshot[]): Buffer {
  const parts: Buffer[] = [];
  for (const s of list) {
    const id = Buffer.from(s.id, 'utf8'), name = Buffer.from(s.name, 'utf8');
    const extra = Buffer.alloc(24 + s.extraUnknown.length);
    const w64 = (b: Buffer, o: number, v: number): void => {
      b.writeUInt32BE(Math.floor(v / 0x100000000) >>> 0, o);
      b.writeUInt32BE(v >>> 0, o + 4);
    };
    w64(extra, 0, s.vmStateSize);
    w64(extra, 8, s.diskSize ?? 0);
    if (s.icount < 0) extra.fill(0xff, 16, 24);
    else w64(extra, 16, s.icount);
    s.extraUnknown.copy(extra, 24);
    const head = Buffer.alloc(40);
    w64(head, 0, s.l1TableOffset);
    head.writeUInt32BE(s.l1Size, 8);
    head.writeUInt16BE(id.length, 12);
    head.writeUInt16BE(name.length, 14);
    head.writeUInt32BE(s.dateSec >>> 0, 16);
    head.writeUInt32BE(s.dateNsec >>> 0, 20);
    w64(head, 24, s.vmClockNsec);
    head.writeUInt32BE(s.vmStateSize > 0xffffffff ? 0 : s.vmStateSize, 32);
    head.writeUInt32BE(extra.length, 36);
    const len = 40 + extra.length + id.length + name.length;
    parts.push(head, extra, id, name, Buffer.alloc((8 - (len % 8)) % 8));
  }
  return Buffer.concat(parts);
}
