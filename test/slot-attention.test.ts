/**
 * The Slot Attention baseline's API around the numerics (the golden test checks the numbers):
 * parameter names and initialisation, input checks, any batch size and non-square images, the
 * noise it draws, and that repeated passes (failed ones included) leak no tensors.
 */
import { tf, initBackend } from '../lib/tf';
import type { NetConfig } from '../lib/config/net';
import { ReplayNoise, SeededNoise, RecordingNoise } from '../lib/model/noise';
import { SlotAttention } from '../lib/model/slot-attention';
import { slotAttentionParamSpecs } from '../lib/params/slot-attention-spec';
import { netConfig } from '../lib/config/net';
import { Rng } from '../lib/util/rng';

beforeAll(async () => {
  await initBackend('cpu');
});

const tiny: Partial<NetConfig> = { K: 3, input_size: [3, 8, 8], z_size: 4, image_decoder: 'small' };

function images(B: number, H: number, W: number, seed = 1): tf.Tensor4D {
  const rng = new Rng(seed);
  return tf.tensor4d(Float32Array.from(rng.normals(B * 3 * H * W), (v) => Math.tanh(v)), [B, 3, H, W]);
}

describe('parameters', () => {
  test('names and shapes are the original state_dict', () => {
    const specs = slotAttentionParamSpecs(netConfig({ K: 4, z_size: 32, input_size: [3, 35, 35], image_decoder: 'small' }));
    const byName = new Map(specs.map((s) => [s.name, s.shape]));
    expect(specs.length).toBe(42); // as the fixture's params/
    expect(byName.get('init_slots')).toEqual([1, 64]);
    expect(byName.get('encoder_pt_1.0.weight')).toEqual([64, 3, 5, 5]);
    expect(byName.get('to_k.weight')).toEqual([32, 64]);
    expect(byName.has('to_q.bias')).toBe(false);
    expect(byName.get('gru.weight_ih_l0')).toEqual([96, 32]);
    expect(byName.get('mlp.0.weight')).toEqual([128, 32]);
    expect(byName.get('image_decoder.decode.6.weight')).toEqual([4, 32, 3, 3]);
    expect(byName.get('image_decoder.pos_embed_projection.weight')).toEqual([32, 4]);
    const big = slotAttentionParamSpecs(netConfig({ z_size: 8, image_decoder: 'big', input_size: [3, 96, 96] }));
    expect(big.find((s) => s.name === 'image_decoder.decode.10.weight')!.shape).toEqual([64, 4, 3, 3]);
  });

  test('initialisation follows the original', () => {
    const m = new SlotAttention({ ...tiny, z_size: 8 }, { seed: 3 });
    try {
      const snap = m.params.snapshot();
      expect(Array.from(snap.init_slots.data)).toEqual([...new Array(8).fill(0), ...new Array(8).fill(1)]);
      expect(Array.from(snap['norm_slots.weight'].data).every((v) => v === 1)).toBe(true);
      expect(Array.from(snap['norm_pre_ff.bias'].data).every((v) => v === 0)).toBe(true);
      expect(Array.from(snap['image_decoder.decode.0.bias'].data).every((v) => v === 0)).toBe(true);
      // PyTorch's default: U(±1/sqrt(fan_in)) for weights and biases, filling the range
      const bound = (name: string, fanIn: number): void => {
        const d = snap[name].data;
        const b = 1 / Math.sqrt(fanIn);
        expect(Math.max(...Array.from(d, Math.abs))).toBeLessThanOrEqual(b);
        expect(Math.max(...Array.from(d, Math.abs))).toBeGreaterThan(0.8 * b);
      };
      bound('encoder_pt_1.2.weight', 64 * 25);
      bound('encoder_pt_1.0.bias', 3 * 25);
      bound('to_v.weight', 64);
      bound('mlp.2.bias', 128);
      bound('gru.weight_hh_l0', 8);
      // the decoder: Xavier-normal with gain 0.02
      const w = snap['image_decoder.decode.2.weight'].data;
      const std = Math.sqrt(Array.from(w).reduce((a, v) => a + v * v, 0) / w.length);
      const expected = 0.02 * Math.sqrt(2 / (32 * 25 + 32 * 25));
      expect(std).toBeGreaterThan(0.9 * expected);
      expect(std).toBeLessThan(1.1 * expected);
    } finally {
      m.dispose();
    }
  });
});

describe('inputs', () => {
  let m: SlotAttention;
  beforeAll(() => {
    m = new SlotAttention(tiny);
  });
  afterAll(() => m.dispose());

  test.each([
    [[2, 3, 8, 9], /images are 8x9, Net.input_size expects 8x8/],
    [[2, 3, 7, 8], /images are 7x8/],
    [[2, 1, 8, 8], /images have 1 channels, Net.input_size expects C = 3/],
    [[3, 8, 8], /images must be \[B, C, H, W\], got rank 3/],
    [[0, 3, 8, 8], /empty batch/],
  ])('rejects images of shape %j', (shape, message) => {
    const x = tf.zeros(shape);
    const before = tf.memory().numTensors;
    expect(() => m.infer(x)).toThrow(message);
    expect(() => m.lossAndGrads(x)).toThrow(message);
    expect(tf.memory().numTensors).toBe(before);
    x.dispose();
  });

  test('rejects non-finite pixels and non-float images', () => {
    const x = tf.tensor4d(new Float32Array(3 * 64).fill(0.5), [1, 3, 8, 8]);
    const bad = tf.tidy(() => tf.add(x, tf.oneHot([5], 3 * 64).reshape([1, 3, 8, 8]).mul(Number.NaN)));
    expect(() => m.infer(bad)).toThrow(/non-finite pixel value NaN/);
    const ints = tf.zeros([1, 3, 8, 8], 'int32');
    expect(() => m.lossAndGrads(ints)).toThrow(/must be float32/);
    tf.dispose([x, bad, ints]);
  });

  test('rejects a bad config', () => {
    expect(() => new SlotAttention({ image_decoder: 'huge' } as unknown as Partial<NetConfig>)).toThrow(/Net\.image_decoder/);
    expect(() => new SlotAttention({ K: 0 })).toThrow(/Net\.K/);
  });
});

describe('passes', () => {
  test.each([1, 2, 5])('batch size %i: shapes, one draw of [B*K, z], a gradient for every parameter', (B) => {
    const m = new SlotAttention(tiny, { seed: 2 });
    const x = images(B, 8, 8);
    try {
      const rec = new RecordingNoise(new SeededNoise(7));
      const inf = m.infer(x, { noise: rec });
      expect(rec.draws.map((d) => d.shape)).toEqual([[B * 3, 4]]);
      expect(inf.outputs.xMeans.shape).toEqual([B, 3, 3, 8, 8]);
      expect(inf.outputs.masks.shape).toEqual([B, 3, 1, 8, 8]);
      expect(inf.outputs.slots.shape).toEqual([B, 3, 4]);
      expect(inf.outputs.recons.shape).toEqual([B, 3, 8, 8]);
      expect(inf.outputs.attn.map((a) => a.shape)).toEqual([0, 1, 2].map(() => [B, 3, 1, 8, 8]));
      // masks are log-probabilities over the slots; attention sums to 1 (+Kε) over the slots
      const maskSum = tf.tidy(() => tf.sum(tf.exp(inf.outputs.masks), 1).dataSync());
      for (const v of maskSum) expect(v).toBeCloseTo(1, 5);
      const attnSum = tf.tidy(() => tf.sum(inf.outputs.attn[2], 1).dataSync());
      for (const v of attnSum) expect(v).toBeCloseTo(1, 5);
      expect(Number.isFinite(inf.totalLoss)).toBe(true);

      const g = m.lossAndGrads(x, { noise: new ReplayNoise(rec.draws) });
      expect(g.totalLoss).toBeCloseTo(inf.totalLoss, 4);
      expect([...g.grads.keys()].sort()).toEqual(m.params.names().sort());
      for (const [k, t] of g.grads) expect(t.shape).toEqual(m.params.get(k).shape);
      expect(g.outputs).toBeUndefined();
      g.dispose();
      inf.dispose();
    } finally {
      x.dispose();
      m.dispose();
    }
  });

  test('the loss is the per-batch mean: a batch equals its images run one by one', () => {
    const m = new SlotAttention(tiny, { seed: 4 });
    const x = images(2, 8, 8, 9);
    try {
      const rec = new RecordingNoise(new SeededNoise(11));
      const both = m.infer(x, { noise: rec });
      const eps = rec.draws[0];
      const half = (i: number): number => {
        const xi = tf.slice(x, [i, 0, 0, 0], [1, 3, 8, 8]);
        const r = m.infer(xi, { noise: new ReplayNoise([{ data: eps.data.slice(i * 12, (i + 1) * 12), shape: [3, 4] }]) });
        const l = r.totalLoss;
        const slots0 = r.outputs.slots.dataSync();
        const expected = both.outputs.slots.dataSync().slice(i * 12, (i + 1) * 12);
        for (let j = 0; j < 12; j++) expect(slots0[j]).toBeCloseTo(expected[j], 5);
        r.dispose();
        xi.dispose();
        return l;
      };
      expect((half(0) + half(1)) / 2).toBeCloseTo(both.totalLoss, 3);
      both.dispose();
    } finally {
      x.dispose();
      m.dispose();
    }
  });

  test('non-square images', () => {
    const m = new SlotAttention({ ...tiny, input_size: [3, 6, 10] });
    const x = images(2, 6, 10);
    try {
      const g = m.lossAndGrads(x, { outputs: true });
      expect(g.outputs!.xMeans.shape).toEqual([2, 3, 3, 6, 10]);
      expect(Number.isFinite(g.totalLoss)).toBe(true);
      g.dispose();
    } finally {
      x.dispose();
      m.dispose();
    }
  });

  test('leaks no tensors: repeated passes, and passes that fail mid-way', () => {
    const m = new SlotAttention(tiny);
    const x = images(2, 8, 8);
    try {
      // warm-up (tfjs caches a few constants on first use)
      m.lossAndGrads(x, { outputs: true }).dispose();
      m.infer(x).dispose();
      const before = tf.memory().numTensors;
      for (let i = 0; i < 3; i++) {
        m.lossAndGrads(x, { outputs: i % 2 === 0 }).dispose();
        m.infer(x, { outputs: i % 2 === 0 }).dispose();
      }
      expect(tf.memory().numTensors).toBe(before);
      // a replay whose draw has the wrong shape fails after the encoder has run
      const wrong = () => new ReplayNoise([{ data: new Float32Array(5), shape: [5] }]);
      expect(() => m.lossAndGrads(x, { noise: wrong(), outputs: true })).toThrow(/ReplayNoise/);
      expect(() => m.infer(x, { noise: wrong() })).toThrow(/ReplayNoise/);
      expect(tf.memory().numTensors).toBe(before);
      // and training still works afterwards
      const g = m.lossAndGrads(x);
      expect(g.grads.size).toBe(m.params.names().length);
      g.dispose();
      expect(tf.memory().numTensors).toBe(before);
    } finally {
      x.dispose();
      m.dispose();
    }
  });
});
