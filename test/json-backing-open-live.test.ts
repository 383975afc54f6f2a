/**
 * Daemons opening an overlay whose header names a json:{...} description as its backing file
 * (what an external snapshot of an overridden node writes), with the header's chain: the
 * described node is attached below with its own described backing, against
 * qemu-storage-daemon 7.2 side by side. Query replies show the overlay by its plain name (its
 * backing is the header's) and the described node by its regenerated json: name (its backing is
 * not its header's), and the guest reads the described chain.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { oracle, qemuImg, qemuIo, scratch } from './helpers/qemu.js';
import { QSD, exportView, norm, onBoth, qcow2Node, quit, serve, withDaemon } from './helpers/live-qmp.js';

const skip = oracle().skip ?? (fs.existsSync(QSD) ? undefined : 'no qemu-storage-daemon');

const TOP_OVER_OTHER = 'json:{"backing": {"driver": "qcow2", "file": {"driver": "file", "filename": "sub/other.qcow2"}}, "driver": "qcow2", "file": {"driver": "file", "filename": "sub/top.qcow2"}}';
const TOP_ALONE = 'json:{"backing": null, "driver": "qcow2", "file": {"driver": "file", "filename": "sub/top.qcow2"}}';

async function images(dir: string): Promise<void> {
  fs.mkdirSync(path.join(dir, 'sub'), { recursive: true });
  const img = async (args: string[]): Promise<void> => assert.equal((await qemuImg(args, dir)).code, 0);
  await img(['create', '-q', '-f', 'qcow2', 'sub/base.qcow2', '16M']);
  await img(['create', '-q', '-f', 'qcow2', 'sub/other.qcow2', '16M']);
  await img(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'sub/top.qcow2']);
  await img(['create', '-q', '-f', 'qcow2', '-u', '-b', TOP_OVER_OTHER, '-F', 'qcow2', 'sub/snap.qcow2', '16M']);
  await img(['create', '-q', '-f', 'qcow2', '-u', '-b', TOP_ALONE, '-F', 'qcow2', 'sub/alone.qcow2', '16M']);
  for (const [f, cmd] of [['sub/base.qcow2', 'write -q -P 0x42 1M 1M'], ['sub/other.qcow2', 'write -q -P 0x41 0 1M'], ['sub/top.qcow2', 'write -q -P 0x43 3M 64k']]) {
    assert.equal((await qemuIo(['-f', 'qcow2', '-c', cmd, f], dir)).code, 0);
  }
}

for (const ov of ['snap', 'alone']) {
  test(`a daemon opens an overlay over a json: backing name (${ov}) as QSD`, { skip, timeout: 120000 }, async () => {
    const res = await onBoth(scratch('qchain-jsonopen-'), async (tool, dir) => {
      await images(dir);
      return withDaemon(tool, dir, [...qcow2Node('ov', '', `sub/${ov}.qcow2`), ...serve('ov')], async (d) => {
        const out: unknown[] = [norm(await d.q.execute('qmp_capabilities', undefined, 'c'), false)];
        out.push(norm(await d.q.execute('query-named-block-nodes', undefined, 'q'), false));
        out.push(norm(await d.q.execute('query-named-block-nodes', { flat: true }, 'f'), false));
        const view = await exportView(dir);
        await quit(d);
        return { out, view: view.toString('base64') };
      });
    });
    assert.deepEqual(res.qchain.out, res.qemu.out);
    assert.equal(res.qchain.view, res.qemu.view);
  });
}
