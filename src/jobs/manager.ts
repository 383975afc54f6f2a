/**
 * The daemon's jobs: creation of stream/commit jobs from QMP arguments (QEMU's checks and
 * messages), the job-* and legacy block-job-* verbs, and the two query commands.
 */
import { Job, type JobEvents } from './job.js';
import { streamWork } from './stream.js';
import { commitWork } from './commit.js';
import { QmpError, type BlockGraph, type FormatNode } from '../daemon/graph.js';
import { optBool, optInt, optStr, str, type Args, type Handler } from '../qmp/server.js';
import type { JobVerb } from './state.js';

export class JobManager {
  readonly jobs = new Map<string, Job>();

  constructor(private readonly graph: BlockGraph, private readonly events: JobEvents) {}

  /** The job holding `node`, if any. */
  jobOn(node: string): Job | undefined {
    for (const j of this.jobs.values()) if (j.nodes.includes(node) && j.status !== 'concluded' && j.status !== 'null') return j;
    return undefined;
  }

  private common(a: Args, device: FormatNode, type: Job['type'], nodes: string[]): Job {
    const id = optStr(a, 'job-id') ?? device.name;
    for (const n of nodes) {
      const busy = this.jobOn(n);
      if (busy) throw new QmpError(`Node '${n}' is busy: block device is in use by block job: ${busy.type}`);
    }
    if (this.jobs.has(id)) throw new QmpError(`Job ID '${id}' already in use`);
    const speed = optInt(a, 'speed') ?? 0;
    if (speed < 0) throw new QmpError("Parameter 'speed' expects a non-negative value");
    const job = new Job({ id, type, nodes, speed, autoFinalize: optBool(a, 'auto-finalize', true), autoDismiss: optBool(a, 'auto-dismiss', true) },
      this.events, (j) => this.jobs.delete(j.id));
    this.jobs.set(id, job);
    return job;
  }

  /** Nodes of a format node's chain, top first. */
  private chainNodes(n: FormatNode): FormatNode[] {
    const out: FormatNode[] = [];
    for (let x: FormatNode | null = n; x; x = x.backing) out.push(x);
    return out;
  }

  private findBelow(top: FormatNode, a: Args, key: string, nodeKey: string): FormatNode | null | undefined {
    const byName = optStr(a, nodeKey), byFile = optStr(a, key);
    if (byName !== undefined && byFile !== undefined) throw new QmpError(`'${key}' and '${nodeKey}' cannot be specified at the same time`);
    const below = this.chainNodes(top).slice(1);
    if (byName !== undefined) {
      const n = this.graph.formatNode(byName);
      if (!below.includes(n)) throw new QmpError(`Node '${byName}' is not a backing image of '${top.name}'`);
      return n;
    }
    if (byFile !== undefined) {
      const n = below.find((x) => x.filename === byFile);
      if (!n) throw new QmpError(`Can't find '${byFile}' in the backing chain`);
      return n;
    }
    return undefined;
  }

  stream(a: Args): void {
    const top = this.graph.formatNode(str(a, 'device'));
    const base = this.findBelow(top, a, 'base', 'base-node') ?? null;
    const layers = this.chainNodes(top);
    const between = layers.slice(0, base ? layers.indexOf(base) : layers.length).map((n) => n.name);
    const job = this.common(a, top, 'stream', between);
    const { work, prepare } = streamWork(this.graph, { top, base, backingFile: optStr(a, 'backing-file') });
    job.start(work, prepare);
  }

  commit(a: Args): void {
    const device = this.graph.formatNode(str(a, 'device'));
    if (this.graph.parentsOf(device).some((p) => p.backing === device)) throw new QmpError('Need a root block node');
    const layers = this.chainNodes(device);
    const topName = optStr(a, 'top-node'), topFile = optStr(a, 'top');
    if (topName !== undefined && topFile !== undefined) throw new QmpError("'top' and 'top-node' cannot be specified at the same time");
    let top = device;
    if (topName !== undefined) top = this.graph.formatNode(topName);
    else if (topFile !== undefined) {
      const t = layers.find((x) => x.filename === topFile);
      if (!t) throw new QmpError(`Top image file ${topFile} not found`);
      top = t;
    }
    if (!layers.includes(top)) throw new QmpError("Top image file not found");
    if (top === device) throw new QmpError('Active commit (committing the active layer) is not supported by qchain yet');
    const base = this.findBelow(top, a, 'base', 'base-node') ?? layers[layers.length - 1];
    if (base === top) throw new QmpError('Base node is the same as the top node');
    const overlay = layers[layers.indexOf(top) - 1];
    const nodes = layers.slice(layers.indexOf(top), layers.indexOf(base) + 1).map((n) => n.name);
    const job = this.common(a, device, 'commit', [device.name, ...nodes]);
    const { work, prepare } = commitWork(this.graph, { device, top, overlay, base, backingFile: optStr(a, 'backing-file') });
    job.start(work, prepare);
  }

  private byId(id: string): Job {
    const j = this.jobs.get(id);
    if (!j) throw new QmpError('Job not found');
    return j;
  }

  private byDevice(device: string): Job {
    const j = this.jobs.get(device);
    if (!j) throw new QmpError(`Block job '${device}' not found`, 'DeviceNotActive');
    return j;
  }

  private verb(j: Job, v: JobVerb): void {
    switch (v) {
      case 'cancel': return j.cancel();
      case 'pause': return j.pause();
      case 'resume': return j.resume();
      case 'finalize': return j.finalize();
      case 'dismiss': return j.dismiss();
      case 'complete': j.checkVerb('complete'); return;
      case 'set-speed': return;
    }
  }

  commands(): Array<[string, Handler]> {
    const out: Array<[string, Handler]> = [
      ['block-stream', (a) => this.stream(a)],
      ['block-commit', (a) => this.commit(a)],
      ['query-jobs', () => [...this.jobs.values()].map((j) => j.jobInfo())],
      ['query-block-jobs', () => [...this.jobs.values()].filter((j) => j.type !== 'create').map((j) => j.blockJobInfo())],
      ['block-job-set-speed', (a) => this.byDevice(str(a, 'device')).setSpeed(optInt(a, 'speed') ?? 0)],
    ];
    for (const v of ['cancel', 'pause', 'resume', 'complete', 'finalize', 'dismiss'] as const) {
      out.push([`job-${v}`, (a) => this.verb(this.byId(str(a, 'id')), v)]);
    }
    for (const v of ['cancel', 'pause', 'resume', 'complete'] as const) {
      out.push([`block-job-${v}`, (a) => this.verb(this.byDevice(str(a, 'device')), v)]);
    }
    out.push(['block-job-finalize', (a) => this.verb(this.byId(str(a, 'id')), 'finalize')]);
    out.push(['block-job-dismiss', (a) => this.verb(this.byId(str(a, 'id')), 'dismiss')]);
    return out;
  }
}
