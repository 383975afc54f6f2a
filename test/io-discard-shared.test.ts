/**
 * `qchain io` against `qemu-io` 7.2, file bytes compared:
 * - discards and unmapping zero writes pass to the file (qemu-io opens with BDRV_O_UNMAP): a
 *   cluster they leave unused is punched, compressed host clusters once their last user goes,
 *   nothing with `-d ignore` (v3, v2, extended L2, compressed);
 * - a zero write without unmap keeps an allocated cluster's host offset, a snapshot's shared
 *   cluster included (it stays shared, as zero_in_l2_slice leaves it);
 * - writing into a shared extended-L2 cluster copies from its first to its last allocated
 *   subcluster and over the written ones (calculate_l2_meta), not the whole cluster.
 * The internal snapshot still reads back after `qemu-img snapshot -a`.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { oracle, qchain, qemuImg, qemuImgSync, qemuIo, qemuIoSync, scratch } from './helpers/qemu.js';

type Build = (dir: string) => void;

const builds: Record<string, Build> = {
  v3: (d) => { qemuImgSync(['create', '-q', '-f', 'qcow2', 'i.qcow2', '4M'], d); qemuIoSync(['-c', 'write -P 0x11 0 1M', 'i.qcow2'], d); },
  v2: (d) => { qemuImgSync(['create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', 'i.qcow2', '4M'], d); qemuIoSync(['-c', 'write -P 0x11 0 1M', 'i.qcow2'], d); },
  xl2: (d) => { qemuImgSync(['create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on', 'i.qcow2', '4M'], d); qemuIoSync(['-c', 'write -P 0x11 0 1M', 'i.qcow2'], d); },
  compressed: (d) => {
    qemuImgSync(['create', '-q', '-f', 'qcow2', 'i.qcow2', '4M'], d);
    qemuIoSync(['-c', 'write -c -P 0x11 0 64k', '-c', 'write -c -P 0x13 64k 64k', '-c', 'write -P 4 128k 64k', 'i.qcow2'], d);
  },
  snapshot: (d) => {
    qemuImgSync(['create', '-q', '-f', 'qcow2', 'i.qcow2', '4M'], d);
    qemuIoSync(['-c', 'write -P 0x11 0 1M', 'i.qcow2'], d);
    qemuImgSync(['snapshot', '-c', 'sn', 'i.qcow2'], d);
    qemuIoSync(['-c', 'write -P 0x12 256k 64k', 'i.qcow2'], d);
  },
  'snapshot xl2': (d) => {
    qemuImgSync(['create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on', 'i.qcow2', '4M'], d);
    qemuIoSync(['-c', 'write -P 0x11 0 1M', '-c', 'write -P 0x21 2097152 8k', '-c', 'write -P 0x22 2117632 2k', '-c', 'write -z 2138112 4k', 'i.qcow2'], d);
    qemuImgSync(['snapshot', '-c', 'sn', 'i.qcow2'], d);
  },
};

const sequences: Record<string, string[][]> = {
  v3: [['-c', 'discard 64k 192k', '-c', 'write -z -u 512k 64k', '-c', 'write -z 640k 64k', '-c', 'discard 900k 10k'], ['-c', 'discard 0 4M'], ['-d', 'ignore', '-c', 'discard 0 4M']],
  v2: [['-c', 'discard 64k 192k', '-c', 'write -z -u 512k 64k', '-c', 'write -z 640k 64k'], ['-c', 'discard 0 4M']],
  xl2: [['-c', 'discard 64k 192k', '-c', 'write -z -u 512k 64k', '-c', 'write -z 640k 64k'], ['-c', 'write -z -u 0 4M']],
  compressed: [['-c', 'discard 0 4M'], ['-c', 'discard 0 64k'], ['-c', 'write -z -u 0 4M']],
  snapshot: [['-c', 'write -z 640k 64k'], ['-c', 'write -z 640k 64k', '-c', 'write -P 5 640k 4k'], ['-c', 'write -z 0 1M', '-c', 'write -P 6 64k 64k', '-c', 'discard 128k 64k', '-c', 'write -z -u 192k 64k']],
  'snapshot xl2': [['-c', 'write -z 640k 64k', '-c', 'write -P 5 640k 4k'], ['-c', 'write -P 8 2127872 1k'], ['-c', 'write -P 8 2158592 5k'],
    ['-c', 'write -P 9 2107392 2k', '-c', 'write -z 2148352 2k'], ['-c', 'write -z 2097152 64k', '-c', 'write -P 3 2101248 512']],
};

for (const [name, build] of Object.entries(builds)) {
  test(`io discards, zero writes and shared clusters: same file as qemu-io (${name})`, oracle(), async () => {
    const root = scratch();
    for (const [i, seq] of sequences[name].entries()) {
      const q = path.join(root, `q${i}`), c = path.join(root, `c${i}`);
      fs.mkdirSync(q);
      build(q);
      fs.cpSync(q, c, { recursive: true });
      const rq = await qemuIo([...seq, 'i.qcow2'], q);
      const rc = await qchain(['io', ...seq, 'i.qcow2'], c);
      const what = `${name}: ${seq.join(' ')}`;
      assert.equal(rc.code, rq.code, `${what}: ${rc.stderr}`);
      const fq = fs.readFileSync(path.join(q, 'i.qcow2')), fc = fs.readFileSync(path.join(c, 'i.qcow2'));
      assert.ok(fc.equals(fq), `${what}: byte-identical to qemu-io's file (${fc.length} vs ${fq.length} bytes)`);
      assert.equal((await qemuImg(['check', 'i.qcow2'], c)).code, 0, what);
      if (name.startsWith('snapshot')) {
        qemuImgSync(['snapshot', '-a', 'sn', 'i.qcow2'], c);
        const r = await qemuIo(['-c', 'read -P 0x11 0 1M', 'i.qcow2'], c);
        assert.equal(r.code, 0, `${what}: snapshot reads back: ${r.stdout}`);
      }
    }
  });
}
