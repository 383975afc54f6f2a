/**
 * QMP `transaction` (qapi/transaction.json): every action is prepared in order with guest I/O
 * drained; if one fails, the prepared ones are undone in reverse order and its error is the
 * reply; otherwise all commit (backup jobs start there, all in the same tick). With
 * completion-mode=grouped (backup actions only, as QEMU) the jobs finish or fail together.
 */
import { QmpError } from './graph.js';
import { CommandError, str, type Args } from '../qmp/server.js';
import { BITMAP_COMMANDS, bitmapAction, type Action } from './bitmap-actions.js';
import type { Daemon } from './daemon.js';
import { JobGroup } from '../jobs/group.js';
import { drainAllJobs } from './job-drain.js';

const KNOWN = ['abort', 'block-dirty-bitmap-add', 'block-dirty-bitmap-remove', 'block-dirty-bitmap-clear', 'block-dirty-bitmap-enable',
  'block-dirty-bitmap-disable', 'block-dirty-bitmap-merge', 'blockdev-backup', 'blockdev-snapshot', 'blockdev-snapshot-internal-sync',
  'blockdev-snapshot-sync', 'drive-backup'];

interface Step { type: string; data: Args }

function parse(a: Args): { steps: Step[]; grouped: boolean } {
  const actions = a.actions;
  if (actions === undefined) throw new CommandError("Parameter 'actions' is missing");
  if (!Array.isArray(actions)) throw new CommandError("Invalid parameter type for 'actions', expected: array");
  const steps: Step[] = actions.map((x: unknown, i) => {
    if (!x || typeof x !== 'object') throw new CommandError(`Invalid parameter type for 'actions[${i}]', expected: object`);
    const { type, data } = x as { type?: unknown; data?: unknown };
    if (type === undefined) throw new CommandError(`Parameter 'actions[${i}].type' is missing`);
    if (typeof type !== 'string' || !KNOWN.includes(type)) throw new CommandError(`Parameter 'type' does not accept value '${String(type)}'`);
    if (data === undefined) throw new CommandError(`Parameter 'actions[${i}].data' is missing`);
    if (!data || typeof data !== 'object') throw new CommandError(`Invalid parameter type for 'actions[${i}].data', expected: object`);
    return { type, data: data as Args };
  });
  const props = (a.properties ?? {}) as Args;
  const mode = props['completion-mode'] ?? 'individual';
  if (mode !== 'individual' && mode !== 'grouped') throw new CommandError(`Parameter 'completion-mode' does not accept value '${String(mode)}'`);
  return { steps, grouped: mode === 'grouped' };
}

async function prepare(d: Daemon, s: Step, group?: JobGroup): Promise<Action> {
  if ((BITMAP_COMMANDS as readonly string[]).includes(s.type)) return bitmapAction(d.bitmaps, s.type, s.data);
  switch (s.type) {
    case 'abort':
      throw new QmpError('Transaction aborted using Abort action');
    case 'blockdev-snapshot-sync': {
      const { node, overlay } = await d.snapshotSync(s.data);
      return { commit: () => d.sealOld(node), abort: () => d.detachOverlay(node, overlay, true) };
    }
    case 'blockdev-snapshot': {
      const { node, overlay } = d.snapshot(s.data);
      return { commit: () => d.sealOld(node), abort: () => d.detachOverlay(node, overlay, false) };
    }
    case 'drive-backup':
      return d.driveBackup(s.data, group);
    case 'blockdev-backup': {
      const start = await d.jobs.prepareBackup(s.data, await d.jobs.backupTarget(s.data));
      return { commit: () => { const job = start(); group?.add(job); }, abort: () => {} };
    }
  }
  throw new QmpError(`Action '${s.type}' is not supported by qchain`);
}

/** Argument errors name the argument inside the action, as QAPI's visitor does. */
function located(e: unknown, i: number): unknown {
  if (e instanceof CommandError) {
    const m = /^(Parameter|Invalid parameter type for) '([^']+)'(.*)$/s.exec(e.message);
    if (m && m[1] === 'Parameter' && !m[3].startsWith(' does not accept')) return new CommandError(`Parameter 'actions[${i}].data.${m[2]}'${m[3]}`);
    if (m && m[1] !== 'Parameter') return new CommandError(`${m[1]} 'actions[${i}].data.${m[2]}'${m[3]}`);
  }
  return e;
}

export async function runTransaction(d: Daemon, a: Args): Promise<void> {
  const { steps, grouped } = parse(a);
  // QEMU's qmp_transaction begins with bdrv_drain_all(), whatever the actions (none included).
  drainAllJobs(d.jobList());
  if (grouped) {
    const other = steps.find((s) => s.type !== 'drive-backup' && s.type !== 'blockdev-backup');
    if (other) throw new QmpError(`Action '${other.type}' does not support Transaction property completion-mode = grouped`);
  }
  const group = grouped ? new JobGroup() : undefined;
  const undrain = await d.drainAll();
  const done: Action[] = [];
  // Jobs are only created at commit: two actions of this transaction must not claim the same job ID.
  const ids = new Set<string>();
  try {
    for (let i = 0; i < steps.length; i++) {
      try {
        const s = steps[i];
        if (s.type === 'drive-backup' || s.type === 'blockdev-backup') {
          const id = s.data['job-id'] ?? s.data.device;
          if (typeof id === 'string' && ids.has(id)) throw new QmpError(`Job ID '${id}' already in use`);
          if (typeof id === 'string') ids.add(id);
        }
        done.push(await prepare(d, s, group));
      } catch (e) {
        for (const x of done.reverse()) await x.abort();
        throw located(e, i);
      }
    }
    for (const x of done) await x.commit();
  } finally {
    undrain();
  }
  await d.releaseUnused();
}
