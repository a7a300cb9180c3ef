/**
 * `npm run bench -- native`: the native conv kernels (forward, input gradient, filter gradient)
 * on the encoder's layers and on the STACK.md reference layer, against the tfjs `cpu` backend's
 * kernels (Conv2D, Conv2DBackpropInput, Conv2DBackpropFilter called directly, NHWC). tfjs runs at
 * ~1 GFLOP/s (its filter gradient far slower), so it is timed on a small batch and scaled.
 *
 * Options: --reps N (native repetitions, default 5), --tfjs-batch N (default 1), --device cuda:N
 * (the decoding stage's GPU run, default cuda:0; skipped without CUDA),
 * --no-tfjs (native only), --tfjs-filter (also time tfjs' filter gradient on the big layers: slow).
 * The machine may be shared: the load average is printed with the results.
 */
import * as os from 'node:os';

import { tf, initBackend } from '../lib/tf';
import { nativeKernels, nativeStatus, conv2dOutputShape, Shape4 } from '../lib/native';
import { addonOps, type DecoderStageLayer } from '../lib/ops/addon';

interface Layer {
  name: string;
  x: Shape4;
  w: Shape4; // [out, in, kh, kw]
  pad: number;
}

const LAYERS: Layer[] = [
  { name: 'encoder conv1 [32,3,35,35] -> 64, 5x5 pad 2', x: [32, 3, 35, 35], w: [64, 3, 5, 5], pad: 2 },
  { name: 'encoder conv2 [32,64,35,35] -> 64, 5x5 pad 2', x: [32, 64, 35, 35], w: [64, 64, 5, 5], pad: 2 },
  { name: 'STACK.md layer [128,32,41,41] -> 32, 5x5 valid', x: [128, 32, 41, 41], w: [32, 32, 5, 5], pad: 0 },
];

function arg(name: string, dflt: number): number {
  const i = process.argv.indexOf(name);
  return i >= 0 && i + 1 < process.argv.length ? Number(process.argv[i + 1]) : dflt;
}
const REPS = arg('--reps', 5);
const TFJS_BATCH = arg('--tfjs-batch', 1);
const NO_TFJS = process.argv.includes('--no-tfjs');
const TFJS_FILTER = process.argv.includes('--tfjs-filter');

function rand(n: number, scale = 1): Float32Array {
  const a = new Float32Array(n);
  for (let i = 0; i < n; i++) a[i] = (Math.random() * 2 - 1) * scale;
  return a;
}

interface Timing {
  best: number; // wall seconds, best run
  median: number; // wall seconds, median run
  cpu: number; // process CPU seconds (user + system, all threads) per run, mean
}

/** Wall and CPU time over `reps` runs after one warm-up. On a shared machine the CPU time is the
 *  steadier figure (the wall time includes waiting for a core). */
function time(fn: () => unknown, reps: number): Timing {
  fn();
  const ts: number[] = [];
  const c0 = process.cpuUsage();
  for (let i = 0; i < reps; i++) {
    const t0 = process.hrtime.bigint();
    fn();
    ts.push(Number(process.hrtime.bigint() - t0) / 1e9);
  }
  const c = process.cpuUsage(c0);
  ts.sort((a, b) => a - b);
  return { best: ts[0], median: ts[Math.floor(ts.length / 2)], cpu: (c.user + c.system) / 1e6 / reps };
}

const fmt = (v: number, d = 1) => (Number.isFinite(v) ? v.toFixed(d) : '-');

async function main(): Promise<void> {
  const st = nativeStatus();
  if (!st.available) {
    console.log(`native addon not available: ${st.reason}`);
    return;
  }
  await initBackend('cpu');
  const K = nativeKernels();
  console.log(`native: gemm ${st.info!.gemmIsa}, ${st.info!.threads} threads (OpenMP ${st.info!.openmp}); ` +
    `${os.cpus().length} cpus, load average ${os.loadavg().map((l) => l.toFixed(2)).join(' ')}`);
  console.log(`tfjs cpu backend timed at batch ${TFJS_BATCH} and scaled to the full batch${NO_TFJS ? ' (skipped)' : ''}\n`);

  const header = ['pass', 'best ms', 'median ms', 'GFLOP/s', 'CPU ms', 'GFLOP/CPU-s', 'tfjs GFLOP/s', 'native/tfjs'];
  for (const L of LAYERS) {
    const y = conv2dOutputShape(L.x, L.w, 1, L.pad);
    const flops = 2 * y[0] * y[1] * y[2] * y[3] * L.w[1] * L.w[2] * L.w[3]; // per pass
    const x = rand(L.x.reduce((a, b) => a * b)), w = rand(L.w.reduce((a, b) => a * b), 0.1);
    const b = rand(L.w[0], 0.1), dy = rand(y.reduce((a, c) => a * c));
    const opts = { stride: 1, pad: L.pad };
    // Outputs go to reused buffers, as in a training loop that pools them (a fresh 10-80 MB
    // array per call costs page faults: see the 'forward, new array' row).
    const yOut = new Float32Array(dy.length), dxOut = new Float32Array(x.length);
    const nat = {
      forward: time(() => K.conv2d(x, L.x, w, L.w, b, { ...opts, out: yOut }), REPS),
      'forward, new array': time(() => K.conv2d(x, L.x, w, L.w, b, opts), REPS),
      'input grad': time(() => K.conv2dBackwardInput(dy, y, w, L.w, L.x, { ...opts, out: dxOut }), REPS),
      'filter grad': time(() => K.conv2dBackwardFilter(x, L.x, dy, y, L.w, { ...opts, withBias: true }), REPS),
    };

    // tfjs on a small batch: its kernels in NHWC with filters [kh, kw, in, out].
    const tfj: Record<string, number> = {};
    if (!NO_TFJS) {
      const nb = Math.min(TFJS_BATCH, L.x[0]);
      const scale = L.x[0] / nb;
      const xs = tf.tensor4d(x.subarray(0, nb * L.x[1] * L.x[2] * L.x[3]), [nb, L.x[1], L.x[2], L.x[3]]).transpose([0, 2, 3, 1]).clone() as tf.Tensor4D;
      const ws = tf.tensor4d(w, L.w).transpose([2, 3, 1, 0]).clone() as tf.Tensor4D;
      const dys = tf.tensor4d(dy.subarray(0, nb * y[1] * y[2] * y[3]), [nb, y[1], y[2], y[3]]).transpose([0, 2, 3, 1]).clone() as tf.Tensor4D;
      const strides: [number, number] = [1, 1];
      const pad = L.pad === 0 ? 'valid' : ([[0, 0], [L.pad, L.pad], [L.pad, L.pad], [0, 0]] as [[number, number], [number, number], [number, number], [number, number]]);
      const reps = 1;
      const run = (f: () => tf.Tensor) => time(() => { const r = f(); r.dataSync(); r.dispose(); }, reps).best * scale;
      tfj.forward = run(() => tf.conv2d(xs, ws, strides, pad));
      tfj['input grad'] = run(() => tf.engine().runKernel('Conv2DBackpropInput', { dy: dys, filter: ws },
        { strides, pad, dataFormat: 'NHWC', inputShape: xs.shape }) as tf.Tensor);
      if (TFJS_FILTER || L.w[1] <= 3) {
        tfj['filter grad'] = run(() => tf.engine().runKernel('Conv2DBackpropFilter', { x: xs, dy: dys },
          { strides, pad, dataFormat: 'NHWC', filterShape: ws.shape }) as tf.Tensor);
      }
      tf.dispose([xs, ws, dys]);
    }

    console.log(`${L.name}: ${fmt(flops / 1e9, 2)} GFLOP per pass`);
    const rows: string[][] = [header];
    let tot = 0;
    let totCpu = 0;
    let totTf = 0;
    for (const [pass, t] of Object.entries(nat)) {
      const tf1 = tfj[pass.replace(', new array', '')] ?? NaN;
      if (!pass.includes('new array')) {
        tot += t.best;
        totCpu += t.cpu;
        totTf += tf1;
      }
      rows.push([pass, fmt(t.best * 1e3), fmt(t.median * 1e3), fmt(flops / t.best / 1e9), fmt(t.cpu * 1e3),
        fmt(flops / t.cpu / 1e9), fmt(flops / tf1 / 1e9, 2), fmt(tf1 / t.best, 0) + 'x']);
    }
    rows.push(['fwd+both grads', fmt(tot * 1e3), '', fmt((3 * flops) / tot / 1e9), fmt(totCpu * 1e3),
      fmt((3 * flops) / totCpu / 1e9), fmt((3 * flops) / totTf / 1e9, 2), fmt(totTf / tot, 0) + 'x']);
    const widths = header.map((_, i) => Math.max(...rows.map((r) => r[i].length)));
    for (const r of rows) console.log('  ' + r.map((c, i) => (i === 0 ? c.padEnd(widths[i]) : c.padStart(widths[i]))).join('  '));
    nhwcRows(L, x, w, b, dy, flops);
    console.log('');
  }
  // The GEMM core through matmul (tfjs matMul on the same shapes, fewer repetitions).
  console.log('matmul (the same GEMM core)');
  const mrows: string[][] = [['shape', 'best ms', 'GFLOP/s', 'CPU ms', 'GFLOP/CPU-s', 'tfjs GFLOP/s', 'native/tfjs']];
  for (const [batch, M, N, Kd, ta, tb] of [[1, 1024, 1024, 1024, false, false], [1, 1024, 1024, 1024, true, true],
    [64, 128, 128, 128, false, false]] as [number, number, number, number, boolean, boolean][]) {
    const as = batch > 1 ? [batch, ta ? Kd : M, ta ? M : Kd] : [ta ? Kd : M, ta ? M : Kd];
    const bs = batch > 1 ? [batch, tb ? N : Kd, tb ? Kd : N] : [tb ? N : Kd, tb ? Kd : N];
    const A = rand(batch * M * Kd), B = rand(batch * Kd * N), C = new Float32Array(batch * M * N);
    const flops = 2 * batch * M * N * Kd;
    const t = time(() => K.matmul(A, as, B, bs, { transA: ta, transB: tb, out: C }), REPS);
    let tfs = NaN;
    if (!NO_TFJS) {
      const at = tf.tensor(A, as), bt = tf.tensor(B, bs);
      tfs = time(() => { const r = tf.matMul(at, bt, ta, tb); r.dataSync(); r.dispose(); }, 1).best;
      tf.dispose([at, bt]);
    }
    mrows.push([`${batch > 1 ? batch + 'x' : ''}${M}x${Kd} . ${Kd}x${N}${ta ? ' tA' : ''}${tb ? ' tB' : ''}`,
      fmt(t.best * 1e3), fmt(flops / t.best / 1e9), fmt(t.cpu * 1e3), fmt(flops / t.cpu / 1e9), fmt(flops / tfs / 1e9, 2),
      fmt(tfs / t.best, 0) + 'x']);
  }
  const mw = mrows[0].map((_, i) => Math.max(...mrows.map((r) => r[i].length)));
  for (const r of mrows) console.log('  ' + r.map((c, i) => (i === 0 ? c.padEnd(mw[i]) : c.padStart(mw[i]))).join('  '));
  console.log('');

  decoderStageBench();

  const rss = process.resourceUsage().maxRSS / 1024;
  console.log(`peak RSS ${fmt(rss, 0)} MB`);
}

/**
 * The same layer on the model's path: the NHWC kernels (implicit GEMM where the channels allow),
 * in fp32 and, where the addon has it, precision bf16 (against twice the FMA peak on AVX512_BF16).
 */
function nhwcRows(L: (typeof LAYERS)[number], x: Float32Array, w: Float32Array, b: Float32Array, dy: Float32Array, flops: number): void {
  const k = addonOps();
  const [N, C, H, W] = L.x;
  const xs = [N, H, W, C], st = [1, 1], pd = [L.pad, L.pad], lin = [0];
  const bf16 = nativeStatus().info!.bf16;
  const out: string[] = [];
  for (const precision of bf16 ? (['fp32', 'bf16'] as const) : (['fp32'] as const)) {
    const fwd = time(() => k.nhwcConv2d(x, xs, w, L.w, b, st, pd, lin, 'cpu', null, precision), REPS);
    const dx = time(() => k.nhwcConv2dBackward(x, xs, w, L.w, null, dy, st, pd, lin, true, false, 'cpu', null, precision), REPS);
    const dw = time(() => k.nhwcConv2dBackward(x, xs, w, L.w, null, dy, st, pd, lin, false, true, 'cpu', null, precision), REPS);
    out.push(`${precision} forward ${fmt(flops / fwd.best / 1e9, 0)}, input grad ${fmt(flops / dx.best / 1e9, 0)}, filter grad ${fmt(flops / dw.best / 1e9, 0)}`);
  }
  console.log(`  NHWC (the model's kernels), GFLOP/s: ${out.join('; ')}${bf16 ? ` (bf16: ${bf16})` : ''}${winogradNote()}`);
}

/**
 * With Winograd on (info().convAlgo), a stride-1 3x3 / 5x5 layer does fewer multiply-adds than the
 * direct count these rates use: they are direct-equivalent and can exceed the FMA peak.
 * `EMORL_CONV_ALGO=direct npm run bench -- native` gives the direct kernels' rates.
 */
function winogradNote(): string {
  return nativeStatus().info!.convAlgo === 'winograd' ? ' [direct-equivalent: Winograd on]' : '';
}

/**
 * One decoding stage of the Tetrominoes config at batch 32 (128 slots: the broadcast 5x5 layer by
 * tap classes, two 5x5 32->32 convs, a 3x3 conv to 4 channels, the fused likelihood), as the model
 * runs it: forward only (inference's last stage), forward + d/dz (inference's refinement stages),
 * forward + every gradient (training). FLOPs count the convolutions' multiply-adds (forward F;
 * d/dz adds F, the weight gradient another F). The peak is the addon's FMA probe on all threads.
 */
function decoderStageBench(): void {
  const addon = addonOps();
  const n = 128, c = 32, gh = 41, gw = 41, B = 32, Kslots = 4, H = 35, W = 35, C = 3;
  const conv = (cin: number, cout: number, k: number, act: number): DecoderStageLayer =>
    ({ kind: 2, w: rand(cout * cin * k * k, 0.05), wShape: [cout, cin, k, k], b: rand(cout, 0.01), pad: 1, act });
  const layers: DecoderStageLayer[] = [
    { kind: 0, w: rand(c * 32 * 25, 0.05), wShape: [32, c, 5, 5], b: rand(32, 0.01), pad: 1, act: 1 },
    conv(32, 32, 5, 1), conv(32, 32, 5, 1), conv(32, 4, 3, 0),
  ];
  const target = rand(B * H * W * C).map(Math.abs);
  const spec = { z: rand(n * c), n, c, pos: rand(gh * gw * c), gh, gw, layers, target, B, K: Kslots, H, W, C, logVar: -2.4, gmm: false, needDz: false, needParams: false, needOutputs: false };
  // the convolutions after the broadcast layer (whose per-class products are negligible)
  const F = n * 2 * (37 * 37 * 32 * 32 * 25 + 35 * 35 * 32 * 32 * 25 + 35 * 35 * 4 * 32 * 9);
  const peak = addon.peakGflops(0.5);
  console.log(`decoder stage, Tetrominoes config at batch 32 (${n} slots): ${fmt(F / 1e9, 1)} GFLOP forward; FMA peak of ${nativeStatus().info!.threads} threads ${fmt(peak, 0)} GFLOP/s${winogradNote()}`);
  // precision bf16: against twice the FMA peak where the bf16 dot products run (AVX512_BF16 does
  // two products per lane per instruction at the FMA rate); an emulated kernel is only listed.
  const bf16 = nativeStatus().info!.bf16;
  if (bf16) console.log(`  bf16 rows: the convolutions in mixed precision (${bf16}${bf16 === 'avx512bf16' ? `; % of the bf16 peak, ${fmt(2 * peak, 0)} GFLOP/s` : ''})`);
  const rows: string[][] = [['pass', 'best ms', 'median ms', 'GFLOP/s', '% of peak', 'GFLOP/CPU-s']];
  for (const precision of bf16 ? (['fp32', 'bf16'] as const) : (['fp32'] as const)) {
    const top = precision === 'bf16' && bf16 === 'avx512bf16' ? 2 * peak : peak;
    for (const [name, needDz, needParams, mult] of [['forward', false, false, 1], ['forward + d/dz', true, false, 2], ['forward + all gradients', true, true, 3]] as [string, boolean, boolean, number][]) {
      const t = time(() => addon.decoderStage({ ...spec, needDz, needParams, precision }), Math.max(2, Math.min(REPS, 3)));
      const flops = mult * F;
      rows.push([precision === 'bf16' ? `${name} (bf16)` : name, fmt(t.best * 1e3), fmt(t.median * 1e3), fmt(flops / t.best / 1e9), fmt((100 * flops) / t.best / 1e9 / top), fmt(flops / t.cpu / 1e9)]);
    }
  }
  const w = rows[0].map((_, i) => Math.max(...rows.map((r) => r[i].length)));
  for (const r of rows) console.log('  ' + r.map((x, i) => (i === 0 ? x.padEnd(w[i]) : x.padStart(w[i]))).join('  '));
  console.log('');
  gpuStageBench(spec, F);
}

/**
 * The same stage on CUDA device --device N (default 0) when the addon has CUDA and the device is
 * there: the three passes against the device's measured FP32 FMA peak, then one profiled run's
 * time per phase (synchronised around each phase; transfers included).
 */
function gpuStageBench(spec: Parameters<ReturnType<typeof addonOps>['decoderStage']>[0], F: number): void {
  const info = nativeStatus().info!;
  const i = process.argv.indexOf('--device');
  const name = i >= 0 ? process.argv[i + 1] ?? '' : 'cuda:0';
  if (!/^cuda:\d+$/.test(name)) {
    console.log(`decoder stage on a GPU: skipped (--device ${name}: give cuda:N)\n`);
    return;
  }
  const index = Number(name.slice(5));
  if (!info.cudaBuilt || info.cudaDevices <= index) {
    console.log(`decoder stage on cuda:${index}: skipped (${info.cudaBuilt ? `${info.cudaDevices} CUDA devices${info.cudaError ? `: ${info.cudaError}` : ''}` : 'addon built without CUDA: EMORL_CUDA=1 npm run build:native'})\n`);
    return;
  }
  const addon = addonOps();
  const device = `cuda:${index}` as const;
  const workspace = new addon.DecoderWorkspace();
  const peak = addon.gpuPeakGflops(index, 1);
  console.log(`decoder stage on ${device}: FP32 FMA peak ${fmt(peak, 0)} GFLOP/s (measured); times include uploading z, pos, weights and targets and downloading the results`);
  const rows: string[][] = [['pass', 'best ms', 'median ms', 'GFLOP/s', '% of peak']];
  for (const [name, needDz, needParams, mult] of [['forward', false, false, 1], ['forward + d/dz', true, false, 2], ['forward + all gradients', true, true, 3]] as [string, boolean, boolean, number][]) {
    const t = time(() => addon.decoderStage({ ...spec, needDz, needParams, device, workspace }), 20);
    const flops = mult * F;
    rows.push([name, fmt(t.best * 1e3, 2), fmt(t.median * 1e3, 2), fmt(flops / t.best / 1e9, 0), fmt((100 * flops) / t.best / 1e9 / peak)]);
  }
  const w = rows[0].map((_, i) => Math.max(...rows.map((r) => r[i].length)));
  for (const r of rows) console.log('  ' + r.map((x, i) => (i === 0 ? x.padEnd(w[i]) : x.padStart(w[i]))).join('  '));
  const prof = addon.decoderStage({ ...spec, needDz: true, needParams: true, device, workspace, profile: true }).profile!;
  console.log('  one training stage by phase (ms):');
  for (const [phase, ms] of Object.entries(prof)) console.log(`    ${phase.padEnd(60)} ${fmt(ms, 3).padStart(9)}`);
  console.log('');
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
