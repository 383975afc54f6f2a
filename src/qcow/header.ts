/**
 * The qcow (version 1) header: parsed and validated in the order and with the messages of
 * QEMU 7.2's block/qcow.c (qcow_open). Every field is checked before it sizes anything.
 */
import { ImageError } from '../image/errors.js';

export const QCOW_MAGIC = 0x514649fb;
export const QCOW_VERSION = 1;
export const QCOW_HEADER_SIZE = 48;
export const QCOW_CRYPT_AES = 1;
/** Largest L1 table qchain allocates (entries); QEMU's own bound (INT_MAX / 8) is far larger. */
export const MAX_L1_ENTRIES = 1 << 25;

export interface QcowHeader {
  backingFileOffset: bigint;
  backingFileSize: number;
  /** Guest size in bytes as stored (the image exposes whole sectors of it). */
  size: bigint;
  clusterBits: number;
  l2Bits: number;
  cryptMethod: number;
  l1TableOffset: bigint;
  l1Size: number;
}

/** Whether the first bytes are a qcow v1 header (QEMU's qcow_probe). */
export function probeQcow(head: Buffer): boolean {
  return head.length >= QCOW_HEADER_SIZE && head.readUInt32BE(0) === QCOW_MAGIC && head.readUInt32BE(4) === QCOW_VERSION;
}

/** Parse the 48 header bytes (bytes past the end of the file read as zeros). */
export function parseQcowHeader(b: Buffer): QcowHeader {
  if (b.readUInt32BE(0) !== QCOW_MAGIC) throw new ImageError('Image not in qcow format');
  const version = b.readUInt32BE(4);
  if (version !== QCOW_VERSION) {
    const hint = version === 2 || version === 3 ? "\nTry the 'qcow2' driver instead." : '';
    throw new ImageError(`qcow (v1) does not support qcow version ${version}${hint}`);
  }
  const size = b.readBigUInt64BE(24);
  const clusterBits = b[32], l2Bits = b[33];
  const cryptMethod = b.readUInt32BE(36);
  if (size <= 1n) throw new ImageError('Image size is too small (must be at least 2 bytes)');
  if (clusterBits < 9 || clusterBits > 16) throw new ImageError('Cluster size must be between 512 and 64k');
  // l2_bits counts 8-byte entries: the table is 512 bytes to 64 KiB.
  if (l2Bits < 9 - 3 || l2Bits > 16 - 3) throw new ImageError('L2 table size must be between 512 and 64k');
  if (cryptMethod > QCOW_CRYPT_AES) throw new ImageError('invalid encryption method in qcow header');
  const shift = BigInt(clusterBits + l2Bits);
  if (size > (1n << 64n) - 1n - (1n << shift)) throw new ImageError('Image too large');
  const l1 = (size + (1n << shift) - 1n) >> shift;
  if (l1 > BigInt(Math.floor(0x7fffffff / 8))) throw new ImageError('Image too large');
  if (l1 > BigInt(MAX_L1_ENTRIES)) throw new ImageError('Could not allocate memory for L1 table');
  return {
    backingFileOffset: b.readBigUInt64BE(8), backingFileSize: b.readUInt32BE(16), size, clusterBits, l2Bits,
    cryptMethod, l1TableOffset: b.readBigUInt64BE(40), l1Size: Number(l1),
  };
}
