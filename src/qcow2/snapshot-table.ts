/** The internal snapshot table entry and its serialisation (reading: snapshot-read.ts). */

export interface Snapshot {
  l1TableOffset: number;
  /** The on-disk L1 offset when it is 2^53 or more (l1TableOffset has lost its low bits then). */
  l1TableOffsetBig?: bigint;
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

export function serializeSnapshotTable(list: Snapshot[]): Buffer {
  const parts: Buffer[] = [];
  let size = 0;
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
    if (s.l1TableOffsetBig !== undefined) head.writeBigUInt64BE(s.l1TableOffsetBig, 0);
    else w64(head, 0, s.l1TableOffset);
    head.writeUInt32BE(s.l1Size, 8);
    head.writeUInt16BE(id.length, 12);
    head.writeUInt16BE(name.length, 14);
    head.writeUInt32BE(s.dateSec >>> 0, 16);
    head.writeUInt32BE(s.dateNsec >>> 0, 20);
    w64(head, 24, s.vmClockNsec);
    head.writeUInt32BE(s.vmStateSize > 0xffffffff ? 0 : s.vmStateSize, 32);
    head.writeUInt32BE(extra.length, 36);
    // Entries start 8-aligned; the table ends right after the last one (QEMU writes no padding there).
    if (size % 8) parts.push(Buffer.alloc(8 - (size % 8)));
    size += (8 - (size % 8)) % 8 + 40 + extra.length + id.length + name.length;
    parts.push(head, extra, id, name);
  }
  return Buffer.concat(parts);
}
