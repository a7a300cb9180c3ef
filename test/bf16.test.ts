/**
 * Precision 'bf16' (native/bf16.h, native/nhwc.h): the addon's mixed-precision convolutions
 * against tfjs on bf16-rounded operands (the same math: each product of two bf16 is exact in fp32,
 * so only the order of the fp32 sums differs), for every path (implicit-GEMM forward and filter
 * gradient, odd channel counts, strided, narrow outputs that stay fp32, partial register tiles);
 * the rounding itself bit for bit; the portable emulation against the CPU's AVX512_BF16
 * instructions bit for bit (when the CPU has them); the decoding stage and the ops in bf16; and
 * the argument checks. Skipped, with a notice, when the addon is not built.
 */
import { execFileSync } from 'node:child_process';
import { tf, initBackend } from '../lib/tf';
import { nativeStatus } from '../lib/native';
import { addonOps, type DecoderStageSpec } from '../lib/ops/addon';
import { bf16Coverage, roundToBf16 } from '../lib/ops/bf16';
import { gemmVectorWidth } from '../lib/ops/winograd';
import { nativeOpsAvailable, nativeOpsOn, opsForBackend } from '../lib/ops/native';
import { expectRelClose, uniform, wrap } from './helpers';

const st = nativeStatus();
const available = st.available && nativeOpsAvailable() && st.info?.bf16 !== undefined;
if (!available) {
  // eslint-disable-next-line no-console
  console.warn(`bf16 tests SKIPPED: ${st.reason ?? 'the addon predates precision bf16 (npm run build:native)'}`);
}
const describeBf16 = available ? describe : describe.skip;
/** The addon's vector width when its Winograd convolutions are on (bf16Coverage). */
const winogradWidth = st.info?.convAlgo === 'winograd' ? gemmVectorWidth(st.info.gemmIsa) : null;

beforeAll(async () => {
  await initBackend('cpu');
});

const bits = (x: number): number => new Uint32Array(new Float32Array([x]).buffer)[0];
const fromBits = (u: number): number => new Float32Array(new Uint32Array([u]).buffer)[0];

/** max |a − b| over max |b|: how far apart two results are. */
function relDistance(a: Float32Array, b: Float32Array): number {
  let e = 0, m = 0;
  for (let i = 0; i < a.length; i++) {
    e = Math.max(e, Math.abs(a[i] - b[i]));
    m = Math.max(m, Math.abs(b[i]));
  }
  return e / m;
}

test('roundToBf16: nearest, ties to even, denormals to signed zero, NaN and overflow', () => {
  const cases: [number, number][] = [
    [0x3f800000, 0x3f800000], // 1
    [0x3f808000, 0x3f800000], // 1 + 2^-8: a tie, to the even 1
    [0x3f818000, 0x3f820000], // a tie, to the even neighbour above
    [0x3f808001, 0x3f810000], // just above the tie: up
    [0xbf80ffff, 0xbf810000], // negative: up in magnitude
    [0x00400000, 0x00000000], // denormal: +0
    [0x80000001, 0x80000000], // negative denormal: -0
    [0x7f7fffff, 0x7f800000], // the largest float rounds to +Inf
    [0xff800000, 0xff800000], // -Inf stays
  ];
  const r = roundToBf16(new Float32Array(cases.map(([u]) => fromBits(u))));
  cases.forEach(([, want], i) => expect(bits(r[i]).toString(16)).toBe(want.toString(16)));
  expect(Number.isNaN(roundToBf16(new Float32Array([NaN]))[0])).toBe(true);
});

describeBf16('bf16 convolutions', () => {
  test('a 1x1 convolution with unit weights returns the rounded input bit for bit (the addon rounds as roundToBf16)', () => {
    const k = addonOps();
    const n = 4096;
    const x = uniform(n, 1, -3, 3);
    // ties, denormals and large values among them
    for (let i = 0; i < 64; i++) x[i] = fromBits((0x3f800000 + (i << 15) + (i & 1 ? 0x8000 : 0)) >>> 0);
    for (let i = 64; i < 96; i++) x[i] = fromBits((0x00001234 * i) & 0x807fffff);
    for (let i = 96; i < 128; i++) x[i] = (i - 112) * 3.3e37;
    const Co = 16;
    const y = k.nhwcConv2d(x, [1, 1, n, 1], new Float32Array(Co).fill(1), [Co, 1, 1, 1], new Float32Array(Co), [1, 1], [0, 0], [0], 'cpu', null, 'bf16');
    const r = roundToBf16(x);
    for (let i = 0; i < n; i++) {
      for (const co of [0, Co - 1]) {
        if (bits(y[i * Co + co]) !== bits(r[i])) throw new Error(`x[${i}] = ${x[i]}: addon ${y[i * Co + co]}, roundToBf16 ${r[i]}`);
      }
    }
  });

  // [name, x NHWC, w [Co, C, k, k], stride, pad, act (0 linear, 1 relu, 2 elu)]
  const cases: [string, number[], number[], number, number, number][] = [
    ['a 32 -> 32 layer (4x4: Winograd takes only 3x3 and 5x5), odd output width, ReLU', [2, 9, 9, 32], [32, 32, 4, 4], 1, 1, 1],
    ['a decoder layer (32 -> 32, 5x5: all three products by Winograd, in fp32), ReLU', [2, 9, 9, 32], [32, 32, 5, 5], 1, 1, 1],
    ['an RGB input (3 channels: odd, fewer than a pair tile)', [2, 10, 8, 3], [20, 3, 5, 5], 1, 2, 1],
    ['stride 2, 64 channels, ELU', [2, 9, 10, 64], [16, 64, 3, 3], 2, 1, 2],
    ['4 output channels (the forward stays fp32)', [2, 7, 7, 32], [4, 32, 3, 3], 1, 1, 0],
    ['40 output channels (partial register tiles), no padding', [1, 6, 5, 32], [40, 32, 3, 3], 1, 0, 0],
    ['3 output channels from 64 (the narrow fp32 forward tile)', [1, 5, 6, 64], [3, 64, 3, 3], 1, 1, 0],
    ['1 output channel from 16, ReLU', [2, 6, 5, 16], [1, 16, 3, 3], 1, 1, 1],
  ];
  for (const [name, xs, ws, stride, pad, act] of cases) {
    test(`${name}: values and gradients equal tfjs on bf16-rounded operands`, () => {
      const k = addonOps();
      const [N, H, W, C] = xs;
      const [Co, , kh] = ws;
      const x = uniform(xs.reduce((a, b) => a * b), 11), w = uniform(ws.reduce((a, b) => a * b), 12, -0.2, 0.2), b = uniform(Co, 13, -0.1, 0.1);
      const cov = bf16Coverage(C, Co, kh, stride, pad, winogradWidth);
      const y = k.nhwcConv2d(x, xs, w, ws, b, [stride, stride], [pad, pad], [act], 'cpu', null, 'bf16');
      const y32 = k.nhwcConv2d(x, xs, w, ws, b, [stride, stride], [pad, pad], [act]);
      const Ho = Math.floor((H + 2 * pad - kh) / stride) + 1, Wo = Math.floor((W + 2 * pad - kh) / stride) + 1;
      const ys = [N, Ho, Wo, Co];
      const dy = uniform(y.length, 14);
      const g = k.nhwcConv2dBackward(x, xs, w, ws, act ? y : null, dy, [stride, stride], [pad, pad], [act], true, true, 'cpu', null, 'bf16');
      const g32 = k.nhwcConv2dBackward(x, xs, w, ws, act ? y : null, dy, [stride, stride], [pad, pad], [act], true, true);

      tf.tidy(() => {
        const xr = roundToBf16(x), wr = roundToBf16(w);
        // tfjs: x NHWC, filter [kh, kw, C, Co]
        const t4 = (a: Float32Array, shape: number[]) => tf.tensor4d(a, shape as [number, number, number, number]);
        const convT = (xt: tf.Tensor, wt: tf.Tensor) =>
          tf.conv2d(xt as tf.Tensor4D, wt.transpose([2, 3, 1, 0]) as tf.Tensor4D, stride, [[0, 0], [pad, pad], [pad, pad], [0, 0]]);
        const conv = (xa: Float32Array, wa: Float32Array) => convT(t4(xa, xs), t4(wa, ws));
        const activate = (t: tf.Tensor) => (act === 1 ? tf.relu(t) : act === 2 ? tf.elu(t) : t);
        const yRef = activate(tf.add(cov.forward ? conv(xr, wr) : conv(x, w), tf.tensor1d(b)));
        expectRelClose(wrap(y, ys), yRef, 5e-5, 'y');
        if (cov.forward) expect(relDistance(y, y32)).toBeGreaterThan(1e-4); // it did round
        else expect(relDistance(y, y32)).toBe(0); // the fp32 path itself
        // G = dy · act'(pre-activation), from the output y as the addon takes it
        const G = new Float32Array(dy.length);
        for (let i = 0; i < dy.length; i++) G[i] = act === 0 || y[i] > 0 ? dy[i] : act === 1 ? 0 : dy[i] * (y[i] + 1);
        const grads = (xa: Float32Array, wa: Float32Array, ga: Float32Array) => tf.grads(convT)([t4(xa, xs), t4(wa, ws)], t4(ga, ys));
        const Gr = roundToBf16(G);
        const [dxRef] = cov.inputGrad ? grads(xr, wr, Gr) : grads(x, w, G);
        const [, dwRef] = cov.filterGrad ? grads(xr, wr, Gr) : grads(x, w, G);
        expectRelClose(wrap(g.dx!, xs), dxRef, 5e-5, 'dx');
        expectRelClose(wrap(g.dw!, ws), dwRef, 5e-5, 'dw');
        expectRelClose(wrap(g.db!, [Co]), tf.sum(tf.tensor2d(G, [G.length / Co, Co]), 0), 1e-5, 'db');
        if (cov.inputGrad) expect(relDistance(g.dx!, g32.dx!)).toBeGreaterThan(1e-4);
        else expect(relDistance(g.dx!, g32.dx!)).toBe(0);
        if (cov.filterGrad) expect(relDistance(g.dw!, g32.dw!)).toBeGreaterThan(1e-4);
        else expect(relDistance(g.dw!, g32.dw!)).toBe(0);
      });
    });
  }

  test('the portable emulation equals the AVX512_BF16 instructions bit for bit (every kernel: implicit and packed products, conversions)', () => {
    if (st.info!.bf16 !== 'avx512bf16') {
      // eslint-disable-next-line no-console
      console.warn(`bf16: this CPU has no AVX512_BF16 (kernel ${st.info!.bf16}): the emulation-vs-instructions check is skipped`);
      return;
    }
    // the same computation in a child whose kernel choice is forced to the emulation
    // a 32-channel 4x4 layer (implicit-GEMM forward, input and filter gradients; Winograd does not
    // take 4x4) and an RGB one (odd channels; the filter gradient through packed operands)
    const run = `(k, uniform) => {
      const out = [];
      for (const [xs, ws, pad] of [[[2, 9, 9, 32], [32, 32, 4, 4], 1], [[2, 10, 8, 3], [20, 3, 5, 5], 2]]) {
        const n = (s) => s.reduce((a, b) => a * b, 1);
        const x = uniform(n(xs), 21), w = uniform(n(ws), 22, -0.2, 0.2), b = uniform(ws[0], 23);
        const y = k.nhwcConv2d(x, xs, w, ws, b, [1, 1], [pad, pad], [1], 'cpu', null, 'bf16');
        const g = k.nhwcConv2dBackward(x, xs, w, ws, y, uniform(y.length, 24), [1, 1], [pad, pad], [1], true, true, 'cpu', null, 'bf16');
        for (const a of [y, g.dx, g.dw, g.db]) out.push(Buffer.from(a.buffer, a.byteOffset, a.byteLength).toString('base64'));
      }
      return out;
    }`;
    const script = `const k = require(${JSON.stringify(st.path)}); ${uniform.toString()}
      process.stdout.write(JSON.stringify([k.info().bf16, ...(${run})(k, uniform)]));`;
    const child = JSON.parse(execFileSync(process.execPath, ['-e', script], { env: { ...process.env, EMORL_BF16_ISA: 'emulated' }, encoding: 'utf8' })) as string[];
    expect(child[0]).toBe('emulated');
    // eslint-disable-next-line no-new-func
    const here = (new Function(`return ${run}`)() as (k: unknown, u: typeof uniform) => string[])(addonOps(), uniform);
    expect(here.length).toBe(8);
    here.forEach((h, i) => expect(h).toBe(child[i + 1]));
  });
});

describeBf16('a decoding stage and the ops in bf16', () => {
  /**
   * The Tetrominoes decoder's layers at a small grid (broadcast 5x5, two 5x5 32 -> 32 convs, 3x3 to
   * RGB + mask), with ELU: ReLU's kink turns rounding-sized differences into flipped derivatives.
   */
  function stageSpec(): DecoderStageSpec {
    const n = 6, c = 8, g = 13, B = 3, K = 2, H = 7, W = 7, C = 3;
    const conv = (cin: number, cout: number, kk: number, act: number, seed: number) =>
      ({ kind: 2 as const, w: uniform(cout * cin * kk * kk, seed, -0.15, 0.15), wShape: [cout, cin, kk, kk], b: uniform(cout, seed + 1, -0.05, 0.05), pad: 1, act });
    return {
      z: uniform(n * c, 1), n, c, pos: uniform(g * g * c, 2), gh: g, gw: g,
      layers: [{ kind: 0, w: uniform(32 * c * 25, 3, -0.15, 0.15), wShape: [32, c, 5, 5], b: uniform(32, 4, -0.05, 0.05), pad: 1, act: 2 }, conv(32, 32, 5, 2, 5), conv(32, 32, 5, 2, 7), conv(32, 4, 3, 0, 9)],
      target: uniform(B * H * W * C, 10, 0, 1), B, K, H, W, C, logVar: -2.4, gmm: false, needDz: true, needParams: true, needOutputs: true,
    };
  }

  test('the stage in bf16 is within bf16 rounding of the fp32 stage, and not equal to it', () => {
    const k = addonOps();
    const spec = stageSpec();
    const r16 = k.decoderStage({ ...spec, precision: 'bf16' }), r32 = k.decoderStage(spec);
    expectRelClose(wrap(r16.nll, [spec.B]), wrap(r32.nll, [spec.B]), 1e-2, 'nll');
    expectRelClose(wrap(r16.dz!, [spec.n, spec.c]), wrap(r32.dz!, [spec.n, spec.c]), 2e-2, 'dz');
    expectRelClose(wrap(r16.means!, [r16.means!.length]), wrap(r32.means!, [r32.means!.length]), 2e-2, 'means');
    for (let i = 0; i < spec.layers.length; i++) expectRelClose(wrap(r16.dw[i]!, [r16.dw[i]!.length]), wrap(r32.dw[i]!, [r32.dw[i]!.length]), 3e-2, `dw[${i}]`);
    // the last layer's filter gradient is bf16 products on every CPU (4 outputs: no Winograd, which
    // computes the 32-channel layers in fp32 in either precision)
    const last = spec.layers.length - 1;
    expect(relDistance(r16.dw[last]!, r32.dw[last]!)).toBeGreaterThan(1e-5);
  });

  test('nativeOpsOn(cpu, bf16) computes the convolutions in bf16', () => {
    const ops = nativeOpsOn('cpu', 'bf16');
    expect(ops).toBe(nativeOpsOn('cpu', 'bf16'));
    tf.tidy(() => {
      const x = tf.tensor4d(uniform(2 * 6 * 6 * 32, 31), [2, 6, 6, 32]);
      const w = tf.tensor4d(uniform(32 * 32 * 16, 32, -0.2, 0.2), [32, 32, 4, 4]); // 4x4: not a Winograd size
      const b = tf.tensor1d(uniform(32, 33));
      const y = ops.conv2d(x, w, b, { pad: 1 });
      const want = tf.conv2d(tf.tensor4d(roundToBf16(x.dataSync() as Float32Array), x.shape), tf.tensor4d(roundToBf16(w.dataSync() as Float32Array), w.shape).transpose([2, 3, 1, 0]) as tf.Tensor4D, 1, 1).add(b);
      expectRelClose(y, want, 5e-5, 'conv2d');
    });
  });

  test('nativeOpsOn(cpu, bf16) runs the encoder stage\'s convolutions in bf16 too', () => {
    tf.tidy(() => {
      const B = 2, H = 9, W = 8, C = 3, D = 32, Z = 16;
      const t = (shape: number[], seed: number, r = 1) => tf.tensor(uniform(shape.reduce((a, b) => a * b, 1), seed, -r, r), shape);
      const params = [t([D, C, 5, 5], 41, 0.2), t([D], 42, 0.1), t([D, D, 5, 5], 43, 0.05), t([D], 44, 0.1),
        t([D, 4], 45, 0.5), t([D], 46, 0.1), tf.add(1, t([D], 47, 0.2)), t([D], 48, 0.1),
        t([D, D], 49, 0.3), t([D], 50, 0.1), t([D, D], 51, 0.3), t([D], 52, 0.1), t([Z, D], 53, 0.3), t([Z, D], 54, 0.3)];
      const x = t([B, H, W, C], 55) as tf.Tensor4D, pos = t([H, W, 4], 56) as tf.Tensor3D;
      const wk = t([B, H * W, Z], 57), wv = t([B, H * W, Z], 58);
      const loss = (precision: 'fp32' | 'bf16') => (...p: tf.Tensor[]) => {
        const r = nativeOpsOn('cpu', precision).encoder({
          x, pos, convs: [0, 1].map((i) => ({ weight: p[2 * i], bias: p[2 * i + 1], pad: 2, activation: 'relu' as const })),
          posWeight: p[4], posBias: p[5], lnWeight: p[6], lnBias: p[7], w1: p[8], b1: p[9], w2: p[10], b2: p[11], wk: p[12], wv: p[13],
        });
        return tf.add(tf.sum(tf.mul(r.k!, wk)), tf.sum(tf.mul(r.v!, wv))) as tf.Scalar;
      };
      const g16 = tf.grads(loss('bf16'))(params), g32 = tf.grads(loss('fp32'))(params);
      // the second convolution's filter gradient is a bf16 product, and bf16's 8-bit mantissas
      // move every value after them: within ~10% of fp32's here (as with the per-layer calls
      // before the stage), not equal
      const d = relDistance(g16[2].dataSync() as Float32Array, g32[2].dataSync() as Float32Array);
      expect(d).toBeGreaterThan(1e-5);
      expect(d).toBeLessThan(0.3);
    });
  });

  test('clear errors: an unknown precision, bf16 on a GPU device or the js backend', () => {
    const k = addonOps();
    const x = uniform(16, 1), w = uniform(16, 2);
    expect(() => k.nhwcConv2d(x, [1, 4, 4, 1], w, [16, 1, 1, 1], null, [1, 1], [0, 0], [0], 'cpu', null, 'fp16' as 'bf16')).toThrow(/'precision' must be 'fp32' or 'bf16'/);
    expect(() => k.nhwcConv2d(x, [1, 4, 4, 1], w, [16, 1, 1, 1], null, [1, 1], [0, 0], [0], 'simt', null, 'bf16')).toThrow(/bf16 is for the CPU kernels/);
    expect(() => k.decoderStage({ ...stageSpec(), precision: 'bf16', device: 'simt' })).toThrow(/spec.precision' bf16 is for the CPU kernels/);
    expect(() => opsForBackend('js', 'cpu', 'bf16')).toThrow(/precision bf16 needs the native backend/);
    expect(() => opsForBackend('native', 'cpu', 'half')).toThrow(/unknown precision "half" \(use fp32 or bf16\)/);
    expect(() => nativeOpsOn('simt', 'bf16')).toThrow(/precision bf16 is for the CPU kernels/);
  });
});
