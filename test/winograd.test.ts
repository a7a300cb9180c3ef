/**
 * Winograd convolution (lib/ops/winograd.ts, native/nhwc.cc): the float64 reference of the
 * algorithm equals a direct sum (so the transform matrices are right), and the addon's fp32
 * Winograd convolutions equal the direct sums within fp32 rounding: every tile position (edges cut
 * short), padding 0-3, both kernel sizes, ReLU and ELU with bias, the stride-1 input gradient that
 * runs through it and the filter gradient (by the transforms' adjoints), the same results in
 * precision bf16, and Winograd switched off
 * (EMORL_CONV_ALGO=direct) in a child process. Skipped, with a notice, when the addon is not built.
 */
import { execFileSync } from 'node:child_process';
import { tf, initBackend } from '../lib/tf';
import { nativeStatus } from '../lib/native';
import { addonOps } from '../lib/ops/addon';
import { nativeOpsAvailable } from '../lib/ops/native';
import { gemmVectorWidth, winogradConv2dReference, winogradTakes } from '../lib/ops/winograd';
import { expectRelClose, uniform, wrap } from './helpers';

const st = nativeStatus();
const available = st.available && nativeOpsAvailable() && st.info?.convAlgo !== undefined;
if (!available) {
  // eslint-disable-next-line no-console
  console.warn(`winograd tests SKIPPED: ${st.reason ?? 'the addon predates its Winograd convolutions (npm run build:native)'}`);
}
const describeAddon = available ? describe : describe.skip;

beforeAll(async () => {
  await initBackend('cpu');
});

const size = (s: readonly number[]) => s.reduce((a, b) => a * b, 1);

/**
 * Every product of a stride-1 correlation with zero padding pad: visit(xi, wi, yi) for each input
 * cell and channel (xi, NHWC), weight (wi, [Co, C, r, r]) and output cell and channel (yi, NHWC)
 * that meet.
 */
function forEachProduct([n, h, w, c]: number[], [co, , r]: number[], pad: number, visit: (xi: number, wi: number, yi: number) => void): void {
  const ho = h + 2 * pad - r + 1, wo = w + 2 * pad - r + 1;
  for (let b = 0; b < n; b++)
    for (let oy = 0; oy < ho; oy++)
      for (let ox = 0; ox < wo; ox++)
        for (let o = 0; o < co; o++)
          for (let ky = 0; ky < r; ky++) {
            const iy = oy - pad + ky;
            if (iy < 0 || iy >= h) continue;
            for (let kx = 0; kx < r; kx++) {
              const ix = ox - pad + kx;
              if (ix < 0 || ix >= w) continue;
              for (let i = 0; i < c; i++) visit(((b * h + iy) * w + ix) * c + i, ((o * c + i) * r + ky) * r + kx, ((b * ho + oy) * wo + ox) * co + o);
            }
          }
}

/** The direct correlation in float64: x NHWC, w [Co, C, r, r], stride 1, zero padding pad. */
function directConv(x: ArrayLike<number>, xs: number[], wt: ArrayLike<number>, ws: number[], pad: number): Float64Array {
  const [n, h, w] = xs, [co, , r] = ws;
  const y = new Float64Array(n * (h + 2 * pad - r + 1) * (w + 2 * pad - r + 1) * co);
  forEachProduct(xs, ws, pad, (xi, wi, yi) => (y[yi] += x[xi] * wt[wi]));
  return y;
}

describe('the Winograd algorithm (float64 reference)', () => {
  test.each([
    [[2, 9, 7, 3], [2, 3, 5, 5], 1],
    [[1, 8, 13, 2], [3, 2, 3, 3], 0],
    [[1, 5, 6, 2], [2, 2, 5, 5], 3],
  ])('x %j, w %j, pad %d: equals the direct sum', (xs, ws, pad) => {
    const x = uniform(size(xs), 1), w = uniform(size(ws), 2);
    const { y, shape } = winogradConv2dReference(x, xs, w, ws, pad);
    expectRelClose(wrap(y, shape), wrap(directConv(x, xs, w, ws, pad), shape), 1e-12, 'y');
  });

  test('which convolutions it takes', () => {
    expect(winogradTakes(32, 32, 5, 1, 16)).toBe(true);
    expect(winogradTakes(64, 64, 3, 1, 16)).toBe(true);
    expect(winogradTakes(32, 32, 5, 2, 16)).toBe(false); // strided
    expect(winogradTakes(32, 32, 4, 1, 16)).toBe(false); // kernel size
    expect(winogradTakes(3, 32, 5, 1, 16)).toBe(false); // RGB input
    expect(winogradTakes(24, 32, 5, 1, 16)).toBe(false);
    expect(winogradTakes(24, 32, 5, 1, 8)).toBe(true); // AVX2
    expect(winogradTakes(32, 4, 3, 1, 4)).toBe(false); // the RGB + mask output
  });
});

describeAddon('the addon\'s Winograd convolutions', () => {
  const width = () => gemmVectorWidth(st.info!.gemmIsa);

  // [x NHWC, w [Co, C, r, r], pad, act (0 linear, 1 ReLU, 2 ELU)]; the sizes leave partial tiles
  const cases: [number[], number[], number, number][] = [
    [[2, 41, 41, 32], [32, 32, 5, 5], 1, 1], // the Tetrominoes decoder's second layer (39 -> 37: 10 tiles, the last cut to 1)
    [[1, 11, 9, 16], [48, 16, 5, 5], 2, 2],
    [[3, 7, 10, 64], [16, 64, 3, 3], 1, 0],
    [[1, 14, 13, 32], [32, 32, 3, 3], 0, 2],
    [[1, 6, 6, 16], [16, 16, 5, 5], 3, 1], // padding beyond the kernel's reach
  ];
  test.each(cases)('x %j, w %j, pad %d, act %d: values, input and filter gradients within fp32 rounding of the direct sums', (xs, ws, pad, act) => {
    const k = addonOps();
    const [N, H, W, C] = xs;
    const [Co, , r] = ws;
    expect(winogradTakes(C, Co, r, 1, width())).toBe(true);
    const x = uniform(size(xs), 3), w = uniform(size(ws), 4, -0.2, 0.2), b = uniform(Co, 5, -0.1, 0.1);
    const y = k.nhwcConv2d(x, xs, w, ws, b, [1, 1], [pad, pad], [act]);
    const Ho = H + 2 * pad - r + 1, Wo = W + 2 * pad - r + 1;
    const direct = directConv(x, xs, w, ws, pad);
    const want = direct.map((v, i) => {
      const p = v + b[i % Co];
      return act === 1 ? Math.max(p, 0) : act === 2 ? (p > 0 ? p : Math.expm1(p)) : p;
    });
    expectRelClose(wrap(y, [N, Ho, Wo, Co]), wrap(want, [N, Ho, Wo, Co]), 2e-5, 'y');
    // the filter gradient takes Winograd too; the stride-1 input gradient is a forward convolution
    // (Co -> C) and does where that one fits
    const dy = uniform(y.length, 6);
    const g = k.nhwcConv2dBackward(x, xs, w, ws, act ? y : null, dy, [1, 1], [pad, pad], [act], true, true);
    const G = dy.map((d, i) => (act === 0 || y[i] > 0 ? d : act === 1 ? 0 : d * (y[i] + 1)));
    const dwRef = new Float64Array(size(ws)), dbRef = new Float64Array(Co);
    forEachProduct(xs, ws, pad, (xi, wi, yi) => (dwRef[wi] += G[yi] * x[xi]));
    G.forEach((v, i) => (dbRef[i % Co] += v));
    expectRelClose(wrap(g.dw!, ws), wrap(dwRef, ws), 2e-5, 'dw');
    expectRelClose(wrap(g.db!, [Co]), wrap(dbRef, [Co]), 1e-5, 'db');
    tf.tidy(() => {
      const conv = (xt: tf.Tensor4D) => tf.conv2d(xt, tf.tensor4d(w, ws as [number, number, number, number]).transpose([2, 3, 1, 0]) as tf.Tensor4D, 1, [[0, 0], [pad, pad], [pad, pad], [0, 0]]);
      const [dxRef] = tf.grads((xt: tf.Tensor) => conv(xt as tf.Tensor4D))([tf.tensor4d(x, xs as [number, number, number, number])], tf.tensor4d(G, [N, Ho, Wo, Co]));
      expectRelClose(wrap(g.dx!, xs), dxRef, 2e-5, 'dx');
    });
  });

  test('precision bf16 leaves a Winograd convolution in fp32: the same numbers bit for bit', () => {
    const k = addonOps();
    const xs = [2, 12, 11, 32], ws = [32, 32, 5, 5];
    const x = uniform(size(xs), 7), w = uniform(size(ws), 8, -0.2, 0.2), b = uniform(32, 9);
    const y32 = k.nhwcConv2d(x, xs, w, ws, b, [1, 1], [1, 1], [1]);
    const y16 = k.nhwcConv2d(x, xs, w, ws, b, [1, 1], [1, 1], [1], 'cpu', null, 'bf16');
    const same = (a: Float32Array, c: Float32Array) => Buffer.from(a.buffer, a.byteOffset, a.byteLength).equals(Buffer.from(c.buffer, c.byteOffset, c.byteLength));
    expect(same(y16, y32)).toBe(true);
    const dy = uniform(y32.length, 10);
    const g32 = k.nhwcConv2dBackward(x, xs, w, ws, y32, dy, [1, 1], [1, 1], [1], true, true);
    const g16 = k.nhwcConv2dBackward(x, xs, w, ws, y32, dy, [1, 1], [1, 1], [1], true, true, 'cpu', null, 'bf16');
    expect(same(g16.dx!, g32.dx!) && same(g16.dw!, g32.dw!) && same(g16.db!, g32.db!)).toBe(true);
  });

  test('EMORL_CONV_ALGO=direct switches it off (info().convAlgo), with results within fp32 rounding', () => {
    expect(st.info!.convAlgo).toBe(process.env.EMORL_CONV_ALGO === 'direct' ? 'direct' : 'winograd');
    const run = `(k, uniform) => {
      const xs = [2, 15, 13, 32], ws = [32, 32, 5, 5];
      const n = (s) => s.reduce((a, b) => a * b, 1);
      const y = k.nhwcConv2d(uniform(n(xs), 10), xs, uniform(n(ws), 11, -0.2, 0.2), ws, uniform(32, 12), [1, 1], [2, 2], [0]);
      return Array.from(y);
    }`;
    const script = `const k = require(${JSON.stringify(st.path)}); ${uniform.toString()}
      process.stdout.write(JSON.stringify([k.info().convAlgo, (${run})(k, uniform)]));`;
    const [algo, direct] = JSON.parse(execFileSync(process.execPath, ['-e', script], { env: { ...process.env, EMORL_CONV_ALGO: 'direct' }, encoding: 'utf8', maxBuffer: 1 << 26 })) as [string, number[]];
    expect(algo).toBe('direct');
    // eslint-disable-next-line no-new-func
    const here = (new Function(`return ${run}`)() as (k: unknown, u: typeof uniform) => number[])(addonOps(), uniform);
    expect(here.length).toBe(direct.length);
    expectRelClose(wrap(here, [here.length]), wrap(direct, [direct.length]), 2e-5, 'winograd vs direct');
    if (st.info!.convAlgo === 'winograd') expect(here.some((v, i) => v !== direct[i])).toBe(true); // a different summation
  });
});
