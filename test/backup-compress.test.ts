/**
 * blockdev-backup / drive-backup with compress=true, against qemu-storage-daemon: the job writes
 * every granule holding data to the qcow2 target as compressed clusters (QEMU's block-copy with
 * BDRV_REQ_WRITE_COMPRESSED), zero granules as zeroes. The target must read back the source as it
 * was when the job started (copy-before-write compresses too), pass `qemu-img check`, and hold
 * compressed clusters; its map must be QSD's (host offsets aside). A target that cannot compress
 * (raw) is refused with QSD's reply.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { mapKinds, oracle, qemuImg, qemuIo, scratch } from './helpers/qemu.js';
import type { QmpMessage } from './helpers/qmp-client.js';
import { M, MONITOR, firstDiff, guest, jobEvent, onBoth, qcow2Node, quit, serve, withDaemon, type Tool } from './helpers/live-qmp.js';

/** Not a multiple of the 64 KiB granule: the last compressed cluster ends at the image's end. */
const SIZE = 32 * M + 40960;

/**
 * src.qcow2: pattern data, a granule only half data, zero clusters, incompressible data (written
 * uncompressed by the target's compressed-write path), a zeroed hole in data, data up to the
 * image's unaligned end, the rest unallocated. tgt.qcow2 and tgt.raw: empty, same size.
 */
async function images(dir: string): Promise<void> {
  fs.mkdirSync(dir, { recursive: true });
  // Deterministic incompressible bytes: a SHA-256 counter stream.
  const rnd = Buffer.alloc(M);
  for (let i = 0; i < M / 32; i++) crypto.createHash('sha256').update(`qchain-${i}`).digest().copy(rnd, i * 32);
  fs.writeFileSync(path.join(dir, 'random.bin'), rnd);
  for (const f of ['src.qcow2', 'tgt.qcow2']) assert.equal((await qemuImg(['create', '-q', '-f', 'qcow2', f, String(SIZE)], dir)).code, 0);
  assert.equal((await qemuImg(['create', '-q', '-f', 'raw', 'tgt.raw', String(SIZE)], dir)).code, 0);
  const w = await qemuIo(['-c', 'write -q -P 0x11 0 3M', '-c', `write -q -P 0x22 ${3 * M + 32768} 32k`, '-c', 'write -q -z 4M 2M',
    '-c', `write -q -s random.bin ${6 * M} ${M}`, '-c', 'write -q -P 0x33 8M 2M', '-c', `write -q -z ${9 * M} 512k`,
    '-c', `write -q -P 0x44 ${32 * M - 65536} ${65536 + 40960}`, 'src.qcow2'], dir);
  assert.equal(w.code, 0, w.stderr);
  assert.equal((await qemuImg(['convert', '-O', 'raw', 'src.qcow2', 'want.raw'], dir)).code, 0);
}

const ARGS = [...qcow2Node('src'), ...qcow2Node('tgt'),
  '--blockdev', 'driver=file,node-name=tgtraw-file,filename=tgt.raw',
  '--blockdev', 'driver=raw,node-name=tgtraw,file=tgtraw-file', ...serve('src')];

function norm(m: QmpMessage): Record<string, unknown> {
  const c = JSON.parse(JSON.stringify(m)) as Record<string, unknown>;
  delete c.timestamp;
  if ('QMP' in c) return { QMP: 'greeting' };
  return c;
}

/** The target's map without host offsets, its check output (leaks/corruptions) and whether it shows the wanted view. */
async function inspect(dir: string, file: string): Promise<{ map: unknown; check: string; compressedPct: number; same: string }> {
  // Host offsets and how the data extents split depend on allocation order (QEMU copies with up
  // to 64 workers): adjacent extents of the same kind are merged.
  const map = await mapKinds(dir, file);
  const c = await qemuImg(['check', '-f', 'qcow2', file], dir);
  assert.equal(c.code, 0, `qemu-img check ${file}: ${c.stdout}${c.stderr}`);
  const pct = /([\d.]+)% compressed clusters/.exec(c.stdout);
  assert.ok(pct, c.stdout);
  const got = await qemuImg(['convert', '-f', 'qcow2', '-O', 'raw', file, 'got.raw'], dir);
  assert.equal(got.code, 0, got.stderr);
  const a = fs.readFileSync(path.join(dir, 'got.raw')), b = fs.readFileSync(path.join(dir, 'want.raw'));
  return { map, check: c.stdout, compressedPct: Number(pct[1]), same: a.equals(b) ? 'same' : firstDiff(a, b) };
}

describe('backup compress=true vs qemu-storage-daemon', oracle(), () => {
  test('full backup of data, zero and unallocated areas: the source\'s view, check clean, compressed clusters, QSD\'s map', async () => {
    const res = await onBoth(scratch('qchain-backup-compress-'), async (tool: Tool, dir: string) => {
      await images(dir);
      return withDaemon(tool, dir, ARGS, async (d) => {
        const { q } = d;
        await q.execute('qmp_capabilities', undefined, 'caps');
        const r = await q.execute('blockdev-backup', { 'job-id': 'b', device: 'src', target: 'tgt', sync: 'full', compress: true }, 'backup');
        assert.ok('return' in r, JSON.stringify(r));
        await q.waitFor(jobEvent('b', 'null'), 60000);
        await quit(d, 'quit');
        const events = q.received.filter((m) => m.event === 'BLOCK_JOB_COMPLETED').map(norm);
        const cmp = await qemuImg(['compare', 'src.qcow2', 'tgt.qcow2'], dir);
        assert.equal(cmp.code, 0, `${tool}: ${cmp.stdout}${cmp.stderr}`);
        return { events, ...(await inspect(dir, 'tgt.qcow2')) };
      });
    });
    for (const tool of ['qemu', 'qchain'] as const) {
      assert.equal(res[tool].same, 'same', tool);
      assert.ok(res[tool].compressedPct > 0, `${tool}: ${res[tool].check}`);
    }
    assert.deepEqual(res.qchain.events, res.qemu.events);
    assert.deepEqual(res.qchain.map, res.qemu.map);
    assert.equal(res.qchain.compressedPct, res.qemu.compressedPct, res.qchain.check + res.qemu.check);
  });

  test('targets with 128 KiB and 4 KiB clusters: whole target clusters compressed, the source\'s view, QSD\'s map', async () => {
    const res = await onBoth(scratch('qchain-backup-compress-cs-'), async (tool: Tool, dir: string) => {
      await images(dir);
      for (const [f, cs] of [['big.qcow2', '131072'], ['small.qcow2', '4096']]) {
        assert.equal((await qemuImg(['create', '-q', '-f', 'qcow2', '-o', `cluster_size=${cs}`, f, String(SIZE)], dir)).code, 0);
      }
      return withDaemon(tool, dir, [...qcow2Node('src'), ...qcow2Node('big'), ...qcow2Node('small'), ...MONITOR], async (d) => {
        const { q } = d;
        await q.execute('qmp_capabilities', undefined, 'caps');
        for (const t of ['big', 'small']) {
          const r = await q.execute('blockdev-backup', { 'job-id': t, device: 'src', target: t, sync: 'full', compress: true }, t);
          assert.ok('return' in r, JSON.stringify(r));
          await q.waitFor(jobEvent(t, 'null'), 60000);
        }
        await quit(d, 'quit');
        const events = q.received.filter((m) => m.event === 'BLOCK_JOB_COMPLETED').map(norm);
        return { events, big: await inspect(dir, 'big.qcow2'), small: await inspect(dir, 'small.qcow2') };
      });
    });
    for (const tool of ['qemu', 'qchain'] as const) {
      for (const t of ['big', 'small'] as const) {
        assert.equal(res[tool][t].same, 'same', `${tool} ${t}`);
        assert.ok(res[tool][t].compressedPct > 0, `${tool} ${t}: ${res[tool][t].check}`);
      }
    }
    assert.deepEqual(res.qchain.events, res.qemu.events);
    for (const t of ['big', 'small'] as const) {
      assert.deepEqual(res.qchain[t].map, res.qemu[t].map, t);
      assert.equal(res.qchain[t].compressedPct, res.qemu[t].compressedPct, res.qchain[t].check + res.qemu[t].check);
    }
  });

  test('guest writes during a slow backup are copied first (compressed): the target shows the start-time view', async () => {
    const res = await onBoth(scratch('qchain-backup-compress-cbw-'), async (tool: Tool, dir: string) => {
      await images(dir);
      return withDaemon(tool, dir, ARGS, async (d) => {
        const { q } = d;
        await q.execute('qmp_capabilities', undefined, 'caps');
        // One granule a second: the guest's writes land long before the job reaches them.
        const r = await q.execute('blockdev-backup', { 'job-id': 'b', device: 'src', target: 'tgt', sync: 'full', compress: true, speed: 65536 }, 'backup');
        assert.ok('return' in r, JSON.stringify(r));
        await guest(dir, ['write -q -P 0x55 1M 1M', `write -q -P 0x66 ${3 * M} 128k`, 'write -q -z 8M 1M', 'write -q -P 0x77 12M 2M',
          `write -q -P 0x88 ${6 * M + 4096} 8k`, `write -q -P 0x99 ${32 * M} 4096`]);
        assert.equal((await q.execute('block-job-set-speed', { device: 'b', speed: 0 }, 'speed')).return !== undefined, true);
        await q.waitFor(jobEvent('b', 'null'), 60000);
        await quit(d, 'quit');
        const completed = q.received.find((m) => m.event === 'BLOCK_JOB_COMPLETED');
        assert.ok(completed && !(completed.data as { error?: string }).error, JSON.stringify(completed));
        // The source has the guest's writes; the target the view from before them.
        const cmp = await qemuImg(['compare', 'src.qcow2', 'tgt.qcow2'], dir);
        assert.equal(cmp.code, 1, `${tool}: ${cmp.stdout}${cmp.stderr}`);
        return inspect(dir, 'tgt.qcow2');
      });
    });
    for (const tool of ['qemu', 'qchain'] as const) {
      assert.equal(res[tool].same, 'same', tool);
      assert.ok(res[tool].compressedPct > 0, `${tool}: ${res[tool].check}`);
    }
  });

  test('a raw target is refused (blockdev-backup, drive-backup, in a transaction) with QSD\'s replies; drive-backup to qcow2 compresses', async () => {
    const res = await onBoth(scratch('qchain-backup-compress-raw-'), async (tool: Tool, dir: string) => {
      await images(dir);
      assert.equal((await qemuImg(['create', '-q', '-f', 'qcow2', 'drive.qcow2', String(SIZE)], dir)).code, 0);
      assert.equal((await qemuImg(['create', '-q', '-f', 'raw', 'drive.raw', String(SIZE)], dir)).code, 0);
      return withDaemon(tool, dir, [...qcow2Node('src'), '--blockdev', 'driver=file,node-name=tgtraw-file,filename=tgt.raw',
        '--blockdev', 'driver=raw,node-name=tgtraw,file=tgtraw-file', ...MONITOR], async (d) => {
        const { q } = d;
        await q.execute('qmp_capabilities', undefined, 'caps');
        await q.execute('blockdev-backup', { 'job-id': 'b1', device: 'src', target: 'tgtraw', sync: 'full', compress: true }, 'raw');
        await q.execute('blockdev-backup', { 'job-id': 'b3', device: 'src', target: 'tgtraw', sync: 'none', compress: true }, 'none');
        await q.execute('drive-backup', { 'job-id': 'b4', device: 'src', target: path.join(dir, 'drive.raw'), format: 'raw', mode: 'existing', sync: 'full', compress: true }, 'drive-raw');
        await q.execute('transaction', { actions: [{ type: 'blockdev-backup', data: { 'job-id': 'b5', device: 'src', target: 'tgtraw', sync: 'full', compress: true } }] }, 'tx');
        await q.execute('blockdev-backup', { 'job-id': 'b6', device: 'src', target: 'tgtraw', sync: 'full', compress: false }, 'uncompressed');
        await q.waitFor(jobEvent('b6', 'null'), 60000);
        await q.execute('drive-backup', { 'job-id': 'b7', device: 'src', target: path.join(dir, 'drive.qcow2'), format: 'qcow2', mode: 'existing', sync: 'full', compress: true }, 'drive-qcow2');
        await q.waitFor(jobEvent('b7', 'null'), 60000);
        await quit(d, 'quit');
        const replies = q.received.filter((m) => !('event' in m)).map(norm);
        const cmp = await qemuImg(['compare', '-F', 'qcow2', 'want.raw', 'drive.qcow2'], dir);
        assert.equal(cmp.code, 0, `${tool}: ${cmp.stdout}${cmp.stderr}`);
        const c = await qemuImg(['check', 'drive.qcow2'], dir);
        assert.equal(c.code, 0, c.stdout + c.stderr);
        return { replies, compressed: /([\d.]+)% compressed clusters/.exec(c.stdout)?.[1] };
      });
    });
    assert.deepEqual(res.qchain.replies, res.qemu.replies);
    assert.ok(Number(res.qchain.compressed) > 0, String(res.qchain.compressed));
    assert.equal(res.qchain.compressed, res.qemu.compressed);
    const refused = (res.qemu.replies as Array<{ id?: string; error?: { desc: string } }>).find((m) => m.id === 'raw');
    assert.equal(refused?.error?.desc, 'Compression is not supported for this drive ');
  });
});
