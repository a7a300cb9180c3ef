/**
 * The model's API around the numerics: config validation, parameter store checks, input checks,
 * noise sources, any batch size and non-square images, the zero-refinement mode, initialisation,
 * GECO bookkeeping, Adam, and that repeated training steps leak no tensors.
 */
import { tf, initBackend } from '../lib/tf';
import { ConfigError, DEFAULT_NET_CONFIG, netConfig, type NetConfig } from '../lib/config/net';
import { EfficientMORL, stageWeight } from '../lib/model/efficient-morl';
import { Geco } from '../lib/model/geco';
import { RecordingNoise, ReplayNoise, SeededNoise } from '../lib/model/noise';
import { positionalEmbedding } from '../lib/model/positional';
import { Adam, clipGradNorm, clipScale } from '../lib/optim/adam';
import { addonOps, nativeOpsAvailable } from '../lib/ops/addon';
import { experimentConfig } from '../lib/config/experiment';
import { Trainer } from '../lib/train/trainer';
import { netParamSpecs } from '../lib/params/spec';
import { ParamStore } from '../lib/params/store';
import { Rng } from '../lib/util/rng';

beforeAll(async () => {
  await initBackend('cpu');
});

const tiny: Partial<NetConfig> = {
  K: 3,
  input_size: [3, 8, 8],
  z_size: 4,
  stochastic_layers: 2,
  refinement_iters: 2,
  image_decoder: 'small',
  image_likelihood: 'Gaussian',
};

function images(B: number, H: number, W: number, seed = 1): tf.Tensor4D {
  const rng = new Rng(seed);
  return tf.tensor4d(Float32Array.from(rng.normals(B * 3 * H * W), (v) => Math.tanh(v)), [B, 3, H, W]);
}

describe('Net config', () => {
  test('defaults are the original ones', () => {
    const c = netConfig();
    expect(c).toEqual({ ...DEFAULT_NET_CONFIG });
    expect(c.log_scale).toBeCloseTo(Math.log(0.1), 12);
  });

  test.each([
    [{ image_decoder: 'huge' }, /Net\.image_decoder: must be 'small', 'big' or 'iodine'/],
    [{ image_likelihood: 'Laplace' }, /Net\.image_likelihood: must be 'Gaussian' or 'GMM'/],
    [{ K: 0 }, /Net\.K: must be an integer >= 1/],
    [{ K: 2.5 }, /Net\.K: must be an integer >= 1/],
    [{ z_size: -1 }, /Net\.z_size/],
    [{ stochastic_layers: -1 }, /Net\.stochastic_layers: must be an integer >= 0/],
    [{ input_size: [3, 64] }, /Net\.input_size: must be \[C, H, W\]/],
    [{ input_size: [1, 64, 64] }, /Net\.input_size: the model takes RGB images/],
    [{ image_decoder: 'big', input_size: [3, 64, 64] }, /Net\.input_size: the 'big' decoder produces 96x96 images/],
    [{ bottom_up_prior: true, reverse_prior_plusplus: true }, /Net\.reverse_prior_plusplus: cannot be true together with bottom_up_prior/],
    [{ use_DualGRU: 'yes' }, /Net\.use_DualGRU: must be true or false/],
    [{ log_scale: Number.NaN }, /Net\.log_scale/],
    [{ kz_size: 3 }, /Net\.kz_size: unknown key/],
  ])('rejects %j', (overrides, message) => {
    expect(() => netConfig(overrides as Record<string, unknown>)).toThrow(message);
    expect(() => netConfig(overrides as Record<string, unknown>)).toThrow(ConfigError);
  });
});

describe('parameter store', () => {
  test('names and shapes follow the original state_dict for every option', () => {
    const dual = netParamSpecs(netConfig({ z_size: 8 }));
    const names = dual.map((s) => s.name);
    expect(names).toContain('hvae_networks.gru.cell.weight_ih_1');
    expect(names).toContain('hvae_networks.image_decoder.decode.8.weight'); // iodine is the default
    const plain = netParamSpecs(netConfig({ z_size: 8, use_DualGRU: false, image_decoder: 'small' })).map((s) => [s.name, s.shape]);
    expect(plain).toContainEqual(['hvae_networks.gru.weight_ih_l0', [48, 16]]);
    expect(plain).toContainEqual(['hvae_networks.project_update.weight', [16, 8]]);
    expect(plain).toContainEqual(['hvae_networks.image_decoder.decode.6.weight', [4, 32, 3, 3]]);
    const big = netParamSpecs(netConfig({ z_size: 8, image_decoder: 'big', input_size: [3, 96, 96] })).map((s) => [s.name, s.shape]);
    expect(big).toContainEqual(['hvae_networks.image_decoder.decode.0.weight', [8, 64, 5, 5]]);
    expect(big).toContainEqual(['hvae_networks.image_decoder.decode.10.weight', [64, 4, 3, 3]]);
  });

  test('initialisation follows the original, distribution by distribution', () => {
    const cfg = netConfig({ z_size: 32, image_decoder: 'small', input_size: [3, 35, 35] });
    const store = new ParamStore(netParamSpecs(cfg), new Rng(3));
    const stats = (name: string): { mean: number; std: number; min: number; max: number } => {
      const d = store.get(name).dataSync() as Float32Array;
      let s = 0;
      let s2 = 0;
      let min = Infinity;
      let max = -Infinity;
      for (const v of d) {
        s += v;
        s2 += v * v;
        min = Math.min(min, v);
        max = Math.max(max, v);
      }
      const mean = s / d.length;
      return { mean, std: Math.sqrt(s2 / d.length - mean * mean), min, max };
    };
    // Xavier normal, gain 0.02: std = 0.02 * sqrt(2 / (fan_in + fan_out))
    const enc = stats('hvae_networks.encoder_pt_1.2.weight');
    expect(enc.std).toBeCloseTo(0.02 * Math.sqrt(2 / (64 * 25 + 64 * 25)), 4);
    expect(stats('hvae_networks.encoder_pt_1.2.bias').max).toBe(0);
    // DualGRU: standard normal, biases included
    expect(stats('hvae_networks.gru.cell.weight_ih_1').std).toBeGreaterThan(0.9);
    expect(stats('hvae_networks.gru.cell.bias_ih').std).toBeGreaterThan(0.8);
    // nn.GRU default: U(-1/sqrt(H), 1/sqrt(H))
    const rec = stats('refinenet.recurrence.weight_ih_l0');
    expect(rec.max).toBeLessThanOrEqual(1 / Math.sqrt(32));
    expect(rec.min).toBeGreaterThanOrEqual(-1 / Math.sqrt(32));
    expect(rec.std).toBeCloseTo(1 / Math.sqrt(32) / Math.sqrt(3), 2);
    // the encoder's positional projection keeps nn.Linear's default U(±1/sqrt(4))
    expect(stats('hvae_networks.pos_embed_projection.weight').max).toBeLessThanOrEqual(0.5);
    expect(stats('hvae_networks.pos_embed_projection.bias').std).toBeGreaterThan(0.1);
    // LayerNorm defaults, learned initial posterior [0…0, 1…1], GECO state
    expect(stats('hvae_networks.norm_slots.weight')).toMatchObject({ min: 1, max: 1 });
    expect(Array.from(store.get('hvae_networks.init_posterior').dataSync())).toEqual([...Array(32).fill(0), ...Array(32).fill(1)]);
    expect(store.get('geco_beta').dataSync()[0]).toBeCloseTo(0.55, 6);
    expect(store.trainableNames()).not.toContain('geco_beta');
    // seeded: the same seed gives the same weights
    const again = new ParamStore(netParamSpecs(cfg), new Rng(3));
    expect(Array.from(again.get('hvae_networks.to_q.weight').dataSync())).toEqual(Array.from(store.get('hvae_networks.to_q.weight').dataSync()));
    store.dispose();
    again.dispose();
  });

  test('loading checks shapes and keys, naming the key', () => {
    const model = new EfficientMORL(tiny);
    const good = model.params.snapshot();
    expect(() => model.params.load({ ...good, 'hvae_networks.to_q.weight': { data: new Float32Array(20), shape: [5, 4] } })).toThrow(
      /parameter 'hvae_networks\.to_q\.weight': shape \[5,4\] does not match the model's \[4,4\]/,
    );
    const missing = { ...good };
    delete missing['refinenet.loc.bias'];
    expect(() => model.params.load(missing)).toThrow(/parameter 'refinenet\.loc\.bias': missing/);
    expect(() => model.params.load({ ...good, 'module.extra': { data: new Float32Array(1), shape: [1] } })).toThrow(/parameter 'module\.extra': unexpected key/);
    model.params.load(good);
    expect(() => model.params.get('nope')).toThrow(/parameter 'nope'/);
    model.dispose();
  });
});

describe('inputs and noise', () => {
  test('bad images are clear errors', () => {
    const model = new EfficientMORL(tiny);
    expect(() => model.infer(tf.zeros([1, 3, 8, 9]))).toThrow(/images are 8x9, Net\.input_size expects 8x8/);
    expect(() => model.infer(tf.zeros([1, 1, 8, 8]))).toThrow(/images have 1 channels, Net\.input_size expects C = 3/);
    expect(() => model.infer(tf.zeros([3, 8, 8]))).toThrow(/must be \[B, C, H, W\]/);
    const nan = tf.tensor4d(Float32Array.from({ length: 3 * 64 }, (_, i) => (i === 17 ? Number.NaN : 0)), [1, 3, 8, 8]);
    expect(() => model.infer(nan)).toThrow(/non-finite pixel value NaN at flat index 17/);
    expect(() => model.infer(images(1, 8, 8), { refinementIters: -1 })).toThrow(/refinementIters/);
    model.dispose();
  });

  test('replayed noise reproduces a pass exactly; a replay of the wrong shape or length fails', () => {
    const model = new EfficientMORL(tiny, { seed: 4 });
    const x = images(2, 8, 8);
    const rec = new RecordingNoise(new SeededNoise(9));
    const a = model.infer(x, { noise: rec });
    // 1 initial + L posterior samples + (L-1) prior samples + I refinement samples
    expect(rec.draws.length).toBe(1 + 2 + 1 + 2);
    const replay = new ReplayNoise(rec.draws);
    const b = model.infer(x, { noise: replay });
    expect(replay.remaining()).toBe(0);
    expect(b.totalLoss).toBe(a.totalLoss);
    expect(Array.from(b.outputs.stages[2].means.dataSync())).toEqual(Array.from(a.outputs.stages[2].means.dataSync()));
    a.dispose();
    b.dispose();
    const beforeFail = tf.memory().numTensors;
    expect(() => model.lossAndGrads(x, { noise: new ReplayNoise(rec.draws.slice(0, 5)), outputs: true })).toThrow(/only 5 were recorded/);
    expect(tf.memory().numTensors).toBe(beforeFail); // a failed pass leaks nothing
    expect(() => model.infer(x, { noise: new ReplayNoise(rec.draws.slice(0, 3)) })).toThrow(/ReplayNoise: draw 3 of shape \[6,4\] requested, but only 3 were recorded/);
    expect(tf.memory().numTensors).toBe(beforeFail); // (that one failed inside the stage-0 gradient)
    expect(() => model.infer(images(1, 8, 8), { noise: new ReplayNoise(rec.draws) })).toThrow(/requested with shape \[3,4\], but the recorded one has shape \[6,4\]/);
    x.dispose();
    model.dispose();
  });
});

describe('shapes and modes', () => {
  test('any batch size, non-square images, every stage returned', () => {
    const model = new EfficientMORL({ ...tiny, input_size: [3, 6, 9], image_decoder: 'iodine', image_likelihood: 'GMM' }, { seed: 2 });
    for (const B of [1, 3]) {
      const r = model.infer(images(B, 6, 9), { decodeHvaeLayers: true });
      expect(r.outputs.stages.map((s) => s.t)).toEqual([0, 1, 2, 3]);
      for (const s of r.outputs.stages) {
        expect(s.means.shape).toEqual([B, 3, 3, 6, 9]);
        expect(s.masks.shape).toEqual([B, 3, 1, 6, 9]);
        expect(s.recons.shape).toEqual([B, 3, 6, 9]);
        // masks are log-probabilities over the slots
        const m = tf.tidy(() => tf.sum(tf.exp(s.masks), 1));
        for (const v of m.dataSync()) expect(v).toBeCloseTo(1, 5);
        m.dispose();
      }
      expect(r.outputs.stages[1].lambda!.shape).toEqual([B, 3, 8]);
      expect(r.outputs.attn.map((a) => a.shape)).toEqual([
        [B, 3, 1, 6, 9],
        [B, 3, 1, 6, 9],
      ]);
      expect(r.deltas.length).toBe(2);
      expect(r.stageLosses.length).toBe(3);
      expect(Number.isFinite(r.totalLoss)).toBe(true);
      r.dispose();
    }
    model.dispose();
  });

  test('zero refinement steps: the HVAE alone', () => {
    const model = new EfficientMORL(tiny, { seed: 2 });
    const r = model.infer(images(2, 8, 8), { refinementIters: 0 });
    expect(r.outputs.stages.map((s) => s.t)).toEqual([1]);
    expect(r.deltas).toEqual([]);
    // a single stage has weight (0+3)/(0+1) = 3
    expect(r.totalLoss).toBeCloseTo(3 * r.stageLosses[0], 3);
    r.dispose();
    model.dispose();
  });

  test.each([0, 1])('L = %i stochastic layers', (L) => {
    const model = new EfficientMORL({ ...tiny, stochastic_layers: L, refinement_iters: 1 }, { seed: 8 });
    const rec = new RecordingNoise(new SeededNoise(2));
    const r = model.infer(images(2, 8, 8), { noise: rec, decodeHvaeLayers: true });
    // 1 initial + L posterior samples + max(L-1, 0) prior samples + I refinement samples
    expect(rec.draws.length).toBe(1 + L + Math.max(L - 1, 0) + 1);
    expect(r.outputs.stages.map((s) => s.t)).toEqual([L - 1, L]);
    expect(r.outputs.attn.length).toBe(L);
    // I = 1: stage weights (1+3-0)/2 = 2 and (1+3-1)/2 = 1.5
    expect(r.totalLoss).toBeCloseTo(2 * r.stageLosses[0] + 1.5 * r.stageLosses[1], 1);
    expect(Number.isFinite(r.totalLoss)).toBe(true);
    r.dispose();
    const g = model.lossAndGrads(images(2, 8, 8), { noise: new ReplayNoise(rec.draws) });
    expect(g.totalLoss).toBeCloseTo(r.totalLoss, 3);
    g.dispose();
    model.dispose();
  });

  test('stage weights are the original code’s (I+3-i)/(I+1)', () => {
    expect([0, 1, 2, 3].map((i) => stageWeight(i, 3))).toEqual([1.5, 1.25, 1, 0.75]);
  });

  test('the positional embedding matches the original for square grids', () => {
    const p = positionalEmbedding(3, 3);
    // [row, col, channel]: ch0 falls down the rows, ch1 rises, ch2 rises along columns, ch3 falls
    expect(Array.from(p.slice(0, 4))).toEqual([1, 0, 0, 1]);
    expect(Array.from(p.slice((2 * 3 + 1) * 4, (2 * 3 + 1) * 4 + 4))).toEqual([0, 1, 0.5, 0.5]);
  });
});

describe('GECO', () => {
  test('EMA, β steps with acceleration and the 0.55 floor', () => {
    const g = new Geco({ target: -100, alpha: 0.99, stepSizeAcceleration: 10 });
    expect(g.initEma(-120)).toBe(20);
    expect(g.updateEma(20, -120)).toBeCloseTo(20, 5);
    expect(g.stepBeta(20, 1.0, 1e-3)).toBeCloseTo(1.0 - 10 * 1e-3 * 20, 6); // C_ema > 0: accelerated
    expect(g.stepBeta(-20, 1.0, 1e-3)).toBeCloseTo(1.02, 6);
    expect(g.stepBeta(1000, 1.0, 1e-3)).toBe(0.55);
  });

  test('the GECO loss uses the model state and only after the warm start', () => {
    const model = new EfficientMORL({ ...tiny, geco_warm_start: 10 });
    const geco = new Geco({ target: -50 });
    expect(model.usesGeco({ geco, globalStep: 9 })).toBe(false);
    expect(model.usesGeco({ geco, globalStep: 10 })).toBe(true);
    expect(model.usesGeco({ geco, globalStep: 10, klBeta: 0 })).toBe(false);
    model.params.set('geco_C_ema', { data: new Float32Array([2]), shape: [] });
    model.params.set('geco_beta', { data: new Float32Array([0.55]), shape: [] });
    const x = images(2, 8, 8);
    const rec = new RecordingNoise(new SeededNoise(1));
    const r = model.infer(x, { geco, globalStep: 10, refinementIters: 0, noise: rec });
    // value: kl_beta·kl − softplus(β)·C_ema
    expect(r.usedGeco).toBe(true);
    expect(r.stageLosses[0]).toBeCloseTo(r.kl - Math.log1p(Math.exp(0.55)) * 2, 3);
    r.dispose();
    x.dispose();
    model.dispose();
  });
});

describe('training', () => {
  test('Adam equals a hand-computed first and second step; clipping scales to the max norm', () => {
    const store = new ParamStore([{ name: 'w', shape: [2], init: { kind: 'const', value: 1 }, trainable: true }], new Rng(1));
    const adam = new Adam(store, { lr: 0.1 });
    const g1 = new Map([['w', tf.tensor1d([3, -4])]]);
    const { grads: clipped, norm } = clipGradNorm(g1, 1);
    expect(norm).toBeCloseTo(5, 5);
    expect(Array.from(clipped.get('w')!.dataSync()).map((v) => +v.toFixed(5))).toEqual([0.6, -0.8]);
    adam.applyGradients(g1);
    // first step: lr · g / (|g| + eps)
    expect(Array.from(store.get('w').dataSync()).map((v) => +v.toFixed(5))).toEqual([0.9, 1.1]);
    adam.applyGradients(new Map([['w', tf.tensor1d([1, 1])]]));
    const m = [0.9 * 0.3 + 0.1, 0.9 * -0.4 + 0.1];
    const v = [0.999 * 0.009 + 0.001, 0.999 * 0.016 + 0.001];
    const expected = [0.9, 1.1].map((p, i) => p - (0.1 / (1 - 0.81)) * (m[i] / (Math.sqrt(v[i]) / Math.sqrt(1 - 0.999 ** 2) + 1e-8)));
    const got = store.get('w').dataSync();
    expect(got[0]).toBeCloseTo(expected[0], 5);
    expect(got[1]).toBeCloseTo(expected[1], 5);
    expect(() => adam.applyGradients(new Map([['w', tf.zeros([3])]]))).toThrow(/gradient for 'w' has shape \[3\]/);
    // export / import round trip continues identically
    const state = adam.exportState();
    expect(state.steps).toBe(2);
    const copy = new Adam(store, { lr: 0.1 });
    copy.importState(state);
    const p0 = Float32Array.from(store.get('w').dataSync() as Float32Array);
    adam.applyGradients(new Map([['w', tf.tensor1d([0.5, -2])]]));
    const viaOriginal = Array.from(store.get('w').dataSync());
    store.set('w', { data: p0, shape: [2] });
    copy.applyGradients(new Map([['w', tf.tensor1d([0.5, -2])]]));
    expect(Array.from(store.get('w').dataSync())).toEqual(viaOriginal);
    expect(() => copy.importState({ steps: 1, m: new Map([['w', { data: new Float32Array(3), shape: [3] }]]), v: new Map() })).toThrow(/m for 'w' has shape \[3\]/);
    copy.dispose();
    adam.dispose();
    store.dispose();
  });

  (nativeOpsAvailable() ? test : test.skip)('Adam on the addon keeps denormal terms, as the TypeScript loop, PyTorch and a GPU do (its other loops flush them)', () => {
    // gradients of 1e-25 … 1e-15: g², (1-β2)·g² and the second moments reach below float's normal range
    const n = 1 << 17;
    const rng = new Rng(3);
    const g = Float32Array.from({ length: n }, () => rng.normal() * 10 ** (-15 - 10 * rng.uniform()));
    const specs = [{ name: 'w', shape: [n], init: { kind: 'const' as const, value: 0.5 }, trainable: true }];
    const stores = [0, 1].map(() => new ParamStore(specs, new Rng(1)));
    const [loop, addon] = [new Adam(stores[0], { native: false }), new Adam(stores[1], { native: true })];
    for (let t = 0; t < 3; t++) {
      const grads = new Map([['w', tf.tensor1d(g.map((x) => x * (t + 1)))]]);
      loop.applyGradients(grads);
      addon.applyGradients(grads);
      grads.get('w')!.dispose();
    }
    const v = [loop, addon].map((a) => a.exportState().v.get('w')!.data);
    expect(v[0].some((x) => x !== 0 && Math.abs(x) < 1.1754943508222875e-38)).toBe(true);  // denormals there
    expect(Buffer.from(v[1].buffer).equals(Buffer.from(v[0].buffer))).toBe(true);
    expect(Buffer.from((stores[1].get('w').dataSync() as Float32Array).buffer).equals(Buffer.from((stores[0].get('w').dataSync() as Float32Array).buffer))).toBe(true);
    for (const x of [loop, addon, ...stores]) x.dispose();
  });

  test('Adam and the clipping norm: the TypeScript loops and the addon give the tensor formulation\'s bits', () => {
    const shapes: [string, number[]][] = [['a', [300, 400]], ['b', [7]], ['c', [3, 5, 5, 2]]];
    const specs = shapes.map(([name, shape]) => ({ name, shape, init: { kind: 'const' as const, value: 0 }, trainable: true }));
    const rng = new Rng(7);
    const start = shapes.map(([, shape]) => Float32Array.from({ length: shape.reduce((a, b) => a * b, 1) }, () => rng.normal()));
    const stores = [0, 1, 2].map(() => new ParamStore(specs, new Rng(1)));
    for (const st of stores) shapes.forEach(([name, shape], i) => st.set(name, { data: start[i], shape }));
    const native = nativeOpsAvailable();
    if (!native) console.log('NOTICE: addon not built; Adam checked in TypeScript only');
    const [lr, b1, b2, eps] = [3e-3, 0.9, 0.999, 1e-8];
    const loop = new Adam(stores[0], { lr, native: false });
    const addon = native ? new Adam(stores[1], { lr, native: true }) : null;
    // the tensor formulation, every op a float32 tfjs op on float32 scalars
    const moments = new Map<string, { m: tf.Tensor; v: tf.Tensor }>();
    const f = Math.fround;
    for (let t = 1; t <= 5; t++) {
      // gradients of very different sizes, so that some steps clip and some do not
      const grads = new Map(shapes.map(([name, shape]) => [name, tf.mul(tf.randomNormal(shape, 0, 1, 'float32', 10 * t + name.charCodeAt(0)), t % 2 ? 1e-3 : 0.5)] as [string, tf.Tensor]));
      const ts = clipScale(grads, 5, { native: false });
      if (native) {
        const ns = clipScale(grads, 5, { native: true });
        expect([ns.norm, ns.scale]).toEqual([ts.norm, ts.scale]);
        for (const g of grads.values()) expect(addonOps().l2Norm(g.dataSync() as Float32Array)).toBe(tf.norm(g).dataSync()[0]);
      }
      expect(ts.norm).toBe(f(Math.sqrt([...grads.values()].reduce((a, g) => a + tf.norm(g).dataSync()[0] ** 2, 0))));
      if (t % 2 === 0) expect(ts.scale).toBeLessThan(1);
      else expect(ts.scale).toBe(1);
      loop.applyGradients(grads, lr, ts.scale);
      addon?.applyGradients(grads, lr, ts.scale);
      tf.tidy(() => {
        const c1 = tf.scalar(f(1 - b1)), c2 = tf.scalar(f(1 - b2));
        for (const [name, g0] of grads) {
          const g = ts.scale !== 1 ? tf.mul(g0, tf.scalar(ts.scale)) : g0;
          const prev = moments.get(name);
          const m = prev ? tf.add(tf.mul(prev.m, tf.scalar(f(b1))), tf.mul(g, c1)) : tf.mul(g, c1);
          const v = prev ? tf.add(tf.mul(prev.v, tf.scalar(f(b2))), tf.mul(tf.square(g), c2)) : tf.mul(tf.square(g), c2);
          const denom = tf.add(tf.div(tf.sqrt(v), tf.scalar(f(Math.sqrt(1 - b2 ** t)))), tf.scalar(f(eps)));
          const p = tf.sub(stores[2].get(name), tf.mul(tf.div(m, denom), tf.scalar(f(lr / (1 - b1 ** t)))));
          stores[2].set(name, { data: p.dataSync() as Float32Array, shape: p.shape });
          prev?.m.dispose();
          prev?.v.dispose();
          moments.set(name, { m: tf.keep(m), v: tf.keep(v) });
        }
      });
      for (const g of grads.values()) g.dispose();
    }
    for (const [name] of shapes) {
      const want = stores[2].get(name).dataSync();
      expect(Buffer.from((stores[0].get(name).dataSync() as Float32Array).buffer).equals(Buffer.from((want as Float32Array).buffer))).toBe(true);
      if (native) expect(Buffer.from((stores[1].get(name).dataSync() as Float32Array).buffer).equals(Buffer.from((want as Float32Array).buffer))).toBe(true);
      const m = moments.get(name)!.m.dataSync() as Float32Array;
      expect(Buffer.from(loop.exportState().m.get(name)!.data.buffer).equals(Buffer.from(m.buffer))).toBe(true);
      if (addon) expect(Buffer.from(addon.exportState().v.get(name)!.data.buffer).equals(Buffer.from((moments.get(name)!.v.dataSync() as Float32Array).buffer))).toBe(true);
    }
    expect(() => loop.applyGradients(new Map(), lr, 1.5)).toThrow(/gradScale must be a float32 value in \(0, 1\]/);
    if (native) {
      const x = new Float32Array(8);
      const spec = { p: x, g: new Float32Array(8), m: new Float32Array(8), v: new Float32Array(8), first: true, scale: 1, b1: f(0.9), c1: f(0.1), b2: f(0.999), c2: f(0.001), eps: f(1e-8), bc2Sqrt: 1, stepSize: f(1e-3) };
      expect(() => addonOps().adamUpdate({ ...spec, m: x })).toThrow(/'spec.m' overlaps 'spec.p'/);
      expect(() => addonOps().adamUpdate({ ...spec, v: new Float32Array(7) })).toThrow(/'spec.v' has 7 elements but p's 8 elements needs 8/);
      expect(() => addonOps().adamUpdate({ ...spec, c1: 0.1 })).toThrow(/'spec.c1' must be a float32 value/);
    }
    for (const { m, v } of moments.values()) tf.dispose([m, v]);
    loop.dispose();
    addon?.dispose();
    for (const st of stores) st.dispose();
  });

  test('repeated training steps (clip, Adam, GECO bookkeeping) leak no tensors', () => {
    const [C, H, W] = [3, 8, 8];
    const trainer = new Trainer(
      experimentConfig({
        Net: { ...tiny, input_size: [C, H, W], refinement_iters: 1, geco_warm_start: 1 },
        training: { lr: 1e-2, use_scheduler: false, use_geco: true, geco_reconstruction_target: 1e6 / (C * H * W), geco_beta_stepsize: 1e-3, refinement_curriculum: [[-1, 1]] },
      }),
      { seed: 3 },
    );
    const model = trainer.model;
    const x = images(2, 8, 8, 5);
    const counts: number[] = [];
    const losses: number[] = [];
    for (let step = 0; step < 4; step++) {
      // GECO's bookkeeping from step 1 (the warm start) on
      const res = trainer.step(x, { noise: new SeededNoise(1) });
      res.release();
      expect(res.gradNorm).toBeGreaterThan(0);
      losses.push(res.totalLoss);
      if (step === 1) expect(res.gecoCEma).toBeCloseTo(1e6 - res.nll, -1);
      const inf = model.infer(x, { noise: new SeededNoise(1) });
      inf.dispose();
      counts.push(tf.memory().numTensors);
    }
    // Adam's moments appear at the first step; after that the count stays put
    expect(counts[3]).toBe(counts[1]);
    expect(counts[2]).toBe(counts[1]);
    // C_ema > 0 (the target is met), so β steps down to its floor
    expect(model.params.get('geco_beta').dataSync()[0]).toBeCloseTo(0.55, 6);
    expect(losses.every(Number.isFinite)).toBe(true);
    x.dispose();
    trainer.dispose();
  });

  test.each(['EMORL', 'SlotAttention'])('%s: training steps without clipping (the global norm reported instead) leak no tensors', (model) => {
    const trainer = new Trainer(
      experimentConfig({
        Net: { ...tiny, refinement_iters: 1 },
        training: { model: model === 'EMORL' ? 'EfficientMORL' : 'SlotAttention', use_geco: false, clip_grad_norm: false, refinement_curriculum: [[-1, 1]] },
      }),
      { seed: 4 },
    );
    const x = images(2, 8, 8);
    const counts: number[] = [];
    for (let step = 0; step < 3; step++) {
      const res = trainer.step(x, { noise: new SeededNoise(step) });
      res.release();
      expect(res.gradNorm).toBeGreaterThan(0);
      counts.push(tf.memory().numTensors);
    }
    // Adam's moments appear at the first step; after that the count stays put
    expect(counts[2]).toBe(counts[1]);
    x.dispose();
    trainer.dispose();
  });

  test('a model, its optimizer and its results release every tensor when disposed', () => {
    const before = tf.memory().numTensors;
    const trainer = new Trainer(experimentConfig({ Net: tiny, training: { refinement_curriculum: [[-1, tiny.refinement_iters ?? 3]] } }), { seed: 1 });
    const x = images(1, 8, 8);
    trainer.step(x, { noise: new SeededNoise(1) }).release();
    trainer.model.infer(x, { decodeHvaeLayers: true }).dispose();
    x.dispose();
    trainer.dispose();
    expect(tf.memory().numTensors).toBe(before);
  });
});
