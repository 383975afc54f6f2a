/**
 * The real NBD clients over TCP (nbd://127.0.0.1:PORT): qemu-io writes and reads, qemu-img map
 * and nbdinfo --map see the allocation, nbdcopy copies out and back in; the image passes
 * qemu-img check afterwards. An inet --nbd-server without addr.host listens on loopback only.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { QCHAIN, oracle, qemuImg, qemuIo, run, scratch } from './helpers/qemu.js';

/** Start the daemon on a free-looking port (retried when taken); the child and the port. */
async function startTcp(dir: string): Promise<{ child: ChildProcess; port: number }> {
  for (let attempt = 0; ; attempt++) {
    const port = 20000 + Math.floor(Math.random() * 30000);
    const child = spawn(process.execPath, [QCHAIN, 'daemon', '--blockdev', 'driver=qcow2,node-name=d,file.driver=file,file.filename=a.qcow2',
      '--nbd-server', `addr.type=inet,addr.port=${port}`, '--export', 'type=nbd,id=e,node-name=d,name=vda,writable=on'], { cwd: dir, stdio: ['ignore', 'ignore', 'pipe'] });
    let err = '';
    child.stderr?.on('data', (b: Buffer) => { err += b.toString(); });
    for (let i = 0; i < 200 && child.exitCode === null; i++) {
      const up = await new Promise<boolean>((r) => {
        const s = net.createConnection({ host: '127.0.0.1', port }, () => { s.destroy(); r(true); });
        s.on('error', () => r(false));
      });
      if (up) return { child, port };
      await new Promise((r) => setTimeout(r, 25));
    }
    child.kill('SIGKILL');
    assert.ok(attempt < 5, `daemon did not listen: ${err}`);
  }
}

test('qemu-io, qemu-img, nbdinfo and nbdcopy over nbd://127.0.0.1', oracle(), async () => {
  const dir = scratch();
  assert.equal((await qemuImg(['create', '-q', '-f', 'qcow2', 'a.qcow2', '16M'], dir)).code, 0);
  const { child, port } = await startTcp(dir);
  try {
    // Loopback only: the port is not open on another local address.
    const other = (Object.values((await import('node:os')).networkInterfaces()).flat().find((a) => a && a.family === 'IPv4' && !a.internal))?.address;
    if (other) {
      const open = await new Promise<boolean>((r) => {
        const s = net.createConnection({ host: other, port }, () => { s.destroy(); r(true); });
        s.on('error', () => r(false));
      });
      assert.equal(open, false, `listening on ${other}`);
    }
    const uri = `nbd://127.0.0.1:${port}/vda`;
    const w = await qemuIo(['-f', 'raw', '-c', 'write -P 7 0 64k', '-c', 'write -z 1M 64k', '-c', 'read -P 7 0 64k', uri]);
    assert.equal(w.code, 0, w.stderr);
    assert.doesNotMatch(w.stdout, /fail/i);
    const map = await qemuImg(['map', '--output=json', '-f', 'raw', uri]);
    assert.equal(map.code, 0, map.stderr);
    assert.deepEqual((JSON.parse(map.stdout) as Array<{ start: number; data: boolean }>).map((e) => [e.start, e.data]), [[0, true], [65536, false]]);
    const info = await run('nbdinfo', ['--map', uri]);
    assert.equal(info.code, 0, info.stderr);
    assert.match(info.stdout, /^\s+0\s+65536\s+0\s+data$/m);
    const out = path.join(dir, 'out.raw');
    assert.equal((await run('nbdcopy', [uri, out])).code, 0);
    const b = fs.readFileSync(out);
    assert.ok(b.subarray(0, 65536).every((x) => x === 7) && b.subarray(65536).every((x) => x === 0));
    b.fill(9, 2 * 1024 * 1024, 3 * 1024 * 1024);
    fs.writeFileSync(out, b);
    assert.equal((await run('nbdcopy', [out, uri])).code, 0);
    const r = await qemuIo(['-f', 'raw', '-c', 'read -P 9 2M 1M', '-c', 'read -P 7 0 64k', uri]);
    assert.doesNotMatch(r.stdout, /fail/i, r.stdout);
  } finally {
    const exited = new Promise((r) => child.once('exit', r));
    child.kill('SIGTERM');
    await exited;
  }
  const c = await qemuImg(['check', 'a.qcow2'], dir);
  assert.equal(c.code, 0, c.stdout);
});
