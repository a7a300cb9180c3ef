/**
 * The native addon's kernels against tfjs (values and, through tf.grads, gradients), against
 * the addon's own plain reference loops, and against finite differences; plus the argument
 * checks at the N-API boundary. Skipped, with a notice, when the addon is not built.
 */
import { tf, initBackend } from '../lib/tf';
import {
  nativeKernels,
  nativeReferenceKernels,
  nativeStatus,
  conv2dOutputShape,
  conv2dTransposeOutputShape,
  NativeKernels,
  Shape4,
  Padding,
} from '../lib/native';
import { addonOps } from '../lib/ops/addon';

const status = nativeStatus();
const describeNative = status.available ? describe : describe.skip;
if (!status.available) {
  // eslint-disable-next-line no-console
  console.warn(`native-kernels tests SKIPPED: ${status.reason}`);
}

/** Deterministic pseudo-random floats in [-1, 1). */
function rand(n: number, seed: number): Float32Array {
  const a = new Float32Array(n);
  let s = seed >>> 0 || 1;
  for (let i = 0; i < n; i++) {
    s ^= s << 13;
    s >>>= 0;
    s ^= s >>> 17;
    s ^= s << 5;
    s >>>= 0;
    a[i] = s / 2 ** 31 - 1;
  }
  return a;
}

const prod = (s: readonly number[]) => s.reduce((a, b) => a * b, 1);

/** max |a-b| / max(|b|, tiny): the relative error of a whole array. */
function relErr(a: ArrayLike<number>, b: ArrayLike<number>): number {
  expect(a.length).toBe(b.length);
  let e = 0;
  let m = 0;
  for (let i = 0; i < a.length; i++) {
    e = Math.max(e, Math.abs(a[i] - b[i]));
    m = Math.max(m, Math.abs(b[i]));
  }
  return e / Math.max(m, 1e-12);
}

const TOL = 1e-4;

// ---- tfjs references (NCHW / PyTorch layouts converted to tfjs' NHWC) ----

function toNHWC(t: tf.Tensor): tf.Tensor4D {
  return t.transpose([0, 2, 3, 1]) as tf.Tensor4D;
}
function toNCHW(t: tf.Tensor): tf.Tensor4D {
  return t.transpose([0, 3, 1, 2]) as tf.Tensor4D;
}
function pad4(p: Padding): [number, number, number, number] {
  if (typeof p === 'number') return [p, p, p, p];
  return p.length === 2 ? [p[0], p[0], p[1], p[1]] : [p[0], p[1], p[2], p[3]];
}

/** conv2d in NCHW with weights [out,in,kh,kw], as a differentiable tfjs function. */
function tfConv2d(x: tf.Tensor, w: tf.Tensor, b: tf.Tensor | null, stride: [number, number], pad: Padding): tf.Tensor {
  const [t, bo, l, r] = pad4(pad);
  const y = tf.conv2d(toNHWC(x), w.transpose([2, 3, 1, 0]) as tf.Tensor4D, stride, [[0, 0], [t, bo], [l, r], [0, 0]]);
  return toNCHW(b ? tf.add(y, b) : y);
}

/** PyTorch ConvTranspose2d in NCHW with weights [in,out,kh,kw], as a differentiable tfjs function. */
function tfConvT(x: tf.Tensor, w: tf.Tensor, b: tf.Tensor | null, outShape: Shape4, stride: number, padding: number): tf.Tensor {
  const [N, Co, Ho, Wo] = outShape;
  const y = tf.conv2dTranspose(toNHWC(x), w.transpose([2, 3, 1, 0]) as tf.Tensor4D, [N, Ho, Wo, Co], stride, padding);
  return toNCHW(b ? tf.add(y, b) : y);
}

interface ConvCase {
  x: Shape4;
  w: Shape4;
  stride: [number, number];
  pad: Padding;
}

const convCases: ConvCase[] = [
  { x: [2, 3, 9, 7], w: [4, 3, 3, 3], stride: [1, 1], pad: 1 },
  { x: [3, 5, 9, 8], w: [6, 5, 5, 5], stride: [2, 2], pad: 2 },
  { x: [2, 4, 7, 7], w: [5, 4, 3, 3], stride: [2, 2], pad: [0, 1, 1, 0] },
  { x: [1, 3, 11, 6], w: [7, 3, 3, 2], stride: [2, 1], pad: [1, 2] },
  { x: [3, 6, 5, 5], w: [8, 6, 1, 1], stride: [1, 1], pad: 0 },
  { x: [4, 17, 6, 5], w: [9, 17, 4, 4], stride: [1, 1], pad: [2, 1, 2, 1] },
];

interface ConvTCase {
  x: Shape4;
  w: Shape4; // [in, out, kh, kw]
  stride: number;
  padding: number;
  outputPadding: number;
}

const convTCases: ConvTCase[] = [
  { x: [2, 3, 5, 4], w: [3, 4, 3, 3], stride: 2, padding: 1, outputPadding: 1 },
  { x: [3, 4, 4, 4], w: [4, 2, 5, 5], stride: 2, padding: 2, outputPadding: 1 },
  { x: [1, 2, 3, 5], w: [2, 3, 4, 4], stride: 1, padding: 0, outputPadding: 0 },
  { x: [2, 6, 6, 6], w: [6, 5, 5, 5], stride: 2, padding: 2, outputPadding: 0 },
  { x: [2, 3, 6, 7], w: [3, 3, 1, 1], stride: 1, padding: 0, outputPadding: 0 },
];

describeNative('native kernels', () => {
  let K: NativeKernels;
  let R: NativeKernels;
  beforeAll(async () => {
    await initBackend('cpu');
    K = nativeKernels();
    R = nativeReferenceKernels();
  });

  test('reports its build', () => {
    expect(status.info?.gemmIsa).toMatch(/^(avx512|avx2|generic)$/);
    expect(status.info?.threads).toBeGreaterThanOrEqual(1);
  });

  describe.each(convCases)('conv2d x=$x w=$w stride=$stride pad=$pad', (c) => {
    test('forward and both gradients match tfjs and the reference loops', () => {
      const seed = prod(c.x) + prod(c.w);
      const x = rand(prod(c.x), seed), w = rand(prod(c.w), seed + 1), b = rand(c.w[0], seed + 2);
      const opts = { stride: c.stride, pad: c.pad };
      const y = K.conv2d(x, c.x, w, c.w, b, opts);
      expect(y.shape).toEqual(conv2dOutputShape(c.x, c.w, c.stride, c.pad));
      const dy = rand(prod(y.shape), seed + 3);
      const dx = K.conv2dBackwardInput(dy, y.shape, w, c.w, c.x, opts);
      const g = K.conv2dBackwardFilter(x, c.x, dy, y.shape, c.w, { ...opts, withBias: true });

      tf.tidy(() => {
        const xt = tf.tensor(x, c.x), wt = tf.tensor(w, c.w), bt = tf.tensor(b, [c.w[0]]);
        const yt = tfConv2d(xt, wt, bt, c.stride, c.pad);
        expect(yt.shape).toEqual(y.shape);
        expect(relErr(y.data, yt.dataSync())).toBeLessThan(TOL);
        const dyt = tf.tensor(dy, y.shape);
        const [gx, gw, gb] = tf.grads((xa: tf.Tensor, wa: tf.Tensor, ba: tf.Tensor) =>
          tf.sum(tf.mul(tfConv2d(xa, wa, ba, c.stride, c.pad), dyt)))([xt, wt, bt]);
        expect(relErr(dx, gx.dataSync())).toBeLessThan(TOL);
        expect(relErr(g.dw, gw.dataSync())).toBeLessThan(TOL);
        expect(relErr(g.db!, gb.dataSync())).toBeLessThan(TOL);
      });

      expect(relErr(y.data, R.conv2d(x, c.x, w, c.w, b, opts).data)).toBeLessThan(TOL);
      expect(relErr(dx, R.conv2dBackwardInput(dy, y.shape, w, c.w, c.x, opts))).toBeLessThan(TOL);
      const gr = R.conv2dBackwardFilter(x, c.x, dy, y.shape, c.w, { ...opts, withBias: true });
      expect(relErr(g.dw, gr.dw)).toBeLessThan(TOL);
      expect(relErr(g.db!, gr.db!)).toBeLessThan(TOL);
      expect(K.conv2dBackwardFilter(x, c.x, dy, y.shape, c.w, opts).db).toBeNull();
    });
  });

  describe.each(convTCases)('conv2dTranspose x=$x w=$w stride=$stride padding=$padding outputPadding=$outputPadding', (c) => {
    test('forward and both gradients match tfjs and the reference loops', () => {
      const seed = 7 * prod(c.x) + prod(c.w);
      const x = rand(prod(c.x), seed), w = rand(prod(c.w), seed + 1), b = rand(c.w[1], seed + 2);
      const opts = { stride: c.stride, padding: c.padding, outputPadding: c.outputPadding };
      const y = K.conv2dTranspose(x, c.x, w, c.w, b, opts);
      expect(y.shape).toEqual(conv2dTransposeOutputShape(c.x, c.w, c.stride, c.padding, c.outputPadding));
      const dy = rand(prod(y.shape), seed + 3);
      const dx = K.conv2dTransposeBackwardInput(dy, y.shape, w, c.w, c.x, opts);
      const g = K.conv2dTransposeBackwardFilter(x, c.x, dy, y.shape, c.w, { ...opts, withBias: true });

      tf.tidy(() => {
        const xt = tf.tensor(x, c.x), wt = tf.tensor(w, c.w), bt = tf.tensor(b, [c.w[1]]);
        const yt = tfConvT(xt, wt, bt, y.shape, c.stride, c.padding);
        expect(yt.shape).toEqual(y.shape);
        expect(relErr(y.data, yt.dataSync())).toBeLessThan(TOL);
        const dyt = tf.tensor(dy, y.shape);
        const [gx, gw, gb] = tf.grads((xa: tf.Tensor, wa: tf.Tensor, ba: tf.Tensor) =>
          tf.sum(tf.mul(tfConvT(xa, wa, ba, y.shape, c.stride, c.padding), dyt)))([xt, wt, bt]);
        expect(relErr(dx, gx.dataSync())).toBeLessThan(TOL);
        expect(relErr(g.dw, gw.dataSync())).toBeLessThan(TOL);
        expect(relErr(g.db!, gb.dataSync())).toBeLessThan(TOL);
      });

      expect(relErr(y.data, R.conv2dTranspose(x, c.x, w, c.w, b, opts).data)).toBeLessThan(TOL);
      expect(relErr(dx, R.conv2dTransposeBackwardInput(dy, y.shape, w, c.w, c.x, opts))).toBeLessThan(TOL);
      const gr = R.conv2dTransposeBackwardFilter(x, c.x, dy, y.shape, c.w, { ...opts, withBias: true });
      expect(relErr(g.dw, gr.dw)).toBeLessThan(TOL);
      expect(relErr(g.db!, gr.db!)).toBeLessThan(TOL);
    });
  });

  test.each([
    { a: [37, 29], b: [29, 53], ta: false, tb: false },
    { a: [29, 37], b: [29, 53], ta: true, tb: false },
    { a: [37, 29], b: [53, 29], ta: false, tb: true },
    { a: [29, 37], b: [53, 29], ta: true, tb: true },
    { a: [3, 13, 70], b: [3, 70, 9], ta: false, tb: false },
    { a: [4, 70, 13], b: [70, 33], ta: true, tb: false },
    { a: [1, 5, 8], b: [3, 6, 8], ta: false, tb: true },
    { a: [150, 260], b: [260, 170], ta: false, tb: false },
    { a: [1, 1], b: [1, 1], ta: false, tb: false },
  ])('matmul a=$a b=$b transA=$ta transB=$tb matches tf.matMul', ({ a, b, ta, tb }) => {
    const A = rand(prod(a), prod(a) + 11), B = rand(prod(b), prod(b) + 12);
    const c = K.matmul(A, a, B, b, { transA: ta, transB: tb });
    // tfjs reference, one 2-D product per batch entry (a batch of 1 or a 2-D operand broadcasts).
    const batch = c.shape.length === 3 ? c.shape[0] : 1;
    const slice = (d: Float32Array, s: number[], i: number) => {
      if (s.length === 2) return tf.tensor(d, s);
      const n = s[1] * s[2], j = s[0] === 1 ? 0 : i;
      return tf.tensor(d.subarray(j * n, (j + 1) * n), [s[1], s[2]]);
    };
    const want = tf.tidy(() => {
      const parts: number[] = [];
      for (let i = 0; i < batch; i++) parts.push(...tf.matMul(slice(A, a, i), slice(B, b, i), ta, tb).dataSync());
      return parts;
    });
    expect(c.shape[c.shape.length - 2] * c.shape[c.shape.length - 1] * batch).toBe(want.length);
    expect(relErr(c.data, want)).toBeLessThan(TOL);
    expect(relErr(c.data, R.matmul(A, a, B, b, { transA: ta, transB: tb }).data)).toBeLessThan(TOL);
  });

  test('matmul with an empty inner dimension gives zeros', () => {
    const c = K.matmul(new Float32Array(0), [3, 0], new Float32Array(0), [0, 4]);
    expect(c.shape).toEqual([3, 4]);
    expect(Array.from(c.data)).toEqual(new Array(12).fill(0));
  });

  test('matmul with the linear layers\' epilogue: + bias per row, then ReLU or ELU, as in float32 arithmetic', () => {
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    const raw = require(status.path!) as { matmul: (...a: unknown[]) => Float32Array; reference: { matmul: (...a: unknown[]) => Float32Array } };
    const M = 300, Kd = 24, N = 40;
    const A = rand(M * Kd, 601), B = rand(N * Kd, 602), bias = rand(N, 603);
    const plain = raw.matmul(A, [M, Kd], B, [N, Kd], false, true);
    for (const relu of [false, true]) {
      const want = plain.map((v, i) => {
        const t = Math.fround(v + bias[i % N]);
        return relu && !(t > 0) ? 0 : t;
      });
      expect(Array.from(raw.matmul(A, [M, Kd], B, [N, Kd], false, true, null, bias, relu))).toEqual(Array.from(want));
      expect(relErr(raw.reference.matmul(A, [M, Kd], B, [N, Kd], false, true, null, bias, relu), want)).toBeLessThan(TOL);
    }
    // activation codes (ADDON_ACT): 1 is ReLU as `true`; 2 ELU (the epilogue's expm1, within ulps)
    expect(Array.from(raw.matmul(A, [M, Kd], B, [N, Kd], false, true, null, bias, 1))).toEqual(Array.from(raw.matmul(A, [M, Kd], B, [N, Kd], false, true, null, bias, true)));
    const elu = plain.map((v, i) => {
      const t = Math.fround(v + bias[i % N]);
      return t > 0 ? t : Math.fround(Math.expm1(t));
    });
    expect(relErr(raw.matmul(A, [M, Kd], B, [N, Kd], false, true, null, bias, 2), elu)).toBeLessThan(1e-6);
    expect(() => raw.matmul(A, [M, Kd], B, [N, Kd], false, true, null, bias, 3)).toThrow(/argument 'act' must be 0 \(linear\), 1 \(relu\) or 2 \(elu\)/);
    expect(() => raw.matmul(A, [M, Kd], B, [N, Kd], false, true, null, new Float32Array(N + 1))).toThrow(/argument 'bias' has 41 elements but the output's N columns needs 40/);
  });

  // Batch 1, large enough for the multi-threaded GEMM (split over pixels, then over channels);
  // checked against the reference loops only (tfjs' gradients are slow at this size).
  test.each([
    { x: [1, 16, 20, 19] as Shape4, w: [32, 16, 3, 3] as Shape4 },
    { x: [1, 48, 4, 4] as Shape4, w: [192, 48, 3, 3] as Shape4 },
  ])('batch-1 conv2d and conv2dTranspose x=$x w=$w through the threaded GEMM', ({ x: xs, w: ws }) => {
    const x = rand(prod(xs), 501), w = rand(prod(ws), 502), b = rand(ws[0], 503), opts = { pad: 1 };
    const y = K.conv2d(x, xs, w, ws, b, opts);
    expect(relErr(y.data, R.conv2d(x, xs, w, ws, b, opts).data)).toBeLessThan(TOL);
    const dy = rand(y.data.length, 504);
    expect(relErr(K.conv2dBackwardInput(dy, y.shape, w, ws, xs, opts), R.conv2dBackwardInput(dy, y.shape, w, ws, xs, opts)))
      .toBeLessThan(TOL);
    const g = K.conv2dBackwardFilter(x, xs, dy, y.shape, ws, { ...opts, withBias: true });
    const gr = R.conv2dBackwardFilter(x, xs, dy, y.shape, ws, { ...opts, withBias: true });
    expect(relErr(g.dw, gr.dw)).toBeLessThan(TOL);
    expect(relErr(g.db!, gr.db!)).toBeLessThan(TOL);
    // the same weights as a transposed conv [in = ws[0] ... ] applied to y-shaped input
    const wt: Shape4 = [ws[0], ws[1], ws[2], ws[3]];
    const t = K.conv2dTranspose(dy, y.shape, w, wt, null, { padding: 1 });
    expect(relErr(t.data, R.conv2dTranspose(dy, y.shape, w, wt, null, { padding: 1 }).data)).toBeLessThan(TOL);
    const gt = K.conv2dTransposeBackwardFilter(dy, y.shape, x, t.shape, wt, { padding: 1 });
    expect(relErr(gt.dw, R.conv2dTransposeBackwardFilter(dy, y.shape, x, t.shape, wt, { padding: 1 }).dw)).toBeLessThan(TOL);
  });

  // The GEMM micro-kernel is chosen once per process from the CPU's features; the lesser
  // variants (what a CPU without AVX-512 runs) are checked in child processes.
  test.each(['avx2', 'generic'])('the %s GEMM variant matches the reference loops', (isa) => {
    const script = `
      const n = require(${JSON.stringify(status.path)});
      if (n.info().gemmIsa !== ${JSON.stringify(isa)}) { console.log('SKIP ' + n.info().gemmIsa); process.exit(0); }
      let s = 7; const r = (k) => Float32Array.from({ length: k }, () => ((s = (s * 16807) % 2147483647) / 2147483647) * 2 - 1);
      const err = (a, b) => { let e = 0, m = 0; for (let i = 0; i < a.length; i++) { e = Math.max(e, Math.abs(a[i] - b[i])); m = Math.max(m, Math.abs(b[i])); } return e / m; };
      const out = [];
      for (const [M, N, K, ta, tb] of [[70, 45, 300, false, false], [33, 70, 19, true, true], [9, 130, 64, false, true]]) {
        const A = r(M * K), B = r(K * N), as = ta ? [K, M] : [M, K], bs = tb ? [N, K] : [K, N];
        out.push(err(n.matmul(A, as, B, bs, ta, tb), n.reference.matmul(A, as, B, bs, ta, tb)));
      }
      const xs = [3, 5, 11, 9], ws = [7, 5, 3, 3], st = [2, 2], pd = [1, 1, 1, 1], ys = [3, 7, 6, 5];
      const x = r(3 * 5 * 99), w = r(7 * 45), dy = r(3 * 7 * 30);
      out.push(err(n.conv2d(x, xs, w, ws, null, st, pd), n.reference.conv2d(x, xs, w, ws, null, st, pd)));
      out.push(err(n.conv2dBackwardInput(dy, ys, w, ws, xs, st, pd), n.reference.conv2dBackwardInput(dy, ys, w, ws, xs, st, pd)));
      out.push(err(n.conv2dBackwardFilter(x, xs, dy, ys, ws, st, pd, false).dw, n.reference.conv2dBackwardFilter(x, xs, dy, ys, ws, st, pd, false).dw));
      console.log('ERR ' + Math.max(...out));`;
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    const { execFileSync } = require('node:child_process') as typeof import('node:child_process');
    const res = execFileSync(process.execPath, ['-e', script], { env: { ...process.env, EMORL_GEMM_ISA: isa }, encoding: 'utf8' });
    if (res.startsWith('SKIP')) return; // this CPU lacks the instruction set
    const m = /^ERR (\S+)/.exec(res);
    expect(m).not.toBeNull();
    expect(Number(m![1])).toBeLessThan(TOL);
  });

  test('the filter gradient is reproducible (fixed summation order)', () => {
    const xs: Shape4 = [9, 6, 12, 11], ws: Shape4 = [8, 6, 3, 3], opts = { pad: 1 };
    const x = rand(prod(xs), 601), dy = rand(prod(conv2dOutputShape(xs, ws, 1, 1)), 602);
    const ys = conv2dOutputShape(xs, ws, 1, 1);
    const a = K.conv2dBackwardFilter(x, xs, dy, ys, ws, { ...opts, withBias: true });
    for (let i = 0; i < 3; i++) {
      const b = K.conv2dBackwardFilter(x, xs, dy, ys, ws, { ...opts, withBias: true });
      expect(Array.from(b.dw)).toEqual(Array.from(a.dw));
      expect(Array.from(b.db!)).toEqual(Array.from(a.db!));
    }
  });

  test('results can go to a caller-owned out array', () => {
    const xs: Shape4 = [3, 4, 7, 6], ws: Shape4 = [5, 4, 3, 3], opts = { stride: 2, pad: 1 };
    const x = rand(prod(xs), 401), w = rand(prod(ws), 402), b = rand(5, 403);
    const want = K.conv2d(x, xs, w, ws, b, opts);
    const out = new Float32Array(want.data.length).fill(Number.NaN);
    const got = K.conv2d(x, xs, w, ws, b, { ...opts, out });
    expect(got.data).toBe(out);
    expect(Array.from(out)).toEqual(Array.from(want.data));
    const dy = rand(want.data.length, 404);
    const dxOut = new Float32Array(x.length).fill(7);
    expect(K.conv2dBackwardInput(dy, want.shape, w, ws, xs, { ...opts, out: dxOut })).toBe(dxOut);
    expect(Array.from(dxOut)).toEqual(Array.from(K.conv2dBackwardInput(dy, want.shape, w, ws, xs, opts)));
    const tOut = new Float32Array(prod(conv2dTransposeOutputShape(xs, [4, 2, 3, 3], 2, 1, 1))).fill(3);
    const wt = rand(4 * 2 * 9, 405);
    const t = K.conv2dTranspose(x, xs, wt, [4, 2, 3, 3], null, { stride: 2, padding: 1, outputPadding: 1, out: tOut });
    expect(t.data).toBe(tOut);
    expect(Array.from(tOut)).toEqual(Array.from(K.conv2dTranspose(x, xs, wt, [4, 2, 3, 3], null,
      { stride: 2, padding: 1, outputPadding: 1 }).data));
    const mOut = new Float32Array(6 * 4);
    expect(K.matmul(rand(6 * 5, 406), [6, 5], rand(5 * 4, 407), [5, 4], { out: mOut }).data).toBe(mOut);
    // wrong length, wrong type, or sharing memory with an input: errors
    expect(() => K.conv2d(x, xs, w, ws, b, { ...opts, out: new Float32Array(3) }))
      .toThrow(/argument 'out' has 3 elements but the result has/);
    expect(() => K.conv2d(x, xs, w, ws, b, { ...opts, out: new Float64Array(out.length) as unknown as Float32Array }))
      .toThrow(/argument 'out' must be a Float32Array/);
    const shared = new Float32Array(x.length + want.data.length);
    shared.set(x);
    expect(() => K.conv2d(shared.subarray(0, x.length), xs, w, ws, b, { ...opts, out: shared.subarray(x.length - 1, x.length - 1 + want.data.length) }))
      .toThrow(/argument 'out' overlaps argument 'x'/);
    expect(() => K.conv2d(shared.subarray(0, x.length), xs, w, ws, b, { ...opts, out: shared.subarray(x.length) })).not.toThrow();
  });

  // Finite differences on a tiny case: L = sum(y * r) with y the op's output (float32 data,
  // so a generous step; the ops are linear in each argument, so the only error is rounding).
  function fdCheck(
    f: (x: Float32Array, w: Float32Array) => Float32Array,
    x: Float32Array,
    w: Float32Array,
    r: Float32Array,
    gx: Float32Array,
    gw: Float32Array,
  ): void {
    const L = (xx: Float32Array, ww: Float32Array) => f(xx, ww).reduce((s, v, i) => s + v * r[i], 0);
    const h = 1e-2;
    for (const [arr, grad, other, isX] of [[x, gx, w, true], [w, gw, x, false]] as const) {
      for (let i = 0; i < arr.length; i += Math.max(1, Math.floor(arr.length / 7))) {
        const p = arr.slice(), m = arr.slice();
        p[i] += h;
        m[i] -= h;
        const num = isX ? (L(p, other) - L(m, other)) / (2 * h) : (L(other, p) - L(other, m)) / (2 * h);
        expect(Math.abs(num - grad[i])).toBeLessThan(2e-3 * Math.max(1, Math.abs(grad[i])));
      }
    }
  }

  test('conv2d gradients match finite differences', () => {
    const xs: Shape4 = [2, 2, 5, 4], ws: Shape4 = [3, 2, 3, 3], opts = { stride: 2, pad: 1 };
    const x = rand(prod(xs), 101), w = rand(prod(ws), 102);
    const y = K.conv2d(x, xs, w, ws, null, opts);
    const r = rand(y.data.length, 103);
    const gx = K.conv2dBackwardInput(r, y.shape, w, ws, xs, opts);
    const gw = K.conv2dBackwardFilter(x, xs, r, y.shape, ws, opts).dw;
    fdCheck((xx, ww) => K.conv2d(xx, xs, ww, ws, null, opts).data, x, w, r, gx, gw);
  });

  test('conv2dTranspose gradients match finite differences', () => {
    const xs: Shape4 = [2, 3, 3, 4], ws: Shape4 = [3, 2, 3, 3], opts = { stride: 2, padding: 1, outputPadding: 1 };
    const x = rand(prod(xs), 201), w = rand(prod(ws), 202);
    const y = K.conv2dTranspose(x, xs, w, ws, null, opts);
    const r = rand(y.data.length, 203);
    const gx = K.conv2dTransposeBackwardInput(r, y.shape, w, ws, xs, opts);
    const gw = K.conv2dTransposeBackwardFilter(x, xs, r, y.shape, ws, opts).dw;
    fdCheck((xx, ww) => K.conv2dTranspose(xx, xs, ww, ws, null, opts).data, x, w, r, gx, gw);
  });

  test('denormals are flushed in the workers and the caller keeps its float mode', () => {
    const xs: Shape4 = [8, 4, 9, 9], ws: Shape4 = [4, 4, 3, 3];
    const x = rand(prod(xs), 301);
    const w = new Float32Array(prod(ws)).fill(1e-39); // float32 subnormal
    const b = new Float32Array([0.5, -0.25, 1, 0]);
    const y = K.conv2d(x, xs, w, ws, b, { pad: 1 });
    // x86-64: DAZ reads the subnormal weights as zero in every thread, so y is exactly the bias
    // (FtzScope is a no-op elsewhere)
    if (process.arch === 'x64') for (let i = 0; i < y.data.length; i++) expect(y.data[i]).toBe(b[Math.floor(i / 81) % 4]);
    const tiny = Number('5e-324'); // JS doubles must still have subnormals after the call
    expect(tiny * 1.5).toBeGreaterThan(0);
    expect(Math.fround(Number('1e-39'))).toBeGreaterThan(0);
  });

  test.each([16, 5])('the ELU epilogue (vectorised expm1) is within 1.5 ulps of expm1 over [-100, 10] (%d channels)', (C) => {
    // a 1x1 identity convolution with ELU: the epilogue alone, over whole vectors (16) and a tail (5)
    const n = 1 << 14;
    const x = new Float32Array(n * C);
    for (let i = 0; i < x.length; i++) x[i] = -100 + (110 * i) / x.length;
    x.set([-1e-30, -1e-8, -1e-4, -0.3465, -0.3466, -86.9, -87.5, -88.8, -200, 1e-30, 0], 0);
    const w = new Float32Array(C * C);
    for (let i = 0; i < C; i++) w[i * C + i] = 1;
    const y = addonOps().nhwcConv2d(x, [1, 1, n, C], w, [C, C, 1, 1], null, [1, 1], [0, 0], [2]);
    let worst = 0;
    for (let i = 0; i < x.length; i++) {
      const want = x[i] > 0 ? x[i] : Math.fround(Math.expm1(x[i]));
      worst = Math.max(worst, Math.abs(y[i] - want) / Math.max(Math.abs(want) * 2 ** -23, 2 ** -149));
    }
    expect(worst).toBeLessThanOrEqual(1.5);
  });

  describe('argument checks', () => {
    const x = new Float32Array(2 * 3 * 5 * 5), w = new Float32Array(4 * 3 * 3 * 3);
    const call = (fn: () => unknown) => () => fn();
    test('non-Float32Array inputs are TypeErrors naming the argument', () => {
      expect(call(() => K.conv2d([...x] as unknown as Float32Array, [2, 3, 5, 5], w, [4, 3, 3, 3])))
        .toThrow(/emorl\.conv2d: argument 'x' must be a Float32Array/);
      expect(call(() => K.conv2d(x, [2, 3, 5, 5], new Float64Array(w.length) as unknown as Float32Array, [4, 3, 3, 3])))
        .toThrow(/must be a Float32Array/);
      expect(call(() => K.matmul(new Float32Array(4), [2, 2], 'no' as unknown as Float32Array, [2, 2])))
        .toThrow(/argument 'b' must be a Float32Array/);
      expect(call(() => K.conv2d(x, [2, 3, 5, 5], w, [4, 3, 3, 3], [1, 2, 3, 4] as unknown as Float32Array)))
        .toThrow(/argument 'bias'/);
    });
    test('wrong lengths are RangeErrors naming the argument and the shape', () => {
      expect(call(() => K.conv2d(x.subarray(1), [2, 3, 5, 5], w, [4, 3, 3, 3])))
        .toThrow(/argument 'x' has 149 elements but xShape \[2,3,5,5\] needs 150/);
      expect(call(() => K.conv2d(x, [2, 3, 5, 5], w, [4, 3, 3, 3], new Float32Array(3))))
        .toThrow(/argument 'bias' has 3 elements/);
      expect(call(() => K.conv2dBackwardInput(new Float32Array(10), [2, 4, 5, 5], w, [4, 3, 3, 3], [2, 3, 5, 5])))
        .toThrow(/argument 'dy' has 10 elements but dyShape \[2,4,5,5\] needs 200/);
    });
    test('negative, fractional and inconsistent dimensions are RangeErrors', () => {
      expect(call(() => K.conv2d(x, [2, 3, -5, -5], w, [4, 3, 3, 3]))).toThrow(/xShape' entry 2 is -5/);
      expect(call(() => K.conv2d(x, [2, 3, 5, 5.5] as Shape4, w, [4, 3, 3, 3]))).toThrow(/xShape. entry 3 is 5.5; expected an integer/);
      expect(call(() => K.conv2d(x, [2, 3, 5, 5], w, [4, 3, 3, 3], null, { stride: 0 }))).toThrow(/stride' entry 0 is 0/);
      expect(call(() => K.conv2d(x, [2, 3, 5, 5], new Float32Array(4 * 2 * 9), [4, 2, 3, 3])))
        .toThrow(/wShape \[4,2,3,3\] has 2 input channels but xShape \[2,3,5,5\] has 3/);
      expect(call(() => K.conv2d(new Float32Array(6), [1, 3, 1, 2], w, [4, 3, 3, 3]))).toThrow(/larger than the padded input/);
      expect(call(() => K.conv2dBackwardInput(new Float32Array(2 * 4 * 4 * 4), [2, 4, 4, 4], w, [4, 3, 3, 3], [2, 3, 5, 5])))
        .toThrow(/dyShape \[2,4,4,4\] does not match the expected \[2,4,3,3\]/);
      expect(call(() => K.conv2dTranspose(x, [2, 3, 5, 5], new Float32Array(5 * 4 * 9), [5, 4, 3, 3])))
        .toThrow(/wShape \[5,4,3,3\] has 5 input channels but xShape \[2,3,5,5\] has 3/);
      expect(call(() => K.conv2dTranspose(x, [2, 3, 5, 5], new Float32Array(3 * 2 * 9), [3, 2, 3, 3], null,
        { stride: 1, outputPadding: 1 }))).toThrow(/outputPadding \[1,1\] must be smaller than stride \[1,1\]/);
      expect(call(() => K.matmul(new Float32Array(6), [2, 3], new Float32Array(6), [2, 3])))
        .toThrow(/inner dimensions differ/);
      expect(call(() => K.matmul(new Float32Array(12), [2, 2, 3], new Float32Array(18), [3, 3, 2])))
        .toThrow(/batch sizes 2 and 3 do not broadcast/);
    });
    test('empty dimensions give empty (or bias-only) results', () => {
      const F = (k: number) => new Float32Array(k).fill(0.5);
      expect(K.conv2d(F(0), [0, 3, 5, 5], F(108), [4, 3, 3, 3], null, { pad: 1 }).data.length).toBe(0);
      expect(Array.from(K.conv2d(F(0), [2, 0, 5, 5], F(0), [4, 0, 3, 3], F(4), { pad: 1 }).data.slice(0, 2))).toEqual([0.5, 0.5]);
      expect(K.conv2d(F(150), [2, 3, 5, 5], F(0), [0, 3, 3, 3], null, { pad: 1 }).data.length).toBe(0);
      expect(Array.from(K.conv2dBackwardFilter(F(0), [0, 3, 5, 5], F(0), [0, 4, 5, 5], [4, 3, 3, 3], { pad: 1, withBias: true }).db!))
        .toEqual([0, 0, 0, 0]);
      expect(K.conv2dTranspose(F(0), [0, 3, 5, 5], F(108), [3, 4, 3, 3], null, { stride: 2, padding: 1, outputPadding: 1 }).data.length).toBe(0);
      expect(K.matmul(F(0), [0, 2, 3], F(6), [3, 2]).shape).toEqual([0, 2, 2]);
      expect(K.matmul(F(0), [0, 3], F(6), [3, 2]).data.length).toBe(0);
    });
    test('random garbage arguments give results or JS errors, never a crash', () => {
      const raw = require(status.path!) as Record<string, (...a: unknown[]) => unknown>;
      let s = 12345;
      const ri = (m: number) => (s = (s * 1103515245 + 12345) % 2 ** 31) % m;
      const dim = () => [0, 1, 2, 3, 5, 7, -1, 2 ** 31, 0.5, NaN][ri(10)] as number;
      const shape = (r: number) => Array.from({ length: r }, dim);
      const arr = () => (ri(8) === 0 ? [1, 2] : new Float32Array(ri(4) === 0 ? ri(300) : [0, 1, 8, 27, 45, 75, 150][ri(7)]));
      const names = ['conv2d', 'conv2dBackwardInput', 'conv2dBackwardFilter', 'conv2dTranspose',
        'conv2dTransposeBackwardInput', 'conv2dTransposeBackwardFilter', 'matmul'];
      let ok = 0;
      for (let i = 0; i < 600; i++) {
        const fn = names[ri(names.length)];
        const args: unknown[] = Array.from({ length: 10 }, (_, j) => (j % 2 === 0 ? arr() : shape(ri(5) === 0 ? 3 : fn === 'matmul' ? 2 : 4)));
        args[4] = fn === 'matmul' ? ri(2) === 0 : args[4];
        try {
          raw[fn](...args);
          ok++;
        } catch (e) {
          expect((e as Error).message).toMatch(/^emorl/);
        }
      }
      expect(ok).toBeGreaterThanOrEqual(0);
    });
    test('missing arguments and wrong ranks are errors, not crashes', () => {
      const raw = require(status.path!) as Record<string, (...a: unknown[]) => unknown>;
      expect(() => raw.conv2d()).toThrow(/argument 'xShape' must be an array/);
      expect(() => raw.conv2d(x, [2, 3, 5], w, [4, 3, 3, 3], null, [1, 1], [0, 0, 0, 0])).toThrow(/'xShape' must have 4 entries, got 3/);
      expect(() => raw.conv2d(x, [2, 3, 5, 5], w, [4, 3, 3, 3], null, [1, 1], [0, 0])).toThrow(/'pad' must have 4 entries/);
      expect(() => raw.conv2dBackwardFilter(x, [2, 3, 5, 5], x, [2, 3, 5, 5], [3, 3, 1, 1], [1], [0, 0, 0, 0], 'yes'))
        .toThrow(/'withBias' must be a boolean/);
      expect(() => raw.matmul(new Float32Array(1), [1, 'a'], new Float32Array(1), [1, 1])).toThrow(/must contain only numbers/);
      expect(() => raw.conv2d(x, [2 ** 20, 2 ** 20, 2 ** 20, 2 ** 20], w, [4, 3, 3, 3], null, [1, 1], [0, 0, 0, 0])).toThrow(/too large/);
    });
  });
});
