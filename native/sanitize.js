#!/usr/bin/env node
// `npm run test:sanitize`: builds the addon with AddressSanitizer + UndefinedBehaviorSanitizer
// into build-sanitize/ (the normal build/ is left alone) and runs the tests that exercise the
// addon against it. node itself is not instrumented, so the sanitizer runtimes are preloaded;
// leak detection is off (V8 keeps memory to the end by design), any other report fails the run.
'use strict';
const { spawnSync, execFileSync } = require('node:child_process');
const fs = require('node:fs');
const path = require('node:path');

const root = path.resolve(__dirname, '..');
const cmakeJs = require.resolve('cmake-js/bin/cmake-js', { paths: [root] });
const jobs = String(Number(process.env.EMORL_BUILD_JOBS) || require('node:os').availableParallelism?.() || 2);
let r = spawnSync(process.execPath, [cmakeJs, 'compile', '--out', 'build-sanitize', '--config', 'Release', '--parallel', jobs], {
  cwd: root,
  stdio: 'inherit',
  env: { ...process.env, EMORL_SANITIZE: '1', EMORL_CUDA: '0' },
});
if (r.status !== 0) process.exit(r.status ?? 1);
const addon = path.join(root, 'build-sanitize', 'Release', 'emorl_native.node');
if (!fs.existsSync(addon)) throw new Error(`${addon} was not built`);

const runtime = (lib) => execFileSync(process.env.CXX || 'g++', [`-print-file-name=${lib}`], { encoding: 'utf8' }).trim();
const preload = [runtime('libasan.so'), runtime('libubsan.so')];
for (const f of preload) if (!fs.existsSync(f)) throw new Error(`sanitizer runtime ${f} not found (install the compiler's libasan / libubsan)`);
const tests = process.argv.slice(2).length ? process.argv.slice(2) : ['test/native-kernels.test.ts', 'test/decoder-stage.test.ts', 'test/model-native.test.ts', 'test/gpu-decoder.test.ts', 'test/bf16.test.ts', 'test/winograd.test.ts', 'test/device-optimizer.test.ts'];
r = spawnSync(process.execPath, ['--experimental-vm-modules', 'node_modules/jest/bin/jest.js', '--runInBand', ...tests], {
  cwd: root,
  stdio: 'inherit',
  env: {
    ...process.env,
    EMORL_NATIVE_PATH: addon,
    LD_PRELOAD: preload.join(':'),
    ASAN_OPTIONS: 'detect_leaks=0:halt_on_error=1:abort_on_error=1',
    UBSAN_OPTIONS: 'halt_on_error=1:print_stacktrace=1',
  },
});
process.exit(r.status ?? 1);
