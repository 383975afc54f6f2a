/**
 * A small worker_threads pool that runs the cluster codec off the main thread.
 *
 * Invariants:
 * - At most `size` workers, started lazily when work arrives.
 * - Each worker has at most PIPELINE_DEPTH jobs in flight, so one message
 *   round trip overlaps with compression; the rest wait in a FIFO queue.
 * - A worker with jobs in flight is ref()'d (the process stays alive until
 *   its promises settle); an idle worker is unref()'d, so a forgotten pool
 *   never keeps the process alive.
 * - Input bytes are copied into a fresh ArrayBuffer that is transferred to the
 *   worker (structured-cloning a Buffer view would copy its whole backing
 *   store, e.g. Node's 8 KiB pool or a large read buffer). The caller's Buffer
 *   is never detached or modified.
 * - close() stops accepting work, lets queued and in-flight jobs finish (so no
 *   caller is left with a rejected promise it may not be listening to), then
 *   terminates the workers.
 */
import os from 'node:os';
import { Worker } from 'node:worker_threads';
import type { CompressionType } from './compress.js';

/** Message from the pool to a worker. */
export type WorkerRequest =
  | { id: number; op: 'compress'; type: CompressionType; data: Uint8Array }
  | { id: number; op: 'decompress'; type: CompressionType; data: Uint8Array; clusterSize: number };

/** Message from a worker to the pool. */
export type WorkerResponse =
  | { id: number; ok: true; result: Uint8Array | null }
  | { id: number; ok: false; message: string };

const PIPELINE_DEPTH = 2;
const WORKER_URL = new URL('./compress-worker.js', import.meta.url);

interface Job {
  request: WorkerRequest;
  transfer: ArrayBuffer[];
  resolve: (value: Buffer | null) => void;
  reject: (err: Error) => void;
}

interface Slot {
  worker: Worker;
  inflight: Map<number, Job>;
}

export class CompressPool {
  /** Maximum number of worker threads. */
  readonly size: number;
  readonly #slots = new Set<Slot>();
  readonly #queue: Job[] = [];
  #nextId = 1;
  #closing = false;
  #closed: Promise<void> | null = null;
  #drained: (() => void) | null = null;

  constructor(threads: number = os.availableParallelism()) {
    if (!Number.isSafeInteger(threads) || threads < 1) throw new RangeError(`invalid thread count ${threads}`);
    this.size = threads;
  }

  /** compressCluster(type, data) on a worker thread. */
  compress(type: CompressionType, data: Buffer): Promise<Buffer | null> {
    const copy = new Uint8Array(data); // exact-size copy, safe to transfer
    return this.#submit({ id: this.#nextId++, op: 'compress', type, data: copy }, [copy.buffer]);
  }

  /** decompressCluster(type, src, clusterSize) on a worker thread. */
  async decompress(type: CompressionType, src: Buffer, clusterSize: number): Promise<Buffer> {
    const copy = new Uint8Array(src);
    const out = await this.#submit({ id: this.#nextId++, op: 'decompress', type, data: copy, clusterSize }, [copy.buffer]);
    if (out === null) throw new Error('compress worker returned no data');
    return out;
  }

  /** Finish outstanding jobs, then stop all workers. Idempotent. */
  close(): Promise<void> {
    if (this.#closed === null) {
      this.#closing = true;
      this.#closed = new Promise<void>((resolve) => {
        this.#drained = resolve;
        this.#maybeDrained();
      }).then(async () => {
        const slots = [...this.#slots];
        this.#slots.clear();
        await Promise.all(slots.map((s) => s.worker.terminate()));
      });
    }
    return this.#closed;
  }

  #submit(request: WorkerRequest, transfer: ArrayBuffer[]): Promise<Buffer | null> {
    if (this.#closing) return Promise.reject(new Error('CompressPool is closed'));
    return new Promise((resolve, reject) => {
      this.#queue.push({ request, transfer, resolve, reject });
      this.#pump();
    });
  }

  /** Hand queued jobs to the least-loaded worker, starting workers as needed. */
  #pump(): void {
    while (this.#queue.length > 0) {
      let best: Slot | null = null;
      for (const slot of this.#slots) {
        if (best === null || slot.inflight.size < best.inflight.size) best = slot;
      }
      if ((best === null || best.inflight.size > 0) && this.#slots.size < this.size) {
        best = this.#spawn();
      }
      if (best === null || best.inflight.size >= PIPELINE_DEPTH) return;
      const job = this.#queue.shift()!;
      best.inflight.set(job.request.id, job);
      best.worker.ref();
      best.worker.postMessage(job.request, job.transfer);
    }
  }

  #spawn(): Slot {
    const worker = new Worker(WORKER_URL);
    const slot: Slot = { worker, inflight: new Map() };
    this.#slots.add(slot);
    worker.on('message', (msg: WorkerResponse) => {
      const job = slot.inflight.get(msg.id);
      if (job === undefined) return;
      slot.inflight.delete(msg.id);
      if (slot.inflight.size === 0) worker.unref();
      if (msg.ok) {
        const r = msg.result;
        job.resolve(r === null ? null : Buffer.from(r.buffer, r.byteOffset, r.byteLength));
      } else {
        job.reject(new Error(msg.message));
      }
      this.#pump();
      this.#maybeDrained();
    });
    // A crashed worker fails only its own jobs; later work gets a new worker.
    const fail = (err: Error): void => {
      if (!this.#slots.delete(slot)) return;
      for (const job of slot.inflight.values()) job.reject(err);
      slot.inflight.clear();
      this.#pump();
      this.#maybeDrained();
    };
    worker.on('error', fail);
    worker.on('exit', (code) => fail(new Error(`compress worker exited with code ${code}`)));
    return slot;
  }

  #maybeDrained(): void {
    if (this.#drained === null || this.#queue.length > 0) return;
    for (const slot of this.#slots) if (slot.inflight.size > 0) return;
    const done = this.#drained;
    this.#drained = null;
    done();
  }
}
