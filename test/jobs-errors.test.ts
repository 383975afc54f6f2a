/**
 * Job error policies against qemu-storage-daemon, with real I/O errors: both daemons run under
 * the same soft file size limit (`ulimit -S -f`; Node and QEMU ignore SIGXFSZ, so writes past the limit
 * fail with EFBIG). The same QMP script runs against both; events (timestamps, offsets and
 * lengths dropped; repeated BLOCK_JOB_ERRORs of one pause-to-resume phase counted once, as
 * QEMU's number of failing requests in flight varies) and replies must match. A stopped job is
 * resumed after the limit is lifted with prlimit and must then complete.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { QCHAIN, oracle, qemuImg, qemuIo, qemuRawView, run, scratch } from './helpers/qemu.js';
import type { QmpClient, QmpMessage } from './helpers/qmp-client.js';
import { MONITOR, QSD, connectQmp, exited, killIfRunning, onBoth, qcow2Node, type Tool } from './helpers/live-qmp.js';
/** The file size limit, in 1 KiB blocks: 4 MiB. */
const LIMIT = 4096;


interface Ctx {
  q: QmpClient;
  /** Lift the daemon's file size limit. */
  unlimit: () => Promise<void>;
}

interface Scenario {
  name: string;
  setup: (dir: string) => Promise<void>;
  blockdevs: string[];
  script: (c: Ctx) => Promise<void>;
  /** Check the files once the daemon is gone. */
  after?: (dir: string) => Promise<void>;
}

const isEvent = (name: string, pred: (d: Record<string, unknown>) => boolean = () => true) =>
  (m: QmpMessage): boolean => m.event === name && pred((m.data ?? {}) as Record<string, unknown>);
const status = (s: string) => isEvent('JOB_STATUS_CHANGE', (d) => d.status === s);

/** Wait for the n-th message matching `pred` (counting from the start of the session). */
async function nth(q: QmpClient, pred: (m: QmpMessage) => boolean, n = 1): Promise<void> {
  await q.waitFor(() => q.received.filter(pred).length >= n, 60000);
}

async function writeData(dir: string, file: string, args: string[]): Promise<void> {
  const r = await qemuIo(['-c', ...args, file], dir);
  assert.equal(r.code, 0, r.stderr);
}

async function sameView(a: string, b: string): Promise<void> {
  assert.ok((await qemuRawView(a)).equals(await qemuRawView(b)), `${a} and ${b} differ`);
}

/** The images of a scenario and the command line that opens them. */
type Images = Pick<Scenario, 'setup' | 'blockdevs'>;

/** src.qcow2 (64 MiB), its first 8 MiB filled with `pattern`: the mirror and backup scenarios. */
const source = (pattern: string): Images => ({
  setup: async (dir) => {
    await qemuImg(['create', '-q', '-f', 'qcow2', 'src.qcow2', '64M'], dir);
    await writeData(dir, 'src.qcow2', [`write -P ${pattern} 0 8M`]);
  },
  blockdevs: qcow2Node('src'),
});

/** base.qcow2 (first 8 MiB 0x11) <- top.qcow2: the stream scenarios. */
const STREAM_CHAIN: Images = {
  setup: async (dir) => {
    await qemuImg(['create', '-q', '-f', 'qcow2', 'base.qcow2', '64M'], dir);
    await writeData(dir, 'base.qcow2', ['write -P 0x11 0 8M']);
    await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'top.qcow2'], dir);
  },
  blockdevs: [...qcow2Node('base'), ...qcow2Node('top', ',backing=base')],
};

/** base.qcow2 <- mid.qcow2 (first 8 MiB 0x22) <- top.qcow2: the commit scenarios. */
const COMMIT_CHAIN: Images = {
  setup: async (dir) => {
    await qemuImg(['create', '-q', '-f', 'qcow2', 'base.qcow2', '64M'], dir);
    await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'mid.qcow2'], dir);
    await writeData(dir, 'mid.qcow2', ['write -P 0x22 0 8M']);
    await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', 'top.qcow2'], dir);
  },
  blockdevs: [...qcow2Node('base'), ...qcow2Node('mid', ',backing=base'), ...qcow2Node('top', ',backing=mid')],
};

const SCENARIOS: Scenario[] = [
  {
    name: 'mirror: on-target-error=stop pauses, resume retries and completes',
    ...source('0x5a'),
    script: async ({ q, unlimit }) => {
      await q.execute('drive-mirror', { 'job-id': 'j', device: 'src', target: 'tgt.qcow2', format: 'qcow2', sync: 'full', 'on-target-error': 'bogus' }, 'bad');
      await q.execute('drive-mirror', { 'job-id': 'j', device: 'src', target: 'tgt.qcow2', format: 'qcow2', sync: 'full', 'on-target-error': 'stop' }, 'm');
      await nth(q, status('paused'));
      await q.execute('query-block-jobs', undefined, 'q1');
      await unlimit();
      await q.execute('job-resume', { id: 'j' }, 'r');
      await nth(q, isEvent('BLOCK_JOB_READY'));
      await q.execute('query-block-jobs', undefined, 'q2');
      await q.execute('job-complete', { id: 'j' }, 'c');
      await nth(q, status('null'));
    },
    after: (dir) => sameView(path.join(dir, 'src.qcow2'), path.join(dir, 'tgt.qcow2')),
  },
  {
    name: 'mirror: on-target-error=report fails the job',
    ...source('0x5a'),
    script: async ({ q }) => {
      await q.execute('drive-mirror', { 'job-id': 'j', device: 'src', target: 'tgt.qcow2', format: 'qcow2', sync: 'full', 'auto-dismiss': false }, 'm');
      await nth(q, status('concluded'));
      await q.execute('job-dismiss', { id: 'j' }, 'd');
    },
  },
  {
    name: 'stream: on-error=stop reports a read error, resume completes',
    ...STREAM_CHAIN,
    script: async ({ q, unlimit }) => {
      await q.execute('block-stream', { 'job-id': 's', device: 'top', 'on-error': 'stop' }, 's');
      await nth(q, status('paused'));
      await q.execute('query-block-jobs', undefined, 'q1');
      await q.execute('query-jobs', undefined, 'q2');
      await unlimit();
      await q.execute('block-job-resume', { device: 's' }, 'r');
      await nth(q, status('null'));
    },
    after: async (dir) => {
      const info = await qemuImg(['info', '--output=json', 'top.qcow2'], dir);
      assert.equal((JSON.parse(info.stdout) as Record<string, unknown>)['backing-filename'], undefined);
      await sameView(path.join(dir, 'top.qcow2'), path.join(dir, 'base.qcow2'));
    },
  },
  {
    name: 'stream: on-error=ignore copies what it can and fails at the end',
    ...STREAM_CHAIN,
    script: async ({ q }) => {
      await q.execute('block-stream', { 'job-id': 's', device: 'top', 'on-error': 'ignore', 'auto-dismiss': false }, 's');
      await nth(q, status('concluded'));
      await q.execute('job-dismiss', { id: 's' }, 'd');
    },
    after: async (dir) => {
      // The backing link stays: the stream failed.
      const info = await qemuImg(['info', '--output=json', 'top.qcow2'], dir);
      assert.equal((JSON.parse(info.stdout) as Record<string, unknown>)['backing-filename'], 'base.qcow2');
    },
  },
  {
    name: 'commit: a write error into the base is reported',
    ...COMMIT_CHAIN,
    script: async ({ q }) => {
      await q.execute('block-commit', { 'job-id': 'c', device: 'top', 'top-node': 'mid', 'base-node': 'base', 'on-error': 'report' }, 'c');
      await nth(q, status('null'));
    },
  },
  {
    name: 'backup: on-target-error=enospc reports an error other than ENOSPC',
    ...source('0x33'),
    script: async ({ q }) => {
      await q.execute('drive-backup', { 'job-id': 'b', device: 'src', target: 'bk.qcow2', format: 'qcow2', sync: 'full', 'on-target-error': 'enospc' }, 'b');
      await nth(q, status('null'));
    },
  },
  {
    name: 'backup: on-target-error=stop pauses, resume retries and completes',
    ...source('0x33'),
    script: async ({ q, unlimit }) => {
      await q.execute('drive-backup', { 'job-id': 'b', device: 'src', target: 'bk.qcow2', format: 'qcow2', sync: 'full', 'on-target-error': 'stop' }, 'b');
      await nth(q, status('paused'), 2);
      await q.execute('query-block-jobs', undefined, 'q1');
      await unlimit();
      await q.execute('job-resume', { id: 'b' }, 'r');
      await nth(q, status('null'));
    },
    after: (dir) => sameView(path.join(dir, 'src.qcow2'), path.join(dir, 'bk.qcow2')),
  },
  {
    name: 'commit: on-error=stop pauses, resume retries and completes',
    ...COMMIT_CHAIN,
    script: async ({ q, unlimit }) => {
      await q.execute('block-commit', { 'job-id': 'c', device: 'top', 'top-node': 'mid', 'base-node': 'base', 'on-error': 'stop' }, 'c');
      await nth(q, status('paused'));
      await q.execute('query-block-jobs', undefined, 'q1');
      await unlimit();
      await q.execute('job-resume', { id: 'c' }, 'r');
      await nth(q, status('null'));
    },
    after: (dir) => sameView(path.join(dir, 'mid.qcow2'), path.join(dir, 'base.qcow2')),
  },
  {
    name: 'mirror: on-target-error=ignore goes on and completes once writes succeed',
    ...source('0x5a'),
    script: async ({ q, unlimit }) => {
      await q.execute('drive-mirror', { 'job-id': 'j', device: 'src', target: 'tgt.qcow2', format: 'qcow2', sync: 'full', 'on-target-error': 'ignore' }, 'm');
      await nth(q, isEvent('BLOCK_JOB_ERROR'));
      await unlimit();
      await nth(q, isEvent('BLOCK_JOB_READY'));
      await q.execute('job-complete', { id: 'j' }, 'c');
      await nth(q, status('null'));
    },
    after: (dir) => sameView(path.join(dir, 'src.qcow2'), path.join(dir, 'tgt.qcow2')),
  },
];

/** Events and replies with what legitimately differs removed. */
function normalise(msgs: QmpMessage[]): { events: unknown[]; replies: Record<string, unknown> } {
  const events: unknown[] = [];
  const replies: Record<string, unknown> = {};
  const seen = new Set<string>();
  for (const m of msgs) {
    const c = JSON.parse(JSON.stringify(m)) as Record<string, unknown>;
    if ('QMP' in c) continue;
    if (c.event) {
      delete c.timestamp;
      const d = c.data as Record<string, unknown> | undefined;
      if (d) {
        delete d.offset;
        delete d.len;
      }
      if (c.event === 'JOB_STATUS_CHANGE' && d?.status === 'running') seen.clear();
      if (c.event === 'BLOCK_JOB_ERROR') {
        const k = JSON.stringify(d);
        if (seen.has(k)) continue;
        seen.add(k);
      }
      events.push(c);
    } else {
      const r = c.return;
      if (Array.isArray(r)) {
        for (const j of r as Array<Record<string, unknown>>) {
          for (const k of ['offset', 'len', 'current-progress', 'total-progress']) delete j[k];
        }
      }
      replies[String(c.id)] = c;
    }
  }
  return { events, replies };
}

async function session(tool: Tool, sc: Scenario, dir: string): Promise<{ events: unknown[]; replies: Record<string, unknown> }> {
  fs.mkdirSync(dir, { recursive: true });
  await sc.setup(dir);
  const args = [...sc.blockdevs, ...MONITOR];
  const cmd = tool === 'qemu' ? [QSD, ...args] : [process.execPath, QCHAIN, 'daemon', ...args];
  const quoted = cmd.map((a) => `'${a.replace(/'/g, "'\\''")}'`).join(' ');
  const child = spawn('bash', ['-c', `ulimit -S -f ${LIMIT}; exec ${quoted}`], { cwd: dir, stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr?.on('data', (d: Buffer) => { stderr += d.toString(); });
  try {
    const q = await connectQmp(dir, child);
    await q.execute('qmp_capabilities', undefined, 'cap');
    await sc.script({
      q,
      unlimit: async () => {
        const r = await run('prlimit', ['--pid', String(child.pid), '--fsize=unlimited']);
        assert.equal(r.code, 0, r.stderr);
      },
    });
    await q.execute('quit', undefined, 'quit');
    await exited(child);
    q.close();
    assert.equal(child.exitCode, 0, `${tool}: ${stderr}`);
    return normalise(q.received);
  } finally {
    killIfRunning(child);
  }
}

describe('job error policies against qemu-storage-daemon (file size limit)', { skip: oracle().skip ?? (fs.existsSync(QSD) ? undefined : 'no qemu-storage-daemon') }, () => {
  for (const sc of SCENARIOS) {
    test(sc.name, { timeout: 120000 }, async () => {
      const root = scratch('qchain-joberr-');
      const { qemu, qchain: ours } = await onBoth(root, (tool, dir) => session(tool, sc, dir));
      assert.deepEqual(ours.events, qemu.events);
      assert.deepEqual(ours.replies, qemu.replies);
      if (sc.after) {
        await sc.after(path.join(root, 'qemu'));
        await sc.after(path.join(root, 'qchain'));
      }
      for (const f of fs.readdirSync(path.join(root, 'qchain')).filter((x) => x.endsWith('.qcow2'))) {
        // Clusters allocated for a write that then failed may leak (exit 3), as with QEMU; nothing worse.
        const chk = await qemuImg(['check', '-q', path.join(root, 'qchain', f)]);
        assert.ok(chk.code === 0 || chk.code === 3, `${f}: ${chk.stdout}${chk.stderr}`);
      }
    });
  }
});
