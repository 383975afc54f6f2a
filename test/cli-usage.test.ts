/**
 * `qchain --help` names every verb that `qchain img --help` documents (the usage line used to
 * list only the foundation's five verbs after commit, rebase, snapshot and the rest were added).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { qchain } from './helpers/qemu.js';

test('qchain --help lists every qchain img verb', async () => {
  const top = await qchain(['--help']);
  assert.equal(top.code, 0);
  const img = await qchain(['img', '--help']);
  assert.equal(img.code, 0);
  const syntax = img.stdout.split('Command syntax:')[1] ?? '';
  const verbs = [...syntax.matchAll(/^ {2}([a-z]+) /gm)].map((m) => m[1]);
  assert.ok(verbs.length >= 15, `verbs found in img --help: ${verbs.join(' ')}`);
  const line = top.stdout.split('qchain io ')[0];
  for (const v of verbs) assert.match(line, new RegExp(`\\b${v}\\b`), `qchain --help names '${v}'`);
});
