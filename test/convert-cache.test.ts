/**
 * `convert -t` / `-T`: cache modes as qemu-img 7.2 takes them. The output's default is
 * cache=unsafe (no flushes, as QEMU's BDRV_O_NO_FLUSH); the same result is byte-identical in
 * every mode; bad modes fail with QEMU's message at QEMU's moment (a bad -t after the target was
 * created, a bad -T before anything is opened).
 */
import { describe, test, before } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';

import { oracle, qchain, qemuImg, qemuImgSync, qemuIoSync, scratch } from './helpers/qemu.js';
import { FileStorage } from '../src/storage/file.js';

describe('convert cache modes', oracle(), () => {
  let dir = '';
  before(() => {
    dir = scratch('qchain-convert-cache-');
    qemuImgSync(['create', '-q', '-f', 'qcow2', 'src.qcow2', '16M'], dir);
    qemuIoSync(['-c', 'write -q -P 0x3c 1M 3M', '-c', 'write -q -P 0x4d 9M 64k', 'src.qcow2'], dir);
  });

  for (const args of [['-t', 'bogus'], ['-T', 'bogus'], ['-t', 'bogus', '-T', 'nonsense']]) {
    test(`bad mode ${args.join(' ')}: message, exit status and files as qemu-img`, async () => {
      const outcome = async (ours: boolean, out: string): Promise<[number, string, boolean]> => {
        const argv = ['convert', ...args, '-O', 'qcow2', 'src.qcow2', out];
        const r = ours ? await qchain(['img', ...argv], dir) : await qemuImg(argv, dir);
        const made = fs.existsSync(path.join(dir, out));
        fs.rmSync(path.join(dir, out), { force: true });
        return [r.code, r.stderr, made];
      };
      assert.deepEqual(await outcome(true, 'c.qcow2'), await outcome(false, 'c.qcow2'));
    });
  }

  test('every mode gives the same bytes as qemu-img', async () => {
    const ref = path.join(dir, 'ref.qcow2');
    qemuImgSync(['convert', '-O', 'qcow2', 'src.qcow2', ref], dir);
    for (const mode of ['unsafe', 'writeback', 'none', 'writethrough', 'directsync']) {
      const out = path.join(dir, `out-${mode}.qcow2`);
      const r = await qchain(['img', 'convert', '-t', mode, '-O', 'qcow2', 'src.qcow2', out], dir);
      assert.equal(r.code, 0, r.stderr);
      assert.ok(fs.readFileSync(out).equals(fs.readFileSync(ref)), `-t ${mode}: output differs from qemu-img's`);
    }
  });

  test('a no-flush file storage skips fdatasync; a normal one does not', async () => {
    const f = path.join(dir, 'flush.bin');
    let synced = 0;
    const real = fs.fdatasync;
    (fs as { fdatasync: typeof fs.fdatasync }).fdatasync = ((fd: number, cb: (e: NodeJS.ErrnoException | null) => void) => {
      synced++;
      real(fd, cb);
    }) as typeof fs.fdatasync;
    try {
      for (const noFlush of [true, false]) {
        const st = await FileStorage.open(f, { create: true, noFlush });
        await st.write(Buffer.alloc(4096, 1), 0);
        await st.flush();
        await st.close();
      }
    } finally {
      (fs as { fdatasync: typeof fs.fdatasync }).fdatasync = real;
    }
    assert.equal(synced, 1, 'only the storage without noFlush synced');
  });
});
