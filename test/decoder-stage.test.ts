/**
 * The native decoding stage (native/decoder.cc + likelihood.cc through lib/ops/native-decoder.ts)
 * against the reference decoderNll on tfjsOps: nll, the per-slot outputs, and the gradients with
 * respect to z, the positional embedding and every weight and bias, for each decoder and both
 * likelihoods on odd sizes (K = 1, non-square images, one image). Also the fused likelihood on
 * its own against tfjs autodiff and finite differences, and bad input. Skipped, with a notice,
 * when the addon is not built.
 */
import { tf, initBackend } from '../lib/tf';
import { nativeStatus } from '../lib/native';
import { tfjsOps, type Ops } from '../lib/ops';
import { nativeOps, nativeOpsAvailable } from '../lib/ops/native';
import { addonOps } from '../lib/ops/addon';
import { withoutParamGrads } from '../lib/ops/conv';
import { meansAndLogMasks, type DecoderLayerSpec, type DecoderNllArgs, type DecoderSpec, type StageGrads } from '../lib/ops/decoder-stage';
import { decoderStack } from '../lib/model/decoders';
import { gaussianNll, gmmNll } from '../lib/model/likelihoods';
import { EfficientMORL } from '../lib/model/efficient-morl';
import type { NetConfig } from '../lib/config/net';
import { expectRelClose } from './helpers';

const available = nativeStatus().available && nativeOpsAvailable();
const describeNative = available ? describe : describe.skip;
if (!available) {
  // eslint-disable-next-line no-console
  console.warn(`decoder-stage tests SKIPPED: ${nativeStatus().reason ?? 'the addon has no decoder-stage kernel (npm run build:native)'}`);
}

beforeAll(async () => {
  await initBackend('cpu');
});

function rand(shape: number[], seed: number, lo = -1, hi = 1): tf.Tensor {
  return tf.randomUniform(shape, lo, hi, 'float32', seed);
}

const expectClose = expectRelClose;

interface Case {
  cfg: Partial<NetConfig>;
  B: number;
  seed: number;
}

/** The decoder of `cfg` with weights of a useful scale, as tensors the test differentiates. */
function setup(c: Case) {
  const model = new EfficientMORL(c.cfg, { ops: tfjsOps, seed: c.seed });
  const { K, z_size: Z } = model.cfg;
  const [C, H, W] = model.cfg.input_size;
  const stack = decoderStack(model.params, tfjsOps, model.cfg);
  const weights: tf.Tensor[] = [];
  let s = c.seed * 100;
  const layers = stack.spec.layers.map((L): DecoderLayerSpec => {
    if (L.kind === 'spatialBroadcast') return L;
    const fanIn = L.weight.shape[1] * L.weight.shape[2] * L.weight.shape[3];
    const w = tf.mul(rand(L.weight.shape, s++), 1.5 / Math.sqrt(fanIn)) as tf.Tensor4D;
    const b = tf.mul(rand(L.bias.shape, s++), 0.1) as tf.Tensor1D;
    weights.push(w, b);
    return { ...L, weight: w, bias: b };
  });
  const pos = tf.keep(stack.pos.clone());
  stack.pos.dispose();
  model.dispose();
  const z = rand([c.B * K, Z], s++) as tf.Tensor2D;
  const target = rand([c.B, H, W, C], s++, 0, 1) as tf.Tensor4D;
  return { K, C, H, W, layers, weights, pos, z, target, logVar: Math.fround(2 * Math.log(0.3)) };
}

type Setup = ReturnType<typeof setup>;

/** Rebuilds the spec from the differentiated tensors [z, pos, w0, b0, ...]. */
function specFrom(st: Setup, xs: tf.Tensor[]): DecoderSpec {
  let i = 2;
  return {
    layers: st.layers.map((L): DecoderLayerSpec => (L.kind === 'spatialBroadcast' ? L : { ...L, weight: xs[i++] as tf.Tensor4D, bias: xs[i++] as tf.Tensor1D })),
  };
}

function args(st: Setup, xs: tf.Tensor[], likelihood: 'Gaussian' | 'GMM', grads: StageGrads, outputs: boolean): DecoderNllArgs {
  return { spec: specFrom(st, xs), z: xs[0] as tf.Tensor2D, pos: xs[1] as tf.Tensor3D, target: st.target, K: st.K, logVar: st.logVar, likelihood, grads, outputs };
}

function compare(c: Case, likelihood: 'Gaussian' | 'GMM'): void {
  const st = setup(c);
  const xs = [st.z, st.pos, ...st.weights];
  try {
    // values and outputs
    tf.tidy(() => {
      const ref = tfjsOps.decoderNll(args(st, xs, likelihood, 'none', true));
      const nat = nativeOps.decoderNll(args(st, xs, likelihood, 'none', true));
      expectClose(nat.nll, ref.nll, 2e-6, 'nll');
      expectClose(nat.means!, ref.means!, 1e-5, 'means');
      expectClose(nat.logMasks!, ref.logMasks!, 1e-5, 'log masks');
    });
    // every gradient for a uniform upstream (a batch-mean loss with a weight)
    tf.tidy(() => {
      const u = 0.37;
      const f = (ops: Ops) => (...t: tf.Tensor[]) => tf.mul(tf.sum(ops.decoderNll(args(st, t, likelihood, 'all', false)).nll), u) as tf.Scalar;
      const gr = tf.grads(f(tfjsOps))(xs);
      const gn = tf.grads(f(nativeOps))(xs);
      const names = ['dz', 'dpos', ...st.weights.map((_, i) => `d${i % 2 ? 'bias' : 'weight'}[${Math.floor(i / 2)}]`)];
      gn.forEach((g, i) => expectClose(g, gr[i], 1e-4, names[i]));
    });
    // the refinement's inner gradient: d/dz only, any per-image upstream
    tf.tidy(() => {
      const up = tf.tensor1d(Array.from({ length: c.B }, (_, b) => 0.5 + b));
      const f = (ops: Ops) => (z: tf.Tensor) => tf.sum(tf.mul(ops.decoderNll(args(st, [z, ...xs.slice(1)], likelihood, 'input', false)).nll, up)) as tf.Scalar;
      const gr = withoutParamGrads(() => tf.grad(f(tfjsOps))(st.z));
      const gn = withoutParamGrads(() => tf.grad(f(nativeOps))(st.z));
      expectClose(gn, gr, 1e-4, 'dz (per-image upstream)');
    });
  } finally {
    tf.dispose([...xs, st.target]);
  }
}

describeNative('decoderNll: native stage vs the tfjsOps reference', () => {
  const cases: [string, Case][] = [
    ['small decoder, non-square', { cfg: { K: 3, input_size: [3, 9, 7], z_size: 6, image_decoder: 'small' }, B: 2, seed: 1 }],
    ['small decoder, K=1, one image', { cfg: { K: 1, input_size: [3, 8, 8], z_size: 5, image_decoder: 'small' }, B: 1, seed: 2 }],
    ['iodine decoder, non-square', { cfg: { K: 2, input_size: [3, 7, 10], z_size: 6, image_decoder: 'iodine' }, B: 2, seed: 3 }],
    ['big decoder', { cfg: { K: 2, input_size: [3, 96, 96], z_size: 4, image_decoder: 'big' }, B: 1, seed: 4 }],
  ];
  for (const [name, c] of cases) {
    // the big decoder's reference is slow (96x96 on tfjs): one likelihood there (the whole-model
    // test in model-native.test.ts runs it with the other)
    for (const lik of name.startsWith('big') ? (['GMM'] as const) : (['Gaussian', 'GMM'] as const)) {
      test(`${name}, ${lik}`, () => compare(c, lik), 120_000);
    }
  }

  test('the decoder workspace kept between calls: batches of changing size give the reference results', () => {
    // same weights (so the same kept workspace), batches 3, 1, 2: buffers grow, then are reused
    const st = setup({ cfg: { K: 2, input_size: [3, 7, 6], z_size: 4, image_decoder: 'small' }, B: 3, seed: 6 });
    try {
      for (const B of [3, 1, 2]) {
        tf.tidy(() => {
          const z = st.z.slice([0, 0], [B * st.K, -1]);
          const target = st.target.slice([0, 0, 0, 0], [B, -1, -1, -1]);
          const xs = [z, st.pos, ...st.weights];
          const a = (t: tf.Tensor[]) => ({ ...args(st, t, 'GMM', 'all', false), target: target as tf.Tensor4D });
          const f = (ops: Ops) => (...t: tf.Tensor[]) => tf.sum(ops.decoderNll(a(t)).nll) as tf.Scalar;
          const gr = tf.grads(f(tfjsOps))(xs);
          const gn = tf.grads(f(nativeOps))(xs);
          gn.forEach((g, i) => expectClose(g, gr[i], 1e-4, `batch ${B}: gradient ${i}`));
          expectClose(nativeOps.decoderNll(a(xs)).nll, tfjsOps.decoderNll(a(xs)).nll, 2e-6, `batch ${B}: nll`);
        });
      }
    } finally {
      tf.dispose([st.z, st.pos, ...st.weights, st.target]);
    }
  });

  test("parameter gradients need a uniform upstream and a stage run with grads 'all'", () => {
    const st = setup({ cfg: { K: 2, input_size: [3, 6, 6], z_size: 4, image_decoder: 'small' }, B: 2, seed: 5 });
    const xs = [st.z, st.pos, ...st.weights];
    try {
      const up = tf.tensor1d([1, 2]);
      expect(() => tf.grads((...t: tf.Tensor[]) => tf.sum(tf.mul(nativeOps.decoderNll(args(st, t, 'Gaussian', 'all', false)).nll, up)) as tf.Scalar)(xs)).toThrow(/upstream gradient differs between images/);
      expect(() => tf.grads((...t: tf.Tensor[]) => tf.sum(nativeOps.decoderNll(args(st, t, 'Gaussian', 'input', false)).nll) as tf.Scalar)(xs)).toThrow(/grads 'input'/);
      expect(() => tf.grad((z: tf.Tensor) => tf.sum(nativeOps.decoderNll(args(st, [z, ...xs.slice(1)], 'Gaussian', 'none', false)).nll) as tf.Scalar)(st.z)).toThrow(/grads 'none'/);
      up.dispose();
    } finally {
      tf.dispose([...xs, st.target]);
    }
  });
});

describeNative('imageNll: the fused likelihood alone', () => {
  /** tfjs: sigmoid, log-softmax over slots and the likelihood, as the model composes them. */
  function reference(raw: tf.Tensor4D, target: tf.Tensor4D, B: number, K: number, logVar: number, gmm: boolean): tf.Tensor1D {
    const { means, logMasks } = meansAndLogMasks(raw, B, K);
    return (gmm ? gmmNll : gaussianNll)(target, means, logMasks, tf.scalar(logVar));
  }

  for (const gmm of [false, true]) {
    test(`${gmm ? 'GMM' : 'Gaussian'}: values, gradient vs tfjs autodiff and finite differences`, () => {
      const B = 2, K = 3, H = 4, W = 5, C = 3;
      const logVar = Math.fround(2 * Math.log(0.2));
      const raw = tf.mul(rand([B * K, H, W, C + 1], 7), 3) as tf.Tensor4D;
      const target = rand([B, H, W, C], 8, 0, 1) as tf.Tensor4D;
      const rawD = Float32Array.from(raw.dataSync());
      const targetD = target.dataSync() as Float32Array;
      const r = addonOps().imageNll({ raw: rawD, target: targetD, B, K, H, W, C, logVar, gmm, needGrad: true });
      const ref = reference(raw, target, B, K, logVar, gmm);
      expectClose(tf.tensor1d(r.nll), ref, 2e-6, 'nll');
      const g = tf.grad((x: tf.Tensor) => tf.sum(reference(x as tf.Tensor4D, target, B, K, logVar, gmm)) as tf.Scalar)(raw);
      expectClose(tf.tensor(r.draw!, raw.shape), g, 1e-5, 'd nll / d raw');
      // central differences in double precision of a few entries (float32 evaluation, so loose)
      const total = (d: Float32Array) => addonOps().imageNll({ raw: d, target: targetD, B, K, H, W, C, logVar, gmm, needGrad: false }).nll.reduce((a, b) => a + b, 0);
      for (const i of [0, 3, 17, 50, rawD.length - 1]) {
        const h = 1e-2;
        const p = Float32Array.from(rawD), m = Float32Array.from(rawD);
        p[i] += h;
        m[i] -= h;
        const fd = (total(p) - total(m)) / (2 * h);
        expect(Math.abs(fd - r.draw![i])).toBeLessThan(2e-2 * Math.max(1, Math.abs(fd)));
      }
      tf.dispose([raw, target, ref, g]);
    });
  }

  test('bad input is a JS error naming the argument', () => {
    const k = addonOps();
    const ok = { raw: new Float32Array(2 * 4 * 1), target: new Float32Array(3), B: 1, K: 2, H: 1, W: 1, C: 3, logVar: 0, gmm: false, needGrad: false };
    expect(() => k.imageNll({ ...ok, raw: new Float32Array(5) })).toThrow(/spec\.raw' has 5 elements but \[B\*K,H,W,C\+1\]/);
    expect(() => k.imageNll({ ...ok, logVar: NaN })).toThrow(/logVar' must be a finite number/);
    expect(() => k.imageNll({ ...ok, K: 0 })).toThrow(/spec\.K' is 0/);
    expect(() => (k.imageNll as unknown as (x: unknown) => unknown)(42)).toThrow(/'spec' must be an object/);
  });

  test('decoderStage rejects inconsistent layer chains with a message naming the layer', () => {
    const k = addonOps();
    const n = 2, c = 3, gh = 6, gw = 6;
    const base = {
      z: new Float32Array(n * c), n, c, pos: new Float32Array(gh * gw * c), gh, gw,
      target: new Float32Array(1 * 4 * 4 * 3), B: 1, K: 2, H: 4, W: 4, C: 3, logVar: 0, gmm: false, needDz: true, needParams: true, needOutputs: false,
    };
    const conv = (cin: number, cout: number, kernel: number) => ({ kind: 2 as const, w: new Float32Array(cout * cin * kernel * kernel), wShape: [cout, cin, kernel, kernel], b: new Float32Array(cout) });
    expect(() => k.decoderStage({ ...base, layers: [{ kind: 1 }, conv(5, 4, 3)] })).toThrow(/layers\[1\]: weight \[4,5,3,3\] expects 5 input channels/);
    expect(() => k.decoderStage({ ...base, layers: [{ kind: 1 }, conv(3, 5, 3)] })).toThrow(/decoder's output \[2,4,4,5\] does not match/);
    expect(() => k.decoderStage({ ...base, layers: [conv(3, 4, 3)] })).toThrow(/first layer/);
    expect(() => k.decoderStage({ ...base, layers: [{ kind: 1 }, { ...conv(3, 4, 3), b: new Float32Array(3) }] })).toThrow(/layers\[1\]\.b' has 3 elements/);
    expect(() => k.decoderStage({ ...base, n: 3, layers: [{ kind: 1 }] })).toThrow(/spec\.z' has 6 elements/);
    // and a consistent one runs: spatial broadcast + a 3x3 conv to 4 channels
    const r = k.decoderStage({ ...base, gh: 6, gw: 6, layers: [{ kind: 1 }, conv(3, 4, 3), { ...conv(4, 4, 1) }] });
    expect(r.nll.length).toBe(1);
    expect(r.dz!.length).toBe(n * c);
  });
});
