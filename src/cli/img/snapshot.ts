/** `qemu-img snapshot`: internal snapshots (-l list, -c create, -a apply, -d delete). */
import type { CliContext } from '../context.js';
import { CliError, UsageError } from '../util/errors.js';
import { FORCE_SHARE, HELP, IMAGE_OPTS, OBJECT, errnoMessage, oneFile, open, parseArgs } from './common.js';
import { Qcow2Image } from '../../qcow2/image.js';
import { createSnapshot } from '../../qcow2/snapshot.js';
import { applySnapshot, deleteSnapshot } from '../../qcow2/snapshot-manage.js';
import { ImageError } from '../../image/errors.js';
import { snapshotRow } from './info.js';

/** errno numbers qemu-img prints for a failed create ("%d (%s)"). */
const ERRNO: Record<string, number> = { EIO: 5, EACCES: 13, ENOSPC: 28, EINVAL: 22, EFBIG: 27, ENOTSUP: 95, ENOENT: 2 };

export async function snapshotMain(argv: string[], ctx: CliContext): Promise<number> {
  const { opts, rest } = parseArgs(argv, ':la:c:d:hqU', [HELP, OBJECT, IMAGE_OPTS, FORCE_SHARE]);
  let action: { op: 'l' | 'a' | 'c' | 'd'; name: string } | null = null;
  let forceShare = false;
  for (const o of opts) {
    switch (o.opt) {
      case 'h': ctx.stdout.write('usage: qchain img snapshot [-q] [-l | -a snapshot | -c snapshot | -d snapshot] filename\n'); return 0;
      case 'U': forceShare = true; break;
      case 'l': case 'a': case 'c': case 'd':
        if (action) throw new UsageError("Cannot mix '-l', '-a', '-c', '-d'");
        action = { op: o.opt, name: o.arg ?? '' };
        break;
    }
  }
  const file = oneFile(rest);
  if (!action) return 0; // qemu-img 7.2 does nothing without an action
  if (forceShare && action.op !== 'l') {
    throw new CliError(`Could not open '${file}': force-share=on can only be used with read-only images`);
  }
  const chain = await open(file, { readOnly: action.op === 'l', noBacking: true, forceShare }, ctx);
  try {
    const img = chain.top;
    const name = action.name;
    switch (action.op) {
      case 'l':
        if (img instanceof Qcow2Image && img.snapshots.length) {
          ctx.stdout.write(`Snapshot list:\n${snapshotRow(null)}\n${img.snapshots.map((s) => snapshotRow(s) + '\n').join('')}`);
        }
        break;
      case 'c':
        try {
          if (!(img instanceof Qcow2Image)) throw new ImageError('Operation not supported', 'ENOTSUP');
          await createSnapshot(img, { name });
        } catch (e) {
          // qemu-img reports the errno only; a refcount overflow surfaces as EINVAL there.
          const code = e instanceof ImageError ? (/overflow/.test(e.message) ? 'EINVAL' : e.errno ?? 'EIO') : 'EIO';
          throw new CliError(`Could not create snapshot '${name}': -${ERRNO[code] ?? 5} (${errnoMessage(code)})`);
        }
        break;
      case 'a':
        if (!(img instanceof Qcow2Image)) {
          // QEMU's fallback to the protocol layer reopens the image (the probed-raw warning comes twice).
          await (await open(file, { readOnly: false, noBacking: true, noLock: true }, ctx)).close();
          throw new CliError(`Could not apply snapshot '${name}': Block driver does not support snapshots`);
        }
        try {
          await applySnapshot(img, name);
        } catch (e) {
          throw new CliError(withDetail(e, `Could not apply snapshot '${name}': Failed to load snapshot`));
        }
        break;
      case 'd': {
        // qemu-img looks the snapshot up by name, then deletes it by id and name.
        const sn = img instanceof Qcow2Image ? img.snapshots.find((s) => s.name === name) : undefined;
        if (!(img instanceof Qcow2Image) || !sn) throw new CliError(`Could not delete snapshot '${name}': snapshot not found`);
        try {
          await deleteSnapshot(img, sn.id, sn.name);
        } catch (e) {
          const msg = e instanceof Error ? e.message : String(e);
          throw new CliError(`Could not delete snapshot '${name}': ${msg}`);
        }
        break;
      }
    }
  } finally {
    await chain.close();
  }
  return 0;
}

/**
 * QEMU's goto reports a detailed error first (error_report) and then the generic one with the
 * errno text; an error that is just an errno prints only the second line.
 */
function withDetail(e: unknown, generic: string): string {
  if (!(e instanceof ImageError)) return `${generic}: ${e instanceof Error ? e.message : String(e)}`;
  const text = errnoMessage(e.errno ?? 'EIO');
  return e.message === text ? `${generic}: ${text}` : `${e.message}\n${generic}: ${text}`;
}
