/** Rewriting an image's backing link in its header (what stream and commit do at the end). */
import type { BlockDriver } from '../image/driver.js';
import { Qcow2Image } from '../qcow2/image.js';

/** Point `driver` at a new backing file (name and format), or at none. Flushes data first. */
export async function setBackingLink(driver: BlockDriver, name: string | null, format: string | null): Promise<void> {
  if (!(driver instanceof Qcow2Image)) throw new Error(`Cannot change the backing link of a ${driver.format} image`);
  await driver.flush();
  driver.header.backingFile = name;
  driver.header.backingFormat = name ? format : null;
  await driver.writeHeader();
  await driver.flush();
}
