/**
 * Image locking compatible with QEMU's file driver: one-byte OFD read locks at byte 100+i for
 * each permission i the opener holds and at 200+i for each permission it does not share
 * (permissions: 0 consistent read, 1 write, 2 write unchanged, 3 resize). Conflicts are found
 * by testing the opposite bytes, so qchain and QEMU (qemu-img, qemu-io, qemu-storage-daemon)
 * refuse each other's writers the same way. Without the native helper, no locks are taken.
 */
import fs from 'node:fs';
import { nativeFs } from './native.js';
import { StorageError } from './storage.js';

/** write: read-write open; read: read-only open; shared: read-only with force-share (-U). */
export type LockMode = 'write' | 'read' | 'shared' | 'none';

const PERM_BASE = 100;
const SHARED_BASE = 200;
const PERM_NAMES = ['consistent read', 'write', 'write unchanged', 'resize'];

function permSets(mode: LockMode): { hold: number[]; unshared: number[] } {
  switch (mode) {
    case 'write': return { hold: [0, 1, 3], unshared: [1, 3] };
    case 'read': return { hold: [0], unshared: [1, 3] };
    case 'shared': return { hold: [0], unshared: [] };
    default: return { hold: [], unshared: [] };
  }
}

/**
 * Take the locks for `mode` on `fd` and check that no other opener conflicts. On conflict the
 * locks taken are released and a StorageError with QEMU's two-line message is thrown.
 */
export function lockImage(fd: number, name: string, mode: LockMode): void {
  const nfs = nativeFs();
  if (!nfs || mode === 'none') return;
  const { hold, unshared } = permSets(mode);
  const mine = [...hold.map((i) => PERM_BASE + i), ...unshared.map((i) => SHARED_BASE + i)];
  const taken: number[] = [];
  const fail = (msg: string): never => {
    for (const b of taken) nfs.unlock(fd, b, 1);
    throw new StorageError(`${msg}\nIs another process using the image [${name}]?`, 'ELOCKED');
  };
  // Apply our own locks first, then test, as QEMU does (two openers racing both see each other).
  for (const b of mine) {
    if (!nfs.tryLock(fd, b, 1, { shared: true })) fail(`Failed to lock byte ${b}`);
    taken.push(b);
  }
  // A byte is "held by someone else" when /proc/locks lists more holders of it than our own
  // lock (QEMU asks F_OFD_GETLK, which Node cannot; a write-lock probe would need a writable fd).
  // A lock of a file description closed an instant ago can still be listed; a conflict is
  // only reported when it persists over a few short re-reads (about 50 ms in all).
  let conflict: string | null = null;
  for (let attempt = 0; attempt < 6; attempt++) {
    if (attempt) Atomics.wait(SLEEP, 0, 0, 10);
    const held = lockHolders(fd);
    const othersHold = (b: number): boolean => (held.get(b) ?? 0) > (mine.includes(b) ? 1 : 0);
    conflict = null;
    for (const i of hold) if (!conflict && othersHold(SHARED_BASE + i)) conflict = `Failed to get "${PERM_NAMES[i]}" lock`;
    for (const i of unshared) if (!conflict && othersHold(PERM_BASE + i)) conflict = `Failed to get shared "${PERM_NAMES[i]}" lock`;
    if (!conflict) return;
  }
  fail(conflict as string);
}

const SLEEP = new Int32Array(new SharedArrayBuffer(4));

/** Number of locks per byte in QEMU's ranges on the file behind `fd`, from /proc/locks. */
function lockHolders(fd: number): Map<number, number> {
  const out = new Map<number, number>();
  let text: string;
  try {
    text = fs.readFileSync('/proc/locks', 'utf8');
  } catch {
    return out; // no lock table to consult: nothing can be seen as conflicting
  }
  const st = fs.fstatSync(fd, { bigint: true });
  // glibc's dev_t encoding, as /proc/locks prints it: "MAJOR:MINOR:INODE" with hex device numbers.
  const major = Number(((st.dev >> 8n) & 0xfffn) | ((st.dev >> 32n) & ~0xfffn));
  const minor = Number((st.dev & 0xffn) | ((st.dev >> 12n) & ~0xffn));
  const id = `${major.toString(16).padStart(2, '0')}:${minor.toString(16).padStart(2, '0')}:${st.ino}`;
  for (const line of text.split('\n')) {
    const f = line.trim().split(/\s+/);
    // "1: OFDLCK ADVISORY READ -1 fe:00:1234 100 100" (blocked waiters carry a "->" field first)
    if (f[1] === '->') continue;
    const at = f.indexOf(id);
    if (at < 0) continue;
    const start = Number(f[at + 1]), end = f[at + 2] === 'EOF' ? Infinity : Number(f[at + 2]);
    for (let b = Math.max(start, PERM_BASE); b <= Math.min(end, SHARED_BASE + 7); b++) out.set(b, (out.get(b) ?? 0) + 1);
  }
  return out;
}
