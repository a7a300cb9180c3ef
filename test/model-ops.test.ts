/**
 * The hand-written convolution ops against tfjs' own (slow but independent) conv2d and
 * conv2dTranspose, values and all three gradients, on small random shapes; the diagonal
 * Gaussians' fused σ and KL against their tfjs formulas, bit for bit.
 */
import { tf, initBackend } from '../lib/tf';
import { broadcastConv2d, spatialBroadcast } from '../lib/ops/broadcast';
import { conv2d, convTranspose2d, withoutParamGrads } from '../lib/ops/conv';
import { gemmNN, gemmTN } from '../lib/ops/gemm';
import {
  jsGaussianKernels, klDiagReference, klDiagWith, posteriorFromLambda, posteriorFromLambdaReference, rsample, rsampleReference, sampleWithKl, sampleWithKlReference,
  softplusToStdReference, softplusToStdWith, type Gaussian, type GaussianKernels,
} from '../lib/model/priors';
import { nativeStatus } from '../lib/native';
import { addonOps, nativeOpsAvailable } from '../lib/ops/addon';
import { addSameShape, channelsLast, concatColumns, repeatRows, scaleBy, splitColumns } from '../lib/ops/nn';
import { multiOutputOp } from '../lib/ops/multi-output';
import { stageLoss, stageLossReference, weightedTotal, weightedTotalReference, type StageLossSpec } from '../lib/model/stage-loss';
import { Rng } from '../lib/util/rng';

beforeAll(async () => {
  await initBackend('cpu');
});

function rand(shape: number[], rng: Rng): tf.Tensor {
  const n = shape.reduce((a, b) => a * b, 1);
  return tf.tensor(rng.normals(n), shape);
}

function maxRelDiff(a: tf.Tensor, b: tf.Tensor): number {
  expect(a.shape).toEqual(b.shape);
  const x = a.dataSync();
  const y = b.dataSync();
  let m = 0;
  let s = 0;
  for (let i = 0; i < x.length; i++) {
    m = Math.max(m, Math.abs(x[i] - y[i]));
    s = Math.max(s, Math.abs(y[i]));
  }
  return m / Math.max(s, 1e-12);
}

describe('gemm', () => {
  test('NN and TN products match a float64 reference on ragged shapes', () => {
    const rng = new Rng(1);
    for (const [M, K, N] of [
      [1, 1, 1],
      [5, 7, 3],
      [9, 13, 6],
      [13, 600, 5],
      [700, 3, 9],
    ]) {
      const a = rng.normals(M * K);
      const b = rng.normals(K * N);
      const ref = new Float64Array(M * N);
      for (let i = 0; i < M; i++) for (let k = 0; k < K; k++) for (let j = 0; j < N; j++) ref[i * N + j] += a[i * K + k] * b[k * N + j];
      const c = gemmNN(a, b, M, K, N);
      const at = new Float32Array(K * M);
      for (let i = 0; i < M; i++) for (let k = 0; k < K; k++) at[k * M + i] = a[i * K + k];
      const c2 = gemmTN(at, b, K, M, N);
      for (let i = 0; i < M * N; i++) {
        expect(Math.abs(c[i] - ref[i])).toBeLessThan(1e-4 * (1 + Math.abs(ref[i])));
        expect(Math.abs(c2[i] - ref[i])).toBeLessThan(1e-4 * (1 + Math.abs(ref[i])));
      }
    }
  });
});

describe('conv2d (im2col + GEMM, PyTorch weight layout)', () => {
  test.each([
    { n: 2, h: 7, w: 9, cin: 3, cout: 5, k: 5, pad: 2, stride: 1 },
    { n: 1, h: 8, w: 6, cin: 4, cout: 3, k: 3, pad: 0, stride: 1 },
    { n: 3, h: 9, w: 9, cin: 2, cout: 4, k: 5, pad: 1, stride: 1 },
    { n: 2, h: 9, w: 8, cin: 3, cout: 2, k: 3, pad: 1, stride: 2 },
  ])('value and gradients equal tf.conv2d: n=$n h=$h w=$w cin=$cin cout=$cout k=$k pad=$pad stride=$stride', ({ n, h, w, cin, cout, k, pad, stride }) => {
    const rng = new Rng(7);
    const x = rand([n, h, w, cin], rng) as tf.Tensor4D;
    const wt = rand([cout, cin, k, k], rng) as tf.Tensor4D;
    const b = rand([cout], rng) as tf.Tensor1D;
    const oh = Math.floor((h + 2 * pad - k) / stride) + 1;
    const ow = Math.floor((w + 2 * pad - k) / stride) + 1;
    const r = rand([n, oh, ow, cout], rng);
    const ours = (xx: tf.Tensor, ww: tf.Tensor, bb: tf.Tensor): tf.Scalar =>
      tf.sum(tf.mul(conv2d(xx as tf.Tensor4D, ww, bb, { pad, stride }), r));
    const ref = (xx: tf.Tensor, ww: tf.Tensor, bb: tf.Tensor): tf.Scalar => {
      const filt = tf.transpose(ww, [2, 3, 1, 0]) as tf.Tensor4D; // [kh,kw,in,out]
      const padded = tf.pad(xx as tf.Tensor4D, [
        [0, 0],
        [pad, pad],
        [pad, pad],
        [0, 0],
      ]);
      return tf.sum(tf.mul(tf.add(tf.conv2d(padded, filt, stride, 'valid'), bb), r));
    };
    const a = tf.valueAndGrads(ours)([x, wt, b]);
    const e = tf.valueAndGrads(ref)([x, wt, b]);
    expect(Math.abs(a.value.dataSync()[0] - e.value.dataSync()[0])).toBeLessThan(1e-4 * Math.abs(e.value.dataSync()[0]) + 1e-4);
    for (let i = 0; i < 3; i++) expect(maxRelDiff(a.grads[i], e.grads[i])).toBeLessThan(1e-5);
    // without parameter gradients: the input gradient is unchanged, the others are zeros
    const noParams = withoutParamGrads(() => tf.grads(ours)([x, wt, b]));
    expect(maxRelDiff(noParams[0], e.grads[0])).toBeLessThan(1e-5);
    expect(tf.max(tf.abs(noParams[1])).dataSync()[0]).toBe(0);
  });

  test.each(['relu', 'elu'] as const)('fused %s equals the activation applied after, gradients included', (act) => {
    const rng = new Rng(3);
    const x = rand([2, 6, 5, 3], rng) as tf.Tensor4D;
    const wt = rand([4, 3, 3, 3], rng) as tf.Tensor4D;
    const b = rand([4], rng) as tf.Tensor1D;
    const r = rand([2, 6, 5, 4], rng);
    const fused = (xx: tf.Tensor, ww: tf.Tensor, bb: tf.Tensor): tf.Scalar =>
      tf.sum(tf.mul(conv2d(xx as tf.Tensor4D, ww, bb, { pad: 1, activation: act }), r));
    const after = (xx: tf.Tensor, ww: tf.Tensor, bb: tf.Tensor): tf.Scalar => {
      const y = conv2d(xx as tf.Tensor4D, ww, bb, { pad: 1 });
      return tf.sum(tf.mul(act === 'relu' ? tf.relu(y) : tf.elu(y), r));
    };
    const a = tf.valueAndGrads(fused)([x, wt, b]);
    const e = tf.valueAndGrads(after)([x, wt, b]);
    expect(Math.abs(a.value.dataSync()[0] - e.value.dataSync()[0])).toBeLessThan(1e-4 * Math.abs(e.value.dataSync()[0]) + 1e-4);
    for (let i = 0; i < 3; i++) expect(maxRelDiff(a.grads[i], e.grads[i])).toBeLessThan(1e-5);
  });

  test('rejects mismatched channels', () => {
    const x = tf.zeros([1, 5, 5, 3]) as tf.Tensor4D;
    expect(() => conv2d(x, tf.zeros([4, 2, 3, 3]), tf.zeros([4]))).toThrow(/3 channels.*expects 2/);
    expect(() => conv2d(x, tf.zeros([4, 3, 7, 7]), tf.zeros([4]))).toThrow(/does not fit/);
  });
});

describe('convTranspose2d (PyTorch ConvTranspose2d semantics)', () => {
  test.each([
    { n: 2, h: 3, w: 4, cin: 3, cout: 2, k: 5, stride: 2, pad: 2, outputPad: 1 },
    { n: 1, h: 5, w: 5, cin: 2, cout: 3, k: 5, stride: 1, pad: 2, outputPad: 0 },
    { n: 2, h: 4, w: 3, cin: 4, cout: 4, k: 3, stride: 1, pad: 1, outputPad: 0 },
  ])('value and gradients equal tf.conv2dTranspose: n=$n h=$h w=$w cin=$cin cout=$cout k=$k stride=$stride pad=$pad outputPad=$outputPad', ({ n, h, w, cin, cout, k, stride, pad, outputPad }) => {
    const rng = new Rng(11);
    const x = rand([n, h, w, cin], rng) as tf.Tensor4D;
    const wt = rand([cin, cout, k, k], rng) as tf.Tensor4D;
    const b = rand([cout], rng) as tf.Tensor1D;
    const H = (h - 1) * stride - 2 * pad + k + outputPad;
    const W = (w - 1) * stride - 2 * pad + k + outputPad;
    const r = rand([n, H, W, cout], rng);
    const ours = (xx: tf.Tensor, ww: tf.Tensor, bb: tf.Tensor): tf.Scalar =>
      tf.sum(tf.mul(convTranspose2d(xx as tf.Tensor4D, ww, bb, { stride, pad, outputPad }), r));
    // Reference: the full transposed conv (no padding) from tfjs, then PyTorch's crop/extend.
    const ref = (xx: tf.Tensor, ww: tf.Tensor, bb: tf.Tensor): tf.Scalar => {
      const filt = tf.transpose(ww, [2, 3, 1, 0]) as tf.Tensor4D; // [kh,kw,out,in]
      const fullH = (h - 1) * stride + k;
      const fullW = (w - 1) * stride + k;
      const full = tf.conv2dTranspose(xx as tf.Tensor4D, filt, [n, fullH, fullW, cout], stride, 'valid');
      const ext = tf.pad(full, [
        [0, 0],
        [0, outputPad],
        [0, outputPad],
        [0, 0],
      ]);
      const cropped = tf.slice(ext, [0, pad, pad, 0], [n, H, W, cout]);
      return tf.sum(tf.mul(tf.add(cropped, bb), r));
    };
    const a = tf.valueAndGrads(ours)([x, wt, b]);
    const e = tf.valueAndGrads(ref)([x, wt, b]);
    expect(Math.abs(a.value.dataSync()[0] - e.value.dataSync()[0])).toBeLessThan(1e-4 * Math.abs(e.value.dataSync()[0]) + 1e-4);
    for (let i = 0; i < 3; i++) expect(maxRelDiff(a.grads[i], e.grads[i])).toBeLessThan(1e-5);
  });
});

describe('broadcastConv2d (the decoders\' first layer without the broadcast map)', () => {
  test.each([
    { n: 3, c: 4, gh: 9, gw: 11, cout: 5, k: 5, pad: 1, act: 'relu' as const },
    { n: 2, c: 3, gh: 8, gw: 8, cout: 4, k: 3, pad: 0, act: 'elu' as const },
    { n: 1, c: 2, gh: 6, gw: 7, cout: 3, k: 3, pad: 2, act: 'linear' as const },
  ])('equals conv2d(spatialBroadcast(z, pos)): n=$n c=$c grid=$gh x $gw k=$k pad=$pad $act', ({ n, c, gh, gw, cout, k, pad, act }) => {
    const rng = new Rng(5);
    const z = rand([n, c], rng) as tf.Tensor2D;
    const pos = rand([gh, gw, c], rng) as tf.Tensor3D;
    const wt = rand([cout, c, k, k], rng);
    const b = rand([cout], rng);
    const oh = gh + 2 * pad - k + 1;
    const ow = gw + 2 * pad - k + 1;
    const r = rand([n, oh, ow, cout], rng);
    const fused = (zz: tf.Tensor, pp: tf.Tensor, ww: tf.Tensor, bb: tf.Tensor): tf.Scalar =>
      tf.sum(tf.mul(broadcastConv2d(zz as tf.Tensor2D, pp as tf.Tensor3D, ww, bb, { pad, activation: act }), r));
    const plain = (zz: tf.Tensor, pp: tf.Tensor, ww: tf.Tensor, bb: tf.Tensor): tf.Scalar =>
      tf.sum(tf.mul(conv2d(spatialBroadcast(zz as tf.Tensor2D, pp as tf.Tensor3D), ww, bb, { pad, activation: act }), r));
    const a = tf.valueAndGrads(fused)([z, pos, wt, b]);
    const e = tf.valueAndGrads(plain)([z, pos, wt, b]);
    expect(Math.abs(a.value.dataSync()[0] - e.value.dataSync()[0])).toBeLessThan(1e-4 * Math.abs(e.value.dataSync()[0]) + 1e-4);
    for (let i = 0; i < 4; i++) expect(maxRelDiff(a.grads[i], e.grads[i])).toBeLessThan(1e-5);
    const noParams = withoutParamGrads(() => tf.grads(fused)([z, pos, wt, b]));
    expect(maxRelDiff(noParams[0], e.grads[0])).toBeLessThan(1e-5);
  });
});

describe('the diagonal Gaussians\' fused ops (lib/model/priors.ts)', () => {
  /** The first index where two float32 arrays' bits differ, or -1. */
  function firstBitDifference(a: tf.Tensor, b: tf.Tensor): number {
    expect(a.shape).toEqual(b.shape);
    const x = new Uint32Array((a.dataSync() as Float32Array).slice().buffer), y = new Uint32Array((b.dataSync() as Float32Array).slice().buffer);
    return x.findIndex((v, i) => v !== y[i]);
  }

  /** s spread over [-120, 120] (both clamps: exp underflows, min(s, 80) cuts), and an exact 80 */
  function spread(shape: number[], rng: Rng): tf.Tensor2D {
    const n = shape[0] * shape[1];
    const v = Float32Array.from({ length: n }, (_, i) => (i === 3 ? 80 : rng.normal() * (i % 3 === 0 ? 40 : 2)));
    return tf.tensor2d(v, shape as [number, number]);
  }

  test('repeatRows: tf.tile(x, [n, 1])\'s values and gradient, bit for bit', () => {
    tf.tidy(() => {
      const rng = new Rng(14);
      for (const [n, D] of [[128, 64], [1, 3], [5, 1]]) {
        const x = rand([1, D], rng) as tf.Tensor2D;
        // rows of mixed magnitude, so that the order and rounding of the sum shows
        const dy = tf.mul(rand([n, D], rng), tf.tensor(Float32Array.from({ length: n * D }, (_, i) => 10 ** ((i * 7) % 9 - 4)), [n, D]));
        expect(firstBitDifference(repeatRows(x, n), tf.tile(x, [n, 1]))).toBe(-1);
        const g = tf.grad((t: tf.Tensor) => tf.sum(tf.mul(repeatRows(t as tf.Tensor2D, n), dy)))(x);
        const gt = tf.grad((t: tf.Tensor) => tf.sum(tf.mul(tf.tile(t, [n, 1]), dy)))(x);
        expect(firstBitDifference(g, gt)).toBe(-1);
      }
      expect(() => repeatRows(tf.zeros([2, 3]) as tf.Tensor2D, 4)).toThrow(/x must be \[1, D\], got \[2,3\]/);
    });
  });

  test('concatColumns: tf.concat(xs, 1)\'s values and gradients, bit for bit', () => {
    tf.tidy(() => {
      const rng = new Rng(16);
      for (const widths of [[64, 32, 32], [1], [3, 1, 5, 2]]) {
        const xs = widths.map((w) => rand([7, w], rng) as tf.Tensor2D);
        const dy = rand([7, widths.reduce((a, b) => a + b, 0)], rng);
        expect(firstBitDifference(concatColumns(xs), tf.concat(xs, 1))).toBe(-1);
        const grads = (fn: (t: tf.Tensor2D[]) => tf.Tensor) => tf.grads((...t: tf.Tensor[]) => tf.sum(tf.mul(fn(t as tf.Tensor2D[]), dy)))(xs);
        const g = grads(concatColumns), gt = grads((t) => tf.concat(t, 1));
        g.forEach((gi, i) => expect([i, firstBitDifference(gi, gt[i])]).toEqual([i, -1]));
      }
      expect(() => concatColumns([tf.zeros([2, 3]) as tf.Tensor2D, tf.zeros([3, 3]) as tf.Tensor2D])).toThrow(/every tensor must be \[2, D\], got \[3,3\]/);
      expect(() => concatColumns([])).toThrow(/no tensors/);
    });
  });

  test('splitColumns: tf.split(x, widths, 1)\'s values and gradients, bit for bit, also with an output unused', () => {
    tf.tidy(() => {
      const rng = new Rng(18);
      // (tfjs' own SplitV gradient fails for a single part, so none here)
      for (const widths of [[32, 32], [1, 1], [3, 1, 5, 2]]) {
        const D = widths.reduce((a, b) => a + b, 0);
        const x = rand([7, D], rng) as tf.Tensor2D;
        const parts = splitColumns(x, widths), ref = tf.split(x, widths, 1);
        expect(parts.length).toBe(widths.length);
        parts.forEach((t, i) => expect([i, firstBitDifference(t, ref[i])]).toEqual([i, -1]));
        const dys = widths.map((w) => rand([7, w], rng));
        // every output weighted, then the first one alone (the others' gradients are zeros)
        for (const used of [widths.length, 1]) {
          const grad = (fn: (t: tf.Tensor2D) => tf.Tensor[]) =>
            tf.grad((t: tf.Tensor) => tf.addN(fn(t as tf.Tensor2D).slice(0, used).map((y, i) => tf.sum(tf.mul(y, dys[i])))))(x);
          expect(firstBitDifference(grad((t) => splitColumns(t, widths)), grad((t) => tf.split(t, widths, 1)))).toBe(-1);
        }
      }
      expect(splitColumns(rand([2, 6], rng) as tf.Tensor2D).map((t) => t.shape)).toEqual([[2, 3], [2, 3]]);
      expect(() => splitColumns(tf.zeros([2, 5]) as tf.Tensor2D)).toThrow(/x \[2,5\] has an odd number of columns to halve/);
      expect(() => splitColumns(tf.zeros([2, 5]) as tf.Tensor2D, [2, 2])).toThrow(/widths \[2,2\] must be positive integers summing to x's 5 columns/);
      expect(() => splitColumns(tf.zeros([2, 2, 2]) as unknown as tf.Tensor2D)).toThrow(/x must be \[n, D\], got \[2,2,2\]/);
    });
  });

  test('multiOutputOp: one tape node with several outputs; its errors name the op', () => {
    tf.tidy(() => {
      const x = tf.tensor1d([1, 2, 3]);
      const before = tf.memory().numTensors;
      // without a tape (no gradient asked): just the outputs, the op's temporaries freed
      const [a, b] = multiOutputOp('double', [x], (t) => {
        tf.mul(t, 5); // a temporary the op's scope frees
        return { values: [tf.mul(t, 2), tf.mul(t, 3)], gradFunc: ([da, db]) => [tf.add(tf.mul(da, 2), tf.mul(db, 3))] };
      });
      expect(tf.memory().numTensors - before).toBe(2);
      expect([Array.from(a.dataSync()), Array.from(b.dataSync())]).toEqual([[2, 4, 6], [3, 6, 9]]);
      const g = tf.grad((t: tf.Tensor) => {
        const [p, q] = multiOutputOp('double', [t], (u) => ({ values: [tf.mul(u, 2), tf.mul(u, 3)], gradFunc: ([dp, dq]) => [tf.add(tf.mul(dp, 2), tf.mul(dq, 3))] }));
        return tf.add(tf.sum(p), tf.sum(tf.square(q)));
      })(x);
      expect(Array.from(g.dataSync())).toEqual([2 + 18 * 1, 2 + 18 * 2, 2 + 18 * 3]);
      // the model's pattern: an inner gradient (detached) taken while an outer tape records
      const w = tf.tensor2d([[0.5, -1, 2, 0.25], [1.5, 3, -0.5, 1]]);
      const nested = (split: (t: tf.Tensor2D) => tf.Tensor[]) => {
        let inner: tf.Tensor | null = null;
        const outer = tf.grads((l: tf.Tensor) => {
          const [u, v] = split(l as tf.Tensor2D);
          const g = tf.grad((m: tf.Tensor) => { const [a2, b2] = split(m as tf.Tensor2D); return tf.sum(tf.mul(a2, tf.square(b2))); })(l);
          inner = tf.keep(tf.tensor(g.dataSync(), g.shape)); // detached, as the refinement's
          return tf.add(tf.sum(tf.mul(u, tf.exp(v))), tf.sum(tf.mul(l, inner)));
        })([w]);
        return [outer[0], inner!];
      };
      const [mine, ref] = [nested((t) => splitColumns(t)), nested((t) => tf.split(t, 2, 1))];
      expect([firstBitDifference(mine[0], ref[0]), firstBitDifference(mine[1], ref[1])]).toEqual([-1, -1]);
      const bad = () => tf.grad((t: tf.Tensor) => tf.sum(multiOutputOp('badGrad', [t], (u) => ({ values: [tf.mul(u, 2)], gradFunc: () => [] }))[0]))(x);
      expect(bad).toThrow(/badGrad: the gradient gave 0 tensors for 1 inputs/);
      expect(() => multiOutputOp('empty', [x], () => ({ values: [], gradFunc: () => [] }))).toThrow(/empty: the op must return one or more tensors/);
    });
  });

  test('channelsLast: tf.transpose(x, [0, 2, 3, 1])\'s values and gradient, bit for bit', () => {
    tf.tidy(() => {
      const rng = new Rng(19);
      const x = rand([2, 3, 4, 5], rng) as tf.Tensor4D;
      const dy = rand([2, 4, 5, 3], rng);
      expect(firstBitDifference(channelsLast(x), tf.transpose(x, [0, 2, 3, 1]))).toBe(-1);
      const grad = (fn: (t: tf.Tensor4D) => tf.Tensor) => tf.grad((t: tf.Tensor) => tf.sum(tf.mul(fn(t as tf.Tensor4D), dy)))(x);
      expect(firstBitDifference(grad(channelsLast), grad((t) => tf.transpose(t, [0, 2, 3, 1])))).toBe(-1);
    });
  });

  test('addSameShape and scaleBy: tf.add\'s and tf.mul\'s values and gradients, bit for bit', () => {
    tf.tidy(() => {
      const rng = new Rng(17);
      const [x, y, dy] = [rand([6, 4, 5], rng), rand([6, 4, 5], rng), rand([6, 4, 5], rng)];
      const s = Math.pow(32, -0.5);
      expect(firstBitDifference(addSameShape(x, y), tf.add(x, y))).toBe(-1);
      expect(firstBitDifference(scaleBy(x, s), tf.mul(x, s))).toBe(-1);
      const grads = (fn: (a: tf.Tensor, b: tf.Tensor) => tf.Tensor) => tf.grads((a: tf.Tensor, b: tf.Tensor) => tf.sum(tf.mul(fn(a, b), dy)))([x, y]);
      const [ga, gr] = [grads((a, b) => scaleBy(addSameShape(a, b), s)), grads((a, b) => tf.mul(tf.add(a, b), s))];
      ga.forEach((g, i) => expect([i, firstBitDifference(g, gr[i])]).toEqual([i, -1]));
      // shapes that broadcast go to tf.add
      expect(addSameShape(x, tf.ones([5])).shape).toEqual([6, 4, 5]);
    });
  });

  // the TypeScript loops, and the addon's where it is built (the same bits are asked of both)
  const kernelSets: [string, GaussianKernels][] = [['TypeScript', jsGaussianKernels]];
  if (nativeStatus().available && nativeOpsAvailable()) kernelSets.push(['native', addonOps()]);
  else console.warn('the native Gaussian kernels SKIPPED: the addon is not built'); // eslint-disable-line no-console

  describe.each(kernelSets)('%s kernels', (_name, kernels) => {
    const std = (s: tf.Tensor) => softplusToStdWith(kernels, s);
    const kl = (q: Gaussian, p: Gaussian | null) => klDiagWith(kernels, q, p);

    test.each([[[128, 64]], [[3, 5]], [[4, 1]]])('σ = sqrt(softplus(min(s, 80)) + 1e-5) %j: values and gradients', (shape) => {
      tf.tidy(() => {
        const rng = new Rng(11);
        const s = spread(shape, rng);
        const dy = rand(shape, rng);
        const run = (fn: (t: tf.Tensor) => tf.Tensor) => tf.valueAndGrads((t: tf.Tensor) => tf.sum(tf.mul(fn(t), dy)) as tf.Scalar)([s]);
        const [fused, ref] = [run(std), run(softplusToStdReference)];
        expect(firstBitDifference(std(s), softplusToStdReference(s))).toBe(-1);
        expect(firstBitDifference(fused.grads[0], ref.grads[0])).toBe(-1);
        expect(fused.value.dataSync()[0]).toBe(ref.value.dataSync()[0]);
      });
    });

    test('q from λ = [μ | s] as one op: posteriorFromLambdaReference\'s bits, values and gradients', () => {
      tf.tidy(() => {
        const rng = new Rng(20);
        const lambda = tf.concat([rand([128, 32], rng), spread([128, 32], rng)], 1) as tf.Tensor2D;
        const [dLoc, dStd] = [rand([128, 32], rng), rand([128, 32], rng)];
        const q = posteriorFromLambda(kernels, lambda), ref = posteriorFromLambdaReference(lambda);
        expect([firstBitDifference(q.loc, ref.loc), firstBitDifference(q.std, ref.std)]).toEqual([-1, -1]);
        // both outputs weighted, then σ alone (μ's upstream gradient is the engine's zeros)
        for (const withLoc of [true, false]) {
          const grad = (fn: (l: tf.Tensor2D) => Gaussian) =>
            tf.grad((l: tf.Tensor) => {
              const g = fn(l as tf.Tensor2D);
              const s = tf.sum(tf.mul(g.std, dStd));
              return withLoc ? tf.add(tf.sum(tf.mul(g.loc, dLoc)), s) : s;
            })(lambda);
          expect(firstBitDifference(grad((l) => posteriorFromLambda(kernels, l)), grad(posteriorFromLambdaReference))).toBe(-1);
        }
      });
    });

    test.each([['N(0, I)', false], ['a prior', true]])('z ~ q(λ) and KL(q ‖ %s) as one op: sampleWithKlReference\'s bits, values and gradients', (_, withPrior) => {
      tf.tidy(() => {
        const rng = new Rng(withPrior ? 21 : 22);
        const [N, D] = [128, 32];
        const lambda = tf.concat([rand([N, D], rng), spread([N, D], rng)], 1) as tf.Tensor2D;
        const eps = rand([N, D], rng);
        const prior = withPrior ? { loc: rand([N, D], rng) as tf.Tensor2D, std: tf.abs(rand([N, D], rng)) as tf.Tensor2D } : null;
        const [dz, dkl] = [rand([N, D], rng), rand([N], rng)];
        const fused = sampleWithKl(kernels, lambda, eps, prior), ref = sampleWithKlReference(lambda, eps, prior);
        expect([firstBitDifference(fused.z, ref.z), firstBitDifference(fused.kl, ref.kl)]).toEqual([-1, -1]);
        // both outputs weighted, then z alone and the KL alone (z alone: λ's gradient, the prior's being none)
        for (const used of ['both', 'z', 'kl']) {
          const inputs = prior && used !== 'z' ? [lambda, prior.loc, prior.std] : [lambda];
          const grads = (fn: typeof sampleWithKlReference) =>
            tf.grads((...t: tf.Tensor[]) => {
              const r = fn(t[0] as tf.Tensor2D, eps, t.length > 1 ? { loc: t[1] as tf.Tensor2D, std: t[2] as tf.Tensor2D } : prior);
              const terms = [used !== 'kl' ? tf.sum(tf.mul(r.z, dz)) : null, used !== 'z' ? tf.sum(tf.mul(r.kl, dkl)) : null].filter((x): x is tf.Tensor => x !== null);
              return tf.addN(terms);
            })(inputs);
          const g = grads((l, e, p) => sampleWithKl(kernels, l, e, p)), gr = grads(sampleWithKlReference);
          g.forEach((gi, i) => expect([used, i, firstBitDifference(gi, gr[i])]).toEqual([used, i, -1]));
        }
      });
    });

    test('σ\'s gradient stays NaN for a NaN upstream gradient, also where min(s, 80) cuts it off', () => {
      const s = new Float32Array([0, 100]);
      const ds = kernels.softplusStdBackward({ g: new Float32Array([NaN, NaN]), s, std: kernels.softplusStd({ s }) });
      expect(Array.from(ds)).toEqual([NaN, NaN]);
    });

    test.each([['N(0, I)', false], ['a prior', true]])('KL(q ‖ %s) summed over z: values and all gradients', (_, withPrior) => {
      tf.tidy(() => {
        const rng = new Rng(withPrior ? 12 : 13);
        const shape = [128, 64];
        const inputs = [rand(shape, rng), spread(shape, rng), rand(shape, rng), spread(shape, rng)].slice(0, withPrior ? 4 : 2);
        const dy = rand([shape[0]], rng);
        const run = (klFn: (q: Gaussian, p: Gaussian | null) => tf.Tensor1D) =>
          tf.valueAndGrads((...t: tf.Tensor[]) => {
            const q = { loc: t[0] as tf.Tensor2D, std: std(t[1]) as tf.Tensor2D };
            const p = t.length > 2 ? { loc: t[2] as tf.Tensor2D, std: std(t[3]) as tf.Tensor2D } : null;
            return tf.sum(tf.mul(klFn(q, p), dy)) as tf.Scalar;
          })(inputs);
        const fused = run(kl), ref = run(klDiagReference);
        expect(fused.value.dataSync()[0]).toBe(ref.value.dataSync()[0]);
        fused.grads.forEach((g, i) => expect([i, firstBitDifference(g, ref.grads[i])]).toEqual([i, -1]));
        const q = { loc: inputs[0] as tf.Tensor2D, std: std(inputs[1]) as tf.Tensor2D };
        const p = withPrior ? { loc: inputs[2] as tf.Tensor2D, std: std(inputs[3]) as tf.Tensor2D } : null;
        expect(firstBitDifference(kl(q, p), klDiagReference(q, p))).toBe(-1);
      });
    });
  });

  test('z = μ + ε σ: rsampleReference\'s bits, values and gradients', () => {
    tf.tidy(() => {
      const rng = new Rng(15);
      const shape = [128, 32];
      const [loc, std, eps, dz] = [rand(shape, rng), tf.abs(rand(shape, rng)), rand(shape, rng), rand(shape, rng)];
      const run = (fn: typeof rsample) =>
        tf.valueAndGrads((l: tf.Tensor, s: tf.Tensor) => tf.sum(tf.mul(fn({ loc: l as tf.Tensor2D, std: s as tf.Tensor2D }, eps), dz)) as tf.Scalar)([loc, std]);
      const fused = run(rsample), ref = run(rsampleReference);
      const q = { loc: loc as tf.Tensor2D, std: std as tf.Tensor2D };
      expect(firstBitDifference(rsample(q, eps), rsampleReference(q, eps))).toBe(-1);
      fused.grads.forEach((g, i) => expect([i, firstBitDifference(g, ref.grads[i])]).toEqual([i, -1]));
    });
  });

  test('the native Gaussian kernels check their arguments', () => {
    if (!(nativeStatus().available && nativeOpsAvailable())) return;
    const m = addonOps();
    const a = new Float32Array(6);
    expect(() => m.softplusStd({ s: [1, 2] as unknown as Float32Array })).toThrow(/emorl.softplusStd: 'spec.s' must be a Float32Array/);
    expect(() => m.softplusStdBackward({ g: a, s: a, std: new Float32Array(5) })).toThrow(/'spec.std' has 5 elements but 'spec.s' \(6 elements\) needs 6/);
    expect(() => m.klDiag({ qLoc: a, qStd: a, rows: 2, D: 4 })).toThrow(/'spec.qLoc' has 6 elements but \[rows,D\] = \[2,4\] needs 8/);
    expect(() => m.klDiag({ qLoc: a, qStd: a, pLoc: a, rows: 2, D: 3 })).toThrow(/'spec.pLoc' and 'spec.pStd' go together/);
    expect(() => m.klDiagBackward({ qLoc: a, qStd: a, rows: 2, D: 3, g: new Float32Array(3) })).toThrow(/'spec.g' has 3 elements but \[rows\] = \[2\] needs 2/);
    const g = m.klDiagBackward({ qLoc: a, qStd: a.map(() => 1), rows: 2, D: 3, g: new Float32Array(2) });
    expect([g.dpLoc, g.dpStd]).toEqual([null, null]);
  });
});

describe('the stage loss, one op (lib/model/stage-loss.ts)', () => {
  const bits = (t: tf.Tensor) => Array.from(new Uint32Array(Float32Array.from(t.dataSync() as Float32Array).buffer));
  const B = 6, K = 4;
  const cases: [string, number, Partial<StageLossSpec>][] = [
    ['plain, one KL term', 1, {}],
    ['plain, three layers of KL', 3, { klBeta: 0.37 }],
    ['plain, no KL term (L = 0 at stage 0)', 0, {}],
    ['plain, a shard of a batch of 16', 2, { lossBatchSize: 16 }],
    ['GECO', 2, { geco: { target: 21.5, cEma: -3.25, multiplier: Math.fround(Math.log1p(Math.exp(1.3))) } }],
    ['GECO, a shard of a batch of 16', 1, { klBeta: 0.5, lossBatchSize: 16, geco: { target: 21.5, cEma: 1.75, multiplier: 0.9 } }],
    ['GECO, the whole global batch', 1, { lossBatchSize: B, geco: { target: 2, cEma: 0.5, multiplier: 1.1 } }],
  ];
  test.each(cases)('%s: the reference\'s bits, values, logged means and gradients', (_n, layers, extra) => {
    tf.tidy(() => {
      const rng = new Rng(21 + layers);
      const spec: StageLossSpec = { K, klBeta: 1, ...extra };
      const nll = tf.mul(rand([B], rng), 30) as tf.Tensor1D;
      const kls = Array.from({ length: layers }, () => tf.abs(tf.mul(rand([B * K], rng), 5)) as tf.Tensor1D);
      const fused = stageLoss(nll, kls, spec), ref = stageLossReference(nll, kls, spec);
      expect(bits(fused.loss)).toEqual(bits(ref.loss));
      expect([fused.nllMean, fused.klMean]).toEqual([ref.nllMean, ref.klMean]);
      // gradients with an upstream weight other than 1 (the outer tape's stage weight)
      const grads = (fn: typeof stageLoss) =>
        tf.grads((...t: tf.Tensor[]) => tf.mul(fn(t[0] as tf.Tensor1D, t.slice(1) as tf.Tensor1D[], spec).loss, 1.3))([nll, ...kls]);
      const gf = grads(stageLoss), gr = grads(stageLossReference);
      gf.forEach((g, i) => expect([i, bits(g)]).toEqual([i, bits(gr[i])]));
    });
  });

  test('the weighted total of the stages\' losses: the reference\'s bits and gradients', () => {
    tf.tidy(() => {
      const losses = [-12049.1, 3.3e-3, 7.25, -0.125].map((v) => tf.scalar(v)) as tf.Scalar[];
      const weights = [5 / 4, 4 / 4, 3 / 4, 2 / 4].map((w) => w * 1.1);
      expect(bits(weightedTotal(losses, weights))).toEqual(bits(weightedTotalReference(losses, weights)));
      const grads = (fn: typeof weightedTotal) => tf.grads((...t: tf.Tensor[]) => tf.mul(fn(t as tf.Scalar[], weights), 0.7))(losses);
      const gf = grads(weightedTotal), gr = grads(weightedTotalReference);
      gf.forEach((g, i) => expect([i, bits(g)]).toEqual([i, bits(gr[i])]));
      expect(() => weightedTotal(losses, [1])).toThrow(/4 losses but 1 weights/);
    });
  });

  test('bad shapes and batch sizes are named', () => {
    tf.tidy(() => {
      const nll = tf.zeros([3]) as tf.Tensor1D;
      expect(() => stageLoss(nll, [tf.zeros([5]) as tf.Tensor1D], { K: 2, klBeta: 1 })).toThrow(/each per-slot KL must be \[B·K\] = \[6\], got \[5\]/);
      expect(() => stageLoss(tf.zeros([3, 1]) as unknown as tf.Tensor1D, [], { K: 2, klBeta: 1 })).toThrow(/nll must be \[B\], got \[3,1\]/);
      expect(() => stageLoss(nll, [], { K: 2, klBeta: 1, lossBatchSize: 2 })).toThrow(/lossBatchSize must be an integer >= the batch size 3, got 2/);
    });
  });
});
