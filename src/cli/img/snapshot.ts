/** `qemu-img snapshot`: internal snapshots (-l list, -c create; -a/-d arrive with the offline-management work). */
import type { CliContext } from '../context.js';
import { CliError, UsageError } from '../util/errors.js';
import { FORCE_SHARE, HELP, IMAGE_OPTS, OBJECT, formatArg, oneFile, open, parseArgs } from './common.js';
import { Qcow2Image } from '../../qcow2/image.js';
import { createSnapshot } from '../../qcow2/snapshot.js';
import { snapshotRow } from './info.js';
import type { ImageFormat } from '../../chain/open.js';

export async function snapshotMain(argv: string[], ctx: CliContext): Promise<number> {
  const { opts, rest } = parseArgs(argv, ':la:c:d:f:hqU', [HELP, OBJECT, IMAGE_OPTS, FORCE_SHARE]);
  let action: { op: 'l' | 'a' | 'c' | 'd'; name?: string } | null = null;
  let fmt: ImageFormat | undefined;
  let forceShare = false;
  for (const o of opts) {
    switch (o.opt) {
      case 'h': ctx.stdout.write('usage: qchain img snapshot [-q] [-l | -c snapshot] filename\n'); return 0;
      case 'f': fmt = formatArg(o.arg as string); break;
      case 'U': forceShare = true; break;
      case 'l': case 'a': case 'c': case 'd':
        if (action) throw new UsageError("Cannot mix '-l', '-a', '-c', '-d'");
        action = { op: o.opt, name: o.arg };
        break;
    }
  }
  const file = oneFile(rest);
  if (!action) return 0; // qemu-img 7.2 does nothing without an action
  if (action.op === 'a' || action.op === 'd') throw new CliError(`Snapshot ${action.op === 'a' ? 'apply' : 'delete'} is not supported yet`);
  const chain = await open(file, { format: fmt, readOnly: action.op === 'l', noBacking: true, forceShare }, ctx);
  try {
    const img = chain.top;
    if (!(img instanceof Qcow2Image)) throw new CliError(`Could not ${action.op === 'l' ? 'list' : 'create'} snapshot: Operation not supported`);
    if (action.op === 'l') {
      if (img.snapshots.length) {
        ctx.stdout.write(`Snapshot list:\n${snapshotRow(null)}\n${img.snapshots.map((s) => snapshotRow(s) + '\n').join('')}`);
      }
    } else {
      await createSnapshot(img, { name: action.name as string });
    }
  } finally {
    await chain.close();
  }
  return 0;
}
