/**
 * The decoder's and the encoder's weights kept on a GPU device with their Adam step there (lib/ops/device-params.ts):
 * the same training steps as Adam on the host, bit for bit, with neither the weights nor their
 * gradients crossing the bus; host reads and writes, checkpoints and resumption. On the SIMT
 * emulator here, and on cuda:0 where there is one.
 */
import { tf, initBackend } from '../lib/tf';
import { nativeStatus } from '../lib/native';
import { addonOps, deviceTraffic, type StageDevice } from '../lib/ops/addon';
import { nativeOpsAvailable, nativeOpsOn } from '../lib/ops/native';
import { f32 } from '../lib/ops/arrays';
import { experimentConfig } from '../lib/config/experiment';
import { Trainer } from '../lib/train/trainer';
import { EfficientMORL } from '../lib/model/efficient-morl';
import { SeededNoise } from '../lib/model/noise';
import type { ParamRecord } from '../lib/params/store';
import { LocalGroup } from '../lib/train/distributed';
import { uniform } from './helpers';

const st = nativeStatus();
const available = st.available && nativeOpsAvailable() && st.info?.simtEmulator === true;
if (!available) {
  // eslint-disable-next-line no-console
  console.warn(`device-optimizer tests SKIPPED: ${st.reason ?? 'the addon has no GPU kernels (npm run build:native)'}`);
}
const devices: StageDevice[] = available ? ['simt', ...(st.info!.cudaDevices > 0 ? (['cuda:0'] as const) : [])] : [];
const describeDevices = devices.length ? describe.each(devices) : describe.skip.each(['simt' as StageDevice]);

beforeAll(async () => {
  await initBackend('cpu');
});

const S = 8;
const config = experimentConfig({
  Net: { K: 3, input_size: [3, S, S], z_size: 6, image_decoder: 'small', image_likelihood: 'GMM', stochastic_layers: 1, refinement_iters: 1 },
  // GECO and clipping on: the gradient norms here are ~90, so every step is clipped
  training: { batch_size: 2, lr: 1e-3, use_scheduler: false, use_geco: true, geco_reconstruction_target: -0.5, refinement_curriculum: [[-1, 1]] },
  seed: 3,
});
const decoderWeight = 'hvae_networks.image_decoder.decode.2.weight';

function expectSameBits(a: ParamRecord, b: ParamRecord): void {
  expect(Object.keys(b)).toEqual(Object.keys(a));
  for (const k of Object.keys(a)) expect([k, b[k].data]).toEqual([k, a[k].data]);
}

describeDevices('the decoder\'s and the encoder\'s weights and their Adam step on %s', (device) => {
  let images: tf.Tensor4D;
  beforeAll(() => {
    images = tf.tensor4d(uniform(2 * 3 * S * S, 77), [2, 3, S, S]);
  });
  afterAll(() => images.dispose());

  const trainer = (deviceOptimizer: boolean): Trainer => new Trainer(config, { ops: nativeOpsOn(device), deviceOptimizer });

  test('take Adam on the host\'s steps bit for bit, clipped, with neither weights nor gradients crossing the bus', () => {
    const run = (deviceOptimizer: boolean) => {
      const tensorsBefore = tf.memory().numTensors;
      const t = trainer(deviceOptimizer);
      try {
        expect(t.deviceParams.length > 0).toBe(deviceOptimizer);
        const steps = [0, 1, 2].map(() => {
          const before = deviceTraffic();
          const r = t.step(images);
          const after = deviceTraffic();
          return { r: [r.totalLoss, r.nll, r.kl, r.gradNorm, r.applied], up: after.upBytes - before.upBytes, down: after.downBytes - before.downBytes };
        });
        const names = t.deviceParams.flatMap((g) => [...g.names]);
        const deviceBytes = 4 * names.reduce((n, k) => n + t.model.params.get(k).size, 0);
        return { steps, params: t.parameters(), adam: t.optimizer.exportState(), deviceBytes, tensors: names.length };
      } finally {
        t.dispose();
        expect(tf.memory().numTensors).toBe(tensorsBefore); // nothing left behind (the device's anchors go with the model)
      }
    };
    const host = run(false);
    const dev = run(true);
    expect(dev.steps.map((s) => s.r)).toEqual(host.steps.map((s) => s.r));
    expect(host.steps[0].r[3]).toBeGreaterThan(5); // clipped
    expectSameBits(host.params, dev.params);
    expect(dev.adam.steps).toBe(3);
    for (const which of ['m', 'v'] as const) {
      expect([...dev.adam[which].keys()]).toEqual([...host.adam[which].keys()]);
      for (const [k, e] of host.adam[which]) expect([k, dev.adam[which].get(k)!.data]).toEqual([k, e.data]);
    }
    // the small decoder's 8 tensors, the encoder's 18, the DualGRU's 12 and the refinement GRU's 4
    // (each GRU called once a pass here): from the second step on neither their new values go up
    // nor their gradients come down (only their norms do)
    expect(dev.tensors).toBe(42);
    expect(dev.deviceBytes).toBeGreaterThan(100_000);
    for (const i of [1, 2]) expect([host.steps[i].up - dev.steps[i].up, host.steps[i].down - dev.steps[i].down]).toEqual([dev.deviceBytes, dev.deviceBytes - 4 * 42]);
  }, 120_000);

  test('the GRUs\' gradients over several calls a pass are summed on the device as the tape sums them', () => {
    // 2 stochastic layers and 2 refinement steps: each GRU runs twice a pass
    const deep = experimentConfig({
      Net: { ...config.Net, stochastic_layers: 2, refinement_iters: 2 },
      training: { ...config.training, refinement_curriculum: [[-1, 2]] },
      seed: 3,
    });
    const run = (deviceOptimizer: boolean) => {
      const t = new Trainer(deep, { ops: nativeOpsOn(device), deviceOptimizer });
      try {
        const steps = [0, 1, 2].map((i) => {
          const r = t.step(images, { noise: new SeededNoise(200 + i) });
          r.release();
          return [r.totalLoss, r.gradNorm];
        });
        return { steps, params: t.parameters() };
      } finally {
        t.dispose();
      }
    };
    const host = run(false);
    const dev = run(true);
    expect(dev.steps).toEqual(host.steps);
    expectSameBits(host.params, dev.params);
  }, 120_000);

  test('a run resumed from its parameters and optimizer state takes the uninterrupted run\'s steps', () => {
    const whole = trainer(true);
    const first = trainer(true);
    const resumed = trainer(true);
    try {
      // each step's own draws (a checkpoint keeps the noise generator's state)
      const step = (t: Trainer, i: number) => t.step(images, { noise: new SeededNoise(100 + i) });
      for (let i = 0; i < 3; i++) step(whole, i);
      for (let i = 0; i < 2; i++) step(first, i);
      // what a checkpoint stores: the parameters (pulled from the device) and Adam's state (the device's moments included)
      resumed.model.params.load(first.parameters());
      resumed.optimizer.importState(first.optimizer.exportState());
      resumed.state = { ...first.state };
      step(resumed, 2);
      expectSameBits(whole.parameters(), resumed.parameters());
    } finally {
      whole.dispose();
      first.dispose();
      resumed.dispose();
    }
  }, 120_000);

  test('the host reads the device\'s current values, and a host write reaches the next step', () => {
    const host = trainer(false);
    const dev = trainer(true);
    try {
      host.step(images);
      dev.step(images);
      // the ops' readers of host data see the device's values (the host copy is brought up to date)
      const variable = dev.model.params.variable(decoderWeight);
      expect(Array.from(f32(variable))).toEqual(Array.from(host.model.params.get(decoderWeight).dataSync()));
      // a write on the host replaces the device's values
      const written = { data: uniform(variable.size, 5, -0.1, 0.1), shape: [...variable.shape] };
      host.model.params.set(decoderWeight, written);
      dev.model.params.set(decoderWeight, written);
      host.step(images);
      dev.step(images);
      expectSameBits(host.parameters(), dev.parameters());
    } finally {
      host.dispose();
      dev.dispose();
    }
  }, 120_000);

  test('a pass\'s gradients wait for one optimizer step: a second pass before it is refused, a skipped step drops them', () => {
    const m = new EfficientMORL(config.Net, { ops: nativeOpsOn(device), seed: 4 });
    try {
      const owners = m.keepWeightsOnDevice();
      expect(owners.map((o) => o.stage)).toEqual(['decoder', 'encoder', 'gru', 'gru']);
      expect(m.keepWeightsOnDevice()).toEqual(owners); // one owner per stage and model
      // the tape differentiates the host's trainable weights and one anchor per owner, not the device's weights
      const onDevice = owners.reduce((n, o) => n + o.names.length, 0);
      const tape = m.params.tapeVariables();
      expect(tape.length).toBe(m.params.trainableNames().length - onDevice + owners.length);
      expect(tape.filter((v) => m.params.isAnchor(v.name))).toEqual(owners.map((o) => o.anchor));
      const r = m.lossAndGrads(images, { noise: new SeededNoise(1) });
      // the device's weights are left out of the host's gradients
      expect(r.grads.has(decoderWeight)).toBe(false);
      expect(r.grads.has('hvae_networks.encoder_pt_1.0.weight')).toBe(false);
      expect(r.grads.has('hvae_networks.to_k.weight')).toBe(false);
      expect(r.grads.has('hvae_networks.gru.cell.bias_in')).toBe(false);
      expect(r.grads.has('refinenet.recurrence.weight_hh_l0')).toBe(false);
      expect(r.grads.has('hvae_networks.image_decoder.pos_embed_projection.weight')).toBe(true);
      expect(r.grads.has('refinenet.encoding.0.weight')).toBe(true);
      r.dispose();
      expect(owners.map((o) => o.hasGradients)).toEqual([true, true, true, true]);
      expect(() => m.lossAndGrads(images, { noise: new SeededNoise(1) })).toThrow(/a second pass's gradients of the (decoder|encoder) before an optimizer step took \(or discarded\) the first's/);
      for (const o of owners) o.discardGradients();
      m.lossAndGrads(images, { noise: new SeededNoise(1) }).dispose();
      expect(owners.map((o) => o.hasGradients)).toEqual([true, true, true, true]);
    } finally {
      m.dispose();
    }
  }, 120_000);
});

describeDevices('data-parallel ranks with the weights on %s', (device) => {
  test('sum the device\'s gradients through the host and take Adam on the host\'s steps bit for bit', async () => {
    const world = 2;
    const all = tf.tensor4d(uniform(world * 2 * 3 * S * S, 78), [world * 2, 3, S, S]);
    const run = async (deviceOptimizer: boolean) => {
      const ranks = LocalGroup.create(world).map((comm) => new Trainer(config, { ops: nativeOpsOn(device), comm, deviceOptimizer }));
      try {
        const steps = await Promise.all(
          ranks.map(async (t, rank) => {
            const shard = all.slice([2 * rank, 0, 0, 0], [2, 3, S, S]);
            const out: number[][] = [];
            for (let i = 0; i < 3; i++) {
              const r = await t.stepAsync(shard, { noise: new SeededNoise(100 + 10 * i + rank) });
              r.release();
              out.push([r.totalLoss, r.nll, r.kl, r.gradNorm, Number(r.applied)]);
            }
            shard.dispose();
            return out;
          }),
        );
        expect(ranks.map((t) => t.deviceParams.length > 0)).toEqual([deviceOptimizer, deviceOptimizer]);
        expect(ranks.map((t) => t.deviceParams.some((g) => g.hasGradients))).toEqual([false, false]);
        return { steps, params: ranks.map((t) => t.parameters()), adam: ranks.map((t) => t.optimizer.exportState()) };
      } finally {
        for (const t of ranks) t.dispose();
      }
    };
    try {
      const host = await run(false);
      const dev = await run(true);
      expect(dev.steps).toEqual(host.steps);
      expect(host.steps[0][0]).toEqual(host.steps[1][0]); // the ranks report the reduced values
      expect(host.steps[0][0][3]).toBeGreaterThan(5); // clipped
      for (let rank = 0; rank < world; rank++) {
        expectSameBits(host.params[rank], dev.params[rank]);
        for (const which of ['m', 'v'] as const) for (const [k, e] of host.adam[rank][which]) expect([k, dev.adam[rank][which].get(k)!.data]).toEqual([k, e.data]);
      }
      expectSameBits(dev.params[0], dev.params[1]);
    } finally {
      all.dispose();
    }
  }, 240_000);

  test('the gradients a pass left on the device go down and back as the ranks\' sum', () => {
    const m = new EfficientMORL(config.Net, { ops: nativeOpsOn(device), seed: 4 });
    try {
      const [decoder] = m.keepWeightsOnDevice();
      expect(() => decoder.readGradients()).toThrow(/DeviceParams.readGradients: no pass's gradients of the decoder wait on the device/);
      const images = tf.tensor4d(uniform(2 * 3 * S * S, 79), [2, 3, S, S]);
      m.lossAndGrads(images, { noise: new SeededNoise(1) }).dispose();
      images.dispose();
      const g = decoder.readGradients();
      const norms = decoder.gradNorms();
      expect(g.length).toBe(decoder.names.reduce((n, k) => n + m.params.get(k).size, 0));
      // twice the gradients: twice each norm
      decoder.writeGradients(g.map((v) => 2 * v));
      const doubled = decoder.gradNorms();
      for (const [k, n] of norms) expect([k, doubled.get(k)]).toEqual([k, 2 * n]);
      expect(() => decoder.writeGradients(g.subarray(1))).toThrow(/the decoder's gradients have \d+ values, not \d+/);
      // the norms add the squares in the host's order: crafted values whose double sum rounds
      // differently in another order (reversed: 1.1137988567352295)
      const crafted = new Float32Array(g.length);
      crafted.set([1.11379873752594, 2 ** -12, 2 ** -27, 2 ** -27, 2 ** -27, 2 ** -27]);
      decoder.writeGradients(crafted);
      const first = decoder.names[0];
      const size = m.params.get(first).size;
      expect(size).toBeGreaterThan(6);
      const expected = Math.fround(1.11379873752594);
      expect(addonOps().l2Norm(crafted.subarray(0, size))).toBe(expected);
      expect(addonOps().l2Norm(Float32Array.from(crafted.subarray(0, 6)).reverse())).not.toBe(expected);
      expect(decoder.gradNorms().get(first)).toBe(expected);
      expect(() => decoder.allreduceGradients({})).toThrow(device === 'simt' ? /whose memory is the host's/ : /argument 'comm' must be an NcclComm/);
      decoder.discardGradients();
    } finally {
      m.dispose();
    }
  }, 120_000);
});

(available ? describe : describe.skip)('device-resident parameters at the addon\'s boundary', () => {
  test('clear errors for what the device does not hold, and for parts that do not go that way', () => {
    const k = addonOps();
    const workspace = new k.DecoderWorkspace();
    const params = { stage: 'decoder' as const, layers: 2, params: [{ index: 0, bias: false, size: 4, tag: 7 }] };
    const spec = { workspace, device: 'simt' as const, ...params };
    const scalars = { first: true, scale: 1, b1: Math.fround(0.9), c1: Math.fround(0.1), b2: Math.fround(0.999), c2: Math.fround(0.001), eps: Math.fround(1e-8), bc2Sqrt: Math.fround(0.03), stepSize: Math.fround(0.01) };
    expect(() => k.deviceGradNorms(spec)).toThrow(/no summed gradients on the device/);
    expect(() => k.deviceAdam({ ...spec, ...scalars, newTags: [8] })).toThrow(/no summed gradients on the device/);
    expect(() => k.deviceParamsRead({ ...spec, part: 'weights' })).toThrow(/the device does not hold the weight of layer 0 under tag 7/);
    expect(() => k.deviceParamsRead({ ...spec, part: 'm' })).toThrow(/no first moments on the device/);
    expect(() => k.deviceParamsWrite({ ...spec, part: 'weights' as 'm', data: new Float32Array(4) })).toThrow(/'spec.part' must be 'grads', 'm' or 'v'/);
    expect(() => k.deviceParamsWrite({ ...spec, part: 'grads', data: new Float32Array(4) })).toThrow(/no summed gradients to replace on the device/);
    expect(() => k.deviceGradAllreduce(spec, {})).toThrow(/'spec.device' is 'simt', whose memory is the host's; NCCL reduces CUDA device memory/);
    expect(() => k.deviceParamsWrite({ ...spec, part: 'm', data: new Float32Array(3) })).toThrow(/'spec.data' has 3 elements but the parameters' 4 values needs 4/);
    expect(() => k.deviceParamsRead({ ...spec, params: [{ index: 2, bias: false, size: 4, tag: 7 }], part: 'm' })).toThrow(/'spec.params\[0\].index' is 2, past the stage's 2 places/);
    expect(() => k.deviceParamsRead({ ...spec, params: [{ index: 0, bias: false, size: 4, tag: 0 }], part: 'm' })).toThrow(/'spec.params\[0\].tag' must be a content tag >= 1/);
    expect(() => k.deviceParamsRead({ ...spec, stage: 'head' as 'decoder', part: 'm' })).toThrow(/'spec.stage' must be 'decoder', 'encoder' or 'gru'/);
    expect(() => k.deviceParamsRead({ ...spec, stage: 'encoder', params: [{ index: 2 + 10, bias: false, size: 4, tag: 7 }], part: 'm' })).toThrow(/'spec.params\[0\].index' is 12, past the stage's 12 places/);
    expect(() => k.deviceParamsRead({ ...spec, stage: 'encoder', params: [{ index: 3, bias: false, size: 4, tag: 7 }], part: 'weights' })).toThrow(/the device does not hold head tensor 2 of the encoder under tag 7/);
    expect(() => k.deviceGradNorms({ ...spec, device: 'cpu' })).toThrow(/'spec.device' must be 'cuda:N' or 'simt': device-resident parameters live on a GPU device/);
    // moments written come back as they were
    const m = Float32Array.of(1, 2, 3, 4);
    k.deviceParamsWrite({ ...spec, part: 'm', data: m });
    expect(k.deviceParamsRead({ ...spec, part: 'm' })).toEqual(m);
    expect(() => k.deviceParamsWrite({ ...spec, params: [{ index: 0, bias: false, size: 5, tag: 7 }], part: 'm', data: new Float32Array(5) })).toThrow(/state buffer 2 holds 4 floats, asked for 5/);
    expect(() => k.decoderParamGradSums({ workspace, device: 'simt', ids: [1], us: [1], sizes: [1, 4], keep: { ...params, stage: 'encoder' } })).toThrow(/'spec.keep' must be the decoder's parameters/);
  });

  test('a GRU call on a GRU stage\'s resident weights: the host call\'s values, and clear errors', () => {
    const k = addonOps();
    const workspace = new k.DecoderWorkspace();
    const N = 2, I = 3, H = 2, G = 3 * H;
    const sizes = [G * I, G * H, G, G];
    const w = sizes.map((n, i) => uniform(n, 60 + i, -0.5, 0.5));
    const params = sizes.map((size, index) => ({ index, bias: index >= 2, size, tag: 40 + index }));
    const resident = { stage: 'gru' as const, layers: 1, params, data: w as (Float32Array | null)[], cell: 0 };
    const base = { x: uniform(N * I, 70), h: uniform(N * H, 71), N, I, H };
    const onSimt = { device: 'simt' as const, workspace };
    // the same bits as the call given the arrays
    const plain = k.gruCell({ ...base, wIh: w[0], wHh: w[1], bIh: w[2], bHh: w[3], device: 'simt', workspace: new k.DecoderWorkspace() });
    expect(k.gruCell({ ...base, ...onSimt, resident }).y).toEqual(plain.y);
    // held now: no data needed
    expect(k.gruCell({ ...base, ...onSimt, resident: { ...resident, data: [null, null, null, null] } }).y).toEqual(plain.y);
    expect(() => k.gruCell({ ...base, resident })).toThrow(/'spec.resident' is for GPU devices/);
    expect(() => k.gruCell({ ...base, ...onSimt, resident: { ...resident, stage: 'decoder' as 'gru' } })).toThrow(/'spec.resident.stage' must be 'gru'/);
    expect(() => k.gruCell({ ...base, ...onSimt, resident: { ...resident, layers: 3 } })).toThrow(/'spec.resident.layers' must be 1 \(a GRU cell\) or 2 \(the DualGRU\)/);
    expect(() => k.gruCell({ ...base, ...onSimt, resident: { ...resident, data: [null] } })).toThrow(/'spec.resident.data' must be an array of one Float32Array \(or null\) per parameter/);
    expect(() => k.gruCell({ ...base, ...onSimt, resident: { ...resident, data: [w[1], null, null, null] } })).toThrow(/'spec.resident.data\[0\]' has 12 elements, the parameter 18/);
    const fresh = { device: 'simt' as const, workspace: new k.DecoderWorkspace() };
    expect(() => k.gruCell({ ...base, ...fresh, resident: { ...resident, data: [w[0], w[1], null, w[3]] } })).toThrow(/a device-resident tensor \(tag 42\) is not on the device/);
    expect(() => k.gruCell({ ...base, ...onSimt, resident: { ...resident, cell: 1 } })).toThrow(/GPU GRU: cell 1 is not one of the stage's/);
    const short = params.map((q) => (q.index === 1 ? { ...q, size: 5, tag: 50 } : q));
    expect(() => k.gruCell({ ...base, ...onSimt, resident: { ...resident, params: short, data: [w[0], new Float32Array(5), w[2], w[3]] } }))
      .toThrow(/GPU GRU: parameter 1 has 5 values, input 3 and hidden 2 need 12/);
    expect(() => k.gruCell({ ...base, ...onSimt, resident: { ...resident, params: params.slice(0, 3), data: w.slice(0, 3) } })).toThrow(/the stage's 4 parameters must all be given/);
  });

  test('a resident layer is for GPU devices, and its weights must be in the workspace', () => {
    const k = addonOps();
    const layer = { kind: 2 as const, wShape: [4, 3, 3, 3], pad: 1, act: 0, resident: true, wTag: 11, bTag: 12 };
    const base = { z: new Float32Array(6), n: 2, c: 3, pos: new Float32Array(3 * 5 * 5), gh: 5, gw: 5, target: new Float32Array(5 * 5 * 3), B: 1, K: 2, H: 5, W: 5, C: 3, logVar: 0, gmm: false, needDz: false, needParams: false, needOutputs: false };
    const bcast = { kind: 1 as const };
    expect(() => k.decoderStage({ ...base, layers: [bcast, layer], device: 'cpu' })).toThrow(/'spec.layers\[1\].resident' is for GPU devices/);
    expect(() => k.decoderStage({ ...base, layers: [bcast, layer], device: 'simt' })).toThrow(/'spec.layers\[1\].resident' needs wTag, bTag and the workspace that holds them/);
    expect(() => k.decoderStage({ ...base, layers: [bcast, layer], device: 'simt', workspace: new k.DecoderWorkspace() })).toThrow(/a device-resident tensor \(tag 11\) is not on the device/);
  });
});
