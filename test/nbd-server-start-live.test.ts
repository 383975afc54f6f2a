/**
 * nbd-server-start over QMP against qemu-storage-daemon 7.2, side by side: `addr` is a
 * SocketAddressLegacy ({"type": ..., "data": {...}}); the flat form {"type": "unix", "path": ...}
 * is refused ("Parameter 'addr.data' is missing"), as are unknown members at every level, with
 * QEMU's messages and their quirks. Then the checks made once the server is known not to run
 * (TLS credentials, fd passing) and QEMU's listen failures (a Unix socket in a missing folder, a
 * port in use, a TCP service name getaddrinfo does not know, a host that cannot resolve). The
 * command line's --nbd-server keeps the flat form (addr.type=unix,addr.path=...), as QSD's.
 * TCP listens use ephemeral ports only (port "0", or "65536", which wraps to 0 as getaddrinfo
 * truncates it): other tests may hold the well-known ones.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { QCHAIN, oracle, qemuImg, run, scratch } from './helpers/qemu.js';
import { MONITOR, QSD, exportView, norm, onBoth, qcow2Node, quit, withDaemon } from './helpers/live-qmp.js';

const skip = oracle().skip ?? (fs.existsSync(QSD) ? undefined : 'no qemu-storage-daemon');

const unix = (data: Record<string, unknown>, extra: Record<string, unknown> = {}): Record<string, unknown> => ({ addr: { type: 'unix', data }, ...extra });
const inet = (data: Record<string, unknown>): Record<string, unknown> => ({ addr: { type: 'inet', data } });

/** Each is sent while no server runs (the valid ones are stopped again), then the flat form while one does. */
function commands(busyPort: number): Array<[string, Record<string, unknown>?]> {
  const start = (a: Record<string, unknown>): [string, Record<string, unknown>] => ['nbd-server-start', a];
  return [
    start({ addr: { type: 'unix', path: 'n1.sock' } }),
    start({ addr: { type: 'unix' } }),
    start({ addr: { type: 'unix', data: {} } }),
    start({ addr: { type: 'bogus', data: {} } }),
    start({ addr: { data: { path: 'x' } } }),
    start({}),
    start({ addr: 'x' }),
    start({ addr: ['x'] }),
    start({ addr: { type: 5, data: {} } }),
    start({ addr: { type: 'unix', data: [] } }),
    start({ addr: { type: 'unix', data: 'x' } }),
    start(unix({ path: 'n1.sock', foo: 1 })),
    start({ addr: { type: 'unix', data: { path: 'n1.sock' }, path: 'n1.sock' } }),
    start(unix({ path: 5 })),
    start(unix({ path: 'n1.sock', abstract: 'x' })),
    start(inet({ host: '127.0.0.1' })),
    start(inet({ port: '0' })),
    start(inet({ host: '127.0.0.1', port: 0 })),
    start(inet({ host: '127.0.0.1', port: '0', to: 'x' })),
    start(inet({ host: '127.0.0.1', port: '0', to: -1 })),
    start(inet({ host: '127.0.0.1', port: '0', bogus: 1 })),
    start(unix({ path: 'n1.sock' }, { 'max-connections': -1 })),
    start(unix({ path: 'n1.sock' }, { 'max-connections': 'x' })),
    start(unix({ path: 'n1.sock' }, { 'max-connections': 2 ** 32 })),
    start(unix({ path: 'n1.sock' }, { 'tls-creds': 5 })),
    start(unix({ path: 'n1.sock' }, { 'tls-authz': 5 })),
    start(unix({ path: 'n1.sock' }, { foo: 1 })),
    start(unix({ path: 'n1.sock' }, { 'tls-creds': 'x' })),
    start({ addr: { type: 'fd', data: { str: '3' } } }),
    start(unix({ path: '/nonexistent-dir/n.sock' })),
    start(inet({ host: '127.0.0.1', port: 'no-such-service' })),
    start(inet({ host: '127.0.0.1', port: '-5' })),
    start(inet({ host: 'localhost', port: '0', numeric: true })),
    start(inet({ host: 'no-such-host.invalid', port: '0' })),
    start(inet({ host: '127.0.0.1', port: String(busyPort) })),
    start(inet({ host: '127.0.0.1', port: '65536', 'keep-alive': true })),
    ['nbd-server-stop'],
    start(unix({ path: 'n1.sock' }, { 'tls-authz': 'a' })),
    start({ addr: { type: 'unix', path: 'n2.sock' } }),
    start(unix({ path: 'n2.sock' })),
    ['nbd-server-stop'],
    ['nbd-server-stop'],
  ];
}

test('nbd-server-start: the SocketAddressLegacy form only, with QEMU\'s messages', { skip, timeout: 60000 }, async () => {
  // A port something already listens on.
  const busy = net.createServer();
  await new Promise<void>((r) => busy.listen(0, '127.0.0.1', () => r()));
  const busyPort = (busy.address() as net.AddressInfo).port;
  try {
    const res = await onBoth(scratch('qchain-nbdstart-'), async (tool, dir) => {
      fs.mkdirSync(dir, { recursive: true });
      return withDaemon(tool, dir, [...MONITOR], async (d) => {
        await d.q.execute('qmp_capabilities');
        const out = [];
        for (const [i, [cmd, args]] of commands(busyPort).entries()) out.push(norm(await d.q.execute(cmd, args, i), false));
        await quit(d);
        return out;
      });
    });
    assert.deepEqual(res.qchain, res.qemu);
    const desc = (i: number): unknown => (res.qemu[i].error as { desc?: string } | undefined)?.desc;
    assert.equal(desc(0), "Parameter 'addr.data' is missing");
    assert.equal(desc(3), "Parameter 'type' does not accept value 'bogus'");
    assert.equal(desc(28), 'only QEMU supports file descriptor passing');
    assert.equal(desc(29), 'Failed to bind socket to /nonexistent-dir/n.sock: No such file or directory');
    assert.equal(desc(34), 'Failed to find an available port: Address already in use');
    assert.ok('return' in res.qemu[35] && 'return' in res.qemu[37], 'port 65536 (wraps to 0) and a unix socket with tls-authz alone start');
    // The arguments are checked before whether a server runs.
    assert.equal(desc(38), "Parameter 'addr.data' is missing");
    assert.equal(desc(39), 'NBD server already running');
  } finally {
    busy.close();
  }
});

test('--nbd-server takes the flat address on the command line; its errors name the option, as QSD\'s', { skip, timeout: 60000 }, async () => {
  const res = await onBoth(scratch('qchain-nbdcli-'), async (tool, dir) => {
    fs.mkdirSync(dir, { recursive: true });
    assert.equal((await qemuImg(['create', '-q', '-f', 'qcow2', 'a.qcow2', '1M'], dir)).code, 0);
    const served = await withDaemon(tool, dir, [...qcow2Node('a'), '--nbd-server', 'addr.type=unix,addr.path=nbd.sock',
      '--export', 'type=nbd,id=e,node-name=a,name=vda', ...MONITOR], async (d) => {
      const view = await exportView(dir);
      await d.q.execute('qmp_capabilities');
      await quit(d);
      return view.length;
    });
    const bad = ['--nbd-server', 'addr.type=unix,addr.path=/nonexistent-dir/n.sock'];
    const r = tool === 'qemu' ? await run(QSD, bad, { cwd: dir, timeout: 20000 }) : await run(process.execPath, [QCHAIN, 'daemon', ...bad], { cwd: dir, timeout: 20000 });
    fs.rmSync(path.join(dir, 'nbd.sock'), { force: true });
    return { served, code: r.code, stderr: r.stderr };
  });
  assert.deepEqual(res.qchain, res.qemu);
  assert.equal(res.qemu.served, 1024 * 1024);
  assert.equal(res.qemu.stderr, 'qemu-storage-daemon: --nbd-server addr.type=unix,addr.path=/nonexistent-dir/n.sock: Failed to bind socket to /nonexistent-dir/n.sock: No such file or directory\n');
});
