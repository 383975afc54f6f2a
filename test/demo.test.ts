/**
 * The README's first command ends in `qchain demo`: the seed "Backing Chain Management" walk-through
 * in a temporary folder. It must succeed and print the steps, `info --backing-chain`, `map` and the
 * per-layer picture; with --keep the files it made must pass `qemu-img check` and QEMU must read the
 * guest view the picture shows.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { oracle, qchain, qemuImg, qemuIo } from './helpers/qemu.js';

test('demo: the walk-through runs and prints the chain, the map and the picture', oracle(), async () => {
  const r = await qchain(['demo', '--keep']);
  assert.equal(r.code, 0, r.stderr);
  const out = r.stdout;
  for (const step of ['$ qchain img create -f qcow2 base.qcow2', '$ qchain img snapshot -c', 'backing_fmt=qcow2', '$ qchain img info --backing-chain', '$ qchain img map']) {
    assert.ok(out.includes(step), `demo prints ${step}`);
  }
  assert.match(out, /image: wrap\.qcow2[\s\S]*backing file format: qcow2[\s\S]*image: base\.qcow2[\s\S]*Snapshot list:/);
  assert.match(out, /Offset {10}Length {10}Mapped to {7}File/);
  assert.match(out, /guest sees +[A-Z-]+/);
  const dir = /in (\S+)\n/.exec(out)?.[1];
  assert.ok(dir && fs.existsSync(dir), 'the demo names its folder (kept with --keep)');
  try {
    for (const f of ['base.qcow2', 'wrap.qcow2']) assert.equal((await qemuImg(['check', f], dir)).code, 0, `${f} is clean for qemu-img check`);
    const info = await qemuImg(['info', '--output=json', '--backing-chain', 'wrap.qcow2'], dir);
    assert.equal(info.code, 0, info.stderr);
    // The last write of the walk-through: 64 KiB of 0xff in the overlay.
    const rd = await qemuIo(['-r', '-c', 'read -P 0xff 103744512 65536', 'wrap.qcow2'], dir);
    assert.equal(rd.code, 0, rd.stdout);
  } finally {
    fs.rmSync(path.resolve(dir), { recursive: true, force: true });
  }
});
