/**
 * Exact-length reads from a socket: incoming chunks are kept in a list with a cursor (no
 * concatenation per chunk), and the socket is paused while too much is buffered, so a fast
 * client cannot make the server buffer without bound.
 */
import type { Socket } from 'node:net';

/** Buffered bytes beyond which the socket is paused (unless a pending read needs more). */
const HIGH_WATER = 4 * 1024 * 1024;

export class ClosedError extends Error {
  constructor() {
    super('connection closed');
  }
}

export class SocketReader {
  private chunks: Buffer[] = [];
  private buffered = 0;
  private waiter: { n: number; resolve: (b: Buffer) => void; reject: (e: Error) => void } | null = null;
  private ended = false;

  constructor(private readonly socket: Socket) {
    socket.on('data', (b: Buffer) => {
      this.chunks.push(b);
      this.buffered += b.length;
      if (this.buffered > HIGH_WATER && !(this.waiter && this.buffered < this.waiter.n)) socket.pause();
      this.wake();
    });
    const end = (): void => {
      this.ended = true;
      this.wake();
    };
    socket.on('end', end);
    socket.on('close', end);
    socket.on('error', end);
  }

  /** The next `n` bytes; rejects with ClosedError if the peer goes away first. */
  read(n: number): Promise<Buffer> {
    if (this.waiter) return Promise.reject(new Error('concurrent read'));
    return new Promise((resolve, reject) => {
      this.waiter = { n, resolve, reject };
      this.wake();
    });
  }

  /** The next `n` bytes if already buffered (no promise), else null; then use `read`. */
  tryRead(n: number): Buffer | null {
    if (this.waiter || this.buffered < n) return null;
    const b = this.take(n);
    if (this.buffered <= HIGH_WATER / 2 && this.socket.isPaused()) this.socket.resume();
    return b;
  }

  private wake(): void {
    const w = this.waiter;
    if (!w) return;
    if (this.buffered >= w.n) {
      this.waiter = null;
      w.resolve(this.take(w.n));
      if (this.buffered <= HIGH_WATER / 2 && this.socket.isPaused()) this.socket.resume();
    } else if (this.ended) {
      this.waiter = null;
      w.reject(new ClosedError());
    } else if (this.socket.isPaused()) {
      this.socket.resume();
    }
  }

  private take(n: number): Buffer {
    if (n === 0) return Buffer.alloc(0);
    const first = this.chunks[0];
    if (first.length === n) {
      this.chunks.shift();
      this.buffered -= n;
      return first;
    }
    if (first.length > n) {
      this.chunks[0] = first.subarray(n);
      this.buffered -= n;
      return first.subarray(0, n);
    }
    const out = Buffer.allocUnsafe(n);
    let got = 0;
    while (got < n) {
      const c = this.chunks[0];
      const k = Math.min(c.length, n - got);
      c.copy(out, got, 0, k);
      got += k;
      if (k === c.length) this.chunks.shift();
      else this.chunks[0] = c.subarray(k);
    }
    this.buffered -= n;
    return out;
  }
}
