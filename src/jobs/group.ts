/**
 * Jobs started by one transaction with completion-mode=grouped (QEMU's JobTxn): a member that has
 * finished its work waits until every member has, then the members finalize one after the other
 * in the order they were started; if one fails or is cancelled, the others are cancelled, so the
 * group's bitmaps are all kept (none is synced).
 */
import type { Job } from './job.js';

export class JobGroup {
  private readonly members: Job[] = [];
  private readonly waiting = new Map<Job, () => void>();
  private readonly settling = new Map<Job, () => void>();
  private aborted = false;

  add(job: Job): void {
    this.members.push(job);
    job.group = this;
  }

  /** `job` has finished its work: resolves when it is its turn to finalize (or the group is aborted). */
  arrive(job: Job): Promise<void> {
    const p = new Promise<void>((r) => this.waiting.set(job, r));
    if (this.aborted) this.release();
    else if (this.members.every((m) => this.waiting.has(m))) void this.finalizeInOrder();
    return p;
  }

  /** `job` has concluded (its turn is over). */
  settled(job: Job): void {
    const s = this.settling.get(job);
    this.settling.delete(job);
    s?.();
  }

  /** `from` failed or was cancelled: every other member is cancelled. */
  abort(from: Job): void {
    if (this.aborted) return;
    this.aborted = true;
    for (const m of this.members) if (m !== from) m.cancelByGroup();
    this.release();
  }

  private async finalizeInOrder(): Promise<void> {
    for (const m of this.members) {
      const go = this.waiting.get(m);
      if (!go || this.aborted) break;
      const done = new Promise<void>((r) => this.settling.set(m, r));
      go();
      await done;
    }
  }

  private release(): void {
    for (const go of this.waiting.values()) go();
    for (const s of this.settling.values()) s();
    this.settling.clear();
  }
}
