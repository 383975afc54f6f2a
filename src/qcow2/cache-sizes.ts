/**
 * QEMU's qcow2 cache options resolved to cache sizes, as QEMU's read_cache_sizes does:
 * `l2-cache-size` and `refcount-cache-size` set their cache; `cache-size` (both together) gives
 * the L2 cache what the whole image needs when that fits beside the minimum refcount cache,
 * else all but that minimum, or what the other option leaves; all three at once are refused.
 */
import { ImageError } from '../image/errors.js';

/** QEMU's default maximum L2 cache (DEFAULT_L2_CACHE_MAX_SIZE on Linux). */
export const DEFAULT_L2_CACHE_BYTES = 32 * 1024 * 1024;
/** Refcount blocks cached when no option says otherwise. */
export const DEFAULT_REFCOUNT_CACHE_BLOCKS = 256;
const MIN_REFCOUNT_CACHE_CLUSTERS = 4;

export interface CacheSizeOptions {
  /** `l2-cache-size` in bytes. */
  l2CacheBytes?: number;
  /** `refcount-cache-size` in bytes. */
  refcountCacheBytes?: number;
  /** `cache-size` in bytes. */
  cacheSize?: number;
}

/** Each option's QEMU name and its field. */
const CACHE_OPTIONS = [['l2-cache-size', 'l2CacheBytes'], ['refcount-cache-size', 'refcountCacheBytes'], ['cache-size', 'cacheSize']] as const;

/** The cache options among a node's options, `value(name)` giving each one's bytes (undefined: not given); undefined when none is. */
export function collectCacheOptions(value: (name: string) => number | undefined): CacheSizeOptions | undefined {
  const out: CacheSizeOptions = {};
  for (const [name, field] of CACHE_OPTIONS) {
    const v = value(name);
    if (v !== undefined) out[field] = v;
  }
  return Object.keys(out).length ? out : undefined;
}

export interface CacheSizes {
  l2Bytes: number;
  /** Refcount blocks to cache. */
  refcountBlocks: number;
}

/** The checks that need no image (QEMU's texts); throws ImageError. */
export function checkCacheOptions(o: CacheSizeOptions): void {
  for (const [name, field] of CACHE_OPTIONS) {
    const v = o[field];
    if (v !== undefined && (!Number.isSafeInteger(v) || v < 0)) throw new ImageError(`Parameter '${name}' expects a non-negative number below 2^64`);
  }
  const { l2CacheBytes: l2, refcountCacheBytes: rc, cacheSize: all } = o;
  if (all === undefined) return;
  if (l2 !== undefined && rc !== undefined) throw new ImageError('cache-size, l2-cache-size and refcount-cache-size may not be set at the same time');
  if (l2 !== undefined && l2 > all) throw new ImageError('l2-cache-size may not exceed cache-size');
  if (rc !== undefined && rc > all) throw new ImageError('refcount-cache-size may not exceed cache-size');
}

export function resolveCacheSizes(o: CacheSizeOptions, virtualSize: number, clusterSize: number, l2EntryBytes: number,
  defaultL2 = DEFAULT_L2_CACHE_BYTES): CacheSizes {
  checkCacheOptions(o);
  const minRefcount = MIN_REFCOUNT_CACHE_CLUSTERS * clusterSize;
  let l2 = o.l2CacheBytes, rc = o.refcountCacheBytes;
  if (o.cacheSize !== undefined) {
    const all = o.cacheSize;
    if (l2 !== undefined) rc = all - l2;
    else if (rc !== undefined) l2 = all - rc;
    else {
      const entries = Math.ceil(virtualSize / clusterSize);
      const maxL2 = Math.ceil((entries * l2EntryBytes) / clusterSize) * clusterSize;
      if (all >= maxL2 + minRefcount) l2 = maxL2;
      else l2 = all - Math.min(all, minRefcount);
      rc = all - l2;
    }
  }
  return {
    l2Bytes: l2 ?? defaultL2,
    refcountBlocks: rc === undefined ? DEFAULT_REFCOUNT_CACHE_BLOCKS : Math.max(MIN_REFCOUNT_CACHE_CLUSTERS, Math.floor(rc / clusterSize)),
  };
}
