/**
 * `qchain img convert -c`: the output file ends on a whole sector, as qemu-img's closing
 * zero-length compressed write leaves it, so the files are byte-identical to qemu-img's
 * (zlib and zstd, with -B, into an existing target with -n).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { oracle, qchain, qemuImg, qemuImgSync, qemuIoSync, scratch } from './helpers/qemu.js';

test('convert -c: byte-identical to qemu-img, file end rounded up to a sector', oracle(), async () => {
  const dir = scratch();
  qemuImgSync(['create', '-q', '-f', 'qcow2', 'base.qcow2', '2M'], dir);
  qemuIoSync(['-c', 'write -P 7 0 64k', '-c', 'write -P 8 128k 100k', '-c', 'write -z 512k 64k', 'base.qcow2'], dir);
  qemuImgSync(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'top.qcow2'], dir);
  qemuIoSync(['-c', 'write -P 9 64k 64k', '-c', 'write -P 10 1M 3000', 'top.qcow2'], dir);
  const cases: string[][] = [
    ['-O', 'qcow2', '-c', 'top.qcow2'],
    ['-O', 'qcow2', '-c', '-o', 'compression_type=zstd', 'top.qcow2'],
    ['-O', 'qcow2', '-c', '-B', 'base.qcow2', '-F', 'qcow2', 'top.qcow2'],
    ['-O', 'qcow2', '-c', '-o', 'cluster_size=4k', 'top.qcow2'],
    ['-n', '-O', 'qcow2', '-c', 'top.qcow2'],
  ];
  for (const c of cases) {
    const noCreate = c.includes('-n');
    for (const f of ['q.qcow2', 'c.qcow2']) {
      fs.rmSync(path.join(dir, f), { force: true });
      if (noCreate) qemuImgSync(['create', '-q', '-f', 'qcow2', f, '2M'], dir);
    }
    const rq = await qemuImg(['convert', ...c, 'q.qcow2'], dir);
    const rc = await qchain(['img', 'convert', ...c, 'c.qcow2'], dir);
    const what = c.join(' ');
    assert.equal(rq.code, 0, rq.stderr);
    assert.equal(rc.code, 0, `${what}: ${rc.stderr}`);
    const q = fs.readFileSync(path.join(dir, 'q.qcow2')), got = fs.readFileSync(path.join(dir, 'c.qcow2'));
    assert.equal(got.length % 512, 0, `${what}: file ends on a sector`);
    assert.ok(got.equals(q), `${what}: byte-identical to qemu-img's (${got.length} vs ${q.length} bytes)`);
  }
});
