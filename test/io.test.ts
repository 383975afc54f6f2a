/**
 * `qchain io` against the real qemu-io 7.2: every case runs the same command line with qemu-io
 * and with qchain on two copies of the same freshly created images, then compares stdout (timing
 * lines normalised with the iotests filter), stderr and the exit status, and the resulting images
 * (`qemu-img compare`, `qemu-img check`, and the top layer's `qemu-img map`).
 *
 * Cases marked `todo` document known engine differences (they run, but do not fail the suite).
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { execFile } from 'node:child_process';
import { QCHAIN, QEMU_IO, QEMU_IMG, filterTiming, oracle, qemuImg, scratch, type RunResult } from './helpers/qemu.js';
import { getL2Entry, setL2Entry } from './helpers/craft.js';

const ROOT = scratch('qchain-io-');

/** Also normalise the `-C` statistics line (bytes,ops,time,bytes/sec,ops/sec). */
function normalise(s: string): string {
  return filterTiming(s).replace(/^(\d+),(\d+),[0-9:.]+,[-0-9.infa]+,[-0-9.infa]+$/gm, '$1,$2,TIME,RATE,RATE');
}

/** Run a command with optional stdin text; never throws on a non-zero exit (nor on EPIPE). */
function exec(cmd: string, args: string[], cwd: string, input?: string): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const child = execFile(cmd, args, { cwd, maxBuffer: 64 * 1024 * 1024, timeout: 60_000, encoding: 'utf8' }, (err, stdout, stderr) => {
      if (err && typeof (err as NodeJS.ErrnoException).code === 'string') return reject(new Error(`${cmd}: ${err.message}`));
      resolve({ code: err ? ((err as { code?: number }).code ?? 1) : 0, stdout, stderr });
    });
    // The program may exit before reading its input.
    child.stdin?.on('error', () => {});
    child.stdin?.end(input ?? '');
  });
}

async function sh(cmd: string, args: string[], cwd: string): Promise<RunResult> {
  return exec(cmd, args, cwd);
}

async function img(args: string[], cwd: string): Promise<void> {
  const r = await qemuImg(args, cwd);
  if (r.code !== 0) throw new Error(`qemu-img ${args.join(' ')}: ${r.stderr}`);
}

async function qio(args: string[], cwd: string): Promise<void> {
  if (!QEMU_IO) throw new Error('qemu-io is not installed');
  const r = await sh(QEMU_IO, args, cwd);
  if (r.code !== 0) throw new Error(`qemu-io ${args.join(' ')}: ${r.stdout}${r.stderr}`);
}

interface Case {
  name: string;
  /** Build the images in `dir` (run once; the folder is then copied for qchain). */
  setup: (dir: string) => Promise<void>;
  /** qemu-io arguments (the image names are relative to the case folder). */
  args: string[];
  /** Text fed to stdin (commands read interactively). */
  input?: string;
  /** Images to compare afterwards (default ['t.img']). */
  images?: string[];
  /** Compare `qemu-img map` of the images (default: true for qcow2 images). */
  map?: boolean;
  /** Files that must end up byte for byte identical (images QEMU cannot compare, e.g. corrupt ones). */
  identical?: string[];
  /** Known engine difference: run but do not fail. */
  todo?: string;
}

async function createQcow2(dir: string, opts: string[] = [], size = '4M', name = 't.img'): Promise<void> {
  await img(['create', '-q', '-f', 'qcow2', ...opts, name, size], dir);
}

async function createRaw(dir: string, size = '4M', name = 't.img'): Promise<void> {
  await img(['create', '-q', '-f', 'raw', name, size], dir);
}

/** base.img with data at 0 (1 MiB of 0x11), 2 MiB (128 KiB of 0x22) and a zero cluster at 3 MiB; t.img on top. */
async function createChain(dir: string, topOpts: string[] = []): Promise<void> {
  await createQcow2(dir, [], '4M', 'base.img');
  await qio(['-f', 'qcow2', '-c', 'write -P 0x11 0 1M', '-c', 'write -P 0x22 2M 128k', '-c', 'write -z 3M 64k', 'base.img'], dir);
  await createQcow2(dir, ['-b', 'base.img', '-F', 'qcow2', ...topOpts]);
}

const c = (...cmds: string[]): string[] => cmds.flatMap((x) => ['-c', x]);

async function mapOf(file: string, cwd: string): Promise<string> {
  const r = await qemuImg(['map', '--output=json', file], cwd);
  return r.stdout.replace(/"offset": \d+/g, '"offset": X') + r.stderr;
}

async function formatOf(file: string, cwd: string): Promise<string> {
  const r = await qemuImg(['info', '--output=json', file], cwd);
  return (JSON.parse(r.stdout) as { format: string }).format;
}

async function runCase(k: Case, index: number): Promise<void> {
  if (!QEMU_IO || !QEMU_IMG) throw new Error('qemu-io/qemu-img are not installed');
  const base = path.join(ROOT, `case${index}`);
  const a = path.join(base, 'qemu');
  const b = path.join(base, 'qchain');
  fs.mkdirSync(a, { recursive: true });
  await k.setup(a);
  fs.cpSync(a, b, { recursive: true });
  const [qr, cr] = await Promise.all([
    // By name, so that glibc's getopt messages say "qemu-io:" as qchain does.
    exec('qemu-io', k.args, a, k.input),
    exec(process.execPath, [QCHAIN, 'io', ...k.args], b, k.input),
  ]);
  assert.equal(normalise(cr.stdout), normalise(qr.stdout), 'stdout');
  assert.equal(cr.stderr, qr.stderr, 'stderr');
  assert.equal(cr.code, qr.code, 'exit status');
  for (const name of k.identical ?? []) {
    assert.ok(fs.readFileSync(path.join(a, name)).equals(fs.readFileSync(path.join(b, name))), `${name} differs`);
  }
  for (const name of k.images ?? ['t.img']) {
    const fa = path.join(a, name), fb = path.join(b, name);
    if (!fs.existsSync(fa)) continue;
    const cmp = await qemuImg(['compare', fa, fb]);
    assert.equal(cmp.code, 0, `qemu-img compare ${name}: ${cmp.stdout}${cmp.stderr}`);
    const fmt = await formatOf(fb, b);
    if (fmt === 'qcow2') {
      const chk = await qemuImg(['check', name], b);
      assert.equal(chk.code, 0, `qemu-img check ${name}: ${chk.stdout}${chk.stderr}`);
      if (k.map !== false) assert.equal(await mapOf(name, b), await mapOf(name, a), `qemu-img map ${name}`);
    }
  }
}

/** Corrupt the first L2 entry of t.img (an unaligned data cluster offset). */
function misalignFirstCluster(dir: string): void {
  const file = path.join(dir, 't.img');
  const e = getL2Entry(file, 0, 0);
  setL2Entry(file, 0, 0, e + 0x200n);
}

const CASES: Case[] = [
  {
    name: 'qcow2 v3: pattern writes, verified reads, hexdump, map, alloc, length, info',
    setup: (d) => createQcow2(d),
    args: [...c(
      'write -P 0xab 0 64k', 'write 64k 4k', 'write -P 0x55 1M 100', 'writev -P 0x66 2M 4k 4k 512', 'aio_write -P 7 3M 512', 'aio_flush',
      'read -P 0xab 0 64k', 'read -P 0xcd 64k 4k', 'read -P 0 68k 60k', 'read -P 0xab 32k 64k', 'read -P 0x55 -s 0 -l 100 1M 512',
      'readv -P 0x66 2M 8k 512', 'aio_read -P 7 3M 512', 'read -v 1M 40', 'read -v 1048570 12', 'read -q 0 1', 'read -C 0 1k', 'write -C -q 0 1',
      'map', 'alloc 0 4M', 'alloc 64k', 'alloc 1M 100', 'alloc 4M', 'alloc 3M 2M', 'length', 'info', 'flush',
    ), 't.img'],
  },
  {
    name: 'qcow2 v3: zero writes (-z, -z -u, -z -n), discard, map',
    setup: (d) => createQcow2(d),
    args: [...c(
      'write -P 1 0 256k', 'write -z 0 64k', 'write -z -u 64k 64k', 'discard 128k 64k', 'discard 200k 1k', 'write -z -n 192k 64k',
      'write -P 2 1M 128k', 'write -z 1M 128k', 'write -z -u 1M 64k', 'write -z -n 4032k 64k', 'discard 4095k 1k',
      'read -P 0 0 192k', 'read -P 1 192k 64k', 'read -P 0 1M 128k', 'map', 'alloc 0 4M',
    ), 't.img'],
  },
  {
    name: 'qcow2 v3, lazy refcounts, extended L2, 4k clusters',
    setup: async (d) => {
      await createQcow2(d, ['-o', 'lazy_refcounts=on'], '4M', 't.img');
      await createQcow2(d, ['-o', 'extended_l2=on,cluster_size=128k'], '4M', 'x.img');
      await createQcow2(d, ['-o', 'cluster_size=4k,refcount_bits=1,compression_type=zstd'], '4M', 's.img');
    },
    args: [...c('write -P 3 1000 70k', 'write -z 256k 64k', 'discard 256k 4k', 'map', 'info', 'open x.img', 'write -P 4 5k 3k', 'write -z -u 128k 128k', 'map', 'info', 'close', 'open s.img', 'write -P 9 1k 9k', 'map', 'info'), 't.img'],
    images: ['t.img', 'x.img', 's.img'],
  },
  {
    name: 'qcow2 v2 (compat=0.10): writes, discard, map, info',
    setup: (d) => createQcow2(d, ['-o', 'compat=0.10']),
    args: [...c('write -P 1 0 128k', 'write 1M 4k', 'discard 64k 64k', 'discard 0 4k', 'write -z 2M 64k', 'write -z -n 3M 64k', 'read -P 1 0 64k', 'read -P 0 64k 64k', 'map', 'alloc 0 4M', 'info'), 't.img'],
  },
  {
    name: 'argument errors, usage lines and help',
    setup: (d) => createQcow2(d),
    args: [...c(
      'read', 'read 0', 'read 1x 1', 'read 0 1x', 'read -1 1', 'read 16E 1', 'read 0 3G', 'read -P 300 0 1', 'read -P x 0 1', 'read -P 010 0 1',
      'read -s 1 0 1', 'read -P 0 -s 2 0 1', 'read -P 0 -l 2 0 1', 'read -z 0 1', 'read 0 1 2', 'read -P 0 -s 1x 0 1', 'read -P 0 -s 8 0 8',
      'write -z -P 1 0 1', 'write -u 0 1', 'write -n 0 1', 'write -b -z 0 1', 'write -f -c 0 1', 'write -c 1 512', 'write -c 0 511',
      'write -b 1 512', 'write 0 2G', 'write -z 0 3G', 'write -x 0 1', 'write -s /nonexistent 0 1', 'write -s /dev/null 0 1',
      'writev 0 1x', 'readv 0 3G', 'readv 0 1G 1G', 'writev -z 0 1', 'aio_write -z 0 512 512', 'aio_write -u 0 512', 'aio_read -i 0 1', 'aio_write -i 0 1',
      'discard 0 3G', 'discard -x 0 1', 'alloc -1', 'alloc 0 1x', 'alloc 0 0', 'map x', 'length x', 'help x y', 'sleep x', 'sleep -1', 'sleep 0x1',
      'sigraise 100', 'truncate -m foo 1M', 'truncate 1 2 3 4', 'reopen -r -w', 'reopen -c foo', 'reopen x', 'open t.img', 'bogus', '',
      'read 0x10k 1', 'help', 'help read', 'help w', 'help map', 'help open', 'help sigraise', 'help reopen', 'help aio_write', 'help nope',
      'break a b', 'remove_break a', 'resume a',
    ), 't.img'],
  },
  {
    name: 'requests beyond the end of the image',
    setup: (d) => createQcow2(d),
    args: [...c('write 4M 1', 'read 4M 1', 'read 4095k 2k', 'write 4095k 2k', 'read 4M 0', 'read 5M 0', 'write 5M 0', 'discard 5M 0',
      'discard 4M 1', 'write -z 4M 512', 'readv 4M 512', 'writev 4M 512', 'aio_read 4M 512', 'aio_write 4M 512', 'read 0 0', 'write 0 0', 'discard 0 0'), 't.img'],
  },
  {
    name: 'raw (-f raw): writes, zero writes, map, alloc, info, length',
    setup: (d) => createRaw(d, '1000k'),
    args: ['-f', 'raw', ...c('write -P 5 0 64k', 'write -z 4k 4k', 'write -z -n 1 1000', 'write -c 0 64k', 'write -b 0 512', 'read -b 0 512',
      'read -P 5 0 4k', 'read -P 0 4k 4k', 'read -v 8190 4', 'map', 'alloc 0 1M', 'alloc 999k 2k', 'length', 'info'), 't.img'],
  },
  {
    name: 'probed raw: warning, block 0 restriction, unaligned zero writes without fallback',
    setup: async (d) => {
      await createRaw(d);
      await createQcow2(d, [], '4M', 'q.img');
      fs.writeFileSync(path.join(d, 'hdr'), fs.readFileSync(path.join(d, 'q.img')).subarray(0, 512));
    },
    args: [...c('write -s hdr 0 512', 'write -s hdr 0 8', 'write -s hdr 512 512', 'write -z 0 512', 'write -z -n 0 1', 'write -z -n 512 1024', 'read -P 0 0 512', 'info'), 't.img'],
    images: [],
  },
  {
    name: 'two-layer chain: top-only map/alloc, copy-on-write, zero writes and discard in the overlay',
    setup: (d) => createChain(d),
    args: [...c('map', 'alloc 0 4M', 'write -P 0x33 64k 4k', 'read -P 0x11 0 64k', 'read -P 0x33 64k 4k', 'read -P 0x11 68k 60k',
      'write -z 128k 64k', 'write -z -u 192k 64k', 'discard 2M 64k', 'read -P 0 2M 64k', 'read -P 0x22 2M 64k', 'read -P 0x22 2112k 64k',
      'read -P 0 3M 64k', 'write -P 0x44 1020k 8k', 'read -P 0x11 960k 60k', 'read -P 0 1028k 60k', 'map', 'alloc 0 4M', 'alloc 64k', 'alloc 2M 128k', 'info'), 't.img'],
    images: ['t.img', 'base.img'],
  },
  {
    name: 'two-layer chain with copy-on-read (-C)',
    setup: (d) => createChain(d),
    args: ['-C', ...c('read 4k 4k', 'read 1020k 8k', 'read 2M 4k', 'read 3M 4k', 'read 3136k 64k', 'map'), 't.img'],
    images: ['t.img', 'base.img'],
  },
  {
    name: 'snapshot mode (-s): writes go to a temporary overlay',
    setup: (d) => createChain(d),
    args: ['-s', ...c('write 0 64k', 'map', 'info', 'read -P 0xcd 0 64k', 'read -P 0x11 64k 64k', 'length'), 't.img'],
    images: ['t.img', 'base.img'],
  },
  {
    name: 'read-only (-r), force-share, discard=ignore, bad options',
    setup: (d) => createQcow2(d),
    args: ['-r', '-U', ...c('write 0 1', 'writev 0 1', 'aio_write 0 1', 'discard 0 1', 'truncate 1M', 'write 0', 'read 0 1', 'flush', 'map'), 't.img'],
  },
  {
    name: 'discard=ignore',
    setup: (d) => createQcow2(d),
    args: ['-d', 'off', ...c('write 0 128k', 'discard 0 64k', 'write -z -u 64k 64k', 'map'), 't.img'],
  },
  {
    name: 'open failures: missing file',
    setup: async () => {},
    args: [...c('length'), 'nofile.qcow2'],
  },
  {
    name: 'open failures: unknown driver, wrong format, directory, missing backing file, force-share without -r',
    setup: async (d) => {
      await createRaw(d, '1M', 'r.img');
      await createQcow2(d, ['-b', 'r.img', '-F', 'raw'], '1M', 'o.img');
      fs.rmSync(path.join(d, 'r.img'));
      fs.mkdirSync(path.join(d, 'dir'));
      await createRaw(d, '1M', 'raw.img');
    },
    args: [...c('open -o driver=foo raw.img', 'open -f qcow2 raw.img', 'open -o driver=qcow2 raw.img', 'open dir', 'open o.img', 'open -U raw.img',
      'open -r -C raw.img', 'open -k raw.img', 'open', 'open -r', 'open -o driver=raw', 'open -x', 'open a b', 'length', 'close', 'open -r raw.img', 'length', 'open raw.img')],
    images: [],
  },
  {
    name: 'command line: -h',
    setup: async () => {},
    args: ['-h'],
  },
  {
    name: 'command line: bad option',
    setup: (d) => createQcow2(d),
    args: ['-z', 't.img'],
  },
  { name: 'command line: two files', setup: (d) => createQcow2(d), args: ['t.img', 'u.img'] },
  { name: 'command line: -c without argument', setup: (d) => createQcow2(d), args: ['-c'] },
  { name: 'command line: bad cache mode', setup: (d) => createQcow2(d), args: ['-t', 'foo', 't.img'] },
  { name: 'command line: bad discard mode', setup: (d) => createQcow2(d), args: ['-d', 'foo', 't.img'] },
  { name: 'command line: bad aio mode', setup: (d) => createQcow2(d), args: ['-i', 'foo', 't.img'] },
  { name: 'command line: native aio without O_DIRECT', setup: (d) => createQcow2(d), args: ['-k', '-c', 'length', 't.img'] },
  { name: 'command line: unknown format', setup: (d) => createQcow2(d), args: ['-f', 'foo', '-c', 'length', 't.img'] },
  { name: 'command line: no file', setup: async () => {}, args: [...c('length', 'help', 'sleep 1')] },
  {
    name: 'commands from stdin (prompts, quit)',
    setup: (d) => createQcow2(d),
    args: ['t.img'],
    input: 'write 0 64k\nread -P 0xcd 0 64k\n\n  map\nbogus\nread -P 1 0 512\nquit\nread 0 1\n',
  },
  { name: 'commands from stdin until EOF', setup: (d) => createQcow2(d), args: ['t.img'], input: 'length\nalloc 0' },
  {
    name: 'quit stops the -c commands; close and reopen',
    setup: (d) => createQcow2(d),
    args: [...c('write -P 8 0 4k', 'close', 'read 0 1', 'open -r t.img', 'read -P 8 0 4k', 'write 0 1', 'reopen -w', 'write -P 9 0 1', 'reopen -r', 'write 0 1', 'quit', 'read 0 1'), 't.img'],
  },
  {
    name: 'corrupt image, read-only: the event is reported once',
    setup: async (d) => {
      await createQcow2(d);
      await qio(['-c', 'write 0 64k', 't.img'], d);
      misalignFirstCluster(d);
    },
    args: ['-r', ...c('read 0 512', 'read 0 512', 'map', 'alloc 0 4M', 'read 64k 512', 'info'), 't.img'],
    images: [],
    identical: ['t.img'],
  },
  {
    name: 'corrupt image, read-write: marked corrupt, then no medium',
    setup: async (d) => {
      await createQcow2(d);
      await qio(['-c', 'write 0 64k', 't.img'], d);
      misalignFirstCluster(d);
    },
    args: [...c('read 0 512', 'length', 'map', 'alloc 0', 'info', 'flush', 'discard 0 64k', 'write -z 0 64k', 'read 64k 512', 'readv 0 512', 'writev 0 512', 'alloc 0 0', 'truncate 1M'), 't.img'],
    images: [],
    identical: ['t.img'],
  },
  {
    name: 'corrupt image, read-write: map fails at the bad cluster',
    setup: async (d) => {
      await createQcow2(d);
      await qio(['-c', 'write 0 64k', 't.img'], d);
      misalignFirstCluster(d);
    },
    args: [...c('map', 'alloc 0 4M', 'read 64k 512'), 't.img'],
    images: [],
  },
  {
    name: 'raw truncate',
    setup: (d) => createRaw(d, '1M'),
    args: ['-f', 'raw', ...c('truncate 2M', 'length', 'write -P 1 1M 4k', 'truncate -m full 3M', 'truncate -m metadata 4M', 'truncate 1536k', 'length', 'map', 'read -P 0 1M 4k'), 't.img'],
    map: false,
  },
  // ---- cases that once differed from QEMU (kept as parity checks) ----
  {
    name: 'qcow2 v3: a partial zero write on an unallocated cluster makes the whole cluster a zero cluster',
    setup: (d) => createQcow2(d),
    args: [...c('write -z 0 4k', 'write -z 1M 4k', 'write -P 1 2M 64k', 'write -z -n 2M 64k', 'write -z -n 2052k 4k', 'map'), 't.img'],
  },
  {
    name: 'qcow2 v2 without backing: zero writes deallocate',
    setup: (d) => createQcow2(d, ['-o', 'compat=0.10']),
    args: [...c('write -P 1 0 256k', 'write -z 0 64k', 'write -z -u 128k 64k', 'write -z 1M 4k', 'map'), 't.img'],
  },
  {
    name: 'raw discard punches a hole (reads back as zero)',
    setup: (d) => createRaw(d, '1M'),
    args: ['-f', 'raw', ...c('write -P 5 0 64k', 'discard 0 64k', 'read -P 0 0 64k'), 't.img'],
  },
  {
    name: 'probed raw: only a real format header in block 0 is refused',
    setup: async (d) => {
      await createRaw(d);
      await createQcow2(d, [], '4M', 'q.img');
      fs.writeFileSync(path.join(d, 'hdr'), fs.readFileSync(path.join(d, 'q.img')).subarray(0, 512));
    },
    args: [...c('write -s hdr 0 7', 'read -v 0 8'), 't.img'],
    images: [],
  },
  {
    name: 'dirty image with lazy refcounts is repaired on a read-write open',
    setup: async (d) => {
      await createQcow2(d, ['-o', 'lazy_refcounts=on']);
      // Kill qemu-io after a write so that the dirty bit stays set.
      await sh(QEMU_IO ?? 'qemu-io', ['-c', 'write 0 64k', '-c', 'sigraise 9', 't.img'], d);
    },
    args: [...c('read -P 0xcd 0 64k', 'write 64k 64k', 'map'), 't.img'],
  },
  {
    name: 'corrupt v2 image, read-write: fatal corruption event',
    setup: async (d) => {
      await createQcow2(d, ['-o', 'compat=0.10']);
      await qio(['-c', 'write 0 64k', 't.img'], d);
      misalignFirstCluster(d);
    },
    args: [...c('read 0 512', 'read 0 512', 'write 64k 512', 'map'), 't.img'],
    images: [],
  },
  {
    name: 'corrupt image: the write path names the data cluster',
    setup: async (d) => {
      await createQcow2(d);
      await qio(['-c', 'write 0 64k', 't.img'], d);
      misalignFirstCluster(d);
    },
    args: [...c('write 0 512'), 't.img'],
    images: [],
  },
  {
    name: 'compressed writes (write -c)',
    setup: (d) => createQcow2(d),
    args: [...c('write -c 0 64k', 'write -c 64k 512', 'map'), 't.img'],
  },
];

describe('qchain io vs qemu-io 7.2', { concurrency: 4, ...oracle() }, () => {
  CASES.forEach((k, i) => {
    test(k.name, k.todo ? { todo: k.todo } : {}, () => runCase(k, i));
  });
});
