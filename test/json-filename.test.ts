/**
 * QEMU's `json:{...}` pseudo-filenames, on the command line and as overlays' backing file names
 * (as a daemon writes them for a node whose attached backing differs from its header), against
 * qemu-img/qemu-io 7.2: info (human, JSON, --backing-chain), map, check, qemu-io reads, convert,
 * compare, commit, rebase -b and create -b, and QEMU's error texts for bad descriptions. File
 * names inside a description are relative to the current directory (the images are in sub/ and
 * the tools run from its parent, so a wrong base shows). Also the opener's safety rules: the
 * directory gate and the loop check apply to every file a header's description leads to.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { filterTiming, oracle, qchain, qemuImg, qemuIo, scratch, type RunResult } from './helpers/qemu.js';
import { openChain } from '../src/chain/open.js';
import { parseQemuJson } from '../src/chain/qemu-json.js';
import { firstQdictKey } from '../src/chain/json-filename.js';

const skip = oracle().skip;

const file = (f: string): string => `{"driver": "file", "filename": "${f}"}`;
/** top over other (not over its header's base), as QSD names such a node. */
const TOP_OVER_OTHER = `json:{"backing": {"driver": "qcow2", "file": ${file('sub/other.qcow2')}}, "driver": "qcow2", "file": ${file('sub/top.qcow2')}}`;
/** top with no backing. */
const TOP_ALONE = `json:{"backing": null, "driver": "qcow2", "file": ${file('sub/top.qcow2')}}`;
/** top over its header's chain, flat keys, no file driver. */
const TOP_FLAT = 'json:{"driver":"qcow2","file.filename":"sub/top.qcow2"}';
/** The format probed, single quotes. */
const TOP_PROBED = "json:{'file':{'filename':'sub/top.qcow2'}}";
/** Three levels described, with a qcow2 cache option honoured. */
const NESTED = `json:{"driver":"qcow2","l2-cache-size":"1M","file":${file('sub/top.qcow2')},"backing":{"driver":"qcow2","file":${file('sub/other.qcow2')},"backing":{"driver":"qcow2","file":${file('sub/base.qcow2')}}}}`;

/**
 * sub/base.qcow2 (0x42 in [1M, 2M)), sub/other.qcow2 (0x41 in [0, 1M)), sub/top.qcow2 over base
 * in its header (0x43 in [3M, 3M+64k)); overlays whose headers name json: descriptions:
 * snap (top over other), alone (top with no backing), flat (top over its header's chain).
 */
async function images(dir: string): Promise<void> {
  fs.mkdirSync(path.join(dir, 'sub'), { recursive: true });
  const img = async (args: string[]): Promise<void> => {
    const r = await qemuImg(args, dir);
    assert.equal(r.code, 0, r.stderr);
  };
  await img(['create', '-q', '-f', 'qcow2', 'sub/base.qcow2', '16M']);
  await img(['create', '-q', '-f', 'qcow2', 'sub/other.qcow2', '16M']);
  await img(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'sub/top.qcow2']);
  for (const [f, cmd] of [['sub/base.qcow2', 'write -q -P 0x42 1M 1M'], ['sub/other.qcow2', 'write -q -P 0x41 0 1M'], ['sub/top.qcow2', 'write -q -P 0x43 3M 64k']]) {
    assert.equal((await qemuIo(['-f', 'qcow2', '-c', cmd, f], dir)).code, 0);
  }
  for (const [f, b] of [['snap', TOP_OVER_OTHER], ['alone', TOP_ALONE], ['flat', TOP_FLAT]]) {
    await img(['create', '-q', '-f', 'qcow2', '-u', '-b', b, '-F', 'qcow2', `sub/${f}.qcow2`, '16M']);
    assert.equal((await qemuIo(['-f', 'qcow2', '-c', 'write -q -P 0x44 5M 64k', `sub/${f}.qcow2`], dir)).code, 0);
  }
}

const same = (ours: RunResult, theirs: RunResult, what: string): void => {
  assert.deepEqual({ code: ours.code, stdout: ours.stdout, stderr: ours.stderr }, { code: theirs.code, stdout: theirs.stdout, stderr: theirs.stderr }, what);
};

async function bothImg(dir: string, args: string[]): Promise<void> {
  same(await qchain(['img', ...args], dir), await qemuImg(args, dir), `img ${args.join(' ')}`);
}

const NAMES = [TOP_OVER_OTHER, TOP_ALONE, TOP_FLAT, TOP_PROBED, NESTED, 'sub/snap.qcow2', 'sub/alone.qcow2', 'sub/flat.qcow2'];

test('info (human, JSON, --backing-chain), map and check of json: names and of overlays naming them, as qemu-img', { skip, timeout: 120000 }, async () => {
  const dir = scratch('qchain-jsonname-');
  await images(dir);
  for (const name of NAMES) {
    for (const args of [['info'], ['info', '--output=json'], ['info', '--backing-chain', '--output=json'], ['map'], ['map', '--output=json'], ['check']]) {
      await bothImg(dir, [...args, name]);
    }
  }
  // The overridden backing's name, not joined to the overlay's folder.
  const r = await qchain(['img', 'info', '--output=json', 'sub/snap.qcow2'], dir);
  const info = JSON.parse(r.stdout) as Record<string, unknown>;
  assert.equal(info['full-backing-filename'], TOP_OVER_OTHER);
  // qemu-img info opens without backing: a described backing is then an option nobody takes.
  const chain = await qchain(['img', 'info', '--backing-chain', 'sub/snap.qcow2'], dir);
  assert.match(chain.stderr, /does not support the option 'backing\.driver'/);
});

test('qchain io reads json: names and overlays naming them as qemu-io', { skip, timeout: 120000 }, async () => {
  const dir = scratch('qchain-jsonname-io-');
  await images(dir);
  const cmds = ['read -v 0 16', 'read -P 0x41 0 1M', 'read -P 0 1M 1M', 'read -P 0x42 1M 1M', 'read -P 0x43 3M 64k', 'read -P 0x44 5M 64k', 'map'];
  for (const name of NAMES) {
    const args = ['-r', ...cmds.flatMap((c) => ['-c', c]), name];
    const [ours, theirs] = [await qchain(['io', ...args], dir), await qemuIo(args, dir)];
    assert.equal(filterTiming(ours.stdout), filterTiming(theirs.stdout), name);
    assert.equal(ours.stderr, theirs.stderr, name);
    assert.equal(ours.code, theirs.code, name);
  }
  // -f replaces the description's driver, as qemu-io's own options come first.
  const args = ['-r', '-f', 'qcow2', '-c', 'read -P 0x43 3M 64k', `json:{"driver":"raw","file":${file('sub/top.qcow2')}}`];
  const [ours, theirs] = [await qchain(['io', ...args], dir), await qemuIo(args, dir)];
  assert.equal(filterTiming(ours.stdout), filterTiming(theirs.stdout));
  assert.equal(ours.code, theirs.code);
});

test('names inside a description are relative to the current directory, not to the overlay', { skip, timeout: 60000 }, async () => {
  const dir = scratch('qchain-jsonname-cwd-');
  await images(dir);
  const sub = path.join(dir, 'sub');
  for (const args of [['map', 'snap.qcow2'], ['info', '--backing-chain', 'alone.qcow2'], ['check', 'snap.qcow2']]) await bothImg(sub, args);
  const io = ['-r', '-c', 'read 0 512', path.join(sub, 'snap.qcow2')];
  const [ours, theirs] = [await qchain(['io', ...io], '/'), await qemuIo(io, '/')];
  assert.equal(ours.stderr, theirs.stderr);
  assert.match(ours.stderr, /Could not open backing file: Could not open 'sub\/top\.qcow2': No such file or directory/);
});

test('convert, compare and commit through json: descriptions as qemu-img', { skip, timeout: 120000 }, async () => {
  const dir = scratch('qchain-jsonname-convert-');
  await images(dir);
  // The overlay the daemon writes: its guest view is top over other, byte for byte what qemu-img makes.
  for (const [src, fmt] of [['sub/snap.qcow2', 'qcow2'], ['sub/alone.qcow2', 'raw'], [TOP_OVER_OTHER, 'qcow2'], [NESTED, 'raw']]) {
    const theirs = await qemuImg(['convert', '-O', fmt, src, 'theirs.out'], dir);
    assert.equal(theirs.code, 0, theirs.stderr);
    same(await qchain(['img', 'convert', '-O', fmt, src, 'ours.out'], dir), theirs, `convert ${src}`);
    assert.ok(fs.readFileSync(path.join(dir, 'ours.out')).equals(fs.readFileSync(path.join(dir, 'theirs.out'))), `convert ${src}`);
  }
  await bothImg(dir, ['compare', TOP_OVER_OTHER, 'sub/snap.qcow2']);
  await bothImg(dir, ['compare', 'sub/snap.qcow2', 'sub/alone.qcow2']);
  // commit into the described backing: the whole of it, or -b naming it as the description does.
  const views: Record<string, Buffer> = {};
  for (const tool of ['qemu', 'qchain']) {
    const t = path.join(dir, tool);
    fs.mkdirSync(t);
    for (const f of ['top', 'other', 'base']) fs.copyFileSync(path.join(dir, 'sub', `${f}.qcow2`), path.join(t, `${f}.qcow2`));
    const desc = `json:{"driver":"qcow2","file":${file(`${tool}/top.qcow2`)},"backing":{"driver":"qcow2","file":${file(`${tool}/other.qcow2`)}}}`;
    const run = (args: string[]): Promise<RunResult> => (tool === 'qemu' ? qemuImg(args, dir) : qchain(['img', ...args], dir));
    const out: string[] = [];
    for (const b of [`./${tool}/other.qcow2`, `${tool}/other.qcow2`]) {
      const r = await run(['commit', '-b', b, desc]);
      out.push(`${r.code} ${r.stdout}${r.stderr}`.replaceAll(`${tool}/`, 'T/'));
    }
    views[tool] = Buffer.from(JSON.stringify(out));
    const m = await qemuImg(['map', '--output=json', `${tool}/other.qcow2`], dir);
    views[`${tool}-map`] = Buffer.from(m.stdout);
  }
  assert.equal(views.qchain.toString(), views.qemu.toString());
  assert.equal(views['qchain-map'].toString(), views['qemu-map'].toString());
});

test('img create -b json:... (and plain names) with and without -u, -F and a size, as qemu-img', { skip, timeout: 120000 }, async () => {
  const dir = scratch('qchain-jsonname-create-');
  await images(dir);
  const backings = ['top.qcow2', 'nothere.qcow2', TOP_OVER_OTHER, TOP_PROBED, `json:{"file":${file('sub/nothere.qcow2')}}`, 'json:{',
    `json:{"driver":"qcow2","file":${file('sub/top.qcow2')},"bogus":1}`,
    `json:{"driver":"qcow2","file":${file('sub/top.qcow2')},"backing":{"driver":"qcow2","file":${file('sub/nothere.qcow2')}}}`];
  for (const b of backings) {
    for (const flags of [[], ['-F', 'qcow2'], ['-u', '-F', 'qcow2'], ['-u']]) {
      for (const size of [[], ['16M']]) {
        const args = ['create', '-f', 'qcow2', ...flags, '-b', b, 'sub/new.qcow2', ...size];
        const theirs = await qemuImg(args, dir);
        const theirInfo = await qemuImg(['info', '--output=json', 'sub/new.qcow2'], dir);
        const theirBytes = fs.existsSync(path.join(dir, 'sub/new.qcow2')) ? fs.readFileSync(path.join(dir, 'sub/new.qcow2')) : null;
        fs.rmSync(path.join(dir, 'sub/new.qcow2'), { force: true });
        const ours = await qchain(['img', ...args], dir);
        same(ours, theirs, args.join(' '));
        const ourBytes = fs.existsSync(path.join(dir, 'sub/new.qcow2')) ? fs.readFileSync(path.join(dir, 'sub/new.qcow2')) : null;
        assert.deepEqual(ourBytes, theirBytes, args.join(' '));
        same(await qemuImg(['info', '--output=json', 'sub/new.qcow2'], dir), theirInfo, args.join(' '));
        fs.rmSync(path.join(dir, 'sub/new.qcow2'), { force: true });
      }
    }
  }
});

test('rebase -b json:... (safe and unsafe) gives the guest view and header qemu-img gives', { skip, timeout: 120000 }, async () => {
  const dir = scratch('qchain-jsonname-rebase-');
  await images(dir);
  for (const mode of [[], ['-u']]) {
    const res: Record<string, { out: string; info: string; view: Buffer }> = {};
    for (const tool of ['qemu', 'qchain']) {
      await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'sub/r.qcow2'], dir);
      await qemuIo(['-c', 'write -q -P 0x45 5M 64k', 'sub/r.qcow2'], dir);
      const args = ['rebase', ...mode, '-F', 'qcow2', '-b', TOP_OVER_OTHER, 'sub/r.qcow2'];
      const r = tool === 'qemu' ? await qemuImg(args, dir) : await qchain(['img', ...args], dir);
      const info = await qemuImg(['info', 'sub/r.qcow2'], dir);
      // The overlay's own data (allocation order may differ: compare what it holds).
      const own = `json:{"driver":"qcow2","file":${file('sub/r.qcow2')},"backing":null}`;
      await qemuImg(['convert', '-O', 'raw', own, `r-${tool}.raw`], dir);
      res[tool] = { out: `${r.code} ${r.stdout}${r.stderr}`, info: info.stdout.replace(/disk size: .*\n/, ''), view: fs.readFileSync(path.join(dir, `r-${tool}.raw`)) };
      fs.rmSync(path.join(dir, 'sub/r.qcow2'));
    }
    assert.equal(res.qchain.out, res.qemu.out);
    assert.equal(res.qchain.info, res.qemu.info);
    assert.ok(res.qchain.view.equals(res.qemu.view), `rebase ${mode.join(' ')}`);
  }
});

test('bad json: names fail with qemu-img\'s texts, on the command line and in a header', { skip, timeout: 120000 }, async () => {
  const dir = scratch('qchain-jsonname-errors-');
  await images(dir);
  const top = file('sub/top.qcow2');
  const bad = [
    'json:{', 'json:', 'json:[]', 'json:"x"', 'json:{}', 'json:{"driver":"qcow2"}', 'json:{"driver":"qcow2","file":"sub/top.qcow2"}',
    'json:{"driver":"qcow2","filename":"sub/top.qcow2"}', 'json:{"filename":"sub/top.qcow2"}',
    `json:{"driver":"foo","file":${top}}`, 'json:{"driver":"qcow2","file":{"driver":"foo","filename":"sub/top.qcow2"}}',
    'json:{"driver":"qcow2","file":{"driver":"file"}}', 'json:{"driver":"qcow2","file":{"driver":"file","filename":5}}',
    `json:{"driver":"qcow2","file":${top},"bogus":1}`, `json:{"driver":"qcow2","file":${top},"x":1,"zzz":2,"bogus":3}`,
    `json:{"driver":"qcow2","file":${top},"x":[1]}`, 'json:{"driver":"qcow2","file":{"driver":"file","filename":"sub/top.qcow2","bogus":1}}',
    `json:{"driver":"qcow2","file":${top},"l2-cache-size":"abc"}`, `json:{"driver":"qcow2","file":${top},"cache-size":"1M","l2-cache-size":"2M"}`,
    `json:{"driver":"raw","file":${top},"l2-cache-size":"1M"}`, `json:{"driver":"qcow2","file":${top},"read-only":5}`,
    `json:{"driver":"qcow2","file":${file('sub/nothere.qcow2')}}`, `json:{"driver":"qcow2","file":${file('sub/nothere.qcow2')},"bogus":1}`,
    `json:{"driver":"qcow2","file":${top},"driver":"raw"}`, `json:{"driver":"qcow2","file":${top}} x`, 'json:{driver:1}', 'json:{"a" 1}',
    'json:{"a":1 "b":2}', 'json:{1:2}', 'json:{"a":[1 2]}', 'json:{"a":[1,]}', 'json:{"a":@}', 'json:{"a":"\\q"}', 'json:{"a":1}}', 'json:1',
    // Backings: a node name (none offline), one that is missing, one with an option nobody takes, one under raw.
    `json:{"driver":"qcow2","file":${top},"backing":"x"}`, `json:{"driver":"qcow2","file":${top},"backing":{"driver":"qcow2","file":${file('sub/nothere.qcow2')}}}`,
    `json:{"driver":"qcow2","file":${top},"backing":{"driver":"qcow2","file":${file('sub/other.qcow2')},"bogus":1}}`,
    `json:{"driver":"qcow2","file":${top},"bogus":1,"backing":{"driver":"qcow2","file":${file('sub/nothere.qcow2')}}}`,
    `json:{"driver":"raw","file":${file('sub/other.qcow2')},"backing":{"driver":"qcow2","file":${top}}}`,
  ];
  for (const name of bad) {
    await bothImg(dir, ['info', name]);
    await bothImg(dir, ['map', name]);
  }
  // The same as overlays' backing file names (info opens the overlay alone: fine for both).
  for (const [i, name] of bad.entries()) {
    const ov = `sub/bad${i}.qcow2`;
    assert.equal((await qemuImg(['create', '-q', '-f', 'qcow2', '-u', '-b', name, '-F', 'qcow2', ov, '16M'], dir)).code, 0);
    await bothImg(dir, ['map', ov]);
    await bothImg(dir, ['info', '--output=json', ov]);
  }
});

test('read-only=on in a description refuses writers as QEMU (reads are fine); file.locking=off takes no lock', { skip, timeout: 60000 }, async () => {
  const dir = scratch('qchain-jsonname-ro-');
  await images(dir);
  const ro = `json:{"driver":"qcow2","file":${file('sub/snap.qcow2')},"read-only":true}`;
  for (const args of [['commit', ro], ['snapshot', '-c', 's1', ro], ['check', '-r', 'all', ro], ['map', ro]]) await bothImg(dir, args);
  for (const args of [['-c', 'write -q 0 512', ro], ['-r', '-c', 'read -q -P 0x41 0 512', ro]]) {
    const [ours, theirs] = [await qchain(['io', ...args], dir), await qemuIo(args, dir)];
    same(ours, theirs, args.join(' '));
  }
  // file.locking=off: the file is opened without QEMU's locks (accepted and honoured, as QEMU).
  const nolock = `json:{"driver":"qcow2","file":{"driver":"file","filename":"sub/top.qcow2","locking":"off"},"backing":null}`;
  const args = ['-r', '-c', 'read -q -P 0x43 3M 64k', nolock];
  same(await qchain(['io', ...args], dir), await qemuIo(args, dir), 'locking=off');
});

test('the opener\'s safety rules hold through json: descriptions: directory gate, loops', { skip, timeout: 60000 }, async () => {
  const dir = scratch('qchain-jsonname-gate-');
  await images(dir);
  const outside = scratch('qchain-jsonname-outside-');
  assert.equal((await qemuImg(['create', '-q', '-f', 'qcow2', path.join(outside, 'secret.qcow2'), '16M'], dir)).code, 0);
  const allow = (p: string): boolean => p.startsWith(dir + path.sep);
  // A header's description naming a file outside, directly or as its backing's file.
  const evil = [`json:{"driver":"qcow2","file":${file(path.join(outside, 'secret.qcow2'))}}`,
    `json:{"driver":"qcow2","file":${file(path.join(dir, 'sub/top.qcow2'))},"backing":{"driver":"qcow2","file":${file(path.join(outside, 'secret.qcow2'))}}}`];
  for (const [i, b] of evil.entries()) {
    const ov = path.join(dir, `evil${i}.qcow2`);
    assert.equal((await qemuImg(['create', '-q', '-f', 'qcow2', '-u', '-b', b, '-F', 'qcow2', ov, '16M'])).code, 0);
    await assert.rejects(openChain(ov, { allowBacking: allow, readOnly: true }), /Refusing to open '.*secret\.qcow2': outside the allowed directories/);
  }
  // Inside the allowed folder the same shapes open.
  const good = path.join(dir, 'good.qcow2');
  assert.equal((await qemuImg(['create', '-q', '-f', 'qcow2', '-u', '-b', evil[1].replace(path.join(outside, 'secret.qcow2'), path.join(dir, 'sub/other.qcow2')), '-F', 'qcow2', good, '16M'])).code, 0);
  const c = await openChain(good, { allowBacking: allow, readOnly: true });
  assert.deepEqual(c.layers.map((l) => l.filename), [good, path.join(dir, 'sub/top.qcow2'), path.join(dir, 'sub/other.qcow2')]);
  await c.close();
  // An overlay whose description names itself: qchain refuses the loop (QEMU 7.2 does not return).
  const loop = path.join(dir, 'loop.qcow2');
  assert.equal((await qemuImg(['create', '-q', '-f', 'qcow2', '-u', '-b', `json:{"driver":"qcow2","file":${file(loop)}}`, '-F', 'qcow2', loop, '16M'])).code, 0);
  await assert.rejects(openChain(loop, { readOnly: true }), /creates an infinite loop/);
  const r = await qchain(['img', 'map', loop], dir);
  assert.equal(r.code, 1);
  assert.match(r.stderr, /creates an infinite loop/);
});

test('QEMU\'s JSON reader: single quotes, escapes, and the order QEMU names left-over options in', () => {
  const v = parseQemuJson(" {'a': \"x\\u0041\", \"b\": [1, -2.5e1, true, null]} ") as Map<string, unknown>;
  assert.equal(v.get('a'), 'xA');
  assert.deepEqual(v.get('b'), [1, -25, true, null]);
  assert.equal(firstQdictKey(['backing.file.driver', 'backing.file.filename', 'backing.driver']), 'backing.driver');
  assert.equal(firstQdictKey(['zzz', 'bogus', 'x']), 'x');
});

test('options QEMU has and qchain does not implement are refused naming qchain, not ignored', { skip, timeout: 60000 }, async () => {
  const dir = scratch('qchain-jsonname-unsupported-');
  await images(dir);
  for (const [name, option] of [[`json:{"driver":"qcow2","file":${file('sub/top.qcow2')},"lazy-refcounts":true}`, "qcow2 option 'lazy-refcounts'"],
    [`json:{"file":${file('sub/top.qcow2')},"cache":{"direct":true}}`, "qcow2 option 'cache.direct'"],
    ['json:{"driver":"qcow2","file":{"filename":"sub/top.qcow2","aio":"threads"}}', "file option 'aio'"]]) {
    assert.equal((await qemuImg(['info', name], dir)).code, 0, 'QEMU takes it');
    const r = await qchain(['img', 'info', name], dir);
    assert.equal(r.code, 1);
    assert.equal(r.stderr, `qemu-img: Could not open '${name}': qchain does not support the ${option} in json: file names\n`);
  }
});
