/**
 * blockdev-add's option names and values: unknown names and QEMU's own value checks give
 * qemu-storage-daemon's replies (side by side); options QEMU has and qchain does not implement
 * are refused with a clear message when they ask for other than the default (QSD accepts them),
 * never silently ignored. The same checks apply to --blockdev on the command line.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { QCHAIN, oracle, run, scratch } from './helpers/qemu.js';
import { QSD, blockdevAddReplies, onBoth } from './helpers/live-qmp.js';

const SAME: Array<Record<string, unknown>> = [
  { foo: 1 },
  { cache: { direct: false, 'no-flush': false, bar: 1 } },
  { file: { driver: 'file', filename: 'X', nope: true } },
  { 'detect-zeroes': 'unmap' },
  { 'detect-zeroes': 'off', cache: { direct: false, 'no-flush': false }, 'auto-read-only': false, 'force-share': false },
  { 'lazy-refcounts': true, 'pass-discard-request': true },
  { 'detect-zeroes': 'on', cache: { 'no-flush': true } },
  { 'detect-zeroes': 'unmap', discard: 'unmap', file: { cache: { 'no-flush': true }, 'detect-zeroes': 'on' } },
  { cache: { 'no-flush': 'yes' } },
  { 'detect-zeroes': 'maybe' },
];
const OURS: Array<[Record<string, unknown>, string]> = [
  [{ file: { 'detect-zeroes': 'unmap', discard: 'unmap' } }, 'detect-zeroes=unmap is not supported by qchain on protocol nodes'],
  [{ cache: { direct: true } }, 'cache.direct=on is not supported by qchain (I/O goes through the page cache)'],
];

test('blockdev-add option names and QEMU\'s value checks: the same replies as qemu-storage-daemon', { skip: oracle().skip ?? (fs.existsSync(QSD) ? undefined : 'no qemu-storage-daemon'), timeout: 60000 }, async () => {
  const { qemu, qchain } = await onBoth(scratch('qchain-bdopts-'), (tool, dir) => blockdevAddReplies(tool, dir, SAME));
  assert.deepEqual(qchain, qemu);
  assert.equal(qemu.filter((r) => 'error' in (r as object)).length, 6);
});

test('options qchain does not implement are refused, not ignored (blockdev-add and --blockdev)', { skip: oracle().skip, timeout: 60000 }, async () => {
  const dir = scratch('qchain-bdunsup-');
  const replies = await blockdevAddReplies('qchain', dir, OURS.map(([extra]) => extra));
  for (const [i, [, msg]] of OURS.entries()) assert.deepEqual(replies[i].error, { class: 'GenericError', desc: msg });
  for (const [bad, fileBad, msg] of [['foo=1', '', "Parameter 'foo' is unexpected"], ['cache.direct=on', '', 'cache.direct=on is not supported by qchain'],
    ['', ',detect-zeroes=unmap,discard=unmap', 'detect-zeroes=unmap is not supported by qchain on protocol nodes']]) {
    const r = await run(process.execPath, [QCHAIN, 'daemon', '--blockdev', `driver=file,node-name=f,filename=a0.qcow2${fileBad}`, '--blockdev', `driver=qcow2,node-name=d,file=f,${bad}`], { cwd: dir, timeout: 20000 });
    assert.equal(r.code, 1, r.stderr);
    assert.ok(r.stderr.includes(msg), r.stderr);
    assert.equal(r.stderr.trim().split('\n').length, 1, r.stderr);
  }
});
