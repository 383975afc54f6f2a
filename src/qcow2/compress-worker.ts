/**
 * Worker-thread entry point for CompressPool: runs the cluster codec on
 * requests from the pool, one at a time in arrival order.
 */
import { parentPort } from 'node:worker_threads';
import { compressCluster, decompressCluster } from './compress.js';
import type { WorkerRequest, WorkerResponse } from './compress-pool.js';

if (parentPort === null) throw new Error('compress-worker must run as a worker thread');
const port = parentPort;

/**
 * Reply with `result`, transferring its memory when the view covers a whole
 * ArrayBuffer of its own; otherwise (a slice of a larger or pooled buffer)
 * copy the bytes out first.
 */
function reply(id: number, result: Buffer | null): void {
  if (result === null) {
    port.postMessage({ id, ok: true, result: null } satisfies WorkerResponse);
    return;
  }
  const owned =
    result.byteOffset === 0 && result.byteLength === result.buffer.byteLength && result.buffer instanceof ArrayBuffer
      ? new Uint8Array(result.buffer, 0, result.byteLength)
      : new Uint8Array(result);
  port.postMessage({ id, ok: true, result: owned } satisfies WorkerResponse, [owned.buffer as ArrayBuffer]);
}

port.on('message', (req: WorkerRequest) => {
  const data = Buffer.from(req.data.buffer, req.data.byteOffset, req.data.byteLength);
  const work =
    req.op === 'compress'
      ? compressCluster(req.type, data)
      : decompressCluster(req.type, data, req.clusterSize);
  work.then(
    (result) => reply(req.id, result),
    (err: unknown) => {
      const message = err instanceof Error ? err.message : String(err);
      port.postMessage({ id: req.id, ok: false, message } satisfies WorkerResponse);
    },
  );
});
