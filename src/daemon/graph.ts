/**
 * The daemon's block graph: protocol (file) nodes and format nodes by node name, each format
 * node with its backing node. The chain seen through a node is the node and its backing nodes,
 * top first. Exports and jobs refer to nodes by name and look their chain up on every use, so
 * replacing the active node (external snapshot, pivot) moves every user at once.
 */
import type { BlockDriver } from '../image/driver.js';
import { Chain, moveWriteHooks, type Layer } from '../chain/chain.js';
import { openChain, openImage, isFormat, type ImageFormat } from '../chain/open.js';
import { checkCacheOptions, type CacheSizeOptions } from '../qcow2/cache-sizes.js';

/**
 * L2 cache per qcow2 node unless its blockdev options say otherwise: half QEMU's 32 MiB. It
 * still covers every table of images up to 128 GiB (64 KiB clusters); a daemon holds many
 * nodes, and a Node.js process starts ~45 MiB above qemu-storage-daemon, so the memory a 1 TiB
 * export reaches stays bounded (see docs/PERFORMANCE.md). `l2-cache-size` raises it per node.
 */
export const DAEMON_L2_CACHE_BYTES = 16 * 1024 * 1024;
import { ImageError } from '../image/errors.js';
import fs from 'node:fs';
import { FileStorage } from '../storage/file.js';
import { errnoText } from '../storage/storage.js';
import { Drain } from './drain.js';
import { shownNames } from './node-filename.js';

export class QmpError extends Error {
  constructor(message: string, readonly errorClass = 'GenericError') {
    super(message);
  }
}

/** QEMU's detect-zeroes: whether (and how) writes of all-zero buffers become zero writes. */
export type DetectZeroes = 'off' | 'on' | 'unmap';

/** Options every node has (QEMU's BlockdevOptions base) that change how writes through it are done. */
export interface NodeWriteOptions {
  detectZeroes: DetectZeroes;
  /** cache.no-flush: flushes do not reach the disk (QEMU's BDRV_O_NO_FLUSH). */
  noFlush: boolean;
  /**
   * block-set-write-threshold's value as given (0: none); the first write through the node
   * ending past it fires BLOCK_WRITE_THRESHOLD and sets it back to 0 (see node-io.ts).
   */
  writeThreshold: number;
}

export interface FileNode extends NodeWriteOptions {
  kind: 'file';
  name: string;
  filename: string;
  discard: boolean;
  /** Opened read-only (its own read-only option). */
  readOnly: boolean;
  /** Created with its format node, which was given a file name ("#blockNNN"); goes with it. */
  implicit?: boolean;
  /** locking=off: the image over it takes no byte-range locks. */
  noLock?: boolean;
}

export interface FormatNode extends NodeWriteOptions {
  kind: 'format';
  name: string;
  format: ImageFormat;
  driver: BlockDriver;
  /** File name as opened (the overlay-relative join for implicit backing nodes). */
  filename: string;
  /** The protocol node it sits on, if one was named. */
  fileNode: string | null;
  backing: FormatNode | null;
  /**
   * The backing file name the node would open by itself (QEMU's auto_backing_file): its backing
   * node's file name when that was opened from the header with it, else the header's backing
   * string as opened or as last rewritten ('' for none). Query replies compare it with the node
   * attached below (see node-filename.ts).
   */
  autoBacking: string;
  /** Opened implicitly as part of a chain ("#blockNNN" names). */
  implicit: boolean;
  /** Opened by blockdev-snapshot-sync, not blockdev-add: QEMU frees it with its last user. */
  unowned?: boolean;
  /** Its file has locking=off: no byte-range locks, reopens included. */
  noLock?: boolean;
  discard: boolean;
  /** The node's own qcow2 cache options (kept for reopens). */
  cache?: CacheSizeOptions;
}

/**
 * The filter node a block job inserts above a node for its lifetime (QEMU's mirror_top,
 * commit_top, copy-on-read for block-stream, copy-before-write for backup). It is a listing and
 * graph object only: its I/O is the job's own write interception on the filtered node, so its
 * write options are listed only (block-set-write-threshold may arm it; no write passes through it).
 */
export interface FilterNode extends NodeWriteOptions {
  kind: 'filter';
  name: string;
  drv: FilterDriver;
  /** The node it filters (its only child); a backup's moves up with an external snapshot. */
  child: FormatNode;
  /** Named by QEMU ("#blockNNN"), the job's filter-node-name not given. */
  implicit: boolean;
  readOnly: boolean;
  /** Anonymous dirty bitmaps the filter's driver keeps (copy-before-write), newest first. */
  bitmaps?: () => Array<Record<string, unknown>>;
  /** When it entered the graph (nextGraphSeq): exports older than it show it as their node. */
  seq?: number;
}

let graphSeq = 0;
/** Order of filters entering the graph and exports being added (see FilterNode.seq). */
export function nextGraphSeq(): number {
  return ++graphSeq;
}

export type FilterDriver = 'mirror_top' | 'commit_top' | 'copy-on-read' | 'copy-before-write';

export type BlockNode = FileNode | FormatNode | FilterNode;

/** QEMU's bdrv_assign_node_name for a name the user gave: well-formed (id_wellformed), then unique. */
export function checkUserNodeName(nodes: ReadonlyMap<string, BlockNode>, name: string): void {
  if (!/^[A-Za-z][A-Za-z0-9_.+-]{0,127}$/.test(name)) throw new QmpError(`Invalid node-name: '${name}'`);
  if (nodes.has(name)) throw new QmpError(`Duplicate nodes with node-name='${name}'`);
}

export class BlockGraph {
  readonly nodes = new Map<string, BlockNode>();
  private implicitSeq = 100;
  private chains = new Map<FormatNode, Chain>();

  constructor(private readonly log: (line: string) => void = () => {}) {}

  /** Called whenever a format node gets a driver handle (added, reopened): the daemon binds the node's write options to it. */
  onDriver: (node: FormatNode) => void = () => {};

  /** A fresh "#blockNNN" name for a node the user did not name. */
  implicitName(): string {
    return `#block${this.implicitSeq++}`;
  }

  node(name: string): BlockNode {
    const n = this.nodes.get(name);
    if (!n) throw new QmpError(`Cannot find device='${name}' nor node-name='${name}'`);
    return n;
  }

  formatNode(name: string): FormatNode {
    const n = this.node(name);
    if (n.kind !== 'format') throw new QmpError(`Node '${name}' is not a format node`);
    return n;
  }

  private checkNewName(name: string | undefined): string {
    if (!name) throw new QmpError("'node-name' must be specified for the root node");
    if (!name.startsWith('#block') && !/^[A-Za-z][A-Za-z0-9_.+-]{0,127}$/.test(name)) throw new QmpError('Invalid node-name: \'' + name + '\'');
    if (this.nodes.has(name)) throw new QmpError(`Duplicate nodes with node-name='${name}'`);
    return name;
  }

  /** A protocol node: the file must exist (QEMU opens it at once). */
  addFile(name: string | undefined, filename: string, opts: { discard?: boolean; readOnly?: boolean; detectZeroes?: DetectZeroes; noFlush?: boolean; noLock?: boolean } = {}): FileNode {
    const checked = this.checkNewName(name);
    try {
      fs.accessSync(filename);
    } catch (e) {
      throw new QmpError(`Could not open '${filename}': ${errnoText((e as NodeJS.ErrnoException).code)}`);
    }
    const n: FileNode = { kind: 'file', name: checked, filename, discard: !!opts.discard, readOnly: !!opts.readOnly,
      detectZeroes: opts.detectZeroes ?? 'off', noFlush: !!opts.noFlush, writeThreshold: 0, ...(opts.noLock ? { noLock: true } : {}) };
    this.nodes.set(n.name, n);
    return n;
  }

  /**
   * Add a format node over `file` (a file node name or a file name). `backing`: undefined opens
   * the chain named in the header (implicit nodes), null opens no backing, a name attaches that node.
   */
  async addFormat(opts: { name: string | undefined; format: ImageFormat | 'auto'; file: string; fileIsNode: boolean;
    backing?: string | null; readOnly?: boolean; discard?: boolean; cache?: CacheSizeOptions;
    detectZeroes?: DetectZeroes; noFlush?: boolean;
    /** An inline file's own cache.no-flush (else it inherits the format node's, as QEMU's child options). */
    fileNoFlush?: boolean;
    /** An inline file's own detect-zeroes (shown in listings; not inherited). */
    fileDetectZeroes?: DetectZeroes;
    /** An inline file's locking=off. */
    noLock?: boolean; }): Promise<FormatNode> {
    const name = this.checkNewName(opts.name);
    try {
      if (opts.cache) checkCacheOptions(opts.cache);
    } catch (e) {
      throw new QmpError(e instanceof Error ? e.message : String(e));
    }
    let filename = opts.file, fileNode: string | null = null, discard = !!opts.discard, noLock = !!opts.noLock;
    const noFlush = !!opts.noFlush;
    // What the file's flushes do: the protocol node's own option (an implicit one inherits).
    let storageNoFlush = opts.fileNoFlush ?? noFlush;
    if (opts.fileIsNode) {
      const f = this.node(opts.file);
      if (f.kind !== 'file') throw new QmpError(`Node '${opts.file}' is not a protocol node`);
      filename = f.filename;
      fileNode = f.name;
      discard ||= f.discard;
      if (f.noLock) noLock = true;
      storageNoFlush = f.noFlush;
    }
    const own = (d: number): NodeWriteOptions => ({ detectZeroes: d === 0 ? opts.detectZeroes ?? 'off' : 'off', noFlush, writeThreshold: 0 });
    const format = opts.format === 'auto' ? undefined : opts.format;
    try {
      // Nodes enter the graph as QEMU creates them: each protocol node just before its format
      // node, a backing node after its overlay (listings show the newest first).
      const added: BlockNode[] = [];
      const withFile = (n: FormatNode, explicitFile: string | null, fileNoFlush: boolean, fileDetectZeroes: DetectZeroes = 'off'): FormatNode => {
        if (explicitFile) n.fileNode = explicitFile;
        else {
          const f: FileNode = { kind: 'file', name: this.implicitName(), filename: n.filename, discard: false, readOnly: n.driver.readOnly, implicit: true,
            detectZeroes: fileDetectZeroes, noFlush: fileNoFlush, writeThreshold: 0 };
          n.fileNode = f.name;
          added.push(f);
        }
        added.push(n);
        return n;
      };
      let top: FormatNode;
      /** Header-opened chain layers, whose autoBacking is their backing node's shown name (set once the nodes are in). */
      let chainLayers: Array<{ n: FormatNode; l: Layer }> = [];
      if (opts.backing === undefined) {
        // locking=off reaches the backing files opened from the header too (QEMU would lock those:
        // read locks only, so nothing a writer elsewhere is refused for is lost).
        // A read-only raw node unshares nothing on its file (QEMU's raw passes its parents'
        // permissions through, and shares all): a writer elsewhere, drive-backup's own target
        // node included, may open the file; a qcow2 node unshares write.
        const chain = await openChain(filename, { format, readOnly: opts.readOnly, log: this.log, cache: opts.cache, defaultL2CacheBytes: DAEMON_L2_CACHE_BYTES, noFlush: storageNoFlush, noLock,
          forceShare: format === 'raw' && !!opts.readOnly });
        // The top becomes the named node, the rest implicit read-only nodes.
        const layers = chain.layers.map((l, d): FormatNode => ({
          kind: 'format', name: d === 0 ? name : '', format: l.driver.format, driver: l.driver,
          filename: l.filename, fileNode: null, backing: null, autoBacking: chain.layers[d + 1]?.filename ?? l.driver.backingFile ?? '', implicit: d > 0, discard: d === 0 && discard, cache: d === 0 ? opts.cache : undefined,
          ...own(d),
        }));
        chainLayers = layers.map((n, d) => ({ n, l: chain.layers[d] }));
        layers.forEach((n, d) => {
          n.backing = layers[d + 1] ?? null;
          if (d > 0) n.name = this.implicitName();
          // Backing nodes and their files inherit the cache options (QEMU's bdrv_backing_options).
          withFile(n, d === 0 ? fileNode : null, d === 0 ? storageNoFlush : noFlush, d === 0 ? opts.fileDetectZeroes : 'off');
        });
        top = layers[0];
      } else {
        const img = await openImage(filename, { format, readOnly: opts.readOnly, log: this.log, cache: opts.cache, defaultL2CacheBytes: DAEMON_L2_CACHE_BYTES, noFlush: storageNoFlush, ...(noLock ? { lock: 'none' as const } : {}) });
        // QEMU opens the image first, then its backing child (bdrv_open_backing_file's prefix on failure).
        let below: FormatNode | null = null;
        if (typeof opts.backing === 'string') {
          try {
            below = this.formatNode(opts.backing);
          } catch (e) {
            await img.driver.close().catch(() => {});
            throw new QmpError(`Could not open backing file: ${(e as Error).message}`);
          }
        }
        top = withFile({ kind: 'format', name, format: img.driver.format, driver: img.driver, filename, fileNode: null, backing: below, autoBacking: img.driver.backingFile ?? '', implicit: false, discard, cache: opts.cache, ...own(0) }, fileNode, storageNoFlush, opts.fileDetectZeroes);
      }
      for (const n of added) {
        if (noLock && n.kind !== 'filter') n.noLock = true;
        this.nodes.set(n.name, n);
      }
      // QEMU's auto_backing_file: a backing opened from the header gives its overlay its own
      // (refreshed) name; one a json: description gave in its place leaves the header's string,
      // so that the overlay shows as overridden. Bottom up, as the names below come first.
      for (let d = chainLayers.length - 1; d >= 0; d--) {
        const { n, l } = chainLayers[d];
        n.autoBacking = l.backingOverridden ? (l.driver.backingFile ?? '') : n.backing ? shownNames(this)(n.backing) : (l.driver.backingFile ?? '');
      }
      this.changed();
      for (const n of added) if (n.kind === 'format') this.onDriver(n);
      return top;
    } catch (e) {
      if (e instanceof ImageError) {
        // A lock refused is the file driver's own error in QEMU, with no "Could not open" prefix.
        const prefix = `Could not open '${filename}': `;
        throw new QmpError(e.errno === 'ELOCKED' && e.message.startsWith(prefix) ? e.message.slice(prefix.length) : e.message);
      }
      throw e;
    }
  }

  /**
   * Raw views of protocol nodes exported themselves (an export of a file node serves the file as
   * QEMU serves the node): opened with the first such export, not listed, closed with the last.
   */
  readonly fileViews = new Map<string, FormatNode>();

  /** The raw view of protocol node `f` (opened on first use). */
  async fileView(f: FileNode): Promise<FormatNode> {
    const v = this.fileViews.get(f.name);
    if (v) return v;
    let img;
    try {
      // No locks of its own: the file node holds none in qchain, and a format node over the same
      // file may hold them (QEMU shares the one node).
      img = await openImage(f.filename, { format: 'raw', readOnly: f.readOnly, log: this.log, noFlush: f.noFlush, lock: 'none' });
    } catch (e) {
      if (e instanceof ImageError) throw new QmpError(e.message);
      throw e;
    }
    const again = this.fileViews.get(f.name);
    if (again) {
      await img.driver.close();
      return again;
    }
    const n: FormatNode = { kind: 'format', name: f.name, format: 'raw', driver: img.driver, filename: f.filename, fileNode: f.name, backing: null,
      autoBacking: '', implicit: true, discard: f.discard, detectZeroes: f.detectZeroes, noFlush: f.noFlush, writeThreshold: 0 };
    this.fileViews.set(f.name, n);
    return n;
  }

  /** Close protocol node `name`'s export view (its last export is gone). */
  async closeFileView(name: string): Promise<void> {
    const v = this.fileViews.get(name);
    if (!v) return;
    this.fileViews.delete(name);
    this.chains.delete(v);
    await v.driver.flush().catch(() => {});
    await v.driver.close().catch(() => {});
  }

  /** The chain seen through a format node (cached until the graph changes). */
  chain(node: FormatNode): Chain {
    let c = this.chains.get(node);
    if (!c) {
      const layers: Layer[] = [];
      for (let n: FormatNode | null = node; n; n = n.backing) layers.push({ driver: n.driver, filename: n.filename });
      c = new Chain(layers);
      this.chains.set(node, c);
    }
    return c;
  }

  /**
   * Make `base` the backing node of `node`, whose header now names `backingName`; implicit nodes
   * nobody uses any more are closed.
   */
  relink(node: FormatNode, base: FormatNode | null, backingName: string | null): void {
    node.autoBacking = backingName ?? '';
    const dropped: FormatNode[] = [];
    for (let b = node.backing; b && b !== base; b = b.backing) dropped.push(b);
    node.backing = base;
    for (const d of dropped) {
      if (d.implicit && this.parentsOf(d).length === 0) {
        this.forget(d);
        void this.closeWhenIdle(d.driver);
      }
    }
    this.changed();
  }

  /**
   * Jobs' own copies through chains (backup, mirror) run in sections of this drain, taken before
   * any write gate. A reopen closes a node's handle only once the copies in flight have left, and
   * holds new ones until the new handle is in place (jobs look chains up per copy, so they read
   * through the new handle). Guest I/O is not part of it: callers drain the exports first.
   */
  readonly io = new Drain();

  /** Close a handle no chain reaches any more once the jobs' copies in flight (which may still read it) have left. */
  private async closeWhenIdle(d: BlockDriver): Promise<void> {
    const resume = await this.io.drain();
    try {
      await d.close();
    } catch {
      // A dropped read-only backing handle: nothing to report to anyone.
    } finally {
      resume();
    }
  }

  /** Run after a node got a new driver handle (reopen): what was bound to the old handle moves. */
  readonly reopenHooks: Array<(node: FormatNode, old: BlockDriver) => Promise<void>> = [];

  /**
   * Reopen a format node read-only or read-write. The old handle is flushed and closed first, so
   * its persistent bitmaps are stored before the new handle reads them (QEMU stores them in the
   * reopen's prepare stage); if the new mode cannot be opened, the node is opened again as it was.
   * The caller holds guest I/O (exports drained); jobs' copies are drained here.
   */
  async reopen(node: FormatNode, readOnly: boolean): Promise<void> {
    if (node.driver.readOnly === readOnly) return;
    const resume = await this.io.drain();
    try {
      await this.swapHandle(node, readOnly);
    } finally {
      resume();
    }
  }

  private async swapHandle(node: FormatNode, readOnly: boolean): Promise<void> {
    const old = node.driver;
    await old.flush();
    await old.close();
    const f = node.fileNode === null ? undefined : this.nodes.get(node.fileNode);
    const noFlush = f?.kind === 'file' ? f.noFlush : node.noFlush;
    const open = (ro: boolean) => openImage(node.filename, { format: node.format, readOnly: ro, log: this.log, lock: 'none', cache: node.cache, defaultL2CacheBytes: DAEMON_L2_CACHE_BYTES, noFlush });
    let next, failure: unknown = null;
    try {
      next = await open(readOnly);
    } catch (e) {
      failure = e;
      next = await open(old.readOnly);
    }
    node.driver = next.driver;
    // Copy-before-write hooks, write watchers and the write gate follow the node, not the handle.
    moveWriteHooks(old, next.driver);
    this.onDriver(node);
    this.changed();
    const st = next.driver.storage;
    if (st instanceof FileStorage && !node.noLock) st.lock(next.driver.readOnly ? 'read' : 'write');
    for (const h of this.reopenHooks) await h(node, old);
    if (failure) throw new QmpError(failure instanceof Error ? failure.message : String(failure));
  }

  /** Forget cached chains (after any change of backing links). */
  changed(): void {
    this.chains = new Map();
  }

  /** Format nodes that use `node` as their backing node. */
  parentsOf(node: BlockNode): FormatNode[] {
    return [...this.nodes.values()].filter((n): n is FormatNode => n.kind === 'format' && (n.backing === node || n.fileNode === node.name));
  }

  /**
   * Remove a node nobody uses; implicit backing nodes that become unused go with it. `inUse`
   * answers for jobs and exports: 'in use' (a block backend on the node), 'referenced' (a job's
   * filter sits on it), or the op blocker's reason ("block device is in use by block job: mirror").
   * QEMU's order: backend, op blockers (a job's before the backing link's, as it came later),
   * ownership, references.
   */
  async remove(name: string, inUse: (n: BlockNode) => string | null): Promise<void> {
    const n = this.nodes.get(name);
    if (!n) throw new QmpError(`Failed to find node with node-name='${name}'`);
    const user = inUse(n);
    if (user === 'in use') throw new QmpError(`Node ${name} is in use`);
    if (user && user !== 'referenced') throw new QmpError(`Node '${name}' is busy: ${user}`);
    if (n.kind === 'filter') throw new QmpError(`Node ${name} is not owned by the monitor`);
    const parent = this.parentsOf(n)[0];
    if (n.implicit && !(parent && parent.backing === n)) throw new QmpError(`Node ${name} is not owned by the monitor`);
    // A backing node carries its overlay's op blocker; a file node is only referenced (QEMU's refcnt > 1).
    if (parent?.fileNode === n.name) throw new QmpError(`Block device ${name} is in use`);
    if (parent) throw new QmpError(`Node '${name}' is busy: node is used as backing hd of '${parent.name}'`);
    if (n.implicit) throw new QmpError(`Node ${name} is not owned by the monitor`);
    if (user === 'referenced') throw new QmpError(`Block device ${name} is in use`);
    if (n.kind === 'file') {
      this.nodes.delete(name);
      this.changed();
    } else {
      await this.drop(n);
    }
  }

  /**
   * Anonymous dirty bitmaps jobs keep on format nodes while they run (a mirror's dirty bitmap, a
   * backup's copy bitmap and successor), oldest first; listings place them among the node's own
   * bitmaps by creation (`seq`, see nextBitmapSeq).
   */
  readonly jobBitmaps: Array<{ node: FormatNode; seq: number; info: () => Record<string, unknown> }> = [];

  /** A job's filter enters the graph (the newest node). */
  addFilter(f: FilterNode): void {
    this.nodes.set(f.name, f);
  }

  /** The job's filter leaves the graph (the job has ended). */
  removeFilter(f: FilterNode): void {
    if (this.nodes.get(f.name) === f) this.nodes.delete(f.name);
  }

  /** Close and take out a format node nobody uses, with the implicit backing nodes it leaves unused. */
  async drop(n: FormatNode, inUse: (b: FormatNode) => boolean = () => false): Promise<void> {
    this.forget(n);
    await n.driver.flush().catch(() => {});
    await n.driver.close();
    // Its implicit backing nodes go with it unless something else holds them (another node, or
    // an export a pivot moved onto one: QEMU's block backend keeps its node alive).
    for (let b = n.backing; b && b.implicit && this.parentsOf(b).length === 0 && !inUse(b); b = b.backing) {
      this.forget(b);
      await b.driver.close();
    }
    this.changed();
  }

  /** Take a format node out of the graph, with the protocol node created for it. */
  private forget(n: FormatNode): void {
    this.nodes.delete(n.name);
    const f = n.fileNode === null ? undefined : this.nodes.get(n.fileNode);
    if (f?.kind === 'file' && f.implicit) this.nodes.delete(f.name);
  }

  /** Flush and close every image (daemon shutdown). */
  async closeAll(): Promise<void> {
    for (const name of [...this.fileViews.keys()]) await this.closeFileView(name);
    for (const n of this.nodes.values()) {
      if (n.kind !== 'format') continue;
      await n.driver.flush().catch(() => {});
      await n.driver.close().catch((e: unknown) => this.log(`qemu-storage-daemon: ${e instanceof Error ? e.message : String(e)}`));
    }
    this.nodes.clear();
    this.changed();
  }
}

export function formatArg(v: unknown): ImageFormat | 'auto' {
  if (typeof v !== 'string' || (!isFormat(v) && v !== 'auto')) throw new QmpError(`Invalid parameter value for 'driver': '${String(v)}'`);
  return v;
}
