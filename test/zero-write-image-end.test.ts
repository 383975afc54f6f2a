/**
 * Zero writes that end at the image's end, when the size is not a whole number of clusters: a
 * range that starts at the last cluster's start zeroes that cluster whole (QEMU's
 * qcow2_subcluster_zeroize keeps no tail at the end of the image), one that starts inside it
 * only the subclusters it covers. The same rule runs when a resize over a longer backing file
 * zeroes the new area. Files compared byte for byte with qemu-io's and qemu-img's.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { QCHAIN, oracle, qemuImgSync, qemuIoSync, scratch } from './helpers/qemu.js';
import { execFileSync } from 'node:child_process';

const SIZE = 1049088; // 1 MiB + 512: the last 64 KiB cluster holds 512 bytes

interface Case {
  name: string;
  create: string;
  size?: number;
  setup?: string[];
  cmds: string[];
}

const cases: Case[] = [
  { name: 'extended L2, from the last cluster start', create: 'extended_l2=on', cmds: ['write -z 1M 512'] },
  { name: 'extended L2, from the last cluster start, over data', create: 'extended_l2=on', setup: [`write -P 1 0 ${SIZE}`], cmds: ['write -z 1M 512'] },
  { name: 'extended L2, unmapping, over data', create: 'extended_l2=on', setup: [`write -P 1 0 ${SIZE}`], cmds: ['write -z -u 1M 512'] },
  { name: 'extended L2, across the last cluster boundary', create: 'extended_l2=on', setup: [`write -P 1 0 ${SIZE}`], cmds: ['write -z 960k 66048'] },
  { name: 'extended L2, 2 MiB clusters, the last one nearly empty', create: 'extended_l2=on,cluster_size=2M', size: 2 * 1048576 + 4096, cmds: ['write -z 2M 4096'] },
  { name: 'extended L2, 16k clusters, several zero writes', create: 'extended_l2=on,cluster_size=16k', size: 100000, setup: ['write -P 2 0 100000'], cmds: ['write -z 98304 1696', 'write -z 0 16384'] },
  { name: 'standard L2, from the last cluster start', create: 'extended_l2=off', setup: [`write -P 1 0 ${SIZE}`], cmds: ['write -z 1M 512'] },
];

for (const c of cases) {
  test(`zero write at the image end: ${c.name}`, oracle(), () => {
    const q = scratch(), m = scratch();
    const size = String(c.size ?? SIZE);
    for (const d of [q, m]) {
      qemuImgSync(['create', '-q', '-f', 'qcow2', '-o', c.create, 'img.qcow2', size], d);
      if (c.setup) qemuIoSync([...c.setup.flatMap((x) => ['-c', x]), 'img.qcow2'], d);
    }
    qemuIoSync([...c.cmds.flatMap((x) => ['-c', x]), 'img.qcow2'], q);
    execFileSync(QCHAIN, ['io', ...c.cmds.flatMap((x) => ['-c', x]), 'img.qcow2'], { cwd: m });
    assert.ok(fs.readFileSync(path.join(q, 'img.qcow2')).equals(fs.readFileSync(path.join(m, 'img.qcow2'))), 'files differ');
  });
}

for (const [oldSize, prealloc] of [['1M', 'off'], ['1M', 'metadata'], ['1049088', 'off']] as const) {
  test(`resize of an extended-L2 overlay over a longer backing file to an unaligned size (from ${oldSize}, preallocation=${prealloc})`, oracle(), () => {
    const q = scratch(), m = scratch();
    for (const d of [q, m]) {
      qemuImgSync(['create', '-q', '-f', 'qcow2', 'base.qcow2', '8M'], d);
      qemuIoSync(['-c', 'write -P 9 0 8M', 'base.qcow2'], d);
      qemuImgSync(['create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on', '-b', 'base.qcow2', '-F', 'qcow2', 'ov.qcow2', oldSize], d);
    }
    qemuImgSync(['resize', '-q', `--preallocation=${prealloc}`, 'ov.qcow2', '3146240'], q);
    execFileSync(QCHAIN, ['img', 'resize', '-q', `--preallocation=${prealloc}`, 'ov.qcow2', '3146240'], { cwd: m });
    assert.ok(fs.readFileSync(path.join(q, 'ov.qcow2')).equals(fs.readFileSync(path.join(m, 'ov.qcow2'))), 'files differ');
    assert.match(qemuImgSync(['check', 'ov.qcow2'], m), /No errors were found/);
  });
}
