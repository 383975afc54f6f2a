/**
 * block-dirty-bitmap-* as transaction actions: `prepare` checks and applies (QEMU's order and
 * messages), the returned action commits or undoes. The plain QMP commands are one-action
 * transactions.
 */
import { optBool, optInt, str, type Args } from '../qmp/server.js';
import { ALLOW_RO, BUSY, DEFAULT, RO, cloneBitmap, type BitmapRegistry } from './bitmaps.js';

export interface Action {
  commit(): Promise<void> | void;
  abort(): Promise<void> | void;
}

const done: Action = { commit: () => {}, abort: () => {} };

export async function bitmapAction(reg: BitmapRegistry, type: string, a: Args): Promise<Action> {
  switch (type) {
    case 'block-dirty-bitmap-add': {
      const nodeName = str(a, 'node'), name = str(a, 'name');
      const b = await reg.add(nodeName, name, optInt(a, 'granularity'), optBool(a, 'persistent', false), optBool(a, 'disabled', false));
      return { commit: () => {}, abort: async () => reg.drop((await reg.lookup(nodeName, name)).node, b) };
    }
    case 'block-dirty-bitmap-remove': {
      const { node, bitmap } = await reg.lookup(str(a, 'node'), str(a, 'name'));
      reg.check(node, bitmap, BUSY | RO);
      bitmap.busy = true;
      return { commit: () => reg.drop(node, bitmap), abort: () => { bitmap.busy = false; } };
    }
    case 'block-dirty-bitmap-clear': {
      const { node, bitmap } = await reg.lookup(str(a, 'node'), str(a, 'name'));
      reg.check(node, bitmap, DEFAULT);
      const backup = cloneBitmap(bitmap.data);
      bitmap.data.clear();
      return { commit: () => {}, abort: () => { bitmap.data.clear(); bitmap.data.merge(backup); } };
    }
    case 'block-dirty-bitmap-enable':
    case 'block-dirty-bitmap-disable': {
      const { node, bitmap } = await reg.lookup(str(a, 'node'), str(a, 'name'));
      reg.check(node, bitmap, ALLOW_RO);
      const was = bitmap.enabled;
      bitmap.enabled = type === 'block-dirty-bitmap-enable';
      return { commit: () => {}, abort: () => { bitmap.enabled = was; } };
    }
    case 'block-dirty-bitmap-merge': {
      const { node, bitmap } = await reg.lookup(str(a, 'node'), str(a, 'target'));
      // QEMU's block_dirty_bitmap_merge: each source found and checked with the target in turn.
      const srcs = await reg.sources(node, bitmap, a.bitmaps);
      const backup = cloneBitmap(bitmap.data);
      // A source frozen by a backup merges as it was frozen (QEMU's parent bitmap).
      for (const s of srcs) bitmap.data.merge(s.frozen ?? s.data);
      return { commit: () => {}, abort: () => { bitmap.data.clear(); bitmap.data.merge(backup); } };
    }
  }
  return done;
}

export const BITMAP_COMMANDS = ['block-dirty-bitmap-add', 'block-dirty-bitmap-remove', 'block-dirty-bitmap-clear',
  'block-dirty-bitmap-enable', 'block-dirty-bitmap-disable', 'block-dirty-bitmap-merge'] as const;
