/**
 * Golden test: the whole model against the original PyTorch code, one fixture per model
 * configuration (every *.h5 directly in the fixtures folder but the real-image one; see
 * shared/fixtures/README.md). For both loss modes it replays the recorded noise and checks every
 * stage's components and masks, the attention maps, the losses, the refinement deltas, every
 * parameter gradient and (no_geco) the clipped Adam step.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { tf, initBackend } from '../lib/tf';
import { withH5File, type H5File } from '../lib/io/h5';
import { EfficientMORL, type GradResult } from '../lib/model/efficient-morl';
import { Geco } from '../lib/model/geco';
import { ReplayNoise, type RecordedDraw } from '../lib/model/noise';
import { readArray, readParamGroup } from '../lib/params/h5';
import type { ParamRecord } from '../lib/params/store';
import { Adam, clipGradNorm } from '../lib/optim/adam';
import { readPth } from '../lib/params/pth';
import { FIXTURES_DIR } from './helpers';
import { goldenComparer, maxAbs } from './golden-compare';

const SKIP = new Set(['tetrominoes-real-10.h5']);
const files = fs.existsSync(FIXTURES_DIR)
  ? fs
      .readdirSync(FIXTURES_DIR)
      .filter((f) => f.endsWith('.h5') && !SKIP.has(f) && fs.statSync(path.join(FIXTURES_DIR, f)).isFile())
      .sort()
  : [];

const REL = 1e-4;
const ABS = 1e-5;
const GRAD_TOL = 1e-3;
const ZERO_GRAD_KEY = 'hvae_networks.norm_slots.bias';

/** Worst errors seen per category, reported at the end. */
const { compareClose, compareScaled, summary } = goldenComparer({ rel: REL, abs: ABS, gradTol: GRAD_TOL });

interface GroupData {
  name: string;
  attrs: Record<string, unknown>;
  noise: RecordedDraw[];
  outputs: Record<string, { data: Float32Array; shape: number[] }>;
  grads: ParamRecord;
  afterAdam: ParamRecord | null;
}

interface Fixture {
  netConfig: Record<string, unknown>;
  images: { data: Float32Array; shape: number[] };
  params: ParamRecord;
  groups: GroupData[];
}

async function readGroup(f: H5File, name: string): Promise<GroupData> {
  const attrs: Record<string, unknown> = {};
  for (const a of f.attrNames(name)) attrs[a] = f.attr(name, a);
  const noiseKeys = f.keys(`${name}/noise`).sort();
  const noise: RecordedDraw[] = [];
  for (const k of noiseKeys) noise.push(await readArray(f, `${name}/noise/${k}`));
  const outputs: GroupData['outputs'] = {};
  for (const k of f.keys(`${name}/outputs`)) outputs[k] = await readArray(f, `${name}/outputs/${k}`);
  return {
    name,
    attrs,
    noise,
    outputs,
    grads: await readParamGroup(f, `${name}/grads`),
    afterAdam: f.has(`${name}/after_adam_step`) ? await readParamGroup(f, `${name}/after_adam_step`) : null,
  };
}

async function loadFixture(file: string): Promise<Fixture> {
  return withH5File(path.join(FIXTURES_DIR, file), 'r', async (f) => {
    const netConfig = JSON.parse(String(f.attr('', 'net_config'))) as Record<string, unknown>;
    const groups: GroupData[] = [];
    for (const g of ['no_geco', 'geco']) if (f.has(g)) groups.push(await readGroup(f, g));
    return {
      netConfig,
      images: await readArray(f, 'input/images'),
      params: await readParamGroup(f, 'params'),
      groups,
    };
  });
}

beforeAll(async () => {
  await initBackend('cpu');
});

afterAll(() => {
  // eslint-disable-next-line no-console
  console.log(`golden-model: worst relative errors per category\n${summary()}`);
});

if (files.length === 0) {
  test.skip(`no golden fixtures in ${FIXTURES_DIR}`, () => undefined);
}

describe.each(files)('golden %s', (file) => {
  let fx: Fixture;
  let model: EfficientMORL;

  beforeAll(async () => {
    fx = await loadFixture(file);
    model = new EfficientMORL(fx.netConfig);
    model.params.load(fx.params);
  }, 120_000);

  afterAll(() => model?.dispose());

  describe.each(['no_geco', 'geco'])('%s', (groupName) => {
    let g: GroupData;
    let res: GradResult;
    let replay: ReplayNoise;
    let L: number;

    beforeAll(() => {
      g = fx.groups.find((x) => x.name === groupName)!;
      expect(g).toBeDefined();
      model.params.load(fx.params);
      const globalStep = Number(g.attrs.global_step ?? 0);
      const klBeta = Number(g.attrs.kl_beta ?? 1);
      let geco: Geco | null = null;
      if (groupName === 'geco') {
        geco = new Geco({ target: Number(g.attrs.geco_target) });
        model.params.set('geco_C_ema', { data: new Float32Array([Number(g.attrs.geco_C_ema)]), shape: [] });
        model.params.set('geco_beta', { data: new Float32Array([Number(g.attrs.geco_beta)]), shape: [] });
      }
      replay = new ReplayNoise(g.noise);
      L = Number(fx.netConfig.stochastic_layers);
      const images = tf.tensor(fx.images.data, fx.images.shape);
      const t0 = Date.now();
      res = model.lossAndGrads(images, { noise: replay, klBeta, globalStep, geco, outputs: true, decodeHvaeLayers: true });
      // eslint-disable-next-line no-console
      console.log(`${file} ${groupName}: forward+backward ${((Date.now() - t0) / 1000).toFixed(1)} s`);
      images.dispose();
    }, 600_000);

    afterAll(() => res?.dispose());

    test(`${file} ${groupName}: replays every recorded draw`, () => {
      expect(replay.remaining()).toBe(0);
      expect(res.usedGeco).toBe(groupName === 'geco');
    });

    test(`${file} ${groupName}: every stage's means and masks`, () => {
      const stages = res.outputs!.stages;
      const nStages = Object.keys(g.outputs).filter((k) => k.startsWith('means_')).length;
      expect(stages.length).toBe(nStages);
      for (const s of stages) {
        const em = g.outputs[`means_${s.t}`];
        const ek = g.outputs[`masks_${s.t}`];
        expect(s.means.shape).toEqual(em.shape);
        expect(s.masks.shape).toEqual(ek.shape);
        const cat = s.t < L - 1 ? 'hvae intermediate' : 'stage';
        compareClose(s.means.dataSync(), em.data, `means_${s.t}`, `${cat} means`);
        compareClose(s.masks.dataSync(), ek.data, `masks_${s.t}`, `${cat} masks`);
      }
    });

    test(`${file} ${groupName}: attention maps`, () => {
      const attn = res.outputs!.attn;
      expect(attn.length).toBe(L);
      attn.forEach((a, l) => {
        expect(a.shape).toEqual(g.outputs[`attn_${l}`].shape);
        compareClose(a.dataSync(), g.outputs[`attn_${l}`].data, `attn_${l}`, 'attention');
      });
    });

    test(`${file} ${groupName}: nll, kl, total loss, deltas`, () => {
      compareClose([res.nll], g.outputs.nll.data, 'nll', 'losses');
      compareClose([res.kl], g.outputs.kl.data, 'kl', 'losses');
      compareClose([res.totalLoss], g.outputs.total_loss.data, 'total_loss', 'losses');
      compareClose(res.deltas, g.outputs.deltas.data, 'deltas', 'deltas');
    });

    test(`${file} ${groupName}: every parameter gradient`, () => {
      const expectedKeys = Object.keys(g.grads).sort();
      expect([...res.grads.keys()].sort()).toEqual(expectedKeys);
      let globalMax = 0;
      for (const k of expectedKeys) globalMax = Math.max(globalMax, maxAbs(g.grads[k].data));
      for (const k of expectedKeys) {
        const ours = res.grads.get(k)!;
        expect(ours.shape).toEqual(g.grads[k].shape);
        const a = ours.dataSync() as Float32Array;
        if (k === ZERO_GRAD_KEY) {
          // zero in exact arithmetic (a shift shared by all slots leaves the softmax unchanged)
          expect(maxAbs(a)).toBeLessThan(1e-6 * globalMax);
          expect(maxAbs(g.grads[k].data)).toBeLessThan(1e-6 * globalMax);
          continue;
        }
        compareScaled(a, g.grads[k].data, `grad ${k}`, 'gradients');
      }
    });

    // The inference path (no outer tape; the refinement's inner gradients still taken) on the
    // same draws; once per file, the loss mode changes nothing there that training does not check.
    const checkInference = (source: string): void => {
      const globalStep = Number(g.attrs.global_step ?? 0);
      const klBeta = Number(g.attrs.kl_beta ?? 1);
      const images = tf.tensor(fx.images.data, fx.images.shape);
      const inf = model.infer(images, { noise: new ReplayNoise(g.noise), klBeta, globalStep, geco: null });
      images.dispose();
      try {
        compareClose([inf.totalLoss], g.outputs.total_loss.data, `${source} infer total_loss`, 'inference path');
        compareClose([inf.nll], g.outputs.nll.data, `${source} infer nll`, 'inference path');
        compareClose([inf.kl], g.outputs.kl.data, `${source} infer kl`, 'inference path');
        compareClose(inf.deltas, g.outputs.deltas.data, `${source} infer deltas`, 'inference path');
        const last = inf.outputs.stages[inf.outputs.stages.length - 1];
        compareClose(last.means.dataSync(), g.outputs[`means_${last.t}`].data, `${source} infer means_${last.t}`, 'inference path');
        compareClose(last.masks.dataSync(), g.outputs[`masks_${last.t}`].data, `${source} infer masks_${last.t}`, 'inference path');
      } finally {
        inf.dispose();
        model.params.load(fx.params);
      }
    };

    // The inference path (no outer tape; the refinement's inner gradients still taken) on the
    // same draws; once per file, the loss mode changes nothing there that training does not check.
    if (groupName === 'no_geco') test(`${file} ${groupName}: the inference path gives the same values`, () => checkInference(file));

    // The same weights saved by the original's training script (<name>.pth, <name>-legacy.pth),
    // loaded with no Python, give the same forward pass.
    const base = file.replace(/\.h5$/, '');
    for (const pth of [`${base}.pth`, `${base}-legacy.pth`]) {
      if (groupName !== 'no_geco' || !fs.existsSync(path.join(FIXTURES_DIR, pth))) continue;
      test(`${file} ${groupName}: the forward pass from the weights in ${pth}`, () => {
        const loaded = readPth(path.join(FIXTURES_DIR, pth));
        model.params.load(Object.fromEntries(loaded.params));
        checkInference(pth);
      });
    }

    if (groupName === 'no_geco') {
      test(`${file} ${groupName}: gradient clipping and one Adam step`, () => {
        expect(g.afterAdam).not.toBeNull();
        const lr = Number(g.attrs.adam_lr ?? 4e-4);
        const { grads: clipped, norm } = clipGradNorm(res.grads, 5.0);
        compareClose([norm], [Number(g.attrs.grad_norm_before_clip)], 'grad_norm_before_clip', 'losses');
        const before = model.params.snapshot();
        const adam = new Adam(model.params, { lr });
        adam.applyGradients(clipped);
        for (const t of clipped.values()) t.dispose();
        adam.dispose();
        const after = model.params.snapshot();
        for (const k of Object.keys(g.afterAdam!)) {
          // Elements whose gradient is zero in exact arithmetic (all of norm_slots.bias; the
          // mask-logit element of the decoder's last bias, a shift shared by all slots) hold
          // rounding noise on both sides, so Adam's first step (lr·g/(|g|+eps)) has an arbitrary
          // sign and size there: check only that they moved by at most lr. Everything else to
          // 1e-3 of the tensor's own scale.
          const exp = g.afterAdam![k].data;
          const gr = g.grads[k]?.data;
          const gMax = gr ? maxAbs(gr) : 0;
          const act = after[k].data;
          const b0 = before[k].data;
          const keepA: number[] = [];
          const keepE: number[] = [];
          for (let i = 0; i < exp.length; i++) {
            if (gr && (k === ZERO_GRAD_KEY || Math.abs(gr[i]) < 1e-5 * gMax)) {
              const moved = Math.max(Math.abs(act[i] - b0[i]), Math.abs(exp[i] - b0[i]));
              if (!(moved <= lr * 1.001)) throw new Error(`after_adam_step ${k}[${i}] moved by ${moved} > lr ${lr}`);
            } else {
              keepA.push(act[i]);
              keepE.push(exp[i]);
            }
          }
          if (keepE.length > 0) compareScaled(keepA, keepE, `after_adam_step ${k}`, 'adam step');
        }
        model.params.load(fx.params);
      });
    }
  });
});
