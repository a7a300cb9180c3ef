/**
 * Golden training trajectories: the loop of the original train.py (schedule, curriculum,
 * clipping, Adam, GECO) replayed from recorded batches and noise, one case per file in
 * $EMORL_GOLDEN_TRAIN_DIR (default ../shared/fixtures/training). Per step: learning rate,
 * refinement steps, losses, gradient norm and GECO state; at the end every parameter.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { initBackend, tf } from '../lib/tf';
import { withH5File, type H5File } from '../lib/io/h5';
import { experimentConfig } from '../lib/config/experiment';
import { ReplayNoise, type RecordedDraw } from '../lib/model/noise';
import { Trainer } from '../lib/train/trainer';
import { FIXTURES_DIR } from './helpers';

const DIR = process.env.EMORL_GOLDEN_TRAIN_DIR ?? path.join(FIXTURES_DIR, 'training');
const files = fs.existsSync(DIR) ? fs.readdirSync(DIR).filter((f) => f.endsWith('.h5')).sort() : [];

const REL = 1e-4;

function expectRel(actual: number, expected: number, what: string, rel = REL, abs = 1e-5): void {
  const err = Math.abs(actual - expected);
  if (!(err <= abs + rel * Math.abs(expected))) {
    throw new Error(`${what}: ${actual}, expected ${expected} (relative error ${(err / Math.abs(expected)).toExponential(2)})`);
  }
}

function readDraws(f: H5File, group: string): RecordedDraw[] {
  return f
    .keys(group)
    .sort()
    .map((k) => ({ data: f.readFloat32(`${group}/${k}`), shape: f.info(`${group}/${k}`).shape }));
}

function readParams(f: H5File, group: string): Map<string, { data: Float32Array; shape: number[] }> {
  const out = new Map<string, { data: Float32Array; shape: number[] }>();
  for (const k of f.keys(group)) out.set(k, { data: f.readFloat32(`${group}/${k}`), shape: f.info(`${group}/${k}`).shape });
  return out;
}

beforeAll(async () => {
  await initBackend('cpu');
});

if (files.length === 0) {
  test.skip(`no golden training fixtures in ${DIR}`, () => undefined);
}

describe.each(files)('golden training %s', (file) => {
  test(`${file}: every step's lr, losses, grad norm and GECO state, then the final parameters`, async () => {
    await withH5File(path.join(DIR, file), 'r', async (f) => {
      const net = JSON.parse(f.attr('', 'net_config') as string);
      const tc = JSON.parse(f.attr('', 'training_config') as string);
      const config = experimentConfig({
        Net: net,
        training: {
          lr: tc.lr,
          warmup: tc.warmup,
          use_scheduler: tc.use_scheduler,
          clip_grad_norm: tc.clip_grad_norm,
          use_geco: tc.use_geco,
          geco_reconstruction_target: tc.geco_reconstruction_target,
          geco_ema_alpha: tc.geco_ema_alpha,
          geco_beta_stepsize: tc.geco_beta_stepsize,
          geco_step_size_acceleration: tc.geco_step_size_acceleration,
          kl_beta_init: tc.kl_beta_init,
          refinement_curriculum: tc.refinement_curriculum,
          iters: tc.steps - 1,
          batch_size: tc.batch_size,
        },
      });
      const trainer = new Trainer(config);
      try {
        const initial = readParams(f, 'initial_params');
        trainer.model.params.load(Object.fromEntries(initial));
        const steps = f.keys('steps').sort();
        expect(steps.length).toBe(tc.steps);
        for (const s of steps) {
          const g = `steps/${s}`;
          const images = tf.tensor(f.readFloat32(`${g}/images`), f.info(`${g}/images`).shape);
          const noise = new ReplayNoise(readDraws(f, `${g}/noise`));
          const r = trainer.step(images, { noise });
          r.release();
          images.dispose();
          const at = (name: string) => f.attr(g, name) as number;
          const where = `${file} step ${s}`;
          expect(r.step).toBe(Number(s));
          expect(r.applied).toBe(true);
          expect(noise.remaining()).toBe(0);
          expect(r.refinementIters).toBe(at('refinement_iters'));
          expectRel(r.lr, at('lr'), `${where} lr`, 1e-12, 1e-15);
          expectRel(r.totalLoss, at('total_loss'), `${where} total_loss`);
          expectRel(r.nll, at('nll'), `${where} nll`);
          expectRel(r.kl, at('kl'), `${where} kl`);
          expectRel(r.gradNorm, at('grad_norm_before_clip'), `${where} grad_norm_before_clip`);
          expectRel(r.gecoCEma, at('geco_C_ema_after'), `${where} geco_C_ema_after`);
          expectRel(r.gecoBeta, at('geco_beta_after'), `${where} geco_beta_after`);
        }
        // Final parameters: within 1e-3 of each tensor's largest magnitude. Adam divides each
        // gradient by its own running RMS, so an element whose gradient is rounding noise (the
        // mask-logit bias is shift-invariant under the softmax over slots: exactly zero in exact
        // arithmetic), or nearly cancels over the batch, moves by up to the learning rate in a
        // direction that depends on the summation order. Such elements may differ by at most the
        // sum of the learning rates, and only a handful of them per tensor.
        const lrSum = steps.reduce((a, s) => a + (f.attr(`steps/${s}`, 'lr') as number), 0);
        const final = readParams(f, 'final_params');
        const ours = trainer.parameters();
        expect(Object.keys(ours).sort()).toEqual([...final.keys()].sort());
        for (const [name, expected] of final) {
          const actual = ours[name].data;
          let maxE = 0;
          for (const v of expected.data) maxE = Math.max(maxE, Math.abs(v));
          const tol = Math.max(1e-3 * maxE, 1e-7);
          let outside = 0;
          for (let i = 0; i < expected.data.length; i++) {
            const err = Math.abs(actual[i] - expected.data[i]);
            if (err > tol) {
              outside++;
              if (err > lrSum + tol) throw new Error(`${file} final ${name}[${i}]: ${actual[i]}, expected ${expected.data[i]} (error ${err} exceeds even the summed learning rates ${lrSum})`);
            }
          }
          const allowed = Math.max(1, Math.floor(1e-4 * expected.data.length));
          if (outside > allowed) {
            throw new Error(`${file} final ${name}: ${outside} of ${expected.data.length} elements differ by more than 1e-3 of the tensor's max |${maxE}| (at most ${allowed} allowed)`);
          }
        }
      } finally {
        trainer.dispose();
      }
    });
  });
});
