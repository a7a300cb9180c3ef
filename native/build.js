#!/usr/bin/env node
// Builds the native addon (build/Release/emorl_native.node) with cmake-js; run by `npm install` /
// `npm ci` through the package's `install` script, and by `npm run build:native`.
//
// A failed build does not fail the install: the pure-TypeScript path works without the addon,
// so we print a clear warning instead. Under CI (CI=true), or with EMORL_NATIVE_REQUIRED=1, a
// failed build fails loudly. EMORL_NATIVE_BUILD=0 skips the build; EMORL_CUDA=1 adds the CUDA
// kernels (CMakeLists.txt reads it from the environment).
'use strict';
const { spawnSync } = require('node:child_process');
const path = require('node:path');

const root = path.resolve(__dirname, '..');
const truthy = (v) => /^(1|true|yes|on)$/i.test(String(v ?? '').trim());
const required = truthy(process.env.CI) || truthy(process.env.EMORL_NATIVE_REQUIRED);

if (/^(0|false|no|off)$/i.test(String(process.env.EMORL_NATIVE_BUILD ?? '').trim())) {
  console.log('emorl: EMORL_NATIVE_BUILD=0, not building the native addon (the TypeScript path will be used)');
  process.exit(0);
}

function fail(why) {
  const msg = `emorl: the native addon was not built (${why}).`;
  if (required) {
    console.error(`\n${msg}\nCI=true (or EMORL_NATIVE_REQUIRED=1): failing the install.\n`);
    process.exit(1);
  }
  console.warn(
    `\n*** WARNING: ${msg}\n` +
      '*** emorl still works on its pure-TypeScript path, only slower. To build the addon, install\n' +
      '*** cmake (>= 3.18) and a C++17 compiler, then run `npm run build:native`.\n',
  );
  process.exit(0);
}

let cmakeJs;
try {
  cmakeJs = require.resolve('cmake-js/bin/cmake-js', { paths: [root] });
} catch {
  fail('the cmake-js package is not installed');
}
const args = [cmakeJs, 'compile', '--out', 'build', '--config', 'Release'];
const jobs = Number(process.env.EMORL_BUILD_JOBS) || require('node:os').availableParallelism?.() || 2;
args.push('--parallel', String(jobs));
const r = spawnSync(process.execPath, args, { cwd: root, stdio: 'inherit' });
if (r.error) fail(r.error.message);
if (r.status !== 0) fail(`cmake-js exited with status ${r.status}; see the output above`);
console.log('emorl: built build/Release/emorl_native.node');
