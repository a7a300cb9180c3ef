/**
 * Golden test: the Slot Attention baseline against the original PyTorch code, one fixture per
 * *.h5 in shared/fixtures/slot-attention (see shared/fixtures/README.md). Replays the recorded
 * initial-slots draw and checks the loss, x_means, masks, final slots and every parameter
 * gradient, on both the training path (lossAndGrads) and the inference path (infer).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { tf, initBackend } from '../lib/tf';
import { withH5File } from '../lib/io/h5';
import { SlotAttention, type SlotAttentionGradResult } from '../lib/model/slot-attention';
import { ReplayNoise, type RecordedDraw } from '../lib/model/noise';
import { readArray, readParamGroup } from '../lib/params/h5';
import type { ParamArray, ParamRecord } from '../lib/params/store';
import { goldenComparer, maxAbs } from './golden-compare';

const SA_DIR = process.env.EMORL_GOLDEN_SA_DIR ?? path.resolve(__dirname, '..', '..', 'shared', 'fixtures', 'slot-attention');
const files = fs.existsSync(SA_DIR)
  ? fs
      .readdirSync(SA_DIR)
      .filter((f) => f.endsWith('.h5') && fs.statSync(path.join(SA_DIR, f)).isFile())
      .sort()
  : [];

const REL = 1e-4;
const ABS = 1e-5;
const GRAD_TOL = 1e-3;
/** Zero in exact arithmetic (a shift shared by all slots leaves the softmax over slots unchanged). */
const ZERO_GRAD_KEY = 'norm_slots.bias';

const { compareClose, compareScaled, summary } = goldenComparer({ rel: REL, abs: ABS, gradTol: GRAD_TOL });

interface Fixture {
  netConfig: Record<string, unknown>;
  images: ParamArray;
  params: ParamRecord;
  noise: RecordedDraw[];
  outputs: Record<string, ParamArray>;
  grads: ParamRecord;
}

async function loadFixture(file: string): Promise<Fixture> {
  return withH5File(path.join(SA_DIR, file), 'r', async (f) => {
    const model = String(f.attr('', 'model'));
    if (model !== 'SlotAttention') throw new Error(`${file}: attr model is '${model}', not 'SlotAttention'`);
    const noise: RecordedDraw[] = [];
    for (const k of f.keys('train/noise').sort()) noise.push(await readArray(f, `train/noise/${k}`));
    const outputs: Record<string, ParamArray> = {};
    for (const k of f.keys('train/outputs')) outputs[k] = await readArray(f, `train/outputs/${k}`);
    return {
      netConfig: JSON.parse(String(f.attr('', 'net_config'))) as Record<string, unknown>,
      images: await readArray(f, 'input/images'),
      params: await readParamGroup(f, 'params'),
      noise,
      outputs,
      grads: await readParamGroup(f, 'train/grads'),
    };
  });
}

beforeAll(async () => {
  await initBackend('cpu');
});

afterAll(() => {
  // eslint-disable-next-line no-console
  console.log(`golden-slot-attention: worst relative errors per category\n${summary()}`);
});

if (files.length === 0) {
  test.skip(`no Slot Attention golden fixtures in ${SA_DIR}`, () => undefined);
}

describe.each(files)('golden %s', (file) => {
  let fx: Fixture;
  let model: SlotAttention;
  let res: SlotAttentionGradResult;
  let replay: ReplayNoise;

  beforeAll(async () => {
    fx = await loadFixture(file);
    model = new SlotAttention(fx.netConfig);
    model.params.load(fx.params);
    replay = new ReplayNoise(fx.noise);
    const images = tf.tensor(fx.images.data, fx.images.shape);
    const t0 = Date.now();
    res = model.lossAndGrads(images, { noise: replay, outputs: true });
    // eslint-disable-next-line no-console
    console.log(`${file}: forward+backward ${((Date.now() - t0) / 1000).toFixed(1)} s`);
    images.dispose();
  }, 600_000);

  afterAll(() => {
    res?.dispose();
    model?.dispose();
  });

  test(`${file}: the parameters are exactly the model's state_dict`, () => {
    expect(Object.keys(fx.params).sort()).toEqual(model.params.names().sort());
  });

  test(`${file}: replays every recorded draw`, () => {
    expect(replay.remaining()).toBe(0);
  });

  test(`${file}: total_loss, x_means, masks, slots`, () => {
    const o = res.outputs!;
    compareClose([res.totalLoss], fx.outputs.total_loss.data, 'total_loss', 'total_loss');
    for (const [name, t] of [
      ['x_means', o.xMeans],
      ['masks', o.masks],
      ['slots', o.slots],
    ] as const) {
      expect(t.shape).toEqual(fx.outputs[name].shape);
      compareClose(t.dataSync(), fx.outputs[name].data, name, name);
    }
  });

  test(`${file}: every parameter gradient`, () => {
    const expectedKeys = Object.keys(fx.grads).sort();
    expect([...res.grads.keys()].sort()).toEqual(expectedKeys);
    let globalMax = 0;
    for (const k of expectedKeys) globalMax = Math.max(globalMax, maxAbs(fx.grads[k].data));
    for (const k of expectedKeys) {
      const ours = res.grads.get(k)!;
      expect(ours.shape).toEqual(fx.grads[k].shape);
      const a = ours.dataSync() as Float32Array;
      if (k === ZERO_GRAD_KEY) {
        expect(maxAbs(a)).toBeLessThan(1e-6 * globalMax);
        expect(maxAbs(fx.grads[k].data)).toBeLessThan(1e-6 * globalMax);
        continue;
      }
      compareScaled(a, fx.grads[k].data, `grad ${k}`, 'gradients');
    }
  });

  test(`${file}: the inference path gives the same values`, () => {
    const images = tf.tensor(fx.images.data, fx.images.shape);
    const inf = model.infer(images, { noise: new ReplayNoise(fx.noise) });
    images.dispose();
    try {
      compareClose([inf.totalLoss], fx.outputs.total_loss.data, 'infer total_loss', 'inference path');
      compareClose(inf.outputs.xMeans.dataSync(), fx.outputs.x_means.data, 'infer x_means', 'inference path');
      compareClose(inf.outputs.masks.dataSync(), fx.outputs.masks.data, 'infer masks', 'inference path');
      compareClose(inf.outputs.slots.dataSync(), fx.outputs.slots.data, 'infer slots', 'inference path');
      // the reconstruction is the mask-weighted sum of the components, and the loss is its error
      const [B, , C, H, W] = fx.outputs.x_means.shape;
      expect(inf.outputs.recons.shape).toEqual([B, C, H, W]);
      expect(inf.outputs.attn.map((a) => a.shape)).toEqual([0, 1, 2].map(() => [B, fx.outputs.masks.shape[1], 1, H, W]));
      const sse = tf.tidy(() => {
        const x01 = tf.div(tf.add(tf.tensor(fx.images.data, fx.images.shape), 1), 2);
        return (tf.div(tf.sum(tf.square(tf.sub(x01, inf.outputs.recons))), B).dataSync() as Float32Array)[0];
      });
      compareClose([sse], fx.outputs.total_loss.data, 'loss from recons', 'inference path');
    } finally {
      inf.dispose();
    }
  });
});
