/**
 * The replies of one event-loop turn, sent to the socket together at the turn's end. Node's
 * stream machinery costs a few microseconds per `write` call (a write request, then an iovec
 * per chunk), more than copying a small reply: a turn's replies up to COPY_MAX bytes are copied
 * into one buffer and written once; larger turns go out as one corked (vectored) write.
 * Invariant: parts leave in the order they were pushed, so a reply's pieces stay contiguous.
 */
import type { Socket } from 'node:net';

/** A turn's replies up to this many bytes are joined by copying. */
const COPY_MAX = 256 * 1024;

export class ReplyQueue {
  private parts: Buffer[] = [];
  private bytes = 0;
  private scheduled = false;

  constructor(private readonly socket: Socket) {}

  /** Bytes queued or written but not yet taken by the client. */
  get unsent(): number {
    return this.bytes + this.socket.writableLength;
  }

  push(b: Buffer): void {
    this.parts.push(b);
    this.bytes += b.length;
    if (!this.scheduled) {
      this.scheduled = true;
      setImmediate(this.flush);
    }
  }

  /** A header and its payload as one reply. */
  push2(head: Buffer, body: Buffer): void {
    this.push(head);
    this.parts.push(body);
    this.bytes += body.length;
  }

  readonly flush = (): void => {
    this.scheduled = false;
    const parts = this.parts, bytes = this.bytes;
    if (parts.length === 0) return;
    this.parts = [];
    this.bytes = 0;
    const s = this.socket;
    if (s.destroyed) return;
    if (parts.length === 1) s.write(parts[0]);
    else if (bytes <= COPY_MAX) s.write(Buffer.concat(parts, bytes));
    else {
      s.cork();
      for (const p of parts) s.write(p);
      s.uncork();
    }
  };
}
