/**
 * The daemon's jobs: creation of stream/commit jobs from QMP arguments (QEMU's checks and
 * messages), the job-* and legacy block-job-* verbs, and the two query commands.
 */
import { Job, type JobEvents } from './job.js';
import { streamWork } from './stream.js';
import { commitWork, growBase } from './commit.js';
import { mirrorWork } from './mirror.js';
import { mirrorStart } from './mirror-init.js';
import { mirrorSyncSupported, mirrorArgTypes, mirrorGranularity } from './mirror-args.js';
import { verbCommands } from './verbs.js';
import { drainAllJobs, drainSection, drains } from '../daemon/job-drain.js';
import { backupWork, copyGranule, supportsCompressedWrites, type Backup } from './backup.js';
import { DirtyBitmap } from '../qcow2/dirty-bitmap.js';
import { ALLOW_RO, DEFAULT, dirtyBytes, type BitmapRegistry, type NodeBitmap } from '../daemon/bitmaps.js';
import { QmpError, type BlockGraph, type FormatNode } from '../daemon/graph.js';
import { optBool, optInt, optStr, str, type Args, type Handler } from '../qmp/server.js';
import { onErrorArg, type OnError } from './errors.js';
import { FileStorage } from '../storage/file.js';
import { createQcow2 } from '../qcow2/create.js';
import { findBackingImage } from '../chain/find-backing.js';
import { backingOpenName } from '../chain/resolve.js';
import { isFormat } from '../chain/open.js';
import { anonymousBitmap, attachFilter, attachJobBitmap, checkFilterName, dropFilter, type FilterPlan } from './job-filter.js';
import { delRefusal } from './job-holds.js';
import { filterNamed, jobNode, refuseFilterUse, type FilterUse } from './filter-use.js';

/** What jobs need from the daemon: draining a node's exports and moving them (pivot). */
export interface JobHost {
  drain(node: string): Promise<() => void>;
  drainAll(): Promise<() => void>;
  moveExports(from: string, to: string): void;
  /** The daemon's dirty bitmaps (backups read and update them). */
  bitmaps: BitmapRegistry;
  /** A block job is gone: nodes only it used may be released. */
  jobGone?: () => void;
}

export class JobManager {
  readonly jobs = new Map<string, Job>();

  constructor(private readonly graph: BlockGraph, private readonly events: JobEvents, private readonly host: JobHost) {}

  /** The job holding `node`, if any. */
  jobOn(node: string): Job | undefined {
    for (const j of this.jobs.values()) if (j.nodes.includes(node) && j.status !== 'concluded' && j.status !== 'null') return j;
    return undefined;
  }

  /** A live backup whose copy-before-write filter sits on `node` (see Job.filterOn). */
  filterOn(node: string): Job | undefined {
    for (const j of this.jobs.values()) if (j.filterOn === node && j.status !== 'concluded' && j.status !== 'null') return j;
    return undefined;
  }

  /** An external snapshot put `overlay` over `node`: a filter on node now sits on the overlay (undone with `to`, `from` swapped). */
  moveFilters(from: string, to: string): void {
    for (const j of this.jobs.values()) {
      if (j.filterOn !== from) continue;
      j.filterOn = to;
      const n = this.graph.nodes.get(to);
      if (j.filter && n?.kind === 'format') j.filter.child = n;
    }
  }

  /** What blockdev-del of `name` runs into from the jobs (job-holds.ts). */
  delRefusal(name: string): string | null {
    return delRefusal(this.graph, this.jobs.values(), name);
  }

  private common(a: Args, device: FormatNode, type: Job['type'], nodes: string[], policies: [OnError, OnError] = ['report', 'report'], backupSourceOk?: string, filter?: FilterPlan): Job {
    this.checkNodes(type, device, nodes, backupSourceOk);
    // QEMU creates a job's filter before the job (its name is refused before the job ID), an
    // intermediate commit's after it.
    const filterName = optStr(a, 'filter-node-name');
    if (filter && !filter.late) checkFilterName(this.graph, filterName, !!filter.prefixed);
    const id = this.jobId(a);
    if (this.jobs.has(id)) throw new QmpError(`Job ID '${id}' already in use`);
    const speed = optInt(a, 'speed') ?? 0;
    const job = new Job({ id, type, nodes, speed: Math.max(0, speed), autoFinalize: optBool(a, 'auto-finalize', true), autoDismiss: optBool(a, 'auto-dismiss', true), onReadError: policies[0], onWriteError: policies[1] },
      this.events, (j) => {
        this.jobs.delete(j.id);
        this.host.jobGone?.();
      });
    this.jobs.set(id, job);
    // block_job_create sets the speed once the job exists: a negative one ends it at once.
    if (speed < 0) {
      job.abandon();
      throw new QmpError("Parameter 'speed' expects a non-negative value");
    }
    if (filter) {
      if (filter.late) {
        try {
          checkFilterName(this.graph, filterName, !!filter.prefixed);
        } catch (e) {
          job.abandon();
          throw e;
        }
      }
      attachFilter(this.graph, job, filter.drv, filter.child, filterName, { readOnly: filter.readOnly });
    }
    return job;
  }

  /**
   * No other job may hold the nodes; backups of the same device may run side by side (each has its
   * own copy-before-write). `backupSourceOk`: a node a backup may read from meanwhile (QEMU blocks
   * the backup's filter above its source, not the source: an intermediate commit's top).
   */
  private checkNodes(type: Job['type'], device: FormatNode, nodes: string[], backupSourceOk?: string): void {
    for (const n of nodes) {
      const busy = [...this.jobs.values()].find((j) => j.nodes.includes(n) && j.status !== 'concluded' && j.status !== 'null' &&
        !(type === 'backup' && j.type === 'backup' && n === device.name && j.nodes[0] === n) &&
        !(n === backupSourceOk && j.type === 'backup' && j.nodes[0] === n));
      if (busy) throw new QmpError(`Node '${n}' is busy: block device is in use by block job: ${busy.type}`);
    }
  }

  /** Nodes of a format node's chain, top first. */
  private chainNodes(n: FormatNode): FormatNode[] {
    const out: FormatNode[] = [];
    for (let x: FormatNode | null = n; x; x = x.backing) out.push(x);
    return out;
  }

  /**
   * The layer below `top` a file name designates, as QEMU's bdrv_find_backing_image finds it:
   * absolute, or relative to the overlay's directory (not the daemon's), compared after realpath.
   */
  private belowByFile(top: FormatNode, name: string): FormatNode | undefined {
    const nodes = this.chainNodes(top);
    const d = findBackingImage(this.graph.chain(top), name);
    return d === null ? undefined : nodes[d];
  }

  /**
   * A base named by node (`nodeKey`) or by file (`key`). By file it is looked up below `top`; by
   * node, below `top` for stream, or anywhere in the chain from `top` (itself included) for
   * block-commit, each with QEMU's own refusal.
   */
  private findBelow(top: FormatNode, a: Args, key: string, nodeKey: string, nodeScope: 'below' | 'chain' = 'below'): FormatNode | undefined {
    const byName = optStr(a, nodeKey), byFile = optStr(a, key);
    if (byName !== undefined && byFile !== undefined) throw new QmpError(`'${key}' and '${nodeKey}' cannot be specified at the same time`);
    if (byName !== undefined) {
      const f = filterNamed(this.graph, byName);
      // A job's filter is in the chain only as an intermediate commit's commit_top, whose job holds the top.
      const holder = f?.drv === 'commit_top' ? this.jobOn(top.name) : undefined;
      if (holder) throw new QmpError(`Node '${top.name}' is busy: block device is in use by block job: ${holder.type}`);
      if (f) throw new QmpError(nodeScope === 'chain' ? `'${byName}' is not in this backing file chain` : `Node '${byName}' is not a backing image of '${top.name}'`);
      const n = this.graph.formatNode(byName);
      const chain = this.chainNodes(top);
      if (nodeScope === 'chain' && !chain.includes(n)) throw new QmpError(`'${byName}' is not in this backing file chain`);
      if (nodeScope === 'below' && !chain.slice(1).includes(n)) throw new QmpError(`Node '${byName}' is not a backing image of '${top.name}'`);
      return n;
    }
    if (byFile !== undefined) {
      const n = this.belowByFile(top, byFile);
      if (!n) throw new QmpError(`Can't find '${byFile}' in the backing chain`);
      return n;
    }
    return undefined;
  }

  /** The format node a job command names (a job's filter gets QEMU's refusal for `use`). */
  node(name: string, use: FilterUse): FormatNode {
    return jobNode(this.graph, this.jobs.values(), name, use);
  }

  async stream(a: Args): Promise<void> {
    const top = this.node(str(a, 'device'), 'stream');
    const base = this.findBelow(top, a, 'base', 'base-node') ?? null;
    if (!base && optStr(a, 'backing-file') !== undefined) throw new QmpError('backing file specified, but streaming the entire chain');
    const layers = this.chainNodes(top);
    const between = layers.slice(0, base ? layers.indexOf(base) : layers.length).map((n) => n.name);
    this.checkStreamFilters(layers, base);
    const onError = onErrorArg(a, 'on-error');
    // A backup of the top itself does not stop a stream (QEMU blocks the backup's filter, above the top).
    const job = this.common(a, top, 'stream', between, [onError, onError], top.name, { drv: 'copy-on-read', child: top, prefixed: true });
    // QEMU's stream_start reopens a read-only top read-write before block-stream returns; it is
    // read-only again once the job has ended, however it ended (stream_clean).
    const topWasReadOnly = await this.writableForJob(job, top);
    let sealed: Promise<void> | null = null;
    const sealTop = (): Promise<void> => (sealed ??= topWasReadOnly ? this.reopen(top, true).catch(() => {}) : Promise.resolve());
    const { work, prepare } = streamWork(this.graph, { top, base, backingFile: optStr(a, 'backing-file'), sealTop });
    // The backing link changes with the top's exports drained (no request sees half a change).
    job.start(work, async () => {
      const undrain = await this.host.drain(top.name);
      try {
        await prepare();
      } finally {
        undrain();
        await sealTop();
      }
    }, () => void sealTop());
  }

  /**
   * qmp_block_stream walks from the top down to the base through filters: a backup's
   * copy-before-write filter above a lower layer (or above the base) is met, and refused, before
   * that layer (the newest filter first, as it sits highest).
   */
  private checkStreamFilters(layers: FormatNode[], base: FormatNode | null): void {
    const end = base ? layers.indexOf(base) : layers.length - 1;
    for (let i = 1; i <= end; i++) {
      const j = [...this.jobs.values()].reverse().find((x) => x.filter && x.filterOn === layers[i].name && x.status !== 'concluded' && x.status !== 'null');
      if (j?.filter) throw new QmpError(`Node '${j.filter.name}' is busy: block device is in use by block job: ${j.type}`);
    }
  }

  async commit(a: Args): Promise<void> {
    const name = str(a, 'device');
    // qmp_block_commit's own lookup and error class.
    if (!this.graph.nodes.has(name)) throw new QmpError(`Device '${name}' not found`, 'DeviceNotFound');
    const device = this.node(name, 'commit');
    // A node under a job has the job as a parent in QEMU's graph: not a root node either.
    if (this.graph.parentsOf(device).some((p) => p.backing === device) || this.jobOn(device.name) || this.filterOn(device.name)) throw new QmpError('Need a root block node');
    const layers = this.chainNodes(device);
    const topName = optStr(a, 'top-node'), topFile = optStr(a, 'top');
    if (topName !== undefined && topFile !== undefined) throw new QmpError("'top' and 'top-node' cannot be specified at the same time");
    let top = device;
    if (topName !== undefined) {
      top = this.graph.formatNode(topName);
      if (!layers.includes(top)) throw new QmpError(`'${topName}' is not in this backing file chain`);
    } else if (topFile !== undefined) {
      const t = layers[0].filename === topFile ? layers[0] : this.belowByFile(device, topFile);
      if (!t) throw new QmpError(`Top image file ${topFile} not found`);
      top = t;
    }
    const base = this.findBelow(top, a, 'base', 'base-node', 'chain') ?? layers[layers.length - 1];
    if (base === top) throw new QmpError('cannot commit an image into itself');
    if (top === device) {
      if (optStr(a, 'backing-file') !== undefined) throw new QmpError("'backing-file' specified, but 'top' is the active layer");
      return this.activeCommit(a, device, base);
    }
    const overlay = layers[layers.indexOf(top) - 1];
    const nodes = layers.slice(layers.indexOf(top), layers.indexOf(base) + 1).map((n) => n.name);
    const onError = onErrorArg(a, 'on-error');
    const job = this.common(a, device, 'commit', [device.name, ...nodes], [onError, onError], top.name, { drv: 'commit_top', child: top, late: true, readOnly: true });
    // QEMU reopens a read-only base read-write before block-commit returns.
    const baseWasReadOnly = await this.writableForJob(job, base);
    const { work, prepare } = commitWork(this.graph, { device, top, overlay, base, baseWasReadOnly, backingFile: optStr(a, 'backing-file'), reopen: (n, ro) => this.reopen(n, ro) });
    job.start(work, async () => {
      // QEMU's commit_prepare drains the committed nodes three times (dropping the intermediate
      // nodes, removing its filter): a backup reading from the top pauses and resumes each time.
      const others = [...this.jobs.values()].filter((j) => j !== job && drains(this.graph, top.name, j));
      for (let pass = 0; pass < 3; pass++) drainSection(others);
      await prepare();
      // Such a backup's filter now sits on the base (QEMU replaces the top under it): the base is
      // the backup's too, and no other job may change it under the backup's view.
      for (const j of others) if (j.type === 'backup' && j.nodes[0] === top.name) j.nodes.push(base.name);
    });
  }

  /**
   * Reopen a read-only node read-write for a job before its command returns (as QEMU's job
   * starts do); whether it was read-only. If that fails the job is dropped and the error thrown.
   */
  private async writableForJob(job: Job, node: FormatNode): Promise<boolean> {
    if (!node.driver.readOnly) return false;
    try {
      await this.reopen(node, false);
    } catch (e) {
      dropFilter(job);
      this.jobs.delete(job.id);
      throw e;
    }
    return true;
  }

  /** Reopen a node with no guest request in flight (old handles may be in use by running requests). */
  private async reopen(node: FormatNode, readOnly: boolean): Promise<void> {
    const undrain = await this.host.drainAll();
    try {
      await this.graph.reopen(node, readOnly);
    } finally {
      undrain();
    }
  }

  /** Active commit: mirror the layers above the base into it; on completion the base becomes the active node. */
  private async activeCommit(a: Args, device: FormatNode, base: FormatNode): Promise<void> {
    const layers = this.chainNodes(device);
    const nodes = layers.slice(0, layers.indexOf(base) + 1).map((n) => n.name);
    const onError = onErrorArg(a, 'on-error');
    const job = this.common(a, device, 'commit', nodes, [onError, onError], undefined, { drv: 'mirror_top', child: device });
    const { work, prepare, dirtyBytes, granularity: g, release } = mirrorWork(this.graph, {
      source: device, target: base, initial: 'allocated',
      depth: (chain) => chain.layers.findIndex((l) => l.driver === base.driver),
      drain: () => this.host.drain(device.name),
      pivot: async () => {
        this.host.moveExports(device.name, base.name);
        this.graph.changed();
      },
    });
    job.ended.push(release);
    attachJobBitmap(this.graph, job, device, true, g, dirtyBytes);
    // As for an intermediate commit, the base is read-write before block-commit returns.
    await this.writableForJob(job, base);
    // Unlike an intermediate commit, a cancelled or failed active commit leaves the base
    // read-write (as qemu-storage-daemon 7.2 does).
    job.start(async (j) => {
      await growBase(base, device.driver.size);
      await work(j);
    }, prepare);
  }

  /**
   * blockdev-mirror / drive-mirror: copy the device's chain (sync full/top/none) into a target, then pivot on completion.
   * `backing`, what the target's backing becomes at the pivot (QEMU's MirrorBackingMode): 'leave' as it is
   * (blockdev-mirror), 'source' the source's backing (drive-mirror absolute-paths), 'open' the chain its
   * header names (drive-mirror mode=existing).
   */
  mirror(a: Args, target: FormatNode, backing: 'leave' | 'source' | 'open' = 'leave'): void {
    const device = this.mirrorSource(a);
    const sync = str(a, 'sync');
    // blockdev_mirror_common: the granularity, then the op blockers (the source's and the
    // target's jobs, the target's overlay: a mirror may not write into a backing node), then
    // mirror_start_job's buffer size and node checks.
    const granularity = mirrorGranularity(a);
    this.checkNodes('mirror', device, [device.name, target.name]);
    const overlay = this.graph.parentsOf(target).find((p) => p.backing === target);
    if (overlay) throw new QmpError(`Node '${target.name}' is busy: node is used as backing hd of '${overlay.name}'`);
    mirrorSyncSupported(sync);
    if ((optInt(a, 'buf-size') ?? 0) < 0) throw new QmpError("Invalid parameter 'buf-size'");
    if (target === device) throw new QmpError("Can't mirror node into itself");
    const job = this.common(a, device, 'mirror', [device.name, target.name], [onErrorArg(a, 'on-source-error'), onErrorArg(a, 'on-target-error')], undefined, { drv: 'mirror_top', child: device });
    const { work, prepare, dirtyBytes, granularity: g, release } = mirrorWork(this.graph, {
      source: device, target, granularity,
      // What a dirty granule is copied from: the top alone for sync=top (the target shares the
      // source's backing); the whole guest view for full, and for none (QEMU's mirror reads the
      // source above a NULL base: the target need not have the source below it).
      depth: (chain) => (sync === 'top' ? 1 : chain.layers.length),
      // drive-mirror's own new image (backing 'source') reads as zeros.
      ...mirrorStart(sync as 'full' | 'top' | 'none', target, backing === 'source'),
      drain: () => this.host.drain(device.name),
      pivot: async () => {
        if (backing === 'open') await this.openOwnBacking(target);
        else if (backing === 'source' && !target.backing) target.backing = sync === 'none' ? device : sync === 'top' ? device.backing : null;
        this.host.moveExports(device.name, target.name);
        this.graph.changed();
      },
    });
    job.ended.push(release);
    attachJobBitmap(this.graph, job, device, true, g, dirtyBytes);
    // QEMU's mirror_run compares the sizes once the job runs: the job fails, nothing is copied.
    job.start(async (j) => {
      if (target.driver.size !== device.driver.size) throw new Error('Source and target image have different sizes');
      await work(j);
    }, prepare);
  }

  /**
   * A mirror's device, as qmp_get_root_bs finds it (before anything else is looked at): an
   * overlay's backing node, or a node under a job's filter or blocked by a job (all but a
   * mirror's target, which the job holds through a block backend), is no root.
   */
  mirrorSource(a: Args): FormatNode {
    const device = this.node(str(a, 'device'), 'mirror-source');
    const held = this.delRefusal(device.name);
    if (this.graph.parentsOf(device).some((p) => p.backing === device) || (held !== null && held !== 'in use')) throw new QmpError('Need a root block node');
    return device;
  }

  /** Attach the backing chain a target's header names, as implicit read-only nodes (QEMU's bdrv_open_backing_file). */
  private async openOwnBacking(target: FormatNode): Promise<void> {
    const name = target.driver.backingFile;
    if (!name || target.backing) return;
    const fmt = target.driver.backingFormat;
    const b = await this.graph.addFormat({
      name: this.graph.implicitName(), format: fmt && isFormat(fmt) ? fmt : 'auto',
      file: backingOpenName(target.filename, name), fileIsNode: false, readOnly: true,
    });
    b.implicit = true;
    target.backing = b;
  }

  /**
   * blockdev-backup's target (a filter as the device is refused first, as qmp_blockdev_backup
   * looks both up before it checks them). A protocol node is taken as QEMU does (the job writes
   * the file as raw, through the node's raw view); one a format node other than raw stands on is
   * refused as QEMU's permission check does (qcow2 unshares write on its file child).
   */
  async backupTarget(a: Args): Promise<FormatNode> {
    refuseFilterUse(this.graph, this.jobs.values(), str(a, 'device'), 'backup-source');
    const name = str(a, 'target');
    const n = this.graph.nodes.get(name);
    if (n?.kind === 'file') {
      this.node(str(a, 'device'), 'backup-source');
      return this.graph.fileView(n);
    }
    return this.node(name, 'backup-target');
  }

  /** blockdev-backup / drive-backup: check everything, then start at once. */
  async backup(a: Args, target: FormatNode): Promise<void> {
    (await this.prepareBackup(a, target))();
  }

  /**
   * Checks a backup's arguments (QEMU's order and messages) and returns the function that starts
   * it (a transaction starts it at commit). sync=incremental is sync=bitmap with on-success.
   */
  async prepareBackup(a: Args, target: FormatNode): Promise<() => Job> {
    const device = this.node(str(a, 'device'), 'backup-source');
    let sync = str(a, 'sync');
    const bitmapName = optStr(a, 'bitmap');
    let mode = optStr(a, 'bitmap-mode');
    if (!['full', 'top', 'none', 'incremental', 'bitmap'].includes(sync)) throw new QmpError(`Parameter 'sync' does not accept value '${sync}'`);
    if (mode !== undefined && !['on-success', 'never', 'always'].includes(mode)) throw new QmpError(`Parameter 'bitmap-mode' does not accept value '${mode}'`);
    if ((sync === 'bitmap' || sync === 'incremental') && bitmapName === undefined) throw new QmpError(`must provide a valid bitmap name for '${sync}' sync mode`);
    if (sync === 'incremental') {
      if (mode !== undefined && mode !== 'on-success') throw new QmpError("Bitmap sync mode must be 'on-success' when using sync mode 'incremental'");
      sync = 'bitmap';
      mode = 'on-success';
    }
    let bm: NodeBitmap | undefined;
    if (bitmapName !== undefined) {
      bm = (await this.host.bitmaps.list(device)).find((b) => b.name === bitmapName);
      if (!bm) throw new QmpError(`Bitmap '${bitmapName}' could not be found`);
      if (mode === undefined) throw new QmpError('Bitmap sync mode must be given when providing a bitmap');
      this.host.bitmaps.check(device, bm, ALLOW_RO);
      if (sync === 'none') throw new QmpError("sync mode 'none' does not produce meaningful bitmap outputs");
      if (mode === 'never' && sync !== 'bitmap') throw new QmpError(`Bitmap sync mode 'never' has no meaningful effect when combined with sync mode '${sync}'`);
    } else if (mode !== undefined) {
      throw new QmpError('Cannot specify bitmap sync mode without a bitmap');
    }
    if (target === device) throw new QmpError("Can't back up node into itself");
    // backup_job_create: compression before the op blockers. QEMU names the target's device (its
    // BlockBackend's name), which a daemon's node does not have: the text ends in a space.
    const compress = optBool(a, 'compress', false);
    if (compress && !supportsCompressedWrites(target)) throw new QmpError('Compression is not supported for this drive ');
    // backup_job_create: the op blockers (busy nodes) before the sizes.
    this.checkNodes('backup', device, [device.name, target.name]);
    if (target.driver.size !== device.driver.size) throw new QmpError('Source and target image have different sizes');
    if (bm && mode !== 'never') this.host.bitmaps.check(device, bm, DEFAULT);
    this.checkFree(a, device, target);
    const bitmap = bm, bitmapMode = mode;
    const opts = { granule: copyGranule(target), ...(compress ? { compress } : {}) };
    return () => {
      const job = this.common(a, device, 'backup', [device.name, target.name], [onErrorArg(a, 'on-source-error'), onErrorArg(a, 'on-target-error')], undefined, { drv: 'copy-before-write', child: device, prefixed: true });
      job.filterOn = device.name;
      const depth = (chain: { layers: unknown[] }): number => (sync === 'top' ? 1 : chain.layers.length);
      /** QEMU's block-copy bitmap on the source, and copy-before-write's access and done bitmaps on its filter. */
      const listed = (b: Backup): void => {
        attachJobBitmap(this.graph, job, device, false, b.granule, b.copyBytes);
        if (job.filter) job.filter.bitmaps = () => [anonymousBitmap(false, b.granule, b.accessBytes), anonymousBitmap(false, b.granule, b.cbwBytes())];
      };
      if (!bitmap) {
        const b = backupWork(this.graph, { source: device, target, depth, none: sync === 'none', ...opts });
        listed(b);
        job.start(b.work, async () => {});
        return job;
      }
      // Freeze the bitmap: what it holds now is what the job copies; a successor records writes from here on.
      bitmap.busy = true;
      const frozen = bitmap.data;
      bitmap.frozen = frozen;
      bitmap.data = new DirtyBitmap(frozen.size, frozen.granularityBits, frozen.chunkBytes);
      // QEMU lists the successor as an anonymous bitmap on the source until the job ends, just
      // below the job's copy bitmap (created after it).
      const fresh = bitmap.data;
      const successorSeq = attachJobBitmap(this.graph, job, device, bitmap.enabled, bitmap.granularity, () => dirtyBytes(fresh, bitmap.granularity));
      const b = backupWork(this.graph, { source: device, target, depth, bitmap: sync === 'bitmap' ? frozen : undefined, ...opts });
      listed(b);
      const end = (ok: boolean): void => {
        const successor = bitmap.data;
        // Synced: the bitmap becomes the successor (what was written meanwhile); otherwise it keeps everything.
        if ((ok || bitmapMode === 'always') && bitmapMode !== 'never') this.host.bitmaps.takeSuccessorPlace(device, bitmap, successorSeq);
        else successor.merge(frozen);
        if (!ok && bitmapMode === 'always') {
          for (let i = 0; i < b.pending.length; i++) if (b.pending[i]) successor.set(i * b.granule, b.granule);
        }
        bitmap.frozen = null;
        bitmap.busy = false;
      };
      job.start(b.work, async () => end(true), () => end(false));
      return job;
    };
  }

  /** The checks common() makes, without creating the job. */
  private checkFree(a: Args, device: FormatNode, target: FormatNode): void {
    this.checkNodes('backup', device, [device.name, target.name]);
    const filterName = optStr(a, 'filter-node-name');
    checkFilterName(this.graph, filterName, true);
    // A protocol node as target: raw shares write on its file child (QEMU treats it as a filter
    // there); qcow2 does not.
    const file = this.graph.nodes.get(target.name);
    const user = file?.kind === 'file' ? this.graph.parentsOf(file).find((p) => p.format !== 'raw') : undefined;
    if (user) {
      const filter = filterName ?? this.graph.implicitName();
      // A writable qcow2 holds resize on its file, which the filter's target child unshares;
      // a read-only one unshares the write the filter needs.
      if (!user.driver.readOnly) throw new QmpError(`Could not create node: Permission conflict on node '${target.name}': permissions 'resize' are both required by node '${user.name}' (uses node '${target.name}' as 'file' child) and unshared by node '${filter}' (uses node '${target.name}' as 'target' child).`);
      throw new QmpError(`Could not create node: Permission conflict on node '${target.name}': permissions 'write' are both required by node '${filter}' (uses node '${target.name}' as 'target' child) and unshared by node '${user.name}' (uses node '${target.name}' as 'file' child).`);
    }
    // The filter takes write on its target child: refused where the target is the backing of an
    // overlay that a backup reads from (its copy-before-write filter unshares write down the
    // chain). Without such a backup QEMU 7.2 lets a backup write into a backing node.
    const overlay = this.graph.parentsOf(target).find((p) => p.backing === target);
    if (overlay && this.filterOn(overlay.name)?.type === 'backup') {
      throw new QmpError(`Could not create node: Permission conflict on node '${target.name}': permissions 'write' are both required by node '${filterName ?? this.graph.implicitName()}' (uses node '${target.name}' as 'target' child) and unshared by node '${overlay.name}' (uses node '${target.name}' as 'backing' child).`);
    }
    const id = this.jobId(a);
    if (this.jobs.has(id)) throw new QmpError(`Job ID '${id}' already in use`);
    const speed = optInt(a, 'speed') ?? 0;
    if (speed < 0) {
      // QEMU creates the job before it refuses the speed: created, then null.
      new Job({ id, type: 'backup', nodes: [] }, this.events, () => {}).abandon();
      throw new QmpError("Parameter 'speed' expects a non-negative value");
    }
  }

  /** Without job-id QEMU takes the device's BlockBackend name, which the storage daemon's nodes lack: ''. */
  private jobId(a: Args): string {
    const id = optStr(a, 'job-id') ?? '';
    if (!/^[A-Za-z][A-Za-z0-9_.-]*$/.test(id)) throw new QmpError(`Invalid job ID '${id}'`);
    return id;
  }

  /** blockdev-create: a job that creates an image file (driver file) or formats one (qcow2/raw). */
  create(a: Args): void {
    const id = str(a, 'job-id');
    const o = a.options;
    if (!o || typeof o !== 'object') throw new QmpError("Parameter 'options' is missing");
    const opts = o as Args;
    const driver = str(opts, 'driver');
    const size = optInt(opts, 'size');
    if (size === undefined) throw new QmpError("Parameter 'size' is missing");
    let work: () => Promise<void>;
    if (driver === 'file') {
      const filename = str(opts, 'filename');
      work = async () => {
        const st = await FileStorage.open(filename, { create: true, lock: 'write' });
        try {
          await st.truncate(size);
        } finally {
          await st.close();
        }
      };
    } else if (driver === 'qcow2' || driver === 'raw') {
      const fileNode = this.graph.node(str(opts, 'file'));
      if (fileNode.kind !== 'file') throw new QmpError(`Node '${fileNode.name}' is not a protocol node`);
      const version = optStr(opts, 'version');
      if (version !== undefined && version !== 'v2' && version !== 'v3') throw new QmpError(`Parameter 'version' does not accept value '${version}'`);
      work = async () => {
        // QEMU's creation takes the node as the root of an unnamed block device, wanting write
        // and resize: a format node over it (sharing neither) refuses that.
        const user = [...this.graph.nodes.values()].find((n) => n.kind === 'format' && n.fileNode === fileNode.name);
        if (user) {
          throw new Error(`Permission conflict on node '${fileNode.name}': permissions 'write, resize' are both required by an unnamed block device (uses node '${fileNode.name}' as 'root' child) and unshared by node '${user.name}' (uses node '${fileNode.name}' as 'file' child).`);
        }
        const st = await FileStorage.open(fileNode.filename, { create: true, lock: 'write' });
        try {
          if (driver === 'raw') await st.truncate(size);
          else {
            const img = await createQcow2(st, {
              size, version: version === 'v2' ? 2 : 3, clusterSize: optInt(opts, 'cluster-size'),
              backingFile: optStr(opts, 'backing-file') ?? null, backingFormat: optStr(opts, 'backing-fmt') ?? null,
              lazyRefcounts: optBool(opts, 'lazy-refcounts', false), refcountBits: optInt(opts, 'refcount-bits'),
              extendedL2: optBool(opts, 'extended-l2', false),
            });
            await img.close();
            return;
          }
        } catch (e) {
          await st.close().catch(() => {});
          throw e;
        }
        await st.close();
      };
    } else {
      throw new QmpError(`Driver '${driver}' does not support image creation`);
    }
    if (this.jobs.has(id)) throw new QmpError(`Job ID '${id}' already in use`);
    const job = new Job({ id, type: 'create', nodes: [], autoDismiss: false }, this.events, (j) => this.jobs.delete(j.id));
    this.jobs.set(id, job);
    job.start(async (j) => {
      j.len = 1;
      // QEMU's blockdev_create_run counts the one step done whether the creation worked or not.
      try {
        await work();
      } finally {
        j.offset = 1;
      }
    }, async () => {});
  }

  commands(): Array<[string, Handler]> {
    const out: Array<[string, Handler]> = [
      ['block-stream', (a) => this.stream(a)],
      ['block-commit', (a) => this.commit(a)],
      ['blockdev-create', (a) => this.create(a)],
      // Newest job first, as QEMU keeps its job list.
      ['query-jobs', () => [...this.jobs.values()].reverse().map((j) => j.jobInfo())],
      ['query-block-jobs', () => [...this.jobs.values()].reverse().filter((j) => j.type !== 'create').map((j) => j.blockJobInfo())],
      ...verbCommands(this.jobs),
    ];
    out.push(['blockdev-mirror', (a) => {
      mirrorArgTypes(a);
      this.mirrorSource(a);
      return this.mirror(a, this.node(str(a, 'target'), 'mirror-target'));
    }]);
    // A one-action transaction in QEMU: all jobs are drained first.
    out.push(['blockdev-backup', async (a) => {
      const target = await this.backupTarget(a);
      drainAllJobs([...this.jobs.values()]);
      return this.backup(a, target);
    }]);
    return out;
  }
}
