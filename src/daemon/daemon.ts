/**
 * The storage daemon: the block graph, the NBD server and its exports, and the QMP commands
 * that change them. Front ends (the `qchain daemon` command line, QMP) call into this.
 */
import { cacheRange } from './nbd-cache.js';
import { BlockGraph, QmpError, formatArg, type BlockNode, type FilterNode, type FormatNode, nextGraphSeq } from './graph.js';
import { NbdServer, type NbdAddress } from '../nbd/server.js';
import { CommandError, VERSION, onlyArgs, optBool, optStr, str, uint64, type Args, type Handler } from '../qmp/server.js';
import { namedNodes } from './named-nodes.js';
import { shownNames } from './node-filename.js';
import { FileStorage } from '../storage/file.js';
import { JobManager } from '../jobs/manager.js';
import type { Job } from '../jobs/job.js';
import type { JobGroup } from '../jobs/group.js';
import { Drain } from './drain.js';
import { quiesce } from './shutdown.js';
import { mirrorArgTypes } from '../jobs/mirror-args.js';
import { filterNamed } from '../jobs/filter-use.js';
import { drainAllJobs, drainSection, drains, exportCloseDrains } from './job-drain.js';
import { createQcow2 } from '../qcow2/create.js';
import { blockResize } from './resize.js';
import { BitmapRegistry, bitmapView, ALLOW_RO, type NodeBitmap } from './bitmaps.js';
import { BITMAP_COMMANDS, bitmapAction, type Action } from './bitmap-actions.js';
import { runTransaction } from './transaction.js';
import type { DirtyBitmapView } from '../nbd/export.js';
import { collectCacheOptions, type CacheSizeOptions } from '../qcow2/cache-sizes.js';
import { nbdServerStartArgs, startChecks } from './nbd-server-args.js';
import { backingRef, checkBlockdevNames, checkBlockdevSupport, nodeWriteOptions } from './blockdev-options.js';
import { bindNode, setWriteThreshold } from './node-io.js';

export interface ExportEntry {
  id: string;
  drain?: Drain;
  /** The node the export serves; moves to the overlay on an external snapshot. */
  nodeName: string;
  name: string;
  writable: boolean;
  allocationDepth: boolean;
  description?: string;
  /** Dirty bitmaps exported as qemu:dirty-bitmap:NAME (found on the node or down its chain). */
  bitmaps?: string[];
  /** The bitmaps held busy by the export. */
  held?: NodeBitmap[];
  /** Added on a job's filter node (it serves the filter's child, shown as the filter while it lasts). */
  on?: FilterNode;
  /** The iothread asked for (qchain has none: refused as QEMU refuses an unknown one). */
  iothread?: string;
  /** When it was added (nextGraphSeq): a filter put over its node later is shown as its node. */
  seq?: number;
}

/**
 * A lock refusal as QMP reports it: without the "Is another process using the image" hint
 * (QEMU's error_append_hint text is for the command line only, where qchain keeps it).
 */
function withoutHint(e: unknown): unknown {
  if (!(e instanceof QmpError) || !e.message.includes('\nIs another process using the image')) return e;
  return new QmpError(e.message.slice(0, e.message.indexOf('\n')), e.errorClass);
}

export class Daemon {
  readonly graph: BlockGraph;
  readonly nbd: NbdServer;
  readonly exports = new Map<string, ExportEntry>();
  private nbdRunning = false;
  readonly jobs: JobManager;
  readonly bitmaps: BitmapRegistry;
  /** Emits a QMP event (wired to the monitor by the front end). */
  emit: (name: string, data?: Record<string, unknown>) => void = () => {};

  constructor(readonly log: (line: string) => void) {
    this.graph = new BlockGraph(log);
    this.nbd = new NbdServer(log);
    this.bitmaps = new BitmapRegistry(this.graph);
    // Detect-zeroes and write thresholds follow each format node to every driver handle it gets.
    this.graph.onDriver = (n) => {
      bindNode(this.graph, n, (name, data) => this.emit(name, data));
      this.bitmaps.bindFile(n.fileNode);
    };
    this.jobs = new JobManager(this.graph, { emit: (n, d) => this.emit(n, d) }, {
      drain: (node) => this.drainNode(node),
      drainAll: () => this.drainAll(),
      moveExports: (from, to) => this.moveExports(from, to),
      bitmaps: this.bitmaps,
      jobGone: () => void this.releaseUnused(),
    });
  }

  async startNbd(addr: NbdAddress, maxConnections = 0): Promise<void> {
    if (this.nbdRunning) throw new QmpError('NBD server already running');
    this.nbd.maxConnections = maxConnections;
    await this.nbd.listen(addr);
    this.nbdRunning = true;
  }

  async stopNbd(): Promise<void> {
    if (!this.nbdRunning) throw new QmpError('NBD server not running');
    // QEMU's qmp_nbd_server_stop closes every NBD export first (BLOCK_EXPORT_DELETED each,
    // oldest first), then the server.
    for (const e of [...this.exports.values()]) {
      exportCloseDrains(this.graph, e.nodeName, this.jobList());
      this.deleteExport(e.id);
    }
    await this.nbd.close();
    this.nbdRunning = false;
    await this.releaseUnused();
  }

  async addExport(e: ExportEntry): Promise<void> {
    if (this.exports.has(e.id)) throw new QmpError(`Block export id '${e.id}' is already in use`);
    // blk_exp_add looks the node up by node name only.
    if (!this.graph.nodes.has(e.nodeName)) throw new QmpError(`Cannot find device='' nor node-name='${e.nodeName}'`);
    if (e.iothread !== undefined) throw new QmpError(`iothread "${e.iothread}" not found`);
    // A job's filter reads through to its child (and guest writes reach the child's chain, where
    // the job intercepts them): the export serves the child, and shows the filter while it lasts.
    const filter = filterNamed(this.graph, e.nodeName);
    if (filter) {
      if (e.writable && filter.readOnly) throw new QmpError('Cannot export read-only node as writable');
      e = { ...e, nodeName: filter.child.name, on: filter };
    }
    // A protocol node is served as its file (QEMU exports the node itself): its raw view.
    const own = this.graph.node(e.nodeName);
    if (own.kind === 'file' && !this.nbdRunning) throw new QmpError('NBD server not running');
    const node = own.kind === 'file' ? await this.graph.fileView(own) : this.graph.formatNode(e.nodeName);
    if (own.kind === 'file') this.bitmaps.bindFile(own.name);
    const exportNode = (): FormatNode => this.graph.fileViews.get(entry.nodeName) ?? this.graph.formatNode(entry.nodeName);
    if (e.writable && node.driver.readOnly) throw new QmpError('Cannot export read-only node as writable');
    if (!this.nbdRunning) throw new QmpError('NBD server not running');
    // nbd_export_create: NBD strings are at most 4096 bytes.
    if (Buffer.byteLength(e.name) > 4096) throw new QmpError(`export name '${e.name}' too long`);
    if (e.description !== undefined && Buffer.byteLength(e.description) > 4096) throw new QmpError(`description '${e.description}' too long`);
    if ([...this.exports.values()].some((x) => x.name === e.name)) throw new QmpError(`NBD server already has export named '${e.name}'`);
    const views = new Map<string, DirtyBitmapView>();
    const held: NodeBitmap[] = [];
    for (const name of e.bitmaps ?? []) {
      const found = own.kind === 'file'
        ? await this.bitmaps.list(own).then((l) => { const b = l.find((x) => x.name === name); return b ? { node: own, bitmap: b } : null; })
        : await this.bitmaps.findInChain(node, name);
      if (!found) throw new QmpError(`Bitmap '${name}' is not found`);
      // QEMU 7.2 refuses an enabled bitmap on a read-only export before it looks at the bitmap's state.
      if (!e.writable && !(found.node.kind === 'file' ? node.driver.readOnly : found.node.driver.readOnly) && !this.graph.parentsOf(found.node).some((p) => p.backing === found.node) && found.bitmap.enabled) {
        throw new QmpError(`Enabled bitmap '${name}' incompatible with readonly export`);
      }
      this.bitmaps.check(found.node, found.bitmap, ALLOW_RO);
      views.set(name, bitmapView(found.bitmap));
      held.push(found.bitmap);
    }
    for (const b of held) b.busy = true;
    const drain = new Drain();
    this.exports.set(e.id, { ...e, drain, held, seq: nextGraphSeq() });
    const entry = this.exports.get(e.id) as ExportEntry;
    this.nbd.addExport({
      enter: () => drain.enter(),
      tryEnter: () => drain.tryEnter(),
      name: e.name, description: e.description, writable: e.writable, allocationDepth: e.allocationDepth,
      get discard() { return node.discard; },
      chain: () => this.graph.chain(exportNode()),
      cache: (offset, length) => cacheRange(this.graph, exportNode(), offset, length),
      bitmaps: views,
    });
  }

  /**
   * The node query-block-exports names: QEMU puts a job's filter over a node in place of it for
   * all its parents, exports included, and drops it onto its child when the job ends. So an
   * export shows the filter it was added on while that lasts, else the oldest filter put over
   * its node after it was added, else its node.
   */
  exportShownNode(e: ExportEntry): string {
    if (e.on && this.graph.nodes.get(e.on.name) === e.on) return e.on.name;
    let shown: FilterNode | null = null;
    for (const n of this.graph.nodes.values()) {
      if (n.kind !== 'filter' || n.child.name !== e.nodeName || (n.seq ?? 0) <= (e.seq ?? 0)) continue;
      if (!shown || (n.seq ?? 0) < (shown.seq ?? 0)) shown = n;
    }
    return shown?.name ?? e.nodeName;
  }

  deleteExport(id: string): void {
    const e = this.exports.get(id);
    if (!e) throw new QmpError(`Export '${id}' is not found`);
    this.exports.delete(id);
    this.nbd.removeExport(e.name);
    for (const b of e.held ?? []) b.busy = false;
    this.emit('BLOCK_EXPORT_DELETED', { id });
  }

  /** Hold guest I/O on every export of `node`; resolves with the function that resumes it. */
  async drainNode(node: string): Promise<() => void> {
    const opens: Array<() => void> = [];
    for (const e of this.exports.values()) if (e.nodeName === node && e.drain) opens.push(await e.drain.drain());
    return () => opens.forEach((o) => o());
  }

  /** Hold guest I/O on every export (around reopening a node that chains read through). */
  async drainAll(): Promise<() => void> {
    const opens: Array<() => void> = [];
    for (const e of this.exports.values()) if (e.drain) opens.push(await e.drain.drain());
    return () => opens.forEach((o) => o());
  }

  /** Every export of `from` now serves `to` (pivot). */
  moveExports(from: string, to: string): void {
    for (const e of this.exports.values()) if (e.nodeName === from) e.nodeName = to;
  }

  /**
   * Nodes QEMU frees with their last reference (snapshot-sync overlays): once no export, job or
   * overlay uses one, it is closed and leaves the graph (an overlay nobody uses goes at once).
   */
  async releaseUnused(): Promise<void> {
    // A protocol node's raw view a backup wrote through (its target) goes with the job, unless exported.
    for (const name of [...this.graph.fileViews.keys()]) {
      if (![...this.exports.values()].some((x) => x.nodeName === name) && !this.jobs.jobOn(name)) await this.graph.closeFileView(name);
    }
    for (;;) {
      const n = [...this.graph.nodes.values()].find((x): x is FormatNode => x.kind === 'format' && !!x.unowned &&
        this.userOf(x) === null && !this.jobs.filterOn(x.name) && this.graph.parentsOf(x).length === 0);
      if (!n) return;
      await this.graph.drop(n, (b) => this.userOf(b) !== null || !!this.jobs.filterOn(b.name));
    }
  }

  /** Who uses a node, for blockdev-del's refusal (see BlockGraph.remove and JobManager.delRefusal). */
  private userOf(n: BlockNode): string | null {
    // An export's block backend on the node: QEMU's bdrv_has_blk ("Node X is in use").
    for (const e of this.exports.values()) if (e.nodeName === n.name) return 'in use';
    return this.jobs.delRefusal(n.name);
  }

  /**
   * external_snapshot_prepare's start: the old node is drained (the jobs on it or above pause
   * and resume) and must not be blocked by a job (a backup's source is not: its filter is).
   */
  private snapshotPrepare(node: FormatNode): void {
    drainSection(this.jobList().filter((j) => drains(this.graph, node.name, j)));
    const job = this.jobList().find((j) => j.nodes.includes(node.name) && j.status !== 'concluded' && j.status !== 'null' &&
      !(j.type === 'backup' && j.nodes[0] === node.name));
    if (job) throw new QmpError(`Node '${node.name}' is busy: block device is in use by block job: ${job.type}`);
  }

  private checkNoOverlay(node: FormatNode): void {
    const p = this.graph.parentsOf(node).find((x) => x.backing === node);
    if (p) throw new QmpError(`Node '${node.name}' is busy: node is used as backing hd of '${p.name}'`);
  }

  /** Put `overlay` on top of `node`: it takes node as backing, and every export of node moves up. */
  private attachOverlay(node: FormatNode, overlay: FormatNode): void {
    overlay.backing = node;
    for (const e of this.exports.values()) if (e.nodeName === node.name) e.nodeName = overlay.name;
    this.jobs.moveFilters(node.name, overlay.name);
    this.graph.changed();
  }

  async snapshotSync(a: Args): Promise<{ node: FormatNode; overlay: FormatNode }> {
    // QEMU's external_snapshot_prepare, in its order. `device` names a block backend, and QSD
    // has none: only `node-name` finds a node (bdrv_lookup_bs).
    const file = str(a, 'snapshot-file');
    const mode = optStr(a, 'mode') ?? 'absolute-paths';
    if (mode !== 'absolute-paths' && mode !== 'existing') throw new QmpError(`Parameter 'mode' does not accept value '${mode}'`);
    const device = optStr(a, 'device'), nodeName = optStr(a, 'node-name');
    if (nodeName === undefined || !this.graph.nodes.has(nodeName)) throw new QmpError(`Cannot find device='${device ?? ''}' nor node-name='${nodeName ?? ''}'`);
    const node = this.jobs.node(nodeName, 'snapshot');
    this.snapshotPrepare(node);
    this.checkNoOverlay(node);
    const overlayName = optStr(a, 'snapshot-node-name');
    const format = optStr(a, 'format') ?? 'qcow2';
    if (overlayName === undefined) throw new QmpError('New overlay node-name missing');
    if (this.graph.nodes.has(overlayName)) throw new QmpError('New overlay node-name already in use');
    if (format !== 'qcow2' && format !== 'raw') throw new QmpError(mode === 'existing' ? `Unknown driver '${format}'` : `Unknown file format '${format}'`);
    if (mode === 'absolute-paths') {
      if (format !== 'qcow2') throw new QmpError("Backing file not supported for file format 'raw'");
      const st = await FileStorage.open(file, { create: true, lock: 'write' }).catch((e: Error) => { throw new QmpError(`Could not create '${file}': ${e.message}`); });
      try {
        // The node's name as QEMU shows it (bs->filename): a json:{...} pseudo-filename when its
        // attached backing is not its header's, so that the new overlay's header reopens the chain
        // the guest saw (the node over its attached backing), not the node's header chain.
        const img = await createQcow2(st, { size: node.driver.size, version: 3, backingFile: shownNames(this.graph)(node), backingFormat: node.format });
        await img.close();
      } catch (e) {
        await st.close().catch(() => {});
        throw new QmpError(e instanceof Error ? e.message : String(e));
      }
    }
    const overlay = await this.graph.addFormat({ name: overlayName, format: formatArg(format), file, fileIsNode: false, backing: null });
    overlay.unowned = true;
    this.attachOverlay(node, overlay);
    return { node, overlay };
  }

  /**
   * An external snapshot's commit stage: the node under the new overlay is reopened read-only
   * (QEMU's external_snapshot_commit; a failed reopen is ignored, the snapshot stands).
   */
  async sealOld(node: FormatNode): Promise<void> {
    await this.graph.reopen(node, true).catch(() => {});
  }

  /** The jobs, oldest first. */
  jobList(): Job[] {
    return [...this.jobs.jobs.values()];
  }

  /** Run `body` as a one-action transaction: jobs drained once, guest I/O held on every export. */
  private async drained(body: () => Promise<void>): Promise<void> {
    drainAllJobs(this.jobList());
    const undrain = await this.drainAll();
    try {
      await body();
    } finally {
      undrain();
    }
  }

  /** Undo an external snapshot (transaction abort): exports move back down, a created overlay node goes. */
  async detachOverlay(node: FormatNode, overlay: FormatNode, remove: boolean): Promise<void> {
    overlay.backing = null;
    this.moveExports(overlay.name, node.name);
    this.jobs.moveFilters(overlay.name, node.name);
    this.graph.changed();
    if (remove) await this.graph.remove(overlay.name, () => null);
  }

  snapshot(a: Args): { node: FormatNode; overlay: FormatNode } {
    const node = this.jobs.node(str(a, 'node'), 'snapshot');
    this.snapshotPrepare(node);
    this.checkNoOverlay(node);
    // QEMU's external_snapshot_prepare, once the node passed: the overlay is looked up, must
    // have no user but a backing link (no export, not a format node's file), no backing of its
    // own, support backing files (qcow2) and be writable (bdrv_append's permissions).
    const name = str(a, 'overlay');
    const ov = this.graph.nodes.get(name);
    if (!ov) throw new QmpError(`Cannot find device='${name}' nor node-name='${name}'`);
    // In use as QSD finds it: exported, or under an exported node's backing chain, or a format node's file.
    const exported = [...this.exports.values()].some((e) => {
      if (e.on?.name === name) return true;
      for (let n = this.graph.nodes.get(e.nodeName); n?.kind === 'format'; n = n.backing ?? undefined) if (n.name === name) return true;
      return false;
    });
    const isFile = [...this.graph.nodes.values()].some((n) => n.kind === 'format' && n.fileNode === name);
    if (exported || isFile) throw new QmpError('The overlay is already in use');
    if (ov.kind === 'filter') this.jobs.node(name, 'snapshot');
    if (ov.kind !== 'format') throw new QmpError('The overlay does not support backing images');
    if (ov.backing) throw new QmpError('The overlay already has a backing image');
    if (ov.format === 'raw') throw new QmpError('The overlay does not support backing images');
    if (ov.driver.readOnly) throw new QmpError('Block node is read-only');
    // bdrv_append: the node may not become a backing child of a node of its own chain.
    for (let n: FormatNode | null = node; n; n = n.backing) {
      if (n === ov) throw new QmpError(`Making '${node.name}' a backing child of '${ov.name}' would create a cycle`);
    }
    this.attachOverlay(node, ov);
    return { node, overlay: ov };
  }

  async blockdevAdd(a: Args): Promise<void> {
    try {
      await this.blockdevAddNode(a);
    } catch (e) {
      throw withoutHint(e);
    }
  }

  private async blockdevAddNode(a: Args): Promise<void> {
    const driver = str(a, 'driver');
    checkBlockdevNames(a);
    checkBlockdevSupport(a);
    const name = optStr(a, 'node-name');
    const discard = (optStr(a, 'discard') ?? 'ignore') === 'unmap';
    const readOnly = optBool(a, 'read-only', false);
    const { detectZeroes, noFlush } = nodeWriteOptions(a);
    if (driver === 'file') {
      this.graph.addFile(name, str(a, 'filename'), { discard, readOnly, detectZeroes, noFlush, noLock: lockingOff(a) });
      return;
    }
    const fmt = formatArg(driver);
    const f = a.file;
    let file: string, fileIsNode: boolean;
    if (typeof f === 'string') { file = f; fileIsNode = true; }
    else if (f && typeof f === 'object' && (f as Args).driver === 'file') { file = str(f as Args, 'filename'); fileIsNode = false; }
    else throw new QmpError("Parameter 'file' is missing");
    const cache = cacheOptions(a);
    // A QMP command's warnings go to stderr without the program's name (QEMU's error_report with a monitor current).
    const backing = backingRef(a.backing, this.log);
    const inline = fileIsNode ? undefined : nodeWriteOptions(f as Args);
    await this.graph.addFormat({ name, format: fmt, file, fileIsNode, backing, readOnly, discard, cache,
      detectZeroes, noFlush, fileNoFlush: inline?.noFlushGiven, fileDetectZeroes: inline?.detectZeroes, noLock: fileIsNode ? false : lockingOff(f as Args) });
  }

  /** drive-mirror / drive-backup: create (or open, mode=existing) the target image, add it as a node, start the job on it. */
  async driveJob(a: Args, start: (a: Args, target: FormatNode) => void | Promise<void>): Promise<void> {
    const device = this.graph.formatNode(str(a, 'device'));
    const file = str(a, 'target');
    const sync = str(a, 'sync');
    const format = optStr(a, 'format') ?? device.format;
    const mode = optStr(a, 'mode') ?? 'absolute-paths';
    if (format !== 'qcow2' && format !== 'raw') throw new QmpError(`Unknown driver '${format}'`);
    // QEMU gives the new target a backing file for sync=top/none only (bitmap and incremental targets stand alone):
    // sync=top the source's backing, sync=none the source itself.
    const backingNode = sync === 'none' ? device : sync === 'top' ? device.backing : null;
    const withBacking = backingNode !== null;
    if (mode === 'absolute-paths') {
      const st = await FileStorage.open(file, { create: true, lock: 'write' }).catch((e: Error) => { throw new QmpError(`Could not create '${file}': ${e.message}`); });
      try {
        if (format === 'raw') {
          if (withBacking) throw new QmpError("Format 'raw' does not support backing files");
          await st.truncate(device.driver.size);
          await st.close();
        } else {
          const b = backingNode;
          // As for snapshots: the backing node's name as QEMU shows it (json:{...} when its own backing is overridden).
          const img = await createQcow2(st, { size: device.driver.size, version: 3, backingFile: b ? shownNames(this.graph)(b) : null, backingFormat: b ? b.format : null });
          await img.close();
        }
      } catch (e) {
        await st.close().catch(() => {});
        throw e instanceof QmpError ? e : new QmpError(e instanceof Error ? e.message : String(e));
      }
    } else if (mode !== 'existing') {
      throw new QmpError(`Parameter 'mode' does not accept value '${mode}'`);
    }
    const name = optStr(a, 'node-name') ?? this.graph.implicitName();
    const target = await this.graph.addFormat({ name, format: formatArg(format), file, fileIsNode: false, backing: null }).catch((e: unknown) => {
      throw withoutHint(e);
    });
    try {
      await start(a, target);
    } catch (e) {
      await this.graph.remove(target.name, () => null).catch(() => {});
      throw e;
    }
  }

  /** drive-backup: create (or open) the target and check the job; commit starts it, abort drops the target. */
  async driveBackup(a: Args, group?: JobGroup): Promise<Action> {
    let startJob: (() => Job) | null = null;
    let target: FormatNode | null = null;
    await this.driveJob(a, async (x, t) => {
      // qmp_drive_backup opens its target with discard=unmap and detect-zeroes=unmap.
      t.discard = true;
      t.detectZeroes = 'unmap';
      bindNode(this.graph, t, (name, data) => this.emit(name, data));
      target = t;
      startJob = await this.jobs.prepareBackup(x, t);
    });
    return {
      commit: () => {
        const job = startJob?.();
        if (job && group) group.add(job);
        // The target is the job's alone: it is closed when the job goes, as QEMU drops its last reference.
        const t = target;
        if (job && t) job.released.push(() => void this.graph.remove(t.name, () => null).catch(() => {}));
      },
      abort: async () => { if (target) await this.graph.remove(target.name, () => null).catch(() => {}); },
    };
  }

  /** The QMP command table. */
  commands(): Map<string, Handler> {
    const c = new Map<string, Handler>();
    c.set('query-version', () => VERSION);
    // QSD has no named block backends (no guest devices): query-block always lists none.
    c.set('query-block', (a) => (onlyArgs(a, []), []));
    // Newest first, as QEMU keeps its export list.
    c.set('query-block-exports', () => [...this.exports.values()].reverse().map((e) => ({ 'node-name': this.exportShownNode(e), 'shutting-down': false, type: 'nbd', id: e.id })));
    c.set('query-named-block-nodes', (a) => namedNodes(this.graph, this.bitmaps, optBool(onlyArgs(a, ['flat']), 'flat', false)));
    c.set('blockdev-add', (a) => this.blockdevAdd(a));
    c.set('block-set-write-threshold', (a) => {
      const name = str(a, 'node-name'), threshold = uint64(a, 'write-threshold');
      onlyArgs(a, ['node-name', 'write-threshold']);
      setWriteThreshold(this.graph, name, threshold, (n, d) => this.emit(n, d));
    });
    c.set('blockdev-del', (a) => this.graph.remove(str(a, 'node-name'), (n) => this.userOf(n)));
    c.set('nbd-server-start', (a) => {
      const args = nbdServerStartArgs(a);
      if (this.nbdRunning) throw new QmpError('NBD server already running');
      return this.startNbd(startChecks(args), args.maxConnections);
    });
    c.set('nbd-server-stop', () => this.stopNbd());
    c.set('block-export-add', (a) => {
      if (str(a, 'type') !== 'nbd') throw new CommandError(`Parameter 'type' does not accept value '${String(a.type)}'`);
      const bitmaps = a.bitmaps;
      if (bitmaps !== undefined && (!Array.isArray(bitmaps) || bitmaps.some((b) => typeof b !== 'string'))) {
        throw new CommandError("Invalid parameter type for 'bitmaps', expected: array of strings");
      }
      const nodeName = str(a, 'node-name');
      return this.addExport({
        bitmaps: bitmaps as string[] | undefined,
        id: str(a, 'id'), nodeName, name: optStr(a, 'name') ?? nodeName, writable: optBool(a, 'writable', false),
        allocationDepth: optBool(a, 'allocation-depth', false), description: optStr(a, 'description'), iothread: optStr(a, 'iothread'),
      });
    });
    c.set('block-export-del', async (a) => {
      const e = this.exports.get(str(a, 'id'));
      if (e) exportCloseDrains(this.graph, e.nodeName, this.jobList());
      this.deleteExport(str(a, 'id'));
      await this.releaseUnused();
    });
    // QEMU runs both as a transaction of one action (all jobs drained first), prepared and
    // committed with guest I/O drained.
    c.set('blockdev-snapshot-sync', async (a) => {
      await this.drained(async () => this.sealOld((await this.snapshotSync(a)).node));
      await this.releaseUnused();
    });
    c.set('blockdev-snapshot', (a) => this.drained(async () => this.sealOld(this.snapshot(a).node)));
    c.set('block_resize', (a) => blockResize({
      graph: this.graph, busy: (n) => this.jobs.jobOn(n) !== undefined, exported: (n) => [...this.exports.values()].some((e) => e.nodeName === n),
    }, a));
    c.set('drive-mirror', (a) => {
      // QEMU 7.2's drive-mirror has no filter-node-name (its filter is always implicit).
      if (a['filter-node-name'] !== undefined) throw new CommandError("Parameter 'filter-node-name' is unexpected");
      mirrorArgTypes(a);
      this.jobs.mirrorSource(a);
      return this.driveJob(a, (x, t) => {
        // The target is the job's: QEMU frees it with its last reference once the job is gone
        // (after a cancel, or a pivot no export followed), as a snapshot-sync overlay.
        t.unowned = true;
        this.jobs.mirror(x, t, optStr(x, 'mode') === 'existing' ? 'open' : 'source');
      });
    });
    // A one-action transaction too: all jobs drained first.
    c.set('drive-backup', async (a) => { drainAllJobs(this.jobList()); await (await this.driveBackup(a)).commit(); });
    for (const name of BITMAP_COMMANDS) c.set(name, async (a) => (await bitmapAction(this.bitmaps, name, a)).commit());
    c.set('transaction', (a) => runTransaction(this, a));
    for (const [name, h] of this.jobs.commands()) c.set(name, h);
    // QSD's exit path runs before quit's reply: exports closed, jobs cancelled, their events sent.
    c.set('quit', () => this.quiesce());
    return c;
  }

  /**
   * Close the exports and cancel every job, waiting for each (QSD's exit path, see shutdown.ts).
   * A backup's frozen persistent bitmap thus gets back what was not copied before it is stored.
   */
  quiesce(): Promise<void> {
    // Once: quit and a signal arriving meanwhile share the one exit path.
    return (this.quiescing ??= quiesce({
      graph: this.graph,
      exports: () => [...this.exports.values()].map((e) => ({ id: e.id, nodeName: e.nodeName })),
      deleteExport: (id) => this.deleteExport(id),
      jobs: () => this.jobList(),
    }));
  }

  private quiescing: Promise<void> | null = null;

  async shutdown(): Promise<void> {
    await this.quiesce();
    if (this.nbdRunning) await this.stopNbd();
    await this.graph.closeAll();
  }
}

/** A file node's `locking` option (OnOffAuto; auto locks, as QEMU's file-posix when OFD locks exist): whether it is off. */
export function lockingOff(a: Args, prefix = ''): boolean {
  const l = a.locking;
  if (l === undefined) return false;
  if (l !== 'on' && l !== 'off' && l !== 'auto') throw new QmpError(`Parameter '${prefix}locking' does not accept value '${String(l)}'`);
  return l === 'off';
}

/** blockdev-add's qcow2 cache options (integers in bytes). */
function cacheOptions(a: Args): CacheSizeOptions | undefined {
  return collectCacheOptions((name) => {
    const v = a[name];
    // Negative integers are the open's to refuse (QEMU: "expects a non-negative number").
    if (v !== undefined && (typeof v !== 'number' || !Number.isInteger(v))) throw new QmpError(`Invalid parameter type for '${name}', expected: integer`);
    return v;
  });
}
