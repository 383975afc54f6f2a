/** Pieces shared by `img commit` and `img rebase`: cache modes, format names, opening by -f. */
import { CliError } from '../util/errors.js';
import { isFormat, type ImageFormat } from '../../chain/open.js';
import type { DirectMode } from '../../storage/file.js';

/** bdrv_parse_cache_mode's accepted names. */
export function validCacheMode(s: string): boolean {
  return ['none', 'off', 'directsync', 'writeback', 'unsafe', 'writethrough'].includes(s);
}

/**
 * Whether a cache mode bypasses the page cache for writes: none/off/directsync do (QEMU's
 * cache.direct=on); a command's default (`undefined`) gives `dflt`; the others do not.
 */
export function cacheDirect(mode: string | undefined, dflt: DirectMode): DirectMode {
  if (mode === undefined) return dflt;
  return mode === 'none' || mode === 'off' || mode === 'directsync' ? 'on' : 'off';
}

/** Format names qemu-img 7.2 knows (bdrv_find_format), so -F accepts exactly what it accepts. */
export const QEMU_FORMATS: readonly string[] = ('blkdebug blklogwrites blkverify bochs cloop compress copy-before-write copy-on-read ' +
  'dmg file ftp ftps gluster host_cdrom host_device http https iscsi iser luks nbd nfs null-aio null-co nvme parallels ' +
  'preallocate qcow qcow2 qed quorum raw rbd replication snapshot-access ssh throttle vdi vhdx vmdk vpc vvfat').split(' ');

/** A -f argument as img_open treats it: unknown names fail when the image is opened. */
export function imageFormat(name: string | undefined, file: string): ImageFormat | undefined {
  if (name === undefined) return undefined;
  if (!isFormat(name)) throw new CliError(`Could not open '${file}': Unknown driver '${name}'`);
  return name;
}
