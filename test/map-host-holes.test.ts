/**
 * `qchain img map` where QEMU's block status looks into the file: an image QEMU detects as
 * metadata-preallocated (qcow2_detect_metadata_preallocation) has the holes of its file inside
 * data clusters reported as `"zero": true, "data": true` (and left out of the human output).
 * Preallocated images, extended L2, 4k clusters, an overlay over one, and an overlay whose
 * copy-on-write of zeros QEMU made with a zero write (holes in the host file): same output as
 * qemu-img map, JSON and human.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { oracle, qchain, qemuImg, qemuImgSync, qemuIoSync, scratch } from './helpers/qemu.js';

test('map: holes of the file inside data clusters reported as qemu-img does', oracle(), async () => {
  const dir = scratch();
  qemuImgSync(['create', '-q', '-f', 'qcow2', '-o', 'preallocation=metadata', 'a.qcow2', '8M'], dir);
  qemuIoSync(['-c', 'write -P 1 100k 8k', '-c', 'write -P 2 3M 1M', '-c', 'write -z 5M 64k', '-c', 'discard 6M 128k', 'a.qcow2'], dir);
  qemuImgSync(['create', '-q', '-f', 'qcow2', '-o', 'preallocation=metadata,cluster_size=4k', 'b.qcow2', '8M'], dir);
  qemuIoSync(['-c', 'write -P 1 100k 8k', 'b.qcow2'], dir);
  qemuImgSync(['create', '-q', '-f', 'qcow2', '-o', 'preallocation=metadata,extended_l2=on', 'c.qcow2', '8M'], dir);
  qemuIoSync(['-c', 'write -P 1 100k 8k', 'c.qcow2'], dir);
  qemuImgSync(['create', '-q', '-f', 'qcow2', '-b', 'a.qcow2', '-F', 'qcow2', 'd.qcow2'], dir);
  qemuIoSync(['-c', 'write -P 1 200k 8k', 'd.qcow2'], dir);
  qemuImgSync(['create', '-q', '-f', 'qcow2', '-o', 'preallocation=falloc', 'e.qcow2', '1M'], dir);
  // Partial-cluster writes over an unallocated backing range: QEMU zero-writes the COW areas.
  qemuImgSync(['create', '-q', '-f', 'qcow2', 'base.qcow2', '4M'], dir);
  qemuIoSync(['-c', 'write -P 1 0 256k', 'base.qcow2'], dir);
  qemuImgSync(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'm.qcow2', '3M'], dir);
  qemuIoSync(['-c', 'write -P 3 1100k 64k', '-c', 'write -P 4 2000k 4k', 'm.qcow2'], dir);
  for (const f of ['a.qcow2', 'b.qcow2', 'c.qcow2', 'd.qcow2', 'e.qcow2', 'm.qcow2']) {
    for (const extra of [['--output=json'], [], ['--output=json', '--start-offset=110k', '--max-length=3000k']]) {
      const rq = await qemuImg(['map', ...extra, f], dir);
      const rc = await qchain(['img', 'map', ...extra, f], dir);
      assert.equal(rc.code, rq.code, `${f} ${extra.join(' ')}: ${rc.stderr}`);
      assert.equal(rc.stdout, rq.stdout, `map ${extra.join(' ')} ${f}`);
    }
  }
});
