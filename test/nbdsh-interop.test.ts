/**
 * nbdsh (libnbd's Python shell) as the client, side by side: one script run against
 * qemu-storage-daemon and against `qchain daemon` exporting the same image — export size and
 * flags, structured replies, meta contexts, writes with FUA, zeroes with and without NO_HOLE,
 * trim, flush, cache, reads, block status on base:allocation and qemu:allocation-depth, and an
 * out-of-range request's error — must print the same lines, and both images must end equal and
 * clean. nbdsh runs the system Python (it imports the Debian `nbd` module, python3-libnbd).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { oracle, qemuImg, run, scratch, which } from './helpers/qemu.js';
import { onBoth, qcow2Node, serve, withDaemon, quit } from './helpers/live-qmp.js';

const SCRIPT = String.raw`
import nbd, os
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.add_meta_context("qemu:allocation-depth")
h.connect_uri(os.environ["URI"])
print("size", h.get_size())
print("structured", h.get_structured_replies_negotiated())
print("flags", h.is_read_only(), h.can_flush(), h.can_fua(), h.can_trim(), h.can_zero(), h.can_fast_zero(), h.can_df(), h.can_multi_conn(), h.can_cache())
print("contexts", h.can_meta_context("base:allocation"), h.can_meta_context("qemu:allocation-depth"))
h.pwrite(b"\x5a" * 65536, 0, nbd.CMD_FLAG_FUA)
h.pwrite(b"\x33" * 4096, 3 * 65536 + 512)
h.zero(131072, 65536 * 4)
h.zero(65536, 12 * 65536, nbd.CMD_FLAG_NO_HOLE)
h.trim(65536, 20 * 65536)
h.flush()
h.cache(65536, 0)
buf = h.pread(65536 * 4, 0)
print("read", buf[:4].hex(), buf[65536 * 3 + 512:65536 * 3 + 516].hex(), buf.count(0))
def show(ctx, entries, off, err):
    print(ctx, off, entries)
    return 0
h.block_status(65536 * 32, 0, show)
try:
    h.pread(4096, h.get_size())
except nbd.Error as e:
    print("past end", e.errno)
h.shutdown()
`;

const nbdsh = which('nbdsh');

test('nbdsh against qemu-storage-daemon and qchain daemon: same answers, same image', { ...oracle(), timeout: 120_000 }, async (t) => {
  if (!nbdsh && !process.env.CI) return t.skip('nbdsh not installed (python3-libnbd; CI installs it)');
  const res = await onBoth(scratch('qchain-nbdsh-'), async (tool, dir) => {
    fs.mkdirSync(dir, { recursive: true });
    assert.equal((await qemuImg(['create', '-q', '-f', 'qcow2', 'base.qcow2', '2M'], dir)).code, 0);
    assert.equal((await run('qemu-io', ['-c', 'write -P 0x11 0 2M', 'base.qcow2'], { cwd: dir })).code, 0);
    assert.equal((await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'top.qcow2'], dir)).code, 0);
    fs.writeFileSync(path.join(dir, 'script.py'), SCRIPT);
    const out = await withDaemon(tool, dir, [...qcow2Node('base'), ...qcow2Node('top', ',backing=base,discard=unmap'),
      ...serve('top', ',allocation-depth=on')], async (d) => {
      await d.q.execute('qmp_capabilities');
      // The system Python holds the nbd module; a Python earlier on PATH would not.
      const r = await run('env', ['PATH=/usr/bin:/bin', `URI=nbd+unix:///vda?socket=${path.join(dir, 'nbd.sock')}`, 'nbdsh', '-c', `exec(open(${JSON.stringify(script(dir))}).read())`], { cwd: dir });
      assert.equal(r.code, 0, r.stderr);
      await quit(d);
      return r.stdout;
    });
    const check = await qemuImg(['check', 'top.qcow2'], dir);
    assert.equal(check.code, 0, check.stdout);
    return out;
  });
  assert.equal(res.qchain, res.qemu);
  assert.match(res.qemu, /^structured True$/m);
  assert.match(res.qemu, /^past end EINVAL$/m);
});

function script(dir: string): string {
  return path.join(dir, 'script.py');
}
