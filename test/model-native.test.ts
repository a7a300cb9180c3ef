/**
 * nativeOps (lib/ops/native.ts: NHWC convolutions and big linear layers on the addon) against
 * tfjsOps: each op's values and gradients (tf.grads) on odd shapes, and the whole model's
 * lossAndGrads with the same seed and replayed noise, for each decoder and both likelihoods,
 * plus the golden fixture's no_geco case. Skipped, with a notice, when the addon is not built.
 */
import * as fs from 'node:fs';
import { tf, initBackend } from '../lib/tf';
import { nativeStatus } from '../lib/native';
import { tfjsOps, type EncoderArgs, type Ops } from '../lib/ops';
import { hostKeysValues } from '../lib/ops/encoder-stage';
import { positionalEmbedding } from '../lib/model/positional';
import { nativeOps, nativeOpsAvailable, nativeOpsOn, defaultOps, opsForBackend } from '../lib/ops/native';
import { addonOps, deviceTraffic, workspaceFor, type ConvPrecision, type StageDevice } from '../lib/ops/addon';
import { spawnSync } from 'node:child_process';
import * as path from 'node:path';
import type { FusedActivation } from '../lib/ops/conv';
import { EfficientMORL } from '../lib/model/efficient-morl';
import { decoderStack } from '../lib/model/decoders';
import { RecordingNoise, ReplayNoise, SeededNoise, type RecordedDraw } from '../lib/model/noise';
import type { NetConfig } from '../lib/config/net';
import { withH5File } from '../lib/io/h5';
import { readArray, readParamGroup } from '../lib/params/h5';
import { expectRelClose, fixturePath } from './helpers';

const available = nativeStatus().available && nativeOpsAvailable();
const describeNative = available ? describe : describe.skip;
if (!available) {
  // eslint-disable-next-line no-console
  console.warn(`model-native tests SKIPPED: ${nativeStatus().reason ?? 'the addon has no NHWC kernels (npm run build:native)'}`);
}

beforeAll(async () => {
  await initBackend('cpu');
});

/** max |t| (no tensors left behind). */
function maxAbsOf(t: tf.Tensor): number {
  const a = t.dataSync();
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]));
  return m;
}

function rand(shape: number[], seed: number, scale = 1): tf.Tensor {
  return tf.tidy(() => tf.mul(tf.randomUniform(shape, -1, 1, 'float32', seed), scale));
}

const expectScaled = expectRelClose;

test('defaultOps picks nativeOps exactly when the addon is available', () => {
  expect(defaultOps()).toBe(available ? nativeOps : tfjsOps);
});

test('opsForBackend: native, js, auto, and clear errors', () => {
  expect(opsForBackend('js')).toBe(tfjsOps);
  expect(opsForBackend('auto')).toBe(defaultOps());
  if (available) expect(opsForBackend('native')).toBe(nativeOps);
  expect(() => opsForBackend('cuda')).toThrow(/unknown backend "cuda" \(use native, js or auto\)/);
  // with the addon disabled, asking for it says why
  const r = spawnSync(process.execPath, ['-e', `require(${JSON.stringify(path.join(__dirname, '..', 'dist', 'lib', 'ops', 'native.js'))}).opsForBackend('native')`], {
    env: { ...process.env, EMORL_NATIVE: '0' },
    encoding: 'utf8',
  });
  if (fs.existsSync(path.join(__dirname, '..', 'dist', 'lib', 'ops', 'native.js'))) {
    expect(r.status).not.toBe(0);
    expect(r.stderr).toMatch(/backend 'native': the addon is not available \(disabled by EMORL_NATIVE=0\)/);
  }
});

describeNative('nativeOps ops vs tfjsOps', () => {
  type Case = { name: string; run: (ops: Ops, x: tf.Tensor, w: tf.Tensor, b: tf.Tensor) => tf.Tensor; x: number[]; w: number[] };
  const cases: Case[] = [];
  for (const act of ['linear', 'relu', 'elu'] as FusedActivation[]) {
    cases.push(
      { name: `conv2d 3x3 pad 1 ${act}`, x: [2, 7, 9, 5], w: [6, 5, 3, 3], run: (o, x, w, b) => o.conv2d(x as tf.Tensor4D, w, b, { pad: 1, activation: act }) },
      { name: `conv2d 5x5 pad 2 stride 2 ${act}`, x: [3, 11, 8, 3], w: [7, 3, 5, 5], run: (o, x, w, b) => o.conv2d(x as tf.Tensor4D, w, b, { pad: 2, stride: 2, activation: act }) },
      { name: `conv2d 3x2 unpadded ${act}`, x: [1, 6, 5, 4], w: [3, 4, 3, 2], run: (o, x, w, b) => o.conv2d(x as tf.Tensor4D, w, b, { activation: act }) },
      { name: `conv2d 1x1 ${act}`, x: [2, 5, 3, 6], w: [5, 6, 1, 1], run: (o, x, w, b) => o.conv2d(x as tf.Tensor4D, w, b, { activation: act }) },
      // 16+ input channels: the input gradient runs as a convolution with the flipped kernel
      { name: `conv2d 5x5 pad 1, 20 channels ${act}`, x: [2, 9, 8, 20], w: [24, 20, 5, 5], run: (o, x, w, b) => o.conv2d(x as tf.Tensor4D, w, b, { pad: 1, activation: act }) },
      // channels filling whole GEMM panels (32, 64): the filter gradient's columns go straight into packed panels
      { name: `conv2d 3x3 pad 1, 32 channels ${act}`, x: [2, 8, 7, 32], w: [16, 32, 3, 3], run: (o, x, w, b) => o.conv2d(x as tf.Tensor4D, w, b, { pad: 1, activation: act }) },
      { name: `conv2d 5x5 pad 2 stride 2, 64 channels ${act}`, x: [1, 9, 10, 64], w: [8, 64, 5, 5], run: (o, x, w, b) => o.conv2d(x as tf.Tensor4D, w, b, { pad: 2, stride: 2, activation: act }) },
      { name: `conv2d 3x3 unpadded, 17 channels ${act}`, x: [1, 6, 7, 17], w: [5, 17, 3, 3], run: (o, x, w, b) => o.conv2d(x as tf.Tensor4D, w, b, { activation: act }) },
      { name: `convTranspose2d stride 2 pad 2 outputPad 1 ${act}`, x: [2, 5, 4, 6], w: [6, 5, 5, 5], run: (o, x, w, b) => o.convTranspose2d(x as tf.Tensor4D, w, b, { stride: 2, pad: 2, outputPad: 1, activation: act }) },
      { name: `convTranspose2d stride 1 pad 1 ${act}`, x: [3, 6, 7, 4], w: [4, 3, 3, 3], run: (o, x, w, b) => o.convTranspose2d(x as tf.Tensor4D, w, b, { pad: 1, activation: act }) },
      { name: `convTranspose2d stride 3 4x4 ${act}`, x: [1, 3, 5, 2], w: [2, 3, 4, 4], run: (o, x, w, b) => o.convTranspose2d(x as tf.Tensor4D, w, b, { stride: 3, pad: 1, outputPad: 2, activation: act }) },
    );
  }
  test.each(cases.map((c) => [c.name, c]))('%s: values and gradients', (_name, c) => {
    const cc = c as Case;
    tf.tidy(() => {
      const x = rand(cc.x, 1), w = rand(cc.w, 2, 0.5), b = rand([cc.name.startsWith('convT') ? cc.w[1] : cc.w[0]], 3, 0.2);
      const yShape = cc.run(tfjsOps, x, w, b).shape;
      const dy = rand(yShape, 4);
      const f = (ops: Ops) => (xx: tf.Tensor, ww: tf.Tensor, bb: tf.Tensor) => tf.sum(tf.mul(cc.run(ops, xx, ww, bb), dy));
      expectScaled(cc.run(nativeOps, x, w, b), cc.run(tfjsOps, x, w, b), 1e-5, 'value');
      const gn = tf.grads(f(nativeOps))([x, w, b]);
      const gt = tf.grads(f(tfjsOps))([x, w, b]);
      ['dx', 'dw', 'db'].forEach((n, i) => expectScaled(gn[i], gt[i], 1e-5, n));
      // inside withoutParamGrads: the same input gradient, zero parameter gradients
      const gz = nativeOps.withoutParamGrads(() => tf.grads(f(nativeOps))([x, w, b]));
      expectScaled(gz[0], gt[0], 1e-5, 'dx without param grads');
      expect(maxAbsOf(gz[1])).toBe(0);
    });
  });

  test('encoder (convolutions, then the head in one addon call each way): k, v and every gradient', () => {
    tf.tidy(() => {
      const B = 2, H = 7, W = 6, C = 3, D = 16, Z = 8;
      const x = rand([B, H, W, C], 71) as tf.Tensor4D;
      const params = [rand([D, C, 5, 5], 72, 0.2), rand([D], 73, 0.1), rand([D, D, 5, 5], 74, 0.05), rand([D], 75, 0.1),
        rand([D, 4], 76, 0.5), rand([D], 77, 0.1), tf.add(1, rand([D], 78, 0.2)), rand([D], 79, 0.1),
        rand([D, D], 80, 0.3), rand([D], 81, 0.1), rand([D, D], 82, 0.3), rand([D], 83, 0.1), rand([Z, D], 84, 0.3), rand([Z, D], 85, 0.3)];
      const pos = tf.tensor3d(positionalEmbedding(H, W), [H, W, 4]);
      const args = (p: tf.Tensor[]): EncoderArgs => ({
        x, pos, convs: [0, 1].map((i) => ({ weight: p[2 * i], bias: p[2 * i + 1], pad: 2, activation: 'relu' as const })),
        posWeight: p[4], posBias: p[5], lnWeight: p[6], lnBias: p[7], w1: p[8], b1: p[9], w2: p[10], b2: p[11], wk: p[12], wv: p[13],
      });
      const wk = rand([B, H * W, Z], 86), wv = rand([B, H * W, Z], 87);
      const f = (o: Ops) => (...p: tf.Tensor[]) => {
        const r = hostKeysValues(o.encoder(args(p)), 'test');
        return tf.add(tf.sum(tf.mul(r.k, wk)), tf.sum(tf.mul(r.v, wv))) as tf.Scalar;
      };
      const rn = hostKeysValues(nativeOps.encoder(args(params)), 'test'), rt = hostKeysValues(tfjsOps.encoder(args(params)), 'test');
      expectScaled(rn.k, rt.k, 1e-5, 'k');
      expectScaled(rn.v, rt.v, 1e-5, 'v');
      const gn = tf.grads(f(nativeOps))(params), gt = tf.grads(f(tfjsOps))(params);
      gn.forEach((g, i) => expectScaled(g, gt[i], 1e-4, `gradient ${i}`));
      const gz = nativeOps.withoutParamGrads(() => tf.grads(f(nativeOps))(params));
      expect(maxAbsOf(gz[4])).toBe(0);

      // attentionOnly (the models' way): k and v stay in the addon's arrays, two attention rounds
      // read them there and sum dk, dv there; against the TypeScript ops (which ignore the flag)
      const K = 3;
      const qs = [rand([B, K, Z], 88, 2), rand([B, K, Z], 89, 0.5)] as tf.Tensor3D[];
      const dus = [rand([B, K, Z], 90), rand([B, K, Z], 91)];
      const kept = (p: tf.Tensor[]): EncoderArgs => ({ ...args(p), attentionOnly: true });
      const rounds = (o: Ops) => (...p: tf.Tensor[]) => {
        const kv = o.encoder(kept(p.slice(2)));
        return tf.addN(dus.map((du, r) => tf.sum(tf.mul(o.slotCompetition(p[r] as tf.Tensor3D, kv, false).updates, du)))) as tf.Scalar;
      };
      const kvn = nativeOps.encoder(kept(params));
      expect(kvn.resident?.device).toBe('cpu');
      expect(tfjsOps.encoder(kept(params)).resident).toBeUndefined();
      const an = nativeOps.slotCompetition(qs[0], kvn), at = tfjsOps.slotCompetition(qs[0], tfjsOps.encoder(kept(params)));
      expectScaled(an.updates, at.updates, 1e-5, 'kept: updates');
      expectScaled(an.attn!, at.attn!, 1e-5, 'kept: attn');
      expect(() => tfjsOps.slotCompetition(qs[0], kvn)).toThrow(/kept by the ops that made them, on cpu \(encoder attentionOnly\)/);
      const gk = tf.grads(rounds(nativeOps))([...qs, ...params]), gr = tf.grads(rounds(tfjsOps))([...qs, ...params]);
      gk.forEach((g, i) => expectScaled(g, gr[i], 1e-4, `kept: gradient ${i}`));
      // two encoder passes, their rounds interleaved: each pass sums its own dk, dv
      const x2 = rand([B, H, W, C], 92) as tf.Tensor4D;
      const two = (o: Ops) => (...p: tf.Tensor[]) => {
        const ka = o.encoder(kept(p)), kb = o.encoder({ ...kept(p), x: x2 });
        const ua = o.slotCompetition(qs[0], ka, false).updates, ub = o.slotCompetition(qs[1], kb, false).updates;
        return tf.add(tf.sum(tf.mul(ua, dus[0])), tf.sum(tf.mul(ub, dus[1]))) as tf.Scalar;
      };
      const g2 = tf.grads(two(nativeOps))(params), g2r = tf.grads(two(tfjsOps))(params);
      g2.forEach((g, i) => expectScaled(g, g2r[i], 1e-4, `two passes: gradient ${i}`));
      expect(maxAbsOf(gz[12])).toBe(0);

      // the activations live in the first weight's workspace, which a later pass reuses as it is
      const ws = workspaceFor(params[0], 'encoder') as { bytes(): number };
      const held = ws.bytes();
      expect(held).toBeGreaterThan(4 * B * H * W * D * 5); // two maps, f1, f2, f3 at least
      tf.grads(f(nativeOps))(params);
      expect(ws.bytes()).toBe(held);
      // the addon's checks of a CPU stage
      const stage = addonOps();
      const spec = {
        x: new Float32Array(B * H * W * C), xShape: [B, H, W, C], device: 'cpu' as const,
        layers: [{ w: new Float32Array(D * C * 25), wShape: [D, C, 5, 5], b: new Float32Array(D), pad: 2, act: 1 }],
        head: {
          pos: positionalEmbedding(H, W), posW: new Float32Array(D * 4), posB: new Float32Array(D), lnW: new Float32Array(D).fill(1), lnB: new Float32Array(D), eps: 1e-5,
          w1: new Float32Array(D * D), b1: new Float32Array(D), w2: new Float32Array(D * D), b2: new Float32Array(D), wk: new Float32Array(Z * D), wv: new Float32Array(Z * D),
        },
      };
      expect(() => stage.encoderStage(spec)).toThrow(/'spec.workspace' is needed on the CPU/);
      const own = { ...spec, workspace: new stage.DecoderWorkspace() };
      expect(() => stage.encoderStage({ ...own, keep: true })).toThrow(/'spec.keep' is for GPU devices/);
      const r = stage.encoderStage(own);
      expect([r.k!.length, r.rows, r.Z]).toEqual([B * H * W * Z, B * H * W, Z]);
      // k and v into given arrays (the ops reuse released ones): every element written, those very arrays returned
      const kInto = new Float32Array(B * H * W * Z).fill(NaN), vInto = new Float32Array(B * H * W * Z).fill(NaN);
      const ri = stage.encoderStage({ ...own, kInto, vInto });
      expect(ri.k).toBe(kInto);
      expect(ri.v).toBe(vInto);
      expect([ri.k, ri.v]).toEqual([r.k, r.v]);
      expect(() => stage.encoderStage({ ...own, kInto, vInto: kInto })).toThrow(/'spec.kInto' overlaps another array of the spec/);
      expect(() => stage.encoderStage({ ...own, kInto: new Float32Array(3), vInto })).toThrow(/'spec.kInto' has 3 elements/);
      expect(() => stage.encoderStageBackward({ ...own, stamp: r.stamp, needParams: true })).toThrow(/'spec.dk' and 'spec.dv' are needed$/);
    });
  });

  test.each([
    ['N 7, input 5, hidden 4', 7, 5, 4],
    ['N 1, input 3, hidden 6', 1, 3, 6],
  ] as [string, number, number, number][])('gruCell and dualGruCell %s: values and gradients', (_n, N, I, H) => {
    tf.tidy(() => {
      const x = rand([N, I], 41) as tf.Tensor2D, h = rand([N, H], 42) as tf.Tensor2D, h2 = rand([N, H], 43) as tf.Tensor2D;
      const gw = [rand([3 * H, I], 44, 0.5), rand([3 * H, H], 45, 0.5), rand([3 * H], 46, 0.3), rand([3 * H], 47, 0.3)];
      const gru = (ops: Ops) => (...t: tf.Tensor[]) =>
        ops.gruCell(t[0] as tf.Tensor2D, t[1] as tf.Tensor2D, { weightIh: t[2] as tf.Tensor2D, weightHh: t[3] as tf.Tensor2D, biasIh: t[4] as tf.Tensor1D, biasHh: t[5] as tf.Tensor1D });
      const dy = rand([N, H], 48);
      expectScaled(gru(nativeOps)(x, h, ...gw), gru(tfjsOps)(x, h, ...gw), 1e-5, 'gru value');
      const loss = (f: (...t: tf.Tensor[]) => tf.Tensor) => (...t: tf.Tensor[]) => tf.sum(tf.mul(f(...t), dy));
      const gn = tf.grads(loss(gru(nativeOps)))([x, h, ...gw]);
      const gt = tf.grads(loss(gru(tfjsOps)))([x, h, ...gw]);
      gn.forEach((g, i) => expectScaled(g, gt[i], 1e-5, `gru grad ${i}`));
      const gz = nativeOps.withoutParamGrads(() => tf.grads(loss(gru(nativeOps)))([x, h, ...gw]));
      expectScaled(gz[1], gt[1], 1e-5, 'gru dh without param grads');
      expect(maxAbsOf(gz[2])).toBe(0);
      // DualGRU: the original's layout
      const dw = [rand([2 * H, I], 51, 0.5), rand([2 * H, H], 52, 0.5), rand([2 * H, I], 53, 0.5), rand([2 * H, H], 54, 0.5),
        rand([H, I], 55, 0.5), rand([H, H], 56, 0.5), rand([H, I], 57, 0.5), rand([H, H], 58, 0.5),
        rand([4 * H], 59, 0.3), rand([4 * H], 60, 0.3), rand([2 * H], 61, 0.3), rand([2 * H], 62, 0.3)];
      const dual = (ops: Ops) => (...t: tf.Tensor[]) => {
        const [a, b] = ops.dualGruCell(t[0] as tf.Tensor2D, t[1] as tf.Tensor2D, t[2] as tf.Tensor2D, {
          weightIh1: t[3] as tf.Tensor2D, weightHh1: t[4] as tf.Tensor2D, weightIh2: t[5] as tf.Tensor2D, weightHh2: t[6] as tf.Tensor2D,
          weightIn1: t[7] as tf.Tensor2D, weightHn1: t[8] as tf.Tensor2D, weightIn2: t[9] as tf.Tensor2D, weightHn2: t[10] as tf.Tensor2D,
          biasIh: t[11] as tf.Tensor1D, biasHh: t[12] as tf.Tensor1D, biasIn: t[13] as tf.Tensor1D, biasHn: t[14] as tf.Tensor1D,
        });
        return tf.concat([a, b], 1);
      };
      const dy2 = rand([N, 2 * H], 63);
      expectScaled(dual(nativeOps)(x, h, h2, ...dw), dual(tfjsOps)(x, h, h2, ...dw), 1e-5, 'dual value');
      const loss2 = (f: (...t: tf.Tensor[]) => tf.Tensor) => (...t: tf.Tensor[]) => tf.sum(tf.mul(f(...t), dy2));
      const dn = tf.grads(loss2(dual(nativeOps)))([x, h, h2, ...dw]);
      const dt = tf.grads(loss2(dual(tfjsOps)))([x, h, h2, ...dw]);
      dn.forEach((g, i) => expectScaled(g, dt[i], 1e-5, `dual grad ${i}`));
      const dz = nativeOps.withoutParamGrads(() => tf.grads(loss2(dual(nativeOps)))([x, h, h2, ...dw]));
      dz.slice(0, 3).forEach((g, i) => expectScaled(g, dt[i], 1e-5, `dual grad ${i} without param grads`));
      dz.slice(3).forEach((g, i) => expect([i, maxAbsOf(g)]).toEqual([i, 0]));
    });
  });

  test.each([
    ['B 2, K 3, 17 pixels', 2, 3, 17, 5, 4],
    ['K 1 (every weight 1 + eps)', 2, 1, 9, 3, 3],
    ['B 1, K 7, sharp scores', 1, 7, 30, 6, 8],
  ] as [string, number, number, number, number, number][])('slotCompetition %s: values and gradients', (_n, B, K, N, d, dv) => {
    tf.tidy(() => {
      const sharp = K === 7 ? 6 : 1;
      const q = rand([B, K, d], 31, sharp) as tf.Tensor3D, k = rand([B, N, d], 32) as tf.Tensor3D, v = rand([B, N, dv], 33) as tf.Tensor3D;
      const rt = tfjsOps.slotCompetition(q, { k, v });
      const rn = nativeOps.slotCompetition(q, { k, v });
      expectScaled(rn.attn!, rt.attn!, 1e-5, 'attn');
      expectScaled(rn.updates, rt.updates, 1e-5, 'updates');
      expect(nativeOps.slotCompetition(q, { k, v }, false).attn).toBeUndefined();
      const du = rand([B, K, dv], 34);
      const f = (ops: Ops) => (qq: tf.Tensor, kk: tf.Tensor, vv: tf.Tensor) =>
        tf.sum(tf.mul(ops.slotCompetition(qq as tf.Tensor3D, { k: kk as tf.Tensor3D, v: vv as tf.Tensor3D }).updates, du));
      const gn = tf.grads(f(nativeOps))([q, k, v]);
      const gt = tf.grads(f(tfjsOps))([q, k, v]);
      ['dq', 'dk', 'dv'].forEach((n, i) => expectScaled(gn[i], gt[i], 1e-4, n));
    });
  });

  test('the layer-norm kernels check their arguments', () => {
    const m = addonOps();
    const x = new Float32Array(12);
    expect(() => m.layerNorm({ x, rows: 3, D: 5, eps: 1e-5 })).toThrow(/'spec.x'.*\[rows,D\] = \[3,5\]/);
    expect(() => m.layerNorm({ x, rows: 3, D: 4, weight: new Float32Array(3), eps: 1e-5 })).toThrow(/'spec.weight'/);
    expect(() => m.layerNorm({ x, rows: 3, D: 4, eps: 0 })).toThrow(/'spec.eps' must be > 0/);
    const f = m.layerNorm({ x: Float32Array.from({ length: 12 }, (_, i) => i), rows: 3, D: 4, eps: 1e-5 });
    expect(Array.from(f.mean)).toEqual([1.5, 5.5, 9.5]);
    expect(() => m.layerNormBackward({ g: x, x, rows: 3, D: 4, mean: f.mean, rstd: new Float64Array(2), withParams: false })).toThrow(/'spec.rstd' must be a Float64Array of 3 elements/);
  });

  test('the fused slot attention checks its arguments; equal scores give the mean of v', () => {
    const m = addonOps();
    const B = 2, K = 3, N = 5, d = 4, C = 2;
    const v = Float32Array.from({ length: B * N * C }, (_, i) => i);
    const spec = { q: new Float32Array(B * K * d), k: new Float32Array(B * N * d), v, B, K, N, d, C, eps: 0 };
    expect(() => m.slotAttention({ ...spec, N: 4 })).toThrow(/'spec.k'.*\[B,N,d\] = \[2,4,4\]/);
    expect(() => m.slotAttention({ ...spec, eps: -1 })).toThrow(/eps' must be in \[0, 1\)/);
    const r = m.slotAttention(spec);
    expect(Array.from(r.p.slice(0, 5))).toEqual([1, 1, 1, 1, 1].map((x) => Math.fround(x / 3)));
    // image 0's values: (0,1), (2,3), … (8,9): each slot's update is their mean (4, 5)
    expect(Array.from(r.updates.slice(0, 2))).toEqual([4, 5]);
    expect(() => m.slotAttentionBackward({ ...spec, p: r.p, s: new Float64Array(5), updates: r.updates, dU: r.updates })).toThrow(/'spec.s' must be a Float64Array of 6 elements/);
    // dk, dv added in place: onto arrays of their own only
    const back = { ...spec, p: r.p, s: r.s, updates: r.updates, dU: Float32Array.from({ length: B * K * C }, (_, i) => (i % 3) - 1) };
    const once = m.slotAttentionBackward(back);
    const dkInto = new Float32Array(B * N * d).fill(1), dvInto = new Float32Array(B * N * C).fill(1);
    m.slotAttentionBackward({ ...back, dkInto, dvInto });
    expect(Array.from(dvInto)).toEqual(Array.from(once.dv!, (x) => Math.fround(x + 1)));
    expect(() => m.slotAttentionBackward({ ...back, dkInto: spec.k, dvInto })).toThrow(/'spec.dkInto' overlaps another array of the spec/);
    expect(() => m.slotAttentionBackward({ ...back, dkInto, dvInto: dkInto.subarray(0, B * N * C) })).toThrow(/overlaps another array/);
  });

  test.each([
    ['pad 1 relu', 1, 'relu', [5, 7], [6, 8, 7], [9, 7, 5, 5]],
    ['unpadded elu', 0, 'elu', [3, 4], [7, 6, 4], [5, 4, 3, 3]],
    ['pad 2 linear', 2, 'linear', [2, 3], [5, 5, 3], [4, 3, 3, 2]],
  ] as [string, number, FusedActivation, number[], number[], number[]][])('broadcastConv2d %s: values and gradients', (_n, pad, act, zs, ps, ws) => {
    tf.tidy(() => {
      const z = rand(zs, 21), pos = rand(ps, 22), w = rand(ws, 23, 0.4), b = rand([ws[0]], 24, 0.2);
      const run = (ops: Ops, zz: tf.Tensor, pp: tf.Tensor, ww: tf.Tensor, bb: tf.Tensor) =>
        ops.broadcastConv2d(zz as tf.Tensor2D, pp as tf.Tensor3D, ww, bb, { pad, activation: act });
      const yt = run(tfjsOps, z, pos, w, b);
      expectScaled(run(nativeOps, z, pos, w, b), yt, 1e-5, 'value');
      const dy = rand(yt.shape, 25);
      const f = (ops: Ops) => (zz: tf.Tensor, pp: tf.Tensor, ww: tf.Tensor, bb: tf.Tensor) => tf.sum(tf.mul(run(ops, zz, pp, ww, bb), dy));
      const gn = tf.grads(f(nativeOps))([z, pos, w, b]);
      const gt = tf.grads(f(tfjsOps))([z, pos, w, b]);
      ['dz', 'dpos', 'dw', 'db'].forEach((nm, i) => expectScaled(gn[i], gt[i], 1e-5, nm));
      const gz = nativeOps.withoutParamGrads(() => tf.grads(f(nativeOps))([z, pos, w, b]));
      expectScaled(gz[0], gt[0], 1e-5, 'dz without param grads');
    });
  });

  test.each([
    ['affine', [3, 7, 16], true, true],
    ['weight only', [5, 8], true, false],
    ['no affine', [4, 2, 6], false, false],
  ] as [string, number[], boolean, boolean][])('layerNorm %s: values and gradients', (_n, xs, withW, withB) => {
    tf.tidy(() => {
      const D = xs[xs.length - 1];
      const x = tf.add(rand(xs, 31, 3), 0.5), w = tf.add(rand([D], 32, 0.5), 1), b = rand([D], 33);
      const run = (ops: Ops, xx: tf.Tensor, ww: tf.Tensor, bb: tf.Tensor) => ops.layerNorm(xx, withW ? ww : undefined, withB ? bb : undefined);
      const yt = run(tfjsOps, x, w, b);
      expectScaled(run(nativeOps, x, w, b), yt, 1e-5, 'value');
      const dy = rand(yt.shape, 34);
      // gradients with respect to the inputs actually used (tf.grads rejects unused ones)
      const inputs = [x, ...(withW ? [w] : []), ...(withB ? [b] : [])];
      const f = (ops: Ops) => (...a: tf.Tensor[]) => tf.sum(tf.mul(run(ops, a[0], withW ? a[1] : w, withB ? a[2] : b), dy));
      const gn = tf.grads(f(nativeOps))(inputs);
      const gt = tf.grads(f(tfjsOps))(inputs);
      gt.forEach((g, i) => expectScaled(gn[i], g, 1e-4, ['dx', 'dw', 'db'][i]));
    });
  });

  test.each([
    ['3-D input with bias', [2, 300, 64], [64, 64], true, 'linear'],
    ['2-D input without bias', [1225, 64], [32, 64], false, 'linear'],
    ['small', [3, 5], [4, 5], true, 'linear'],
    ['3-D input with bias, fused ReLU', [2, 300, 64], [64, 64], true, 'relu'],
    ['2-D input without bias, fused ReLU', [1225, 64], [32, 64], false, 'relu'],
    ['small, ReLU', [3, 5], [4, 5], true, 'relu'],
    ['[B·K, z] rows, fused ELU', [128, 96], [128, 96], true, 'elu'],
    ['small, ELU, without bias', [3, 5], [4, 5], false, 'elu'],
  ] as [string, number[], number[], boolean, 'linear' | 'relu' | 'elu'][])('linear %s: values and gradients', (_n, xs, ws, withBias, act) => {
    tf.tidy(() => {
      const x = rand(xs, 5), w = rand(ws, 6, 0.3), b = rand([ws[0]], 7);
      const run = (ops: Ops, xx: tf.Tensor, ww: tf.Tensor, bb: tf.Tensor) => (withBias ? ops.linear(xx, ww, bb, act) : ops.linear(xx, ww, undefined, act));
      const yn = run(nativeOps, x, w, b), yt = run(tfjsOps, x, w, b);
      expectScaled(yn, yt, 1e-5, 'value');
      const dy = rand(yt.shape, 8);
      const inputs = withBias ? [x, w, b] : [x, w];
      const f = (ops: Ops) => (...a: tf.Tensor[]) => tf.sum(tf.mul(run(ops, a[0], a[1], withBias ? a[2] : b), dy));
      const gn = tf.grads(f(nativeOps))(inputs);
      const gt = tf.grads(f(tfjsOps))(inputs);
      gt.forEach((g, i) => expectScaled(gn[i], g, 1e-5, ['dx', 'dw', 'db'][i]));
      const gz = nativeOps.withoutParamGrads(() => tf.grads(f(nativeOps))(inputs));
      expectScaled(gz[0], gt[0], 1e-5, 'dx without param grads');
    });
  });
});

/** lossAndGrads with tfjsOps (recording the draws) and nativeOps (replaying them). */
function compareModels(cfg: Partial<NetConfig>, batch: number, seed: number): void {
  const mt = new EfficientMORL(cfg, { ops: tfjsOps, seed });
  const mn = new EfficientMORL(cfg, { ops: nativeOps, seed });
  const [C, H, W] = mt.cfg.input_size;
  const images = tf.tidy(() => tf.sub(tf.mul(tf.randomUniform([batch, C, H, W], 0, 1, 'float32', seed), 2), 1));
  const rec = new RecordingNoise(new SeededNoise(seed));
  const rt = mt.lossAndGrads(images, { noise: rec });
  const replay = new ReplayNoise(rec.draws);
  const rn = mn.lossAndGrads(images, { noise: replay });
  try {
    expect(replay.remaining()).toBe(0);
    for (const k of ['totalLoss', 'nll', 'kl'] as const) {
      const rel = Math.abs(rn[k] - rt[k]) / Math.max(Math.abs(rt[k]), 1e-30);
      if (!(rel <= 1e-5)) throw new Error(`${k}: native ${rn[k]} vs tfjs ${rt[k]} (relative ${rel.toExponential(2)})`);
    }
    expect([...rn.grads.keys()].sort()).toEqual([...rt.grads.keys()].sort());
    // Gradients that are zero in exact arithmetic (norm_slots.bias: a shift shared by all slots
    // leaves the softmax unchanged; norm_slots.weight at some inits) hold rounding noise on both
    // sides: those only have to stay below 1e-6 of the largest gradient.
    let globalMax = 0;
    for (const g of rt.grads.values()) globalMax = Math.max(globalMax, maxAbsOf(g));
    for (const [k, g] of rt.grads) {
      const ours = rn.grads.get(k)!;
      if (maxAbsOf(g) < 1e-6 * globalMax) {
        expect(maxAbsOf(ours)).toBeLessThan(1e-6 * globalMax);
      } else {
        expectScaled(ours, g, 1e-3, `grad ${k}`);
      }
    }
  } finally {
    rt.dispose();
    rn.dispose();
    images.dispose();
    mt.dispose();
    mn.dispose();
  }
}

describeNative('the whole model: nativeOps vs tfjsOps', () => {
  test('small decoder, Gaussian', () => {
    compareModels({ K: 3, input_size: [3, 13, 11], z_size: 8, image_decoder: 'small', image_likelihood: 'Gaussian', stochastic_layers: 2, refinement_iters: 2 }, 2, 11);
  });
  test('small decoder, GMM', () => {
    compareModels({ K: 3, input_size: [3, 12, 12], z_size: 8, image_decoder: 'small', image_likelihood: 'GMM', stochastic_layers: 3, refinement_iters: 1 }, 2, 12);
  });
  test('iodine decoder, GMM', () => {
    compareModels({ K: 2, input_size: [3, 10, 9], z_size: 8, image_decoder: 'iodine', image_likelihood: 'GMM', stochastic_layers: 2, refinement_iters: 2 }, 2, 13);
  });
  test('iodine decoder, Gaussian', () => {
    compareModels({ K: 2, input_size: [3, 9, 10], z_size: 8, image_decoder: 'iodine', image_likelihood: 'Gaussian', stochastic_layers: 2, refinement_iters: 1 }, 1, 14);
  });
  test('big decoder (96x96), Gaussian', () => {
    compareModels({ K: 2, input_size: [3, 96, 96], z_size: 8, image_decoder: 'big', image_likelihood: 'Gaussian', stochastic_layers: 1, refinement_iters: 1 }, 1, 15);
  }, 600_000);
});

describeNative('the decoding stages of a pass share their weights (shareDecoderWeights)', () => {
  // each stage handing its own weight gradients to the tape, which adds them up
  const unshared = (ops: Ops): Ops => ({ ...ops, shareDecoderWeights: (spec) => spec });
  const devices: StageDevice[] = ['cpu', ...(nativeStatus().info?.simtEmulator ? (['simt'] as StageDevice[]) : [])];
  test.each(devices)('on %s: loss and every gradient the same bits as the tape summing every stage\'s gradients', (device) => {
    const cfg: Partial<NetConfig> = { K: 3, input_size: [3, 12, 11], z_size: 8, image_decoder: 'small', image_likelihood: 'GMM', stochastic_layers: 2, refinement_iters: 2 };
    const ops = nativeOpsOn(device);
    const shared = new EfficientMORL(cfg, { ops, seed: 21 });
    const own = new EfficientMORL(cfg, { ops: unshared(ops), seed: 21 });
    const images = tf.tidy(() => tf.sub(tf.mul(tf.randomUniform([2, 3, 12, 11], 0, 1, 'float32', 21), 2), 1));
    const t0 = deviceTraffic();
    const rs = shared.lossAndGrads(images, { noise: new SeededNoise(5) });
    const t1 = deviceTraffic();
    const ro = own.lossAndGrads(images, { noise: new SeededNoise(5) });
    const t2 = deviceTraffic();
    try {
      expect([rs.totalLoss, rs.nll, rs.kl]).toEqual([ro.totalLoss, ro.nll, ro.kl]);
      expect([...rs.grads.keys()].sort()).toEqual([...ro.grads.keys()].sort());
      const decoderKeys = [...ro.grads.keys()].filter((k) => k.includes('image_decoder.decode'));
      expect(decoderKeys.length).toBe(8);
      if (device !== 'cpu') {
        // on a GPU the three stages' weight gradients stay there and come down summed, once
        const weightBytes = 4 * decoderKeys.reduce((a, k) => a + ro.grads.get(k)!.size, 0);
        expect((t2.downBytes - t1.downBytes) - (t1.downBytes - t0.downBytes)).toBeGreaterThanOrEqual(2 * weightBytes);
      }
      for (const [k, g] of ro.grads) expect([k, rs.grads.get(k)!.dataSync()]).toEqual([k, g.dataSync()]);
    } finally {
      rs.dispose();
      ro.dispose();
      images.dispose();
      shared.dispose();
      own.dispose();
    }
  });

  test('a shared stack goes with its own positional embedding', () => {
    const m = new EfficientMORL({ K: 2, input_size: [3, 6, 5], z_size: 4, image_decoder: 'small' }, { ops: nativeOps, seed: 3 });
    try {
      tf.tidy(() => {
        const d = decoderStack(m.params, nativeOps, m.cfg);
        const spec = nativeOps.shareDecoderWeights(d.spec, d.pos);
        const args = { spec, z: tf.zeros([2, 4]) as tf.Tensor2D, pos: d.pos, target: tf.zeros([1, 6, 5, 3]) as tf.Tensor4D, K: 2, logVar: 0, likelihood: 'Gaussian' as const, grads: 'none' as const, outputs: false };
        expect(nativeOps.decoderNll(args).nll.shape).toEqual([1]);
        expect(() => nativeOps.decoderNll({ ...args, pos: tf.zerosLike(d.pos) })).toThrow(/goes with the positional embedding it was shared with/);
      });
    } finally {
      m.dispose();
    }
  });
});

const FIXTURE = fixturePath('tetrominoes-small-gaussian.h5');
const describeGolden = available && fs.existsSync(FIXTURE) ? describe : describe.skip;

// the decoding stage on the CPU kernels, on the CUDA kernels run by the SIMT emulator, and on a GPU when there is one;
// and the CPU convolutions in bf16 (mixed precision), against the same fp32 recording with bf16-sized tolerances
const goldenRuns: [StageDevice, ConvPrecision][] = [
  ['cpu', 'fp32'],
  ...(available && nativeStatus().info?.simtEmulator ? [['simt', 'fp32'] as [StageDevice, ConvPrecision]] : []),
  ...(available && nativeStatus().info!.cudaDevices > 0 ? [['cuda:0', 'fp32'] as [StageDevice, ConvPrecision]] : []),
  ...(available && nativeStatus().info?.bf16 ? [['cpu', 'bf16'] as [StageDevice, ConvPrecision]] : []),
];
// loss: relative; gradients: of each tensor's own max magnitude (bf16 operands carry 8 bits: ~4e-3 each)
const GOLDEN_TOL: Record<ConvPrecision, { loss: number; grad: number }> = { fp32: { loss: 1e-4, grad: 1e-3 }, bf16: { loss: 1e-2, grad: 3e-2 } };

describeGolden.each(goldenRuns)('golden fixture tetrominoes-small-gaussian.h5 no_geco with nativeOps, decoding stage on %s, convolutions in %s', (device, precision) => {
  test('loss and every gradient match the recorded PyTorch ones', async () => {
    const fx = await withH5File(FIXTURE, 'r', async (f) => {
      const noiseKeys = f.keys('no_geco/noise').sort();
      const noise: RecordedDraw[] = [];
      for (const k of noiseKeys) noise.push(await readArray(f, `no_geco/noise/${k}`));
      const attrs: Record<string, unknown> = {};
      for (const a of f.attrNames('no_geco')) attrs[a] = f.attr('no_geco', a);
      return {
        netConfig: JSON.parse(String(f.attr('', 'net_config'))) as Record<string, unknown>,
        images: await readArray(f, 'input/images'),
        params: await readParamGroup(f, 'params'),
        noise,
        attrs,
        total: await readArray(f, 'no_geco/outputs/total_loss'),
        grads: await readParamGroup(f, 'no_geco/grads'),
      };
    });
    const model = new EfficientMORL(fx.netConfig, { ops: nativeOpsOn(device, precision) });
    const tol = GOLDEN_TOL[precision];
    model.params.load(fx.params);
    const images = tf.tensor(fx.images.data, fx.images.shape);
    const replay = new ReplayNoise(fx.noise);
    const res = model.lossAndGrads(images, { noise: replay, klBeta: Number(fx.attrs.kl_beta ?? 1), globalStep: Number(fx.attrs.global_step ?? 0), geco: null });
    try {
      expect(replay.remaining()).toBe(0);
      const e = fx.total.data[0];
      expect(Math.abs(res.totalLoss - e)).toBeLessThanOrEqual(1e-5 + tol.loss * Math.abs(e));
      let globalMax = 0;
      for (const k of Object.keys(fx.grads)) for (const v of fx.grads[k].data) globalMax = Math.max(globalMax, Math.abs(v));
      for (const k of Object.keys(fx.grads)) {
        const ours = res.grads.get(k)!;
        const exp = tf.tensor(fx.grads[k].data, fx.grads[k].shape);
        if (k === 'hvae_networks.norm_slots.bias') {
          // zero in exact arithmetic
          expect(maxAbsOf(ours)).toBeLessThan(1e-6 * globalMax);
        } else {
          expectScaled(ours, exp, tol.grad, `grad ${k}`);
        }
        exp.dispose();
      }
    } finally {
      res.dispose();
      images.dispose();
      model.dispose();
    }
  }, 600_000);
});
