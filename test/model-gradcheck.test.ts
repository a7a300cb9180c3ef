/**
 * Finite-difference checks of the model's gradients for the options the golden fixtures do not
 * cover (both fixtures use the DualGRU, the reversed prior and a conv decoder): the plain-GRU
 * HVAE, the bottom-up prior, the standard-normal refinement prior and the 'big' transposed-conv
 * decoder. Central differences along random directions, float32, so the tolerance is loose-ish.
 *
 * With refinement steps the analytic gradient deliberately ignores how the refinement input
 * (a detached gradient) depends on the parameters, so these model-level checks use I = 0.
 */
import { tf, initBackend } from '../lib/tf';
import type { NetConfig } from '../lib/config/net';
import { EfficientMORL } from '../lib/model/efficient-morl';
import { decode } from '../lib/model/decoders';
import { RecordingNoise, ReplayNoise, SeededNoise, type RecordedDraw } from '../lib/model/noise';
import { Rng } from '../lib/util/rng';

beforeAll(async () => {
  await initBackend('cpu');
});

/** Makes the weights larger than the original's 0.02-gain init so every path carries signal. */
function scaleUp(model: EfficientMORL, factor: number, rng: Rng): void {
  for (const name of model.params.trainableNames()) {
    const v = model.params.variable(name);
    const shape = v.shape;
    const n = shape.reduce((a, b) => a * b, 1);
    const cur = v.dataSync() as Float32Array;
    const next = new Float32Array(n);
    for (let i = 0; i < n; i++) next[i] = cur[i] * factor + 0.05 * rng.normal();
    model.params.set(name, { data: next, shape });
  }
}

interface Check {
  analytic: number;
  numeric: number;
}

/**
 * Directional derivative of the total loss over `keys`, along a random direction, or (when the
 * derivative along a random one would drown in the float32 rounding of the loss) along the
 * analytic gradient itself, normalised to unit RMS.
 */
function directional(
  model: EfficientMORL,
  images: tf.Tensor,
  draws: RecordedDraw[],
  keys: string[],
  eps: number,
  seed: number,
  alongGradient = false,
): Check {
  const rng = new Rng(seed);
  const dirs = new Map<string, Float32Array>();
  const res = model.lossAndGrads(images, { noise: new ReplayNoise(draws) });
  if (alongGradient) {
    let ss = 0;
    let n = 0;
    for (const k of keys) {
      const g = res.grads.get(k)!.dataSync() as Float32Array;
      for (const x of g) ss += x * x;
      n += g.length;
    }
    const rms = Math.sqrt(ss / n);
    for (const k of keys) dirs.set(k, Float32Array.from(res.grads.get(k)!.dataSync() as Float32Array, (x) => x / rms));
  } else {
    for (const k of keys) dirs.set(k, rng.normals(model.params.variable(k).size));
  }
  let analytic = 0;
  for (const k of keys) {
    const g = res.grads.get(k);
    expect(g).toBeDefined();
    const gd = g!.dataSync();
    const d = dirs.get(k)!;
    for (let i = 0; i < d.length; i++) analytic += gd[i] * d[i];
  }
  res.dispose();
  const base = new Map(keys.map((k) => [k, Float32Array.from(model.params.variable(k).dataSync() as Float32Array)]));
  const lossAt = (sign: number): number => {
    for (const k of keys) {
      const b = base.get(k)!;
      const d = dirs.get(k)!;
      model.params.set(k, { data: b.map((x, i) => x + sign * eps * d[i]), shape: model.params.variable(k).shape });
    }
    const r = model.infer(images, { noise: new ReplayNoise(draws), outputs: false });
    r.dispose();
    return r.totalLoss;
  };
  const numeric = (lossAt(1) - lossAt(-1)) / (2 * eps);
  for (const k of keys) model.params.set(k, { data: base.get(k)!, shape: model.params.variable(k).shape });
  return { analytic, numeric };
}

function expectClose(c: Check, rel = 2e-2): void {
  const scale = Math.max(Math.abs(c.analytic), Math.abs(c.numeric), 1e-3);
  expect(Math.abs(c.analytic - c.numeric) / scale).toBeLessThan(rel);
}

function setup(cfg: Partial<NetConfig>, B: number, seed: number): { model: EfficientMORL; images: tf.Tensor; draws: RecordedDraw[] } {
  const model = new EfficientMORL(cfg, { seed });
  scaleUp(model, 10, new Rng(seed + 1));
  const [C, H, W] = model.cfg.input_size;
  const rng = new Rng(seed + 2);
  const images = tf.tensor(Float32Array.from(rng.normals(B * C * H * W), (v) => Math.tanh(v)), [B, C, H, W]);
  const rec = new RecordingNoise(new SeededNoise(seed + 3));
  model.infer(images, { noise: rec, outputs: false }).dispose();
  return { model, images, draws: rec.draws };
}

const tiny: Partial<NetConfig> = {
  K: 2,
  input_size: [3, 6, 7],
  z_size: 4,
  stochastic_layers: 3,
  refinement_iters: 0,
  image_decoder: 'small',
  image_likelihood: 'Gaussian',
  log_scale: Math.log(0.5),
};

describe('finite-difference gradient checks (I = 0)', () => {
  test('plain GRU (use_DualGRU false): the GRU, project_update and everything upstream', () => {
    const { model, images, draws } = setup({ ...tiny, use_DualGRU: false }, 2, 10);
    const h = 'hvae_networks';
    for (const keys of [
      [`${h}.gru.weight_ih_l0`, `${h}.gru.weight_hh_l0`, `${h}.gru.bias_ih_l0`, `${h}.gru.bias_hh_l0`],
      [`${h}.project_update.weight`, `${h}.project_update.bias`],
      [`${h}.to_q.weight`, `${h}.to_k.weight`, `${h}.encoder_pt_1.6.weight`, `${h}.init_posterior`],
    ]) {
      expectClose(directional(model, images, draws, keys, 3e-4, 1));
    }
    // the decoder's first layer (its tap sums are cached per weight array: this also checks that
    // changed weights are picked up)
    const dec = [`${h}.image_decoder.decode.0.weight`, `${h}.image_decoder.decode.0.bias`, `${h}.image_decoder.pos_embed_projection.weight`];
    // (along the gradient the curvature is large: a smaller step)
    expectClose(directional(model, images, draws, dec, 1e-4, 1, true));
    images.dispose();
    model.dispose();
  });

  test('bottom-up prior (standard-normal refinement prior), GMM likelihood', () => {
    const { model, images, draws } = setup(
      { ...tiny, bottom_up_prior: true, reverse_prior_plusplus: false, image_likelihood: 'GMM', image_decoder: 'iodine' },
      2,
      20,
    );
    const p = 'hvae_networks.indep_prior';
    for (const keys of [
      [`${p}.z_linear.0.weight`, `${p}.z_linear.0.bias`, `${p}.z_mu.weight`, `${p}.z_softplus.weight`, `${p}.z_softplus.bias`],
      ['hvae_networks.mlp_softplus.2.weight', 'hvae_networks.norm_softplus_pre_ff.weight', 'hvae_networks.image_decoder.decode.8.weight'],
    ]) {
      expectClose(directional(model, images, draws, keys, 3e-4, 2));
    }
    images.dispose();
    model.dispose();
  });

  test('big decoder (transposed convolutions from a 6×6 grid), decoder alone', () => {
    // The weights at Xavier gain 1 (the original's 0.02 would shrink the signal to rounding
    // noise across six layers); the direction moves z and the first and last layers' weights.
    const cfg: Partial<NetConfig> = { ...tiny, input_size: [3, 96, 96], image_decoder: 'big', z_size: 3 };
    const model = new EfficientMORL(cfg, { seed: 5 });
    const rng = new Rng(7);
    for (const name of model.params.trainableNames()) {
      if (!name.includes('image_decoder')) continue;
      const v = model.params.variable(name);
      const d = Float32Array.from(v.dataSync() as Float32Array, (x) => (name.endsWith('bias') ? 0.01 * rng.normal() : 50 * x));
      model.params.set(name, { data: d, shape: v.shape });
    }
    const zBase = rng.normals(2 * 3);
    const zDir = rng.normals(2 * 3);
    const rRgb = tf.tensor(rng.normals(2 * 96 * 96 * 3), [2, 96, 96, 3]);
    const rMask = tf.tensor(rng.normals(2 * 96 * 96), [2, 96, 96, 1]);
    const d = 'hvae_networks.image_decoder';
    const keys = [`${d}.decode.0.weight`, `${d}.decode.10.weight`, `${d}.pos_embed_projection.weight`];
    const vars = keys.map((k) => model.params.variable(k));
    const zVar = tf.variable(tf.tensor2d(zBase, [2, 3]), true, `bigdec-z-${Date.now()}`);
    const f = (): tf.Scalar =>
      tf.tidy(() => {
        const out = decode(model.params, model.ops, model.cfg, zVar as unknown as tf.Tensor2D);
        expect(out.rgb.shape).toEqual([2, 96, 96, 3]);
        return tf.add(tf.sum(tf.mul(out.rgb, rRgb)), tf.sum(tf.mul(out.maskLogits, rMask))) as tf.Scalar;
      });
    const { grads } = tf.variableGrads(f, [...vars, zVar]);
    const dirs = keys.map((k) => rng.normals(model.params.variable(k).size));
    let analytic = 0;
    keys.forEach((_k, i) => {
      const g = grads[vars[i].name].dataSync();
      for (let j = 0; j < g.length; j++) analytic += g[j] * dirs[i][j];
    });
    const gz = grads[zVar.name].dataSync();
    for (let j = 0; j < gz.length; j++) analytic += gz[j] * zDir[j];
    const base = keys.map((k) => Float32Array.from(model.params.variable(k).dataSync() as Float32Array));
    // small steps (few ReLUs change side) and the loss summed in float64 (else float32
    // rounding of a ~1e2 sum swamps the difference)
    const eps = 1e-4;
    const rr = rRgb.dataSync();
    const rm = rMask.dataSync();
    const at = (sign: number): number => {
      keys.forEach((k, i) => model.params.set(k, { data: base[i].map((x, j) => x + sign * eps * dirs[i][j]), shape: model.params.variable(k).shape }));
      zVar.assign(tf.tensor2d(zBase.map((x, j) => x + sign * eps * zDir[j]), [2, 3]));
      return tf.tidy(() => {
        const out = decode(model.params, model.ops, model.cfg, zVar as unknown as tf.Tensor2D);
        const y = out.rgb.dataSync();
        const m = out.maskLogits.dataSync();
        let acc = 0;
        for (let i = 0; i < y.length; i++) acc += y[i] * rr[i];
        for (let i = 0; i < m.length; i++) acc += m[i] * rm[i];
        return acc;
      });
    };
    const numeric = (at(1) - at(-1)) / (2 * eps);
    expectClose({ analytic, numeric });
    zVar.dispose();
    for (const g of Object.values(grads)) g.dispose();
    tf.dispose([rRgb, rMask]);
    model.dispose();
  });
});
