/**
 * A block job: status changes through the declarative table, QMP events for every change,
 * progress (offset/len), a rate limit, and pause/cancel points between units of work. The work
 * itself (stream, commit, ...) is a function that calls `checkpoint()` between chunks.
 */
import { canTransition, verbAllowed, type JobStatus, type JobVerb } from './state.js';
import { QmpError, type FilterNode } from '../daemon/graph.js';
import { JobIoError, actionFor, jobErrorText, type ErrorAction, type OnError } from './errors.js';
import type { JobGroup } from './group.js';
import { RateLimit } from './ratelimit.js';

export type JobType = 'commit' | 'stream' | 'mirror' | 'backup' | 'create';

export interface JobEvents {
  emit(name: string, data: Record<string, unknown>): void;
}

export class CancelledError extends Error {
  constructor() {
    super('job cancelled');
  }
}

export interface JobOptions {
  id: string;
  type: JobType;
  /** The node whose users see the job as busy. */
  nodes: string[];
  speed?: number;
  autoFinalize?: boolean;
  autoDismiss?: boolean;
  /** Error policies for failed reads (source) and writes (target). */
  onReadError?: OnError;
  onWriteError?: OnError;
}

export class Job {
  readonly id: string;
  readonly type: JobType;
  readonly nodes: string[];
  status: JobStatus = 'undefined';
  len = 0;
  offset = 0;
  speed: number;
  readonly autoFinalize: boolean;
  readonly autoDismiss: boolean;
  error: string | undefined;
  /** query-block-jobs' io-status: set when an error stopped the job, reset on resume. */
  ioStatus: 'ok' | 'failed' | 'nospace' = 'ok';
  readonly onReadError: OnError;
  readonly onWriteError: OnError;
  private pauseWanted = false;
  private cancelled = false;
  /** The work function is running (a cancel waits for it to return). */
  private working = false;
  /**
   * The graph changes of a successful job are being made (QEMU does them in one go in job_exit,
   * where no monitor command can come in between): a verb waits for `graphChanged` first.
   */
  preparing = false;
  /** job-complete was taken: the job converges towards its pivot (verbs wait, unless it is paused). */
  private completing = false;
  private readonly graphWaiters: Array<() => void> = [];
  /** Concluded (or concluding): no second ending. */
  private done = false;
  private readonly concludedWaiters: Array<() => void> = [];
  /** job-complete was asked (mirror/active commit: pivot). */
  completeRequested = false;
  /** block-job-cancel without force on a ready mirror: finish without pivot. */
  softCancelled = false;
  private wake: (() => void) | null = null;
  /** The work is waiting in a sleep (rate limit, pause, idle): QEMU's job->busy is false there. */
  private sleeping = false;
  private finalizeGo: (() => void) | null = null;
  /** Resolves a pending job-finalize once the job has concluded. */
  private finalized: (() => void) | null = null;
  /**
   * Backup: the node QEMU's copy-before-write filter sits on, the source or the overlay an external
   * snapshot of it put on top (the snapshot replaces the node under the filter). That node has the
   * filter as its parent, so it is no root node (block-commit refuses it as its device).
   */
  filterOn: string | null = null;
  /** The filter node the job put above its top (job-filter.ts), listed while the job runs. */
  filter: FilterNode | null = null;
  /** Run as the job concludes, however it ended: its filter leaves the graph (QEMU drops it in prepare/abort/clean). */
  readonly ended: Array<() => void> = [];
  /** The transaction group (completion-mode=grouped) the job belongs to. */
  group: JobGroup | null = null;
  /** Run when the job is gone (status null): what only the job referenced is released (drive-backup's target). */
  readonly released: Array<() => void> = [];
  /** Undo on failure or cancel (a backup's bitmap), run at most once. */
  private abortHook: (() => void) | null = null;
  /** QEMU 7.2's slice rate limit (the mirror's; the other jobs use the window below). */
  readonly rate = new RateLimit();
  /** In a rate-limit sleep: guest writes (kick) do not end it, as they do not enter QEMU's job. */
  private rateSleeping = false;
  /** Rate limit: bytes allowed since `rateStart`. */
  private rateStart = Date.now();
  private rateBytes = 0;

  constructor(opts: JobOptions, private readonly events: JobEvents, private readonly onGone: (j: Job) => void) {
    this.id = opts.id;
    this.type = opts.type;
    this.nodes = opts.nodes;
    this.speed = opts.speed ?? 0;
    this.rate.setSpeed(this.speed);
    this.autoFinalize = opts.autoFinalize ?? true;
    this.autoDismiss = opts.autoDismiss ?? true;
    this.onReadError = opts.onReadError ?? 'report';
    this.onWriteError = opts.onWriteError ?? 'report';
  }

  private to(s: JobStatus): void {
    if (!canTransition(this.status, s)) throw new Error(`job ${this.id}: invalid transition ${this.status} -> ${s}`);
    this.status = s;
    this.events.emit('JOB_STATUS_CHANGE', { status: s, id: this.id });
    if (s === 'null') {
      this.onGone(this);
      for (const f of this.released.splice(0)) f();
    }
  }

  private legacy(name: string, extra: Record<string, unknown> = {}): void {
    // Only block jobs have the legacy BLOCK_JOB_* events (blockdev-create has none).
    if (this.type === 'create') return;
    this.events.emit(name, { device: this.id, len: this.len, offset: this.offset, speed: this.speed, type: this.type, ...extra });
  }

  checkVerb(verb: JobVerb): void {
    if (!verbAllowed(this.status, verb)) throw new QmpError(`Job '${this.id}' in state '${this.status}' cannot accept command verb '${verb}'`);
  }

  /**
   * Start: created and running are announced before the command returns; the work runs after.
   * `prepare` runs at the pending stage (graph changes); `abort` undoes on failure or cancel.
   */
  start(work: (job: Job) => Promise<void>, prepare: () => Promise<void>, abort?: () => void): void {
    this.abortHook = abort ?? null;
    this.working = true;
    this.to('created');
    this.to('running');
    // A backup starts inside a drained section in QEMU: the job is paused and resumed once at once.
    if (this.type === 'backup') {
      this.to('paused');
      this.to('running');
    }
    setImmediate(() => void this.run(work, prepare));
  }

  private async run(work: (job: Job) => Promise<void>, prepare: () => Promise<void>): Promise<void> {
    try {
      try {
        await work(this);
      } finally {
        this.working = false;
      }
      if (this.cancelled) return this.finishCancel();
      this.pauseWanted = false;
      this.to('waiting');
      if (this.group) {
        await this.group.arrive(this);
        if (this.cancelled) return;
      }
      this.to('pending');
      if (!this.autoFinalize) {
        if (this.type !== 'create') this.events.emit('BLOCK_JOB_PENDING', { type: this.type, id: this.id });
        await new Promise<void>((r) => { this.finalizeGo = r; });
        if (this.cancelled) return;
      }
      this.abortHook = null;
      await this.graphChange(async () => {
        await prepare();
        this.legacy('BLOCK_JOB_COMPLETED');
        this.conclude();
      });
      this.group?.settled(this);
    } catch (e) {
      // Cancelled while working: the work has stopped now, and only now the cancel is announced.
      if (this.cancelled || e instanceof CancelledError) {
        if (!this.done) this.finishCancel();
        return;
      }
      this.error = jobErrorText(e);
      // Work that failed while the job was paused (its I/O was in flight when the pause came)
      // leaves as a cancel does: back to the status it paused in first (QEMU's pause point).
      if (this.status === 'paused') this.to('running');
      else if (this.status === 'standby') this.to('ready');
      this.runAbortHook();
      this.to('aborting');
      this.legacy('BLOCK_JOB_COMPLETED', { error: this.error });
      this.conclude();
      this.group?.abort(this);
    }
  }

  /**
   * Make graph changes as one step no verb may interleave with (QEMU's job_exit, or the pivot):
   * verbs arriving meanwhile are applied once it is over, as if they had come just after it.
   */
  async graphChange<T>(fn: () => Promise<T>): Promise<T> {
    this.preparing = true;
    this.completing = false;
    try {
      return await fn();
    } finally {
      this.graphChangesOver();
    }
  }

  private graphChangesOver(): void {
    this.preparing = false;
    this.completing = false;
    this.releaseGraphWaiters();
  }

  /** Let waiting verbs look again, after the job's own continuation (status changes up to its conclusion) has run. */
  private releaseGraphWaiters(): void {
    setImmediate(() => { for (const r of this.graphWaiters.splice(0)) r(); });
  }

  /**
   * Verbs must wait: graph changes are under way, or a completion is converging (not while the
   * job is paused, by the user or an error policy: the resume that it waits for must get through).
   */
  get settling(): boolean {
    return this.preparing || (this.completing && !this.pauseWanted);
  }

  /** Resolves once graph changes under way are over (at once if none is). */
  async graphChanged(): Promise<void> {
    while (this.settling) await new Promise<void>((r) => this.graphWaiters.push(r));
  }

  /** Resolves once the job has concluded (its work stopped and its ending announced). */
  whenConcluded(): Promise<void> {
    if (this.done) return Promise.resolve();
    return new Promise((r) => this.concludedWaiters.push(r));
  }

  private conclude(): void {
    this.done = true;
    if (this.preparing || this.completing) this.graphChangesOver();
    for (const r of this.concludedWaiters.splice(0)) r();
    for (const f of this.ended.splice(0)) f();
    this.to('concluded');
    if (this.autoDismiss) this.to('null');
    const f = this.finalized;
    this.finalized = null;
    f?.();
  }

  /** Between units of work: honour pause and cancel, and the rate limit for `bytes` just done. */
  async checkpoint(bytes = 0): Promise<void> {
    if (this.cancelled) throw new CancelledError();
    if (bytes && this.speed > 0) {
      this.rateBytes += bytes;
      // Sleep in slices until the bytes done are within the allowance; a new speed (or cancel,
      // or pause) wakes the sleep and is taken into account at once.
      for (;;) {
        if (this.cancelled || this.speed <= 0) break;
        const wait = this.rateStart + (this.rateBytes / this.speed) * 1000 - Date.now();
        if (wait <= 0) break;
        await this.sleep(Math.min(wait, 100));
      }
      if (Date.now() - this.rateStart > 1000 && this.rateBytes > 0) {
        this.rateStart = Date.now();
        this.rateBytes = 0;
      }
    }
    while (this.pauseWanted && !this.cancelled) await this.sleep(1000);
    if (this.cancelled) throw new CancelledError();
  }

  private sleep(ms: number): Promise<void> {
    this.sleeping = true;
    return new Promise((r) => {
      const up = (): void => { this.wake = null; this.sleeping = false; r(); };
      const t = setTimeout(up, ms);
      this.wake = () => { clearTimeout(t); up(); };
    });
  }

  /**
   * QEMU's block_job_error_action: BLOCK_JOB_ERROR for every error, and for `stop` a pause the
   * user must resume (io-status tells why). Returns the action taken.
   */
  errorAction(e: JobIoError, policy?: OnError): ErrorAction {
    const action = actionFor(policy ?? (e.operation === 'read' ? this.onReadError : this.onWriteError), e.code);
    if (this.type !== 'create') this.events.emit('BLOCK_JOB_ERROR', { device: this.id, operation: e.operation, action });
    if (action === 'stop') {
      if (!this.pauseWanted) this.pause(false);
      if (this.ioStatus === 'ok') this.ioStatus = e.code === 'ENOSPC' ? 'nospace' : 'failed';
    }
    return action;
  }

  /**
   * One unit of I/O under the job's error policies: a reported error fails the job, a stop
   * pauses it and retries after resume, an ignored error is returned (the caller decides what
   * skipping means: QEMU's commit and backup retry, stream goes on and fails at the end).
   * Resolves with null once the unit succeeded.
   */
  async guarded(fn: () => Promise<void>, policy?: OnError): Promise<JobIoError | null> {
    for (;;) {
      try {
        await fn();
        return null;
      } catch (e) {
        if (!(e instanceof JobIoError)) throw e;
        const action = this.errorAction(e, policy);
        if (action === 'report') throw e;
        if (action === 'ignore') return e;
        await this.checkpoint();
      }
    }
  }

  /** The copy caught up: announce READY (mirror, active commit). */
  markReady(): void {
    this.to('ready');
    this.legacy('BLOCK_JOB_READY');
  }

  /** Wait until something happens (new work, a verb); returns at once if already woken. */
  idle(ms = 1000): Promise<void> {
    return this.sleep(ms);
  }

  /** Wake an idle job (new dirty data to copy). */
  kick(): void {
    if (!this.rateSleeping) this.wake?.();
  }

  /**
   * QEMU 7.2's job_sleep_ns for a rate-limit delay: one sleep, which a verb (set-speed, pause,
   * cancel) may end early; then the job goes on (7.2 does not sleep the rest of the delay).
   */
  async rateSleep(ms: number): Promise<void> {
    if (ms <= 0 || this.cancelled) return;
    this.rateSleeping = true;
    try {
      await this.sleep(ms);
    } finally {
      this.rateSleeping = false;
    }
  }

  complete(): void {
    this.checkVerb('complete');
    this.completeRequested = true;
    if (this.status === 'standby') this.resume(false);
    // QEMU's mirror converges and pivots before a later command is dispatched: from here verbs
    // wait until the job has finished (or failed) its completion.
    if (this.working && !this.cancelled) this.completing = true;
    this.wake?.();
  }

  /** When the job's work is over: leaving READY for the final stages. */
  get finishing(): boolean {
    return this.completeRequested || this.softCancelled || this.cancelled;
  }

  pause(verb = true): void {
    if (verb) {
      this.checkVerb('pause');
      // QEMU's job_user_pause: the verb table first, then the user's pause is taken once.
      if (this.pauseWanted) throw new QmpError('Job is already paused');
    }
    this.pauseWanted = true;
    if (this.completing) this.releaseGraphWaiters();
    if (this.status === 'running') this.to('paused');
    else if (this.status === 'ready') this.to('standby');
  }

  /** `user`: the resume verb (QEMU's job_user_resume checks the user's pause before the verb table). */
  resume(user = true): void {
    if (user && !this.pauseWanted) throw new QmpError("Can't resume a job that was not paused");
    this.checkVerb('resume');
    this.pauseWanted = false;
    this.ioStatus = 'ok';
    if (this.status === 'paused') this.to('running');
    else if (this.status === 'standby') this.to('ready');
    this.wake?.();
  }

  setSpeed(speed: number): void {
    this.checkVerb('set-speed');
    if (speed < 0) throw new QmpError("Parameter 'speed' expects a non-negative value");
    const old = this.speed;
    this.speed = speed;
    this.rate.setSpeed(speed);
    this.rateStart = Date.now();
    this.rateBytes = 0;
    // As QEMU's block_job_set_speed: only a higher speed (or none) wakes a sleeping job.
    if (speed && speed <= old) return;
    this.wake?.();
  }

  /** Cancel: the job stops at its next checkpoint; its events follow once the work has returned. */
  cancel(force = true): void {
    this.checkVerb('cancel');
    if (!force && (this.status === 'ready' || this.status === 'standby')) {
      // A ready mirror cancelled softly completes without pivoting (a point-in-time copy).
      this.softCancelled = true;
      this.pauseWanted = false;
      if (this.status === 'standby') this.to('ready');
      this.wake?.();
      return;
    }
    this.cancelled = true;
    this.pauseWanted = false;
    this.wake?.();
    // Still working: the work stops at its next checkpoint and the job ends when it has returned
    // (as QEMU's coroutine). Work already over (waiting for its group, pending): it ends now.
    if (this.working) return;
    this.finishCancel();
    this.finalizeGo?.();
  }

  /** The cancelled job's ending: abort hooks, then aborting, BLOCK_JOB_CANCELLED, concluded (and null). */
  private finishCancel(): void {
    if (this.done) return;
    // A paused job resumes to leave (QEMU's job_pause_point goes back to the status it paused in).
    if (this.status === 'paused') this.to('running');
    else if (this.status === 'standby') this.to('ready');
    this.runAbortHook();
    this.to('aborting');
    this.legacy('BLOCK_JOB_CANCELLED');
    this.conclude();
    this.group?.abort(this);
  }

  /** Throws CancelledError if the job has been cancelled (hard). */
  stopIfCancelled(): void {
    if (this.cancelled) throw new CancelledError();
  }

  /** Another member of the job's group failed or was cancelled. */
  cancelByGroup(): void {
    if (this.cancelled || !verbAllowed(this.status, 'cancel')) return;
    this.cancel(true);
  }

  private runAbortHook(): void {
    const h = this.abortHook;
    this.abortHook = null;
    h?.();
  }

  /** job-finalize: resolves once the job has concluded, so the reply follows its events, as QEMU's does. */
  finalize(): Promise<void> {
    this.checkVerb('finalize');
    const done = new Promise<void>((r) => { this.finalized = r; });
    this.finalizeGo?.();
    return done;
  }

  /**
   * A job created but not started gives up (its filter could not be made, as an intermediate
   * commit's): created, then null, as QEMU's job_early_fail.
   */
  abandon(): void {
    this.to('created');
    this.done = true;
    this.to('null');
  }

  dismiss(): void {
    this.checkVerb('dismiss');
    this.to('null');
  }

  /**
   * A drained section over one of the job's nodes begins: as in QEMU, a running (ready) job the
   * user has not paused stops at its pause point, `paused` (`standby`), until the section ends.
   * Only the status and its events change. Returns whether the job went to pause.
   */
  drainBegin(): boolean {
    if (this.pauseWanted || this.done) return false;
    // QEMU's job_pause enters the job: a rate-limit sleep ends there (7.2 does not sleep the rest).
    if (this.rateSleeping) this.wake?.();
    if (this.status === 'running') this.to('paused');
    else if (this.status === 'ready') this.to('standby');
    else return false;
    return true;
  }

  /** The drained section ends: a job drainBegin paused goes back to running (ready). */
  drainEnd(): void {
    if (this.pauseWanted || this.done) return;
    if (this.status === 'paused') this.to('running');
    else if (this.status === 'standby') this.to('ready');
  }

  /** Paused by the user or by an error policy (QEMU's user_paused). */
  get userPaused(): boolean {
    return this.pauseWanted;
  }

  /**
   * QEMU's job->busy: true while the job's coroutine is doing work (I/O in flight included),
   * false while it sleeps (rate limit, pause point, a ready mirror waiting for writes) and once
   * its work has returned (waiting, pending, concluded).
   */
  get busy(): boolean {
    // QEMU enters paused/standby only at a pause point, where busy is already false.
    return this.working && !this.sleeping && this.status !== 'paused' && this.status !== 'standby';
  }

  blockJobInfo(): Record<string, unknown> {
    return {
      'auto-finalize': this.autoFinalize, 'io-status': this.ioStatus, device: this.id, 'auto-dismiss': this.autoDismiss, busy: this.busy,
      len: this.len, offset: this.offset, status: this.status, paused: this.pauseWanted, speed: this.speed,
      ready: this.status === 'ready' || this.status === 'standby', type: this.type, ...(this.error ? { error: this.error } : {}),
    };
  }

  jobInfo(): Record<string, unknown> {
    return {
      'current-progress': this.offset, status: this.status, 'total-progress': this.len, type: this.type, id: this.id,
      ...(this.error ? { error: this.error } : {}),
    };
  }
}
