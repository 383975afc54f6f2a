/**
 * The QMP wire, byte for byte against qemu-storage-daemon 7.2: JSON written as QEMU writes it
 * (", " and ": " separators, non-ASCII and control characters as upper-case \uXXXX escapes,
 * numbers as QEMU prints them), the framing errors of QEMU's lexer and parser for garbage
 * (stray bytes, bad keywords, bare values, invalid UTF-8), the checks on the command object
 * (unexpected members, 'control', 'exec-oob' before and after the 'oob' capability is enabled)
 * and qmp_capabilities' own argument checks (a refused negotiation leaves it to do again).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { oracle, qemuImg, scratch } from './helpers/qemu.js';
import { daemonArgs, onBoth, withDaemon, type Tool } from './helpers/live-qmp.js';

const INPUTS: string[] = [
  '{"execute":"query-jobs","id":1}\n',
  '{"execute":"qmp_capabilities","arguments":{"enable":["bogus"]},"id":0}\n',
  '{"execute":"qmp_capabilities","arguments":{"enable":"oob"},"id":0}\n',
  '{"execute":"qmp_capabilities","arguments":{"x":1},"id":0}\n',
  '{"exec-oob":"query-jobs","id":1}\n',
  '{"execute":"qmp_capabilities","arguments":{"enable":["oob"]},"id":0}\n',
  '{"execute":"qmp_capabilities","id":0}\n',
  '{"exec-oob":"nosuch","id":1}\n',
  '{"exec-oob":"query-jobs","id":1}\n',
  '{"exec-oob":"qmp_capabilities","id":1}\n',
  '{"exec-oob":"query-jobs","execute":"query-jobs","id":1}\n',
  '{"execute":"query-jobs","control":{},"id":1}\n',
  '{"execute":"query-jobs","id":9,"extra":1}\n',
  '{"execute":"query-jobs","arguments":[],"id":10}\n',
  '{"id":5}\n', '{"execute":5,"id":6}\n', '[1,2]\n',
  'garbage\n', '@\n', ':\n', ',\n', '5\n', '"x y"\n', ']\n', '}}}\n', 'tru\n', 'true\n', 'null\n', 'nul!\n', '-\n',
  '{"execute":"query-jobs","id":"a/b\\u007f\\u001f\\t\\"\\\\\\ud83d\\ude00\u00e9"}\n',
  '{"execute":"query-jobs","id":[{},[],{"a":[]}, 1e3, -0, 1.0, 14.5, 0.1, 123456789012345678901]}\n',
  '{"execute":"query-jobs"} {"execute":"query-jobs","id":12}\n',
  '{"execute":"query-block-exports","id":"x"}\n',
  '{"execute":"block-job-cancel","arguments":{"device":"nosuch"},"id":"x"}\n',
];

async function session(tool: Tool, dir: string): Promise<string[]> {
  fs.mkdirSync(dir, { recursive: true });
  assert.equal((await qemuImg(['create', '-q', '-f', 'qcow2', 'd.qcow2', '1M'], dir)).code, 0);
  return withDaemon(tool, dir, daemonArgs('d.qcow2', 'disk'), async (d) => {
    // The helper's client took the monitor; let it go, and talk raw bytes on a fresh connection.
    d.q.close();
    const sock = net.createConnection(path.join(dir, 'qmp.sock'));
    let buf = Buffer.alloc(0);
    let wake: (() => void) | null = null;
    sock.on('data', (b: Buffer) => { buf = Buffer.concat([buf, b]); wake?.(); });
    sock.on('error', () => {});
    const until = async (pred: (s: string) => boolean): Promise<string> => {
      const t0 = Date.now();
      while (!pred(buf.toString('latin1'))) {
        assert.ok(Date.now() - t0 < 10000, `timed out; got ${buf.toString('latin1')}`);
        await new Promise<void>((r) => { wake = r; setTimeout(r, 50); });
      }
      const s = buf.toString('latin1');
      buf = Buffer.alloc(0);
      return s;
    };
    await until((s) => s.includes('\r\n'));
    const out: string[] = [];
    for (const [i, input] of INPUTS.entries()) {
      // A command whose reply marks the end of what `input` brought (sent once negotiated).
      const mark = `{"execute":"query-jobs","id":"mark${i}"}\n`;
      sock.write(Buffer.from(input, 'utf8'));
      sock.write(i > 0 ? mark : '');
      out.push(`${JSON.stringify(input)} -> ${await until((s) => i === 0 ? s.includes('\r\n') : new RegExp(`"mark${i}"[^\\n]*\\r\\n`).test(s))}`);
    }
    for (const bytes of [Buffer.from([0xff, 0x0a]), Buffer.from([0xc3, 0xa9, 0x0a]), Buffer.from([0xff, 0xfe, 0x0a])]) {
      sock.write(bytes);
      sock.write('{"execute":"query-jobs","id":"m"}\n');
      out.push(`${bytes.toString('hex')} -> ${await until((s) => /"m"[^\n]*\r\n/.test(s))}`);
    }
    sock.destroy();
    return out;
  });
}

test('the QMP wire answers as qemu-storage-daemon\'s, byte for byte', oracle(), async () => {
  const r = await onBoth(scratch(), session);
  assert.deepEqual(r.qchain, r.qemu);
  assert.ok(r.qemu.some((l) => l.includes('{"return": [], "id": "a/b\\u007F\\u001F\\t\\"\\\\\\uD83D\\uDE00\\u00E9"}')), r.qemu.join('\n'));
});
