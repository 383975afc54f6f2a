/**
 * The replies of one event-loop turn, sent to the socket together at the turn's end. Node's
 * stream machinery costs a few microseconds per `write` call, and a fresh ArrayBuffer per 4 KiB
 * read costs about as much again (plus the collections it causes), so small replies are built
 * in place in a slab: `reserve` hands out the next bytes of the current slab (a read's header
 * and data land there directly), `push` copies small buffers in and passes large ones by
 * reference. At the turn's end the slab's filled part and the large buffers leave in order, as
 * one write when there is one part, else as one corked (vectored) write.
 * Invariant: bytes leave in the order they were reserved or pushed, so a reply stays contiguous.
 */
import type { Socket } from 'node:net';

/** Size of a slab; a turn that fills one starts another. */
const SLAB = 256 * 1024;
/** Buffers up to this size are copied into the slab; larger ones are sent as they are. */
const COPY_MAX = 16 * 1024;
/** Written-out slabs kept for reuse (fresh 256 KiB buffers at ~500 MB/s made V8 run full collections for their external memory). */
const SPARE_SLABS = 8;

/** A slab and the socket writes of its bytes not yet completed. */
interface Slab {
  buf: Buffer;
  writes: number;
  /** Full: no more bytes will be reserved from it. */
  retired: boolean;
}

export class ReplyQueue {
  private parts: Buffer[] = [];
  /** For each part, the slab it lies in (null: a caller's buffer). */
  private owners: Array<Slab | null> = [];
  /** Bytes in `parts` plus the unsealed part of the slab. */
  private bytes = 0;
  private slab: Slab | null = null;
  private spare: Slab[] = [];
  /** The slab's bytes [sealed, used) are filled and not yet in `parts`. */
  private sealed = 0;
  private used = 0;
  private scheduled = false;

  constructor(private readonly socket: Socket) {}

  /** Bytes queued or written but not yet taken by the client. */
  get unsent(): number {
    return this.bytes + this.socket.writableLength;
  }

  /**
   * The next `n` bytes of this turn's output, to be filled before the turn ends (synchronously),
   * or null when `n` is too large for a slab (send a buffer of your own with `push`).
   */
  reserve(n: number): Buffer | null {
    if (n > COPY_MAX + 64) return null;
    if (!this.slab || this.used + n > SLAB) {
      this.seal();
      if (this.slab) this.retire(this.slab);
      this.slab = this.spare.pop() ?? { buf: Buffer.allocUnsafeSlow(SLAB), writes: 0, retired: false };
      this.slab.retired = false;
      this.sealed = this.used = 0;
    }
    const b = this.slab.buf.subarray(this.used, this.used + n);
    this.used += n;
    this.bytes += n;
    this.schedule();
    return b;
  }

  /** Gives back the last `n` bytes reserved (a reply abandoned before anything else was queued). */
  unreserve(n: number): void {
    this.used -= n;
    this.bytes -= n;
  }

  push(b: Buffer): void {
    if (b.length <= COPY_MAX) {
      const dst = this.reserve(b.length) as Buffer;
      b.copy(dst);
      return;
    }
    this.seal();
    this.parts.push(b);
    this.owners.push(null);
    this.bytes += b.length;
    this.schedule();
  }

  /** A header and its payload as one reply. */
  push2(head: Buffer, body: Buffer): void {
    this.push(head);
    this.push(body);
  }

  private schedule(): void {
    if (!this.scheduled) {
      this.scheduled = true;
      setImmediate(this.flush);
    }
  }

  /** Moves the slab's filled bytes into the part list. */
  private seal(): void {
    if (this.slab && this.used > this.sealed) {
      this.parts.push(this.slab.buf.subarray(this.sealed, this.used));
      this.owners.push(this.slab);
      this.sealed = this.used;
    }
  }

  /** No more bytes come from `s`; it is reused once its writes are done. */
  private retire(s: Slab): void {
    s.retired = true;
    if (s.writes === 0) this.recycle(s);
  }

  private recycle(s: Slab): void {
    if (this.spare.length < SPARE_SLABS) this.spare.push(s);
  }

  private written(s: Slab): void {
    if (--s.writes === 0 && s.retired) this.recycle(s);
  }

  private send(part: Buffer, owner: Slab | null): void {
    if (!owner) {
      this.socket.write(part);
      return;
    }
    owner.writes++;
    // Called once the bytes left (or the write failed): only then may the slab be refilled.
    this.socket.write(part, () => this.written(owner));
  }

  readonly flush = (): void => {
    this.scheduled = false;
    this.seal();
    // The slab's rest serves the next turn: what was handed to the socket is never written again.
    const parts = this.parts, owners = this.owners;
    if (parts.length === 0) return;
    this.parts = [];
    this.owners = [];
    this.bytes = 0;
    const s = this.socket;
    if (s.destroyed) return;
    if (parts.length === 1) this.send(parts[0], owners[0]);
    else {
      s.cork();
      for (let i = 0; i < parts.length; i++) this.send(parts[i], owners[i]);
      s.uncork();
    }
  };
}
