/** qchain library entry point. */
export type { Storage } from './storage/storage.js';
export { StorageError } from './storage/storage.js';
export { FileStorage } from './storage/file.js';
export { MemoryStorage } from './storage/memory.js';
export type { BlockDriver, Extent, ExtentKind, BackingReader, WriteZeroesOptions } from './image/driver.js';
export { ImageError, CorruptionError } from './image/errors.js';
export { Qcow2Image, type Qcow2OpenOptions } from './qcow2/image.js';
export { createQcow2, type Qcow2CreateOptions, type Preallocation } from './qcow2/create.js';
export { checkImage, type CheckResult } from './qcow2/check.js';
export { createSnapshot } from './qcow2/snapshot.js';
export { RawImage } from './raw/raw.js';
export { Chain, type ChainExtent, type Layer } from './chain/chain.js';
export { openChain, openImage, probeFormat, type OpenOptions, type ImageFormat } from './chain/open.js';
export { copyChains, type CopyOptions } from './ops/copy.js';
export { compareChains, CompareError, type CompareOptions, type CompareResult, type CompareOutcome } from './ops/compare.js';
export { ddCopy } from './ops/dd.js';
export { measureQcow2, preallocSize, type MeasureOptions, type MeasureResult } from './qcow2/measure.js';
export { amendQcow2, type AmendOptions, type AmendStatus } from './qcow2/amend.js';
