/**
 * qemu-img `-p` progress output, a port of QEMU's util/qemu-progress.c.
 *
 * Behaviour (all arithmetic in 32-bit float like the C code):
 * - `print(delta, max)`: if `max == 0`, `delta` is the absolute percentage;
 *   otherwise `current += delta / 100 * max`.  The value is capped at 100.
 * - A line `    (%3.2f/100%)\r` is written (and flushed) when
 *   `current > lastPrint + minSkip`, `current < lastPrint - minSkip`, `current == 100` or `current == 0`
 *   (so `0.00` and `100.00` may be printed several times).  qemu-img uses
 *   `minSkip` 1.0 for convert/commit/amend and 2.0 for compare/rebase.
 * - `end()` writes `\n`.
 * - When disabled nothing is written, except that after a SIGUSR1
 *   ({@link ProgressPrinter.requestReport}) the next `print()` writes
 *   `    (%3.2f/100%)\n` to the error stream.
 *
 * Digits use glibc rounding (ties to even on the exact value, e.g. 15.625
 * prints as `15.62`).
 *
 * @module
 */

import type { TextSink } from './errors.js';
import { formatFixed } from './printf.js';

const f32 = Math.fround;

/** Format the progress text for a percentage: `    (12.50/100%)`. */
export function formatProgress(current: number): string {
  return `    (${formatFixed(current, 2, { width: 3 })}/100%)`;
}

/** Progress printer equivalent to `qemu_progress_init()` / `_print()` / `_end()`. */
export class ProgressPrinter {
  private readonly enabled: boolean;
  private readonly out: TextSink;
  private readonly errOut: TextSink;
  private readonly minSkip: number;
  private currentValue = 0;
  private lastPrint = 0;
  private printPending = false;

  /**
   * @param enabled the `-p` flag (`qemu_progress_init(enabled, min_skip)`)
   * @param out where progress lines go (stdout in qemu-img)
   * @param minSkip minimum advance in percent between two lines (qemu-img: 1.0 or 2.0)
   * @param errOut where a SIGUSR1-requested report goes when disabled (stderr)
   */
  constructor(enabled: boolean, out: TextSink = process.stdout, minSkip = 1.0, errOut: TextSink = process.stderr) {
    this.enabled = enabled;
    this.out = out;
    this.minSkip = f32(minSkip);
    this.errOut = errOut;
  }

  /** The current percentage (a float32 value). */
  get current(): number {
    return this.currentValue;
  }

  /**
   * `qemu_progress_print(delta, max)`.
   * @param delta absolute percentage when `max` is 0, else progress of the
   *   current sub-job in percent of `max`
   * @param max share (percent) of the whole job the sub-job represents, or 0
   */
  print(delta: number, max: number): void {
    let current: number;
    const d = f32(delta);
    if (max === 0) {
      current = d;
    } else {
      current = f32(this.currentValue + f32(f32(d / 100) * f32(Math.trunc(max))));
    }
    if (current > 100) {
      current = 100;
    }
    this.currentValue = current;
    // QEMU also prints when the value went back by more than minSkip (amend's per-operation progress).
    if (current > f32(this.lastPrint + this.minSkip) || current < f32(this.lastPrint - this.minSkip) || current === 100 || current === 0) {
      this.lastPrint = this.currentValue;
      if (this.enabled) {
        this.out.write(`${formatProgress(this.currentValue)}\r`);
      } else if (this.printPending) {
        this.errOut.write(`${formatProgress(this.currentValue)}\n`);
        this.printPending = false;
      }
    }
  }

  /** Emulate SIGUSR1: when disabled, the next printed update goes to the error stream. */
  requestReport(): void {
    this.printPending = true;
  }

  /** `qemu_progress_end()`: writes `\n` when enabled. */
  end(): void {
    if (this.enabled) {
      this.out.write('\n');
    }
  }
}
