/** `qemu-img check`: consistency report, optional repair, QEMU's exit codes (0/1/2/3). */
import type { CliContext } from '../context.js';
import { CliError, UsageError } from '../util/errors.js';
import { formatFixed } from '../util/printf.js';
import { FORCE_SHARE, FORMAT, HELP, IMAGE_OPTS, OBJECT, OUTPUT, PROG, sourceFormat, oneFile, open, outputArg, parseArgs, qemuJson } from './common.js';
import { Qcow2Image } from '../../qcow2/image.js';
import { checkImage, type CheckResult, type FixMode } from '../../qcow2/check.js';
import { CheckFailedError, SnapshotTableReadError } from '../../qcow2/check-snapshots.js';
import { errnoText } from '../../storage/storage.js';
import type { ImageFormat } from '../../chain/open.js';

function jsonResult(r: CheckResult, filename: string): Record<string, unknown> {
  const o: Record<string, unknown> = {};
  const nz = (k: string, v: number): void => { if (v) o[k] = v; };
  nz('image-end-offset', r.imageEndOffset);
  nz('compressed-clusters', r.compressedClusters);
  nz('total-clusters', r.totalClusters);
  nz('corruptions', r.corruptions);
  o['check-errors'] = r.checkErrors;
  nz('leaks', r.leaks);
  nz('leaks-fixed', r.leaksFixed);
  nz('corruptions-fixed', r.corruptionsFixed);
  nz('allocated-clusters', r.allocatedClusters);
  o.filename = filename;
  o.format = 'qcow2';
  nz('fragmented-clusters', r.fragmentedClusters);
  return o;
}

function humanResult(r: CheckResult): string {
  let s = '';
  if (!(r.corruptions || r.leaks || r.checkErrors)) s += 'No errors were found on the image.\n';
  else {
    if (r.corruptions) s += `\n${r.corruptions} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n`;
    if (r.leaks) s += `\n${r.leaks} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n`;
    if (r.checkErrors) s += `\n${r.checkErrors} internal errors have occurred during the check.\n`;
  }
  if (r.totalClusters && r.allocatedClusters) {
    const pct = (a: number, b: number): string => formatFixed((a * 100) / b, 2);
    s += `${r.allocatedClusters}/${r.totalClusters} = ${pct(r.allocatedClusters, r.totalClusters)}% allocated, ` +
      `${pct(r.fragmentedClusters, r.allocatedClusters)}% fragmented, ${pct(r.compressedClusters, r.allocatedClusters)}% compressed clusters\n`;
  }
  if (r.imageEndOffset) s += `Image end offset: ${r.imageEndOffset}\n`;
  return s;
}

export async function checkMain(argv: string[], ctx: CliContext): Promise<number> {
  const { opts, rest } = parseArgs(argv, ':hf:r:T:qU', [HELP, FORMAT, { name: 'repair', hasArg: 'required', val: 'r' }, OUTPUT, OBJECT, IMAGE_OPTS, FORCE_SHARE]);
  let fmt: string | undefined, output: 'human' | 'json' = 'human', quiet = false;
  let fix: FixMode | null = null;
  let forceShare = false;
  for (const o of opts) {
    switch (o.opt) {
      case 'h': ctx.stdout.write('usage: qchain img check [-q] [-f fmt] [--output=ofmt] [-r [leaks | all]] [-U] filename\n'); return 0;
      case 'f': fmt = o.arg as string; break;
      case 'U': forceShare = true; break;
      case 'r':
        if (o.arg === 'leaks') fix = { leaks: true, errors: false };
        else if (o.arg === 'all') fix = { leaks: true, errors: true };
        else throw new UsageError("Unknown option value for -r (expecting 'leaks' or 'all'): " + o.arg);
        break;
      case 'OUTPUT': output = outputArg(o.arg as string); break;
      case 'q': quiet = true; break;
      case 'IMAGE_OPTS': throw new UsageError('--image-opts is not supported by qchain');
    }
  }
  const file = oneFile(rest);
  const chain = await open(file, { format: sourceFormat(file, fmt), readOnly: !fix, noRepair: true, checkMode: true, forceShare }, ctx);
  const report = (l: string): void => { ctx.stderr.write(`${l}\n`); };
  try {
    const img = chain.top;
    if (!(img instanceof Qcow2Image)) {
      throw new CliError('This image format does not support checks');
    }
    let r = await checkImage(img, report, fix ?? undefined).catch((e: unknown) => {
      // QEMU's check reads the snapshot table itself; when that (or a repair) fails it reports no result.
      if (e instanceof CheckFailedError) throw new CliError(`Check failed: ${errnoText(e.errno)}`);
      if (!(e instanceof SnapshotTableReadError)) throw e;
      ctx.stderr.write(`${PROG}: ${e.message}\n`);
      throw new CliError(`Check failed: ${errnoText(e.errno)}`);
    });
    if (fix && r.needsRebuild) {
      report('ERROR need to rebuild refcount structures');
      throw new CliError('Check failed: Input/output error');
    }
    if (fix && (r.leaksFixed || r.corruptionsFixed)) {
      const fixedLeaks = r.leaksFixed, fixedCorruptions = r.corruptionsFixed;
      if (output === 'human' && !quiet) {
        ctx.stdout.write(`The following inconsistencies were found and repaired:\n\n    ${fixedLeaks} leaked clusters\n    ${fixedCorruptions} corruptions\n\nDouble checking the fixed image now...\n`);
      }
      // An image marked corrupt during the repair has lost its driver in QEMU: the second pass fails.
      if (img.unusable) throw new CliError('Check failed: No medium found');
      await img.flush();
      r = await checkImage(img, report).catch((e: unknown) => {
        if (e instanceof CheckFailedError) throw new CliError(`Check failed: ${errnoText(e.errno)}`);
        throw e;
      });
      r.leaksFixed = fixedLeaks;
      r.corruptionsFixed = fixedCorruptions;
    }
    // Internal errors during the check: qemu-img reports no result, only that the check failed.
    if (r.checkErrors) throw new CliError('Check failed');
    // -q silences the JSON result too (qemu-img's dump_json_image_check prints with qprintf).
    if (quiet) { /* nothing */ } else if (output === 'json') ctx.stdout.write(qemuJson(jsonResult(r, file)) + '\n');
    else ctx.stdout.write(humanResult(r));
    if (r.checkErrors) return 1;
    if (r.corruptions) return 2;
    if (r.leaks) return 3;
    return 0;
  } catch (e) {
    if (e instanceof CliError && e.message === 'This image format does not support checks') {
      ctx.stderr.write(`${PROG}: ${e.message}\n`);
      return 63;
    }
    throw e;
  } finally {
    await chain.close();
  }
}
