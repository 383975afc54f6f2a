/**
 * `check -r all` on fuzzer-found images (test/helpers/fuzz*.ts recipes, self-contained), against
 * qemu-img 7.2: the same report (stdout, stderr, exit status), the same repaired file byte for byte,
 * and the same `qemu-img check` verdict afterwards. Each tool repairs its own copy.
 */
import { test, before } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { oracle, qchain, qemuImg, scratch } from './helpers/qemu.js';
import { buildCorpus, fileHead, materialiseCase, type Recipe } from './helpers/fuzz.js';
import type { Shape } from './helpers/fuzz-corpus.js';

interface Case extends Recipe { why: string }

const CASES: Case[] = [
  {
    why: "refcount block 14 past 2^53: the file cannot grow to hold it (\"Could not resize file: File too large\"), a rebuild follows",
    shape: "compressed-zlib", target: "c.qcow2",
    patches: [{"off": 112, "hex": "6803f857000000000000000000000000"}, {"off": 17440, "hex": "4000000000000000"}, {"off": 4209, "hex": "76"}, {"off": 1515, "hex": "86"}, {"off": 2539, "hex": "32"}, {"off": 3495, "hex": "1b"}, {"off": 2451, "hex": "bf"}, {"off": 18395, "hex": "b1"}, {"off": 3625, "hex": "98"}, {"off": 17730, "hex": "32"}, {"off": 1244, "hex": "04"}, {"off": 5095, "hex": "ed"}, {"off": 14962, "hex": "8b"}, {"off": 14768, "hex": "20"}],
  },
  {
    why: "rc1: refcount block 0 past EOF: the file grows to hold it, the block is counted (repaired, not rebuilt)",
    shape: "rc1", target: "a.qcow2",
    patches: [{"off": 4096, "hex": "0000000000022000"}],
  },
  {
    why: "reftable entry 0x4000000000020000 (past 2^56): the block reads as zeros past EOF, the resize fails, rebuild",
    shape: "snapshots-v2-64k", target: "a.qcow2",
    patches: [{"off": 196608, "hex": "8000000000070000"}, {"off": 458800, "hex": "4000000000100000"}, {"off": 65536, "hex": "4000000000020000"}],
  },
  {
    why: "v2 image cut to 104 bytes: the rebuilt refblock would overwrite the refcount table; a writable v2 image is marked corrupt too (header rewritten), check fails",
    shape: "snapshots-v2-64k", target: "a.qcow2",
    patches: [{"truncate": 104}],
  },
  {
    why: "rc64: refcount block 276 past EOF grows the file; refcounts of 2^36 are exact",
    shape: "rc64", target: "a.qcow2",
    patches: [{"off": 480, "hex": "01"}, {"off": 17838, "hex": "02"}, {"off": 693, "hex": "a6"}, {"off": 15653, "hex": "94"}, {"off": 6309, "hex": "20"}, {"off": 14726, "hex": "80"}, {"off": 16217, "hex": "08"}, {"off": 1190, "hex": "9f"}, {"off": 10843, "hex": "10"}, {"off": 5854, "hex": "4b"}, {"off": 3057, "hex": "0c"}, {"off": 19073, "hex": "46"}, {"off": 18444, "hex": "0e"}],
  },
  {
    why: "bitmaps: unaligned refblock offset marks the image corrupt; the recount after the rebuild cannot load the bitmap directory (EINVAL); nothing stored on close",
    shape: "bitmaps", target: "a.qcow2",
    patches: [{"off": 4096, "hex": "00fffffffffffe00"}],
  },
  {
    why: "refcount block 333 past EOF: the file grows to 92 MB",
    shape: "compressed-zlib", target: "c.qcow2",
    patches: [{"off": 112, "hex": "a462c0000000003d259de4fb0f59cae41bb674a1a433bfae6c90e46e856a51928d34fed9aefa0da6b586af602ccd9d88ed18f60f1448b81a1e70ab48c0b0a31e6812c03b0d0000000000000000000000"}, {"off": 6760, "hex": "0000000005b25000"}],
  },
  {
    why: "bitmaps: the rebuilt refblock overlaps the old (unaligned) refcount block: ERROR writing refblock",
    shape: "bitmaps", target: "a.qcow2",
    patches: [{"off": 4096, "hex": "0000000000001fff"}],
  },
  {
    why: "rc64: reftable entry with reserved bits; the rebuilt refblock overlaps the old refcount block",
    shape: "rc64", target: "a.qcow2",
    patches: [{"off": 4096, "hex": "0000000000002008"}],
  },
  {
    why: "zstd: the rebuild hits metadata (ERROR writing refblock) before the snapshot table is rewritten",
    shape: "compressed-zstd-64k", target: "c.qcow2",
    patches: [{"off": 60, "hex": "80000000"}, {"off": 171330, "hex": "a081"}, {"off": 504, "hex": "1e8f52700000002171c5c2307f9d4d5fce1c09c3b4ee827614b76a8da57eff7de49e15d425d83fff97000000000000000000000000000000"}],
  },
  {
    why: "4k clusters, two L2 tables: the rebuilt refblock overlaps a refcount block",
    shape: "v3-4k-two-l2", target: "a.qcow2",
    patches: [{"off": 12304, "hex": "800000000001e200"}, {"off": 4096, "hex": "00000000000021ff"}],
  },
  {
    why: "extended L2, L1 size 0x7860: the COPIED repair of an L2 table overlaps the active L1 table; refcount repairs made before are lost with the driver, as in QEMU",
    shape: "extl2-64k", target: "a.qcow2",
    patches: [{"off": 36, "hex": "00007860"}],
  },
  {
    why: "lazy-dirty: a repaired image with no errors left loses its dirty bit (qcow2_mark_clean)",
    shape: "lazy-dirty", target: "a.qcow2",
    patches: [{"off": 4096, "hex": "0000000000001000"}],
  },
  {
    why: "lazy-dirty with errors left: the clean close clears the dirty bit by rewriting the whole header cluster",
    shape: "lazy-dirty", target: "a.qcow2",
    patches: [{"off": 10817, "hex": "fd"}, {"off": 14166, "hex": "64"}, {"off": 17670, "hex": "54"}, {"off": 20443, "hex": "6e"}, {"off": 15094, "hex": "80"}, {"off": 8429, "hex": "fa"}, {"off": 16534, "hex": "94"}, {"off": 1987, "hex": "16"}, {"off": 5821, "hex": "02"}, {"off": 317, "hex": "c4"}, {"off": 16584, "hex": "800000000000f000"}],
  },
  {
    why: "rc1: references are counted at the refcount width; a second reference overflows (\"ERROR: overflow cluster offset=...\")",
    shape: "rc1", target: "a.qcow2",
    patches: [{"off": 60, "hex": "00020ff8"}, {"off": 4096, "hex": "0000000000004000"}, {"off": 12288, "hex": "7fffffffffffffff"}],
  },
  {
    why: "an unaligned preallocated zero cluster is repaired into a zero cluster (fix_l2_entry_by_zero)",
    shape: "rc8-lazy", target: "a.qcow2",
    patches: [{"off": 262144, "hex": "0000000000008cfd"}],
  },
  {
    why: "bitmaps, no snapshots, junk snapshot offset: the header rewritten at open (bitmaps in use) has a zero table offset, as QEMU in check mode",
    shape: "bitmaps", target: "a.qcow2",
    patches: [{"off": 64, "hex": "4000000000000000"}],
  },
  {
    why: "a backing file two levels down has an invalid snapshot table offset: backing files are opened in check mode too (no snapshot table read), so the check runs",
    shape: "chain-3-extl2", target: "a.qcow2",
    patches: [{"truncate": 71}, {"off": 64, "hex": "80000000000000"}, {"truncate": 103}],
  },
  {
    why: "rc64: a leaked refcount of 2^56 is reported exactly",
    shape: "rc64", target: "a.qcow2",
    patches: [{"off": 12288, "hex": "4000000000000000"}, {"off": 60, "hex": "00022000"}, {"off": 8760, "hex": "01"}, {"off": 907, "hex": "8c"}, {"off": 3482, "hex": "04"}, {"off": 6813, "hex": "10"}, {"off": 8574, "hex": "04"}, {"off": 13958, "hex": "dd"}, {"off": 4442, "hex": "fe"}],
  },
  {
    why: "refcount table at 2^55 + 4 KiB (valid for QEMU, past EOF): it reads as zeros, every refcount is rebuilt",
    shape: "lazy-dirty", target: "a.qcow2",
    patches: [{"off": 48, "hex": "0080000000001000"}, {"off": 112, "hex": "6803f857000000000000000000000000"}],
  },
  {
    why: "active L1 table at 2^62 (valid for QEMU, past EOF): it reads as zeros, the clusters it held leak",
    shape: "rc8-lazy", target: "a.qcow2",
    patches: [{"off": 40, "hex": "4000000000000000"}],
  },
  {
    why: "bitmaps: marking them in use at open would overwrite a refcount block (overlap check): the image is marked corrupt, \"Can't update bitmap directory\"",
    shape: "bitmaps", target: "a.qcow2",
    patches: [{"off": 4096, "hex": "000000000002b000"}],
  },
  {
    why: "4k clusters, a refcount block at 564 GiB: the file grows sparsely to hold it, counts are kept only where something is counted, and the rebuild walks 147M clusters",
    shape: "v3-4k", target: "a.qcow2",
    patches: [{"off": 14860, "hex": "80"}, {"off": 13225, "hex": "5e"}, {"off": 3435, "hex": "ef"}, {"off": 990, "hex": "80"}, {"off": 4323, "hex": "8d"}, {"off": 3664, "hex": "cd"}, {"off": 525, "hex": "20"}, {"off": 8272, "hex": "f180"}],
  },
  {
    why: "4k clusters, refcount blocks up to 332 GiB past EOF: three resizes, a rebuild, an image end offset of 356482293760",
    shape: "v3-4k", target: "a.qcow2",
    patches: [{"off": 5437, "hex": "08"}, {"off": 3213, "hex": "01"}, {"off": 6360, "hex": "72"}, {"off": 16975, "hex": "52"}, {"off": 6931, "hex": "53"}, {"off": 18059, "hex": "9b"}, {"off": 5965, "hex": "f1"}, {"off": 12609, "hex": "02"}],
  },
  {
    why: "rc1: the repair marks the image corrupt yet succeeds; the second pass then fails as QEMU's driverless one (\"Check failed: No medium found\")",
    shape: "rc1", target: "a.qcow2",
    patches: [{"off": 4096, "hex": "7fffffffffffffff"}, {"off": 4096, "hex": "7ffffffffffffeff"}, {"off": 12288, "hex": "8000000000005000"}],
  },
  {
    why: "512-byte clusters, a refcount block at 1 TiB: a rebuilt 64 MiB reftable, then the second pass refuses more than INT_MAX clusters (\"Check failed: File too large\")",
    shape: "v3-512", target: "a.qcow2",
    patches: [{"off": 1680, "hex": "8000000000006808"}, {"off": 144, "hex": "58"}, {"off": 1080, "hex": "d9"}, {"off": 1756, "hex": "20"}, {"off": 27132, "hex": "0b"}, {"off": 906, "hex": "01"}, {"off": 40, "hex": "0000000000007000"}],
  },
  {
    why: "virtual size 2^64 - 2: QEMU's L1 index wraps, so the open fails only after the driver opened (\"Could not refresh total sector count: File too large\")",
    shape: "compressed-zstd-64k", target: "c.qcow2",
    patches: [{"off": 24, "hex": "fffffffffffffffe"}],
  },
  {
    why: "rc64: a leaked refcount of 2^64 - 2 is repaired to exactly 1 (the new value written as such, not a rounded difference)",
    shape: "rc64", target: "a.qcow2",
    patches: [{"off": 8208, "hex": "fffffffffffffffe"}, {"off": 17080, "hex": "0000000000003000"}],
  },
  {
    why: "LUKS encryption method without its crypto header extension: \"Missing CRYPTO header for crypt method 2\"",
    shape: "compressed-zstd-64k", target: "c.qcow2",
    patches: [{"off": 32, "hex": "00000002"}],
  },
  {
    why: "AES encryption method: no key-secret given (\"Parameter 'encrypt.key-secret' is required for cipher\")",
    shape: "rc1", target: "a.qcow2",
    patches: [{"off": 32, "hex": "00000001"}],
  },
  {
    why: "AES encryption on a v2 image with 512-byte clusters and compressed clusters: the key-secret error comes before anything is read",
    shape: "compressed-v2-512", target: "c.qcow2",
    patches: [{"off": 3424, "hex": "4000000000001160"}, {"off": 32, "hex": "00000001"}, {"off": 512, "hex": "0000000000000200"}],
  },
  {
    why: "bitmaps autoclear bit with the bitmaps extension gone: QEMU's directory (0, 0) overlaps every write; the repaired refcounts stay cached for the second pass and their flush on close marks the image corrupt",
    shape: "bitmaps", target: "a.qcow2",
    patches: [{"off": 112, "hex": "edd91472"}],
  },
  {
    why: "compression type 2 is refused before the header extensions are read (\"qcow2: unknown compression type: 2\", not \"Header extension too large\")",
    shape: "compressed-zlib", target: "c.qcow2",
    patches: [{"off": 40, "hex": "0000020000000000"}, {"off": 112, "hex": "6803f857000010000100666561743000000000000000000000000000000000000000000000000000000000000000000000000000000000000103787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878780104787878787878787878787878787878787878787878787878787878787878787878787878787878787878787878780000000000000000"}, {"off": 104, "hex": "02"}],
  },
  {
    why: "data file name extension without the data file bit: the clean close rewrites the header without it (QEMU's has_data_file)",
    shape: "lazy-dirty", target: "a.qcow2",
    patches: [{"off": 112, "hex": "44415441000000092f6465762f6e756c6c000000000000000000000000000000"}],
  },
  {
    why: "refcount width 2^(2^32-1) is refused before the header extensions are read (an extension too large is not reached)",
    shape: "extl2-64k", target: "a.qcow2",
    patches: [{"off": 96, "hex": "ffffffff"}, {"off": 112, "hex": "23852875"}, {"off": 116, "hex": "ffff0180"}],
  },
  {
    why: "refcount width 2^256 is refused before the header extensions are read (a crypto extension without LUKS is not reached)",
    shape: "lazy-dirty", target: "a.qcow2",
    patches: [{"off": 96, "hex": "00000100"}, {"off": 112, "hex": "0537be7700000000000000000000100000000000000000010000000000000000"}, {"off": 116, "hex": "00000000"}],
  },
  {
    why: "corrupt bit set: an image opened for repair (check mode) may be opened read/write; the repair clears the bit",
    shape: "rc8-lazy", target: "a.qcow2",
    patches: [{"off": 72, "hex": "0000000000000002"}],
  },
  {
    why: "512-byte clusters, 1024 junk snapshots: the new table's refcounts are cached until qcow2_write_snapshots flushes; the refcount block inside the old table fails the overlap check, nothing of it is written",
    shape: "chain-3-extl2", target: "c.qcow2",
    patches: [{"off": 2464, "hex": "4000000000000000"}, {"off": 2464, "hex": "0000000000000000"}, {"off": 60, "hex": "00000400"}],
  },
  {
    why: "512-byte clusters, 2^32 - 512 snapshots: the rewritten 4 MiB table needs refcount blocks that do not exist; QEMU's allocator places one after the run, its flush hits the old table (image marked corrupt, the block written, not hooked up)",
    shape: "v3-512", target: "a.qcow2",
    patches: [{"off": 60, "hex": "fffffe00"}],
  },
];

let shapes: Map<string, Shape>;
let tmp: string;

before(() => {
  if (oracle().skip) return;
  tmp = scratch('qchain-check-repair-fuzz-');
  shapes = buildCorpus(path.join(tmp, 'corpus'));
});

for (const [i, c] of CASES.entries()) {
  test(`check -r all as qemu-img: ${c.why}`, oracle(), async () => {
    const q = materialiseCase(c, shapes, path.join(tmp, `c${i}`, 'q'));
    const m = materialiseCase(c, shapes, path.join(tmp, `c${i}`, 'm'));
    const name = path.basename(q);
    const qr = await qemuImg(['check', '-r', 'all', name], path.dirname(q));
    const mr = await qchain(['img', 'check', '-r', 'all', name], path.dirname(m));
    assert.equal(mr.stderr, qr.stderr, 'stderr');
    assert.equal(mr.stdout, qr.stdout, 'stdout');
    assert.equal(mr.code, qr.code, 'exit status');
    assert.equal(fs.statSync(m).size, fs.statSync(q).size, 'repaired file sizes');
    assert.ok(fileHead(m).equals(fileHead(q)), 'repaired files differ');
    const qa = await qemuImg(['check', name], path.dirname(q));
    const ma = await qemuImg(['check', name], path.dirname(m));
    assert.equal(ma.code, qa.code, 'qemu-img check afterwards');
    fs.rmSync(path.join(tmp, `c${i}`), { recursive: true, force: true });
  });
}

/**
 * Deliberate difference: in check mode QEMU 7.2 has no snapshot table until the check reads it,
 * so a header rewritten at open (here: an invalid bitmaps extension dropped from a v2 image)
 * records no snapshots, and the repair then frees the snapshot's clusters as leaks. qchain keeps
 * the table: the repaired image still has its snapshot and qemu-img finds it clean.
 */
test('check -r all keeps the snapshot table QEMU 7.2 drops when check mode rewrites the header', oracle(), async () => {
  const c: Recipe = { shape: 'snapshots-v2-64k', target: 'a.qcow2', patches: [{ off: 72, hex: '23852875000000180000000100000000000000000400000000000000000300000000000000000000' }] };
  const m = materialiseCase(c, shapes, path.join(tmp, 'keep-snapshots'));
  const name = path.basename(m);
  const mr = await qchain(['img', 'check', '-r', 'all', name], path.dirname(m));
  assert.equal(mr.code, 0, mr.stderr);
  const list = await qemuImg(['snapshot', '-l', name], path.dirname(m));
  assert.match(list.stdout, /\bs1\b/);
  assert.equal((await qemuImg(['check', name], path.dirname(m))).code, 0);
});
