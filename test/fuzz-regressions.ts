/**
 * Regression cases found by the fuzzer (test/fuzz.test.ts), replayed in CI through every command.
 * Each entry is a self-contained recipe: a corpus shape, the file patched, and byte patches (or a
 * new file length), so it does not depend on the mutation generator staying the same. `why` says
 * what went wrong before the fix.
 */
import type { Recipe } from './helpers/fuzz.js';

export interface Regression extends Recipe {
  why: string;
  /** Also require `qchain img check` to print exactly what `qemu-img check` prints (and exit alike). */
  checkParity?: boolean;
  /** Replay through CLI children (peak RSS measured) instead of in-process. */
  cli?: boolean;
}

export const REGRESSIONS: Regression[] = [
  {
    why: 'write with the refcount table past EOF: a refcount block was written over the header, then allocation looped forever',
    shape: 'compressed-v2-512', target: 'c.qcow2', patches: [{ truncate: 512 }], off: 65536, len: 4096,
  },
  {
    why: 'convert: a read error (bad compressed cluster) left the in-order writers waiting; exit 0 with a short output',
    shape: 'compressed-zlib', target: 'c.qcow2', off: 77925, len: 1,
    patches: [{ off: 16440, hex: '4000000000003000' }, { off: 17576, hex: '0000000000000000' }, { off: 16720, hex: '740000000000539d' }],
  },
  {
    why: 'header size not a multiple of 512: guest size must round down to whole sectors as in QEMU (convert output was longer than qemu-img\'s)',
    shape: 'compressed-v2-512', target: 'c.qcow2', off: 50820, len: 57567,
    patches: [{ off: 36, hex: '0000748c' }, { off: 24, hex: '000000000003ffff' }],
  },
  {
    why: 'write over compressed clusters whose descriptor points past any refcount table: freeing grew the table without bound (hang); QEMU reports "qcow2_free_clusters failed" and goes on',
    shape: 'compressed-v2-512', target: 'c.qcow2', off: 0, len: 65536,
    patches: [{ off: 1038, hex: '0001' }, { off: 1544, hex: '0000000000000ff8' }, { off: 1888, hex: 'ff' }, { off: 1480, hex: '08' }],
  },
  {
    why: 'check: L1 entry with reserved bits set is a corruption (QEMU "ERROR found L1 entry with reserved bits set"); "-r all" ended clean',
    shape: 'lazy-dirty', target: 'a.qcow2', patches: [{ off: 12288, hex: 'c000000000004000' }], checkParity: true,
  },
  {
    why: 'check: L2 entry with reserved bits set is a corruption (QEMU "ERROR found l2 entry with reserved bits set")',
    shape: 'chain-raw-backing', target: 'top.qcow2', patches: [{ off: 16408, hex: '80000000000061fe' }], checkParity: true,
  },
  {
    why: 'check: extended L2 entry whose subclusters are both allocated and zero is a corruption',
    shape: 'extl2-64k', target: 'a.qcow2', patches: [{ off: 262168, hex: 'ffffffffffffffff' }], checkParity: true,
  },
  {
    why: 'check: OFLAG_COPIED messages print the entry without zero padding, as QEMU',
    shape: 'v3-4k', target: 'a.qcow2', patches: [{ off: 16384, hex: '0000000000005000' }], checkParity: true,
  },
  {
    why: 'check: refcount table entry with reserved bits set (QEMU "ERROR refcount table entry 0 has reserved bits set", then a rebuild with -r all)',
    shape: 'v3-4k', target: 'a.qcow2', patches: [{ off: 4096, hex: '0000000000002001' }], checkParity: true,
  },
  {
    why: 'check: two refcount table entries sharing a block (QEMU "ERROR refcount block 1 refcount=2")',
    shape: 'v3-4k', target: 'a.qcow2', patches: [{ off: 4104, hex: '0000000000002000' }], checkParity: true,
  },
  {
    why: 'check: refcount block offset past 2^56 is "outside image", not "not cluster aligned"',
    shape: 'v3-4k', target: 'a.qcow2', patches: [{ off: 4104, hex: '0200000000002000' }], checkParity: true,
  },
  {
    why: 'check: compressed L2 entry with the copied flag (QEMU "ERROR: coffset=0x502c: copied flag must never be set for compressed clusters")',
    shape: 'compressed-zlib', target: 'c.qcow2', patches: [{ off: 16400, hex: 'c00000000000502c' }], checkParity: true,
  },
  {
    why: 'check: a flipped bitmap table size (up to 2^27 entries) allocated 1 GiB and printed 260k lines (6 s, 580 MiB RSS); QEMU bounds it by 512 MiB of bitmap data',
    shape: 'bitmaps', target: 'a.qcow2', off: 327680, len: 65536, cli: true,
    patches: [{ off: 13556, hex: '40' }, { off: 14639, hex: 'a8' }, { off: 26481, hex: '10' }, { off: 5867, hex: '02' }, { off: 25507, hex: '40' }, { off: 9759, hex: '80' },
      { off: 176168, hex: '04' }, { off: 10663, hex: '97' }, { off: 8346, hex: '8d' }, { off: 12305, hex: '08' }, { off: 173144, hex: '02' }],
  },
  {
    why: 'check -r all: a refcount block at 4 TiB with 512-byte clusters grew the file to 2^33 clusters and the rebuild ran out of heap (SIGABRT); the rebuilt reftable is now bounded (128 MiB: "Check failed: Cannot allocate memory"; QEMU needs 17 GB and fails its second pass)',
    shape: 'v3-512', target: 'a.qcow2', off: 63737, len: 106190, cli: true,
    patches: [{ truncate: 29184 }, { off: 512, hex: '0000040000000000' }],
  },
];
