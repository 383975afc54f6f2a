import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import zlib from 'node:zlib';
import {
  COMPRESSION_ZLIB,
  COMPRESSION_ZSTD,
  type CompressionType,
  compressCluster,
  decompressCluster,
  zstdFrameInfo,
  zstdFrameLength,
} from '../src/qcow2/compress.js';
import { CompressPool } from '../src/qcow2/compress-pool.js';

const TYPES: [CompressionType, string][] = [
  [COMPRESSION_ZLIB, 'zlib'],
  [COMPRESSION_ZSTD, 'zstd'],
];
const CLUSTER_SIZES = [512, 4096, 65536, 2 * 1024 * 1024];

// ---------------------------------------------------------------------------
// helpers

/** Deterministic pseudo-random bytes (xorshift32), for reproducible data. */
function prng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x;
  };
}

const WORDS = 'the quick brown fox jumps over lazy dog qcow2 cluster refcount table backing file snapshot l1 l2 header'.split(' ');

/** Text-like data: words from a small vocabulary, with line breaks and numbers. */
function textData(size: number, seed = 1): Buffer {
  const next = prng(seed);
  const parts: string[] = [];
  let len = 0;
  while (len < size) {
    const r = next();
    const word = r % 17 === 0 ? String(r % 100000) : WORDS[r % WORDS.length]!;
    const piece = word + (r % 11 === 0 ? '\n' : ' ');
    parts.push(piece);
    len += piece.length;
  }
  return Buffer.from(parts.join(''), 'latin1').subarray(0, size);
}

function patterns(size: number): [string, Buffer][] {
  const half = Buffer.concat([randomBytes(size / 2), Buffer.alloc(size / 2, 0x5a)]);
  return [
    ['zeros', Buffer.alloc(size)],
    ['text', textData(size)],
    ['half-random', half],
    ['random', randomBytes(size)],
  ];
}

function tmpdir(): string {
  return mkdtempSync(path.join(os.tmpdir(), 'qchain-compress-'));
}

function hasCommand(cmd: string): boolean {
  const r = spawnSync(cmd, ['--version'], { stdio: 'ignore' });
  return r.error === undefined && r.status === 0;
}

/** Hand-made zstd frame of raw blocks, without Frame_Content_Size or checksum. */
function rawZstdFrameWithoutSize(content: Buffer): Buffer {
  // FHD 0: no content size, not single-segment, no checksum; window 2^17.
  const parts: Buffer[] = [Buffer.from([0x28, 0xb5, 0x2f, 0xfd, 0x00, 7 << 3])];
  let pos = 0;
  do {
    const block = content.subarray(pos, pos + 65536);
    pos += block.length;
    const h = (block.length << 3) | (pos >= content.length ? 1 : 0); // Block_Type 0 = raw
    parts.push(Buffer.from([h & 0xff, (h >> 8) & 0xff, (h >> 16) & 0xff]), block);
  } while (pos < content.length);
  return Buffer.concat(parts);
}

function skippableFrame(payload: Buffer): Buffer {
  const h = Buffer.alloc(8);
  h.writeUInt32LE(0x184d2a53, 0);
  h.writeUInt32LE(payload.length, 4);
  return Buffer.concat([h, payload]);
}

async function mustCompress(type: CompressionType, data: Buffer): Promise<Buffer> {
  const c = await compressCluster(type, data);
  assert.ok(c !== null, 'expected compressible data');
  return c;
}

// ---------------------------------------------------------------------------
// 1. round trips

test('round trip, all types, cluster sizes and patterns', async (t) => {
  for (const [type, name] of TYPES) {
    for (const cs of CLUSTER_SIZES) {
      for (const [pname, data] of patterns(cs)) {
        await t.test(`${name} ${cs} ${pname}`, async () => {
          const c = await compressCluster(type, data);
          if (pname === 'random') {
            assert.equal(c, null, 'incompressible data must be reported as null');
            return;
          }
          assert.ok(c !== null);
          assert.ok(c.length < cs, `compressed ${c.length} >= cluster ${cs}`);
          if (type === COMPRESSION_ZSTD) assert.equal(zstdFrameLength(c), c.length);
          const d = await decompressCluster(type, c, cs);
          assert.equal(d.length, cs);
          assert.ok(d.equals(data));
        });
      }
    }
  }
});

test('compress returns null exactly when output is not smaller than the cluster', async () => {
  // 512 random bytes cannot shrink in either format.
  for (const [type] of TYPES) assert.equal(await compressCluster(type, randomBytes(512)), null);
  // A mostly random 4 KiB cluster with a short compressible tail still shrinks.
  const data = Buffer.concat([randomBytes(3584), Buffer.alloc(512)]);
  for (const [type] of TYPES) {
    const c = await compressCluster(type, data);
    assert.ok(c !== null && c.length < 4096);
  }
  // The exact threshold (QEMU's output buffer is cluster_size - 1 bytes):
  // find clusters whose deflate stream is exactly cs and cs - 1 bytes long.
  // (zstd cannot land there: it stores a raw block unless compression saves
  // at least srcSize/64 + 2 bytes, so its frames jump from well below the
  // cluster size to above it.)
  const cs = 4096;
  const next = prng(12345);
  const noise = Buffer.from(Array.from({ length: cs }, () => next() & 0xff));
  const abcd = Buffer.from(Array.from({ length: cs }, () => 0x41 + (next() & 3)));
  const seen = new Set<number>();
  for (let k = cs - 1200; k <= cs && seen.size < 2; k++) {
    const cluster = Buffer.concat([noise.subarray(0, k), abcd.subarray(0, cs - k)]);
    const len = zlib.deflateRawSync(cluster, { windowBits: 12, memLevel: 9 }).length;
    if ((len !== cs && len !== cs - 1) || seen.has(len)) continue;
    seen.add(len);
    const c = await compressCluster(COMPRESSION_ZLIB, cluster);
    if (len === cs) assert.equal(c, null, 'a stream of exactly cluster_size bytes must not be used');
    else assert.equal(c?.length, cs - 1, 'a stream of cluster_size - 1 bytes must be used');
  }
  assert.equal(seen.size, 2, 'test data did not hit both threshold lengths');
});

// ---------------------------------------------------------------------------
// 2. trailing bytes (the next compressed cluster follows in the same sector)

test('trailing garbage after the compressed stream is ignored', async (t) => {
  for (const [type, name] of TYPES) {
    for (const cs of [4096, 65536]) {
      await t.test(`${name} ${cs}`, async () => {
        const a = textData(cs, 7);
        const b = Buffer.alloc(cs, 0x33);
        const ca = await mustCompress(type, a);
        const cb = await mustCompress(type, b);
        // As stored by QEMU: packed back to back, the slice rounded up to a sector.
        const packed = Buffer.concat([ca, cb]);
        const padded = Buffer.concat([packed, randomBytes((512 - (packed.length % 512)) % 512)]);
        assert.ok((await decompressCluster(type, padded, cs)).equals(a));
        assert.ok((await decompressCluster(type, padded.subarray(ca.length), cs)).equals(b));
        // Arbitrary junk after the stream.
        const junk = Buffer.concat([ca, Buffer.alloc(1000, 0xff)]);
        assert.ok((await decompressCluster(type, junk, cs)).equals(a));
      });
    }
  }
});

// ---------------------------------------------------------------------------
// zstd frame walking and multi-frame clusters

test('zstdFrameLength: library, CLI (with checksum), raw, RLE and skippable frames', async (t) => {
  const samples = [Buffer.alloc(0), Buffer.alloc(300000), textData(300000), randomBytes(200000), Buffer.alloc(5, 1)];
  for (const s of samples) {
    const frame = rawZstdFrameWithoutSize(s);
    assert.equal(zstdFrameLength(frame), frame.length);
    assert.equal(zstdFrameInfo(frame).contentSize, null);
  }
  const sk = skippableFrame(Buffer.from('hello'));
  assert.deepEqual(zstdFrameInfo(Buffer.concat([sk, Buffer.alloc(7)])), { length: 13, skippable: true, contentSize: null });

  // Frame starting at a non-zero offset, followed by another frame.
  const c1 = await mustCompress(COMPRESSION_ZSTD, textData(65536, 3));
  const c2 = await mustCompress(COMPRESSION_ZSTD, Buffer.alloc(65536));
  const both = Buffer.concat([Buffer.alloc(11), c1, c2]);
  assert.equal(zstdFrameLength(both, 11), c1.length);
  assert.equal(zstdFrameLength(both, 11 + c1.length), c2.length);
  assert.equal(zstdFrameInfo(c1).contentSize, 65536);

  await t.test('zstd CLI frames', { skip: !hasCommand('zstd') && 'zstd CLI not installed' }, () => {
    const dir = tmpdir();
    try {
      let i = 0;
      for (const s of samples) {
        for (const args of [['-3'], ['-19', '--no-check'], ['-1', '--check'], ['--ultra', '-22']]) {
          const f = path.join(dir, `s${i++}`);
          writeFileSync(f, s);
          execFileSync('zstd', ['-q', '-f', ...args, f, '-o', `${f}.zst`]);
          const frame = readFileSync(`${f}.zst`);
          assert.equal(zstdFrameLength(frame), frame.length, `zstd ${args.join(' ')} of ${s.length} bytes`);
          assert.equal(zstdFrameLength(Buffer.concat([frame, frame])), frame.length);
        }
      }
      // The RLE path: the CLI emits RLE blocks for runs of one byte.
      const f = path.join(dir, 'rle');
      writeFileSync(f, Buffer.alloc(1 << 20, 0x61));
      execFileSync('zstd', ['-q', '-f', f, '-o', `${f}.zst`]);
      const rle = readFileSync(`${f}.zst`);
      assert.equal(zstdFrameLength(rle), rle.length);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

test('zstdFrameLength rejects malformed frames', async () => {
  const c = await mustCompress(COMPRESSION_ZSTD, textData(65536));
  assert.throws(() => zstdFrameLength(c.subarray(0, c.length - 1)), /truncated/);
  assert.throws(() => zstdFrameLength(c.subarray(0, 3)), /truncated/);
  assert.throws(() => zstdFrameLength(Buffer.from('not a zstd frame')), /not a zstd frame/);
  const reserved = Buffer.from(c);
  reserved[4] = reserved[4]! | 0x08;
  assert.throws(() => zstdFrameLength(reserved), /reserved header bit/);
  const badBlock = Buffer.from([0x28, 0xb5, 0x2f, 0xfd, 0x20, 0x10, 0x07, 0x00, 0x00]); // block type 3
  assert.throws(() => zstdFrameLength(badBlock), /reserved block type/);
  assert.throws(() => zstdFrameLength(skippableFrame(Buffer.alloc(10)).subarray(0, 12)), /truncated/);
});

test('zstd: multiple frames, skippable frames and frames without content size', async () => {
  const cs = 65536;
  const data = textData(cs, 9);
  // Cluster content split over three frames: [0, 32768) compressed with a
  // content size, [32768, 50000) raw blocks without one, the rest compressed.
  const expected = Buffer.concat([data.subarray(0, 1000), Buffer.alloc(31768), data.subarray(32768)]);
  const first = await mustCompress(COMPRESSION_ZSTD, expected.subarray(0, 32768));
  const second = rawZstdFrameWithoutSize(expected.subarray(32768, 50000));
  const third = await mustCompress(COMPRESSION_ZSTD, expected.subarray(50000));
  const src = Buffer.concat([skippableFrame(Buffer.from('x')), first, second, skippableFrame(Buffer.alloc(0)), third, randomBytes(100)]);
  const out = await decompressCluster(COMPRESSION_ZSTD, src, cs);
  assert.ok(out.equals(expected));
  // A whole cluster in one frame without Frame_Content_Size.
  const noSize = rawZstdFrameWithoutSize(data);
  assert.ok((await decompressCluster(COMPRESSION_ZSTD, Buffer.concat([noSize, first]), cs)).equals(data));
});

// ---------------------------------------------------------------------------
// corrupt input

test('corrupt input throws a one-line error', async (t) => {
  const cs = 65536;
  const data = textData(cs, 5);
  const expectErr = async (type: CompressionType, src: Buffer, clusterSize = cs): Promise<void> => {
    const name = type === COMPRESSION_ZLIB ? 'zlib' : 'zstd';
    await assert.rejects(decompressCluster(type, src, clusterSize), (err: unknown) => {
      assert.ok(err instanceof Error);
      assert.equal(err.message, `Failed to decompress cluster (${name})`);
      assert.ok(!err.message.includes('\n'));
      return true;
    });
  };
  for (const [type, name] of TYPES) {
    await t.test(name, async () => {
      const c = await mustCompress(type, data);
      await expectErr(type, randomBytes(4096));
      await expectErr(type, Buffer.alloc(0));
      await expectErr(type, c.subarray(0, c.length >> 1)); // truncated
      await expectErr(type, c, cs * 2); // stream shorter than the cluster
      const flipped = Buffer.from(c);
      for (let i = 20; i < flipped.length; i += 97) flipped[i] = flipped[i]! ^ 0x5a;
      await expectErr(type, flipped);
    });
  }
  await t.test('zstd content size larger than the cluster', async () => {
    const c = await mustCompress(COMPRESSION_ZSTD, Buffer.alloc(2 * cs));
    await expectErr(COMPRESSION_ZSTD, c, cs);
    // Forged 8-byte Frame_Content_Size of 2^40: rejected before any allocation.
    const forged = Buffer.from([0x28, 0xb5, 0x2f, 0xfd, 0xe0, 0, 0, 0, 0, 0, 1, 0, 0, 0x01, 0, 0]);
    assert.equal(zstdFrameInfo(forged).contentSize, 2 ** 40);
    await expectErr(COMPRESSION_ZSTD, forged, cs);
  });
  await t.test('invalid arguments', async () => {
    await assert.rejects(decompressCluster(COMPRESSION_ZLIB, Buffer.alloc(10), 0), RangeError);
    await assert.rejects(decompressCluster(2 as CompressionType, Buffer.alloc(10), 512), RangeError);
    await assert.rejects(compressCluster(COMPRESSION_ZSTD, Buffer.alloc(0)), RangeError);
  });
});

test('zlib: a stream longer than the cluster yields its first clusterSize bytes (as QEMU)', async () => {
  const cs = 4096;
  const long = textData(3 * cs, 11);
  const stream = zlib.deflateRawSync(long, { windowBits: 12, memLevel: 9 });
  const out = await decompressCluster(COMPRESSION_ZLIB, Buffer.concat([stream, Buffer.alloc(300)]), cs);
  assert.ok(out.equals(long.subarray(0, cs)));
  // A stream cut short after the cluster's worth of output is also accepted.
  const cut = stream.subarray(0, Math.floor(stream.length * 0.8));
  assert.ok((await decompressCluster(COMPRESSION_ZLIB, cut, cs)).equals(long.subarray(0, cs)));
});

// ---------------------------------------------------------------------------
// 4. our output decodes with independent decoders

test('our output is decodable by zlib inflateRaw(windowBits 12) and the zstd CLI', async (t) => {
  const inputs = [textData(65536, 21), Buffer.alloc(4096, 0x7e), Buffer.concat([randomBytes(1 << 20), Buffer.alloc(1 << 20)])];
  for (const data of inputs) {
    const c = await mustCompress(COMPRESSION_ZLIB, data);
    assert.ok(zlib.inflateRawSync(c, { windowBits: 12 }).equals(data));
  }
  await t.test('zstd -d', { skip: !hasCommand('zstd') && 'zstd CLI not installed' }, async () => {
    const dir = tmpdir();
    try {
      for (const [i, data] of inputs.entries()) {
        const c = await mustCompress(COMPRESSION_ZSTD, data);
        const f = path.join(dir, `c${i}.zst`);
        writeFileSync(f, c);
        execFileSync('zstd', ['-q', '-d', '-f', f, '-o', `${f}.out`]);
        assert.ok(readFileSync(`${f}.out`).equals(data));
      }
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

// ---------------------------------------------------------------------------
// 3. oracle: clusters compressed by the real qemu-img

interface CompressedCluster {
  guestOffset: number;
  slice: Buffer;
}

/** Minimal qcow2 walk: every compressed cluster and its sector-rounded slice. */
function compressedClusters(image: Buffer): { clusterBits: number; compressionType: number; clusters: CompressedCluster[] } {
  assert.equal(image.readUInt32BE(0), 0x514649fb, 'qcow2 magic');
  const clusterBits = image.readUInt32BE(20);
  const l1Size = image.readUInt32BE(36);
  const l1Offset = Number(image.readBigUInt64BE(40));
  const headerLength = image.readUInt32BE(4) >= 3 ? image.readUInt32BE(100) : 72;
  const compressionType = headerLength > 104 ? image[104]! : 0;
  const clusterSize = 1 << clusterBits;
  const l2Entries = clusterSize / 8;
  const x = BigInt(62 - (clusterBits - 8));
  const offsetMask = (1n << x) - 1n;
  const sectorsMask = (1n << BigInt(clusterBits - 8)) - 1n;
  const clusters: CompressedCluster[] = [];
  for (let i = 0; i < l1Size; i++) {
    const l2Offset = Number(image.readBigUInt64BE(l1Offset + 8 * i) & 0x00fffffffffffe00n);
    if (l2Offset === 0) continue;
    for (let j = 0; j < l2Entries; j++) {
      const entry = image.readBigUInt64BE(l2Offset + 8 * j);
      if (((entry >> 62n) & 1n) === 0n) continue;
      const hostOffset = Number(entry & offsetMask);
      const nsectors = Number((entry >> x) & sectorsMask);
      const len = (nsectors + 1) * 512 - (hostOffset & 511);
      clusters.push({
        guestOffset: (i * l2Entries + j) * clusterSize,
        slice: image.subarray(hostOffset, hostOffset + len),
      });
    }
  }
  return { clusterBits, compressionType, clusters };
}

test('oracle: decode clusters compressed by qemu-img convert -c', async (t) => {
  if (!hasCommand('qemu-img') || !hasCommand('qemu-io')) {
    if (process.env.CI) assert.fail('qemu-img/qemu-io not found, required when CI is set');
    t.skip('qemu-img/qemu-io not installed');
    return;
  }
  const dir = tmpdir();
  try {
    // Source: text in the first 2 MiB, random (stays uncompressed) in the
    // next 512 KiB, then patterns written by qemu-io over a zero background.
    const raw = Buffer.alloc(4 << 20);
    textData(2 << 20, 42).copy(raw, 0);
    randomBytes(512 << 10).copy(raw, 2 << 20);
    for (let off = 3 << 20; off < (3 << 20) + (256 << 10); off += 4096) {
      textData(1500, off).copy(raw, off); // partly compressible clusters
    }
    const rawPath = path.join(dir, 'text.raw');
    const src = path.join(dir, 'src.qcow2');
    writeFileSync(rawPath, raw);
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', src, '4M']);
    execFileSync('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'qcow2', rawPath, src]);
    execFileSync('qemu-io', [
      '-f', 'qcow2',
      '-c', 'write -q -P 0x11 2560k 256k',
      '-c', 'write -q -P 0x22 2816k 128k',
      '-c', 'write -q -P 0xa5 3700k 3k',
      '-c', 'write -q -z 3800k 64k',
      src,
    ]);

    for (const [type, name] of TYPES) {
      for (const cs of [65536, 4096]) {
        await t.test(`${name} cluster_size=${cs}`, async () => {
          const dst = path.join(dir, `dst-${name}-${cs}.qcow2`);
          const out = path.join(dir, `out-${name}-${cs}.raw`);
          const opts = `cluster_size=${cs}` + (type === COMPRESSION_ZSTD ? ',compression_type=zstd' : '');
          execFileSync('qemu-img', ['convert', '-c', '-f', 'qcow2', '-O', 'qcow2', '-o', opts, src, dst]);
          execFileSync('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', dst, out]);
          const image = readFileSync(dst);
          const expected = readFileSync(out);
          const { clusterBits, compressionType, clusters } = compressedClusters(image);
          assert.equal(1 << clusterBits, cs);
          assert.equal(compressionType, type);
          assert.ok(clusters.length > (2 << 20) / cs, `only ${clusters.length} compressed clusters`);
          let withTrailing = 0;
          for (const { guestOffset, slice } of clusters) {
            const got = await decompressCluster(type, slice, cs);
            assert.ok(got.equals(expected.subarray(guestOffset, guestOffset + cs)), `cluster at guest ${guestOffset}`);
            if (type === COMPRESSION_ZSTD && zstdFrameLength(slice) < slice.length) withTrailing++;
          }
          if (type === COMPRESSION_ZSTD) assert.ok(withTrailing > 0, 'no slice carried trailing bytes');
        });
      }
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

// ---------------------------------------------------------------------------
// worker pool

test('CompressPool compresses on worker threads', async () => {
  const pool = new CompressPool(2);
  try {
    const clusters = Array.from({ length: 24 }, (_, i) =>
      i % 3 === 2 ? randomBytes(65536) : textData(65536, i + 100),
    );
    for (const [type] of TYPES) {
      const compressed = await Promise.all(clusters.map((c) => pool.compress(type, c)));
      for (const [i, c] of compressed.entries()) {
        if (i % 3 === 2) {
          assert.equal(c, null);
          continue;
        }
        assert.ok(c !== null);
        assert.ok((await decompressCluster(type, c, 65536)).equals(clusters[i]!));
        assert.ok((await pool.decompress(type, c, 65536)).equals(clusters[i]!));
      }
      await assert.rejects(pool.decompress(type, randomBytes(100), 65536), /Failed to decompress cluster/);
    }
    // A view into a larger buffer: only the view is sent, the caller's bytes are untouched.
    const big = Buffer.concat([randomBytes(1000), textData(4096, 1), randomBytes(1000)]);
    const view = big.subarray(1000, 1000 + 4096);
    const c = await pool.compress(COMPRESSION_ZLIB, view);
    assert.ok(c !== null);
    assert.ok((await decompressCluster(COMPRESSION_ZLIB, c, 4096)).equals(textData(4096, 1)));
    assert.equal(big.length, 6096);
  } finally {
    await pool.close();
  }
  await assert.rejects(pool.compress(COMPRESSION_ZLIB, Buffer.alloc(512)), /closed/);
});

test('CompressPool close() finishes queued work', async () => {
  const pool = new CompressPool(1);
  const jobs = Array.from({ length: 8 }, (_, i) => pool.compress(COMPRESSION_ZSTD, textData(65536, i)));
  await pool.close();
  for (const j of jobs) assert.ok((await j) !== null);
});

test('CompressPool workers do not keep the process alive', () => {
  const poolUrl = new URL('../src/qcow2/compress-pool.js', import.meta.url).href;
  for (const close of [true, false]) {
    const script = `
      import { CompressPool } from ${JSON.stringify(poolUrl)};
      const pool = new CompressPool(2);
      const r = await Promise.all([pool.compress(0, Buffer.alloc(65536)), pool.compress(1, Buffer.alloc(65536))]);
      console.log(r.map((b) => b.length > 0).join(','));
      ${close ? 'await pool.close();' : ''}
    `;
    // A script file, not --input-type (worker threads inherit execArgv).
    const dir = tmpdir();
    try {
      const file = path.join(dir, 'child.mjs');
      writeFileSync(file, script);
      const r = spawnSync(process.execPath, [file], { encoding: 'utf8', timeout: 20000 });
      assert.equal(r.error, undefined, `child did not exit (close=${close})`);
      assert.equal(r.status, 0, r.stderr);
      assert.equal(r.stdout.trim(), 'true,true');
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  }
});
