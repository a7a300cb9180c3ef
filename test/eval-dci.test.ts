/**
 * The dci evaluation: the DCI scores on hand-made importance matrices, numpy's permutation for
 * the train/test split, the gradient-boosted trees and their importances, and `--type dci` end to
 * end on generated Tetrominoes (with factors) and a tiny model trained 1 step, plus the errors
 * before any work when the data has no factors or masks.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { initBackend } from '../lib/tf';
import { experimentConfig } from '../lib/config/experiment';
import { withH5File } from '../lib/io/h5';
import { train } from '../lib/train/loop';
import { generateDataset } from '../lib/data/generators';
import { runEval, EvalError } from '../lib/eval/run';
import { SUPPORTED_EVAL_TYPES } from '../lib/eval/config';
import { completeness, computeDci, disentanglement, numpyPermutation, trainTestSplit } from '../lib/eval/dci';
import { GradientBoostingRegressor, fitRegressionTree, samples } from '../lib/eval/trees';
import { Rng } from '../lib/util/rng';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'emorl-dci-'));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));
const quiet = () => undefined;

describe('DCI scores', () => {
  test('a perfectly disentangled importance matrix gives D = C = 1', () => {
    const m = { data: [0.7, 0, 0, 0, 0.2, 0, 0, 0, 0.5], codes: 3, factors: 3 };
    expect(disentanglement(m)).toBeCloseTo(1, 8);
    expect(completeness(m)).toBeCloseTo(1, 8);
  });

  test('a uniform importance matrix gives D = C = 0', () => {
    const m = { data: new Array(12).fill(0.25), codes: 4, factors: 3 };
    expect(disentanglement(m)).toBeCloseTo(0, 8);
    expect(completeness(m)).toBeCloseTo(0, 8);
  });

  test('one code for every factor: complete but not disentangled; unused codes weigh nothing', () => {
    // code 0 explains both factors, code 1 nothing
    const m = { data: [1, 1, 0, 0], codes: 2, factors: 2 };
    expect(disentanglement(m)).toBeCloseTo(0, 6);
    expect(completeness(m)).toBeCloseTo(1, 6);
  });

  test('agrees with the original lib/dci.py (scipy entropies) on a mixed matrix', () => {
    const m = { data: [0.3, 0.1, 0, 0.05, 0.5, 0.2, 0, 0.02, 0.4, 0.1, 0.1, 0.1], codes: 4, factors: 3 };
    expect(disentanglement(m)).toBeCloseTo(0.39767937495716116, 12);
    expect(completeness(m)).toBeCloseTo(0.34434271821900564, 12);
  });

  test('the train/test split is numpy RandomState(5).permutation, test = first ceil(n/2)', () => {
    // np.random.RandomState(5).permutation(10)
    expect(Array.from(numpyPermutation(10, 5))).toEqual([9, 5, 2, 4, 7, 1, 0, 8, 6, 3]);
    const s = trainTestSplit(7);
    expect(s.test.length).toBe(4);
    expect(s.train.length).toBe(3);
    expect([...s.test, ...s.train].sort()).toEqual([0, 1, 2, 3, 4, 5, 6]);
  });
});

describe('gradient-boosted trees', () => {
  test('a depth-1 tree splits at the midpoint of the best feature', () => {
    const X = samples([[0, 5], [1, 3], [2, 4], [3, 1]]);
    const t = fitRegressionTree(X, [0, 0, 10, 10], 1);
    expect(t.feature[0]).toBe(0);
    expect(t.threshold[0]).toBe(1.5);
    expect(Array.from(t.value.slice(1))).toEqual([0, 10]);
    // impurity decrease 25 per sample
    expect(Array.from(t.importances)).toEqual([25, 0]);
  });

  test('the feature that determines the target dominates the importances and predictions fit', () => {
    const rng = new Rng(3);
    const n = 200;
    const rows: number[][] = [];
    const y: number[] = [];
    for (let i = 0; i < n; i++) {
      const r = [rng.uniform(), rng.uniform(), rng.uniform(), rng.uniform()];
      rows.push(r);
      y.push(Math.sin(6 * r[2]) + 0.01 * rng.normal());
    }
    const X = samples(rows);
    const gbt = new GradientBoostingRegressor().fit(X, y);
    const imp = gbt.featureImportances();
    expect(imp.reduce((a, b) => a + b, 0)).toBeCloseTo(1, 10);
    expect(imp[2]).toBeGreaterThan(0.9);
    const pred = gbt.predict(X);
    let mse = 0;
    pred.forEach((p, i) => (mse += (p - y[i]) ** 2 / n));
    expect(mse).toBeLessThan(0.01);
    // deterministic
    expect(Array.from(new GradientBoostingRegressor().fit(X, y).featureImportances())).toEqual(Array.from(imp));
  });

  test('matches scikit-learn GradientBoostingRegressor() (reference values from sklearn 1.9.1)', () => {
    // X[i][j] = float32(2·sin(1.3 i + 2.7 j)), y = 2·X0 + X1², 40 samples
    const rows = Array.from({ length: 40 }, (_, i) => [0, 1, 2].map((j) => Math.fround(Math.sin(i * 1.3 + j * 2.7) * 2)));
    const y = rows.map((r) => r[0] * 2 + r[1] ** 2);
    const X = samples(rows);
    const first2 = samples(rows.slice(0, 2));
    const g5 = new GradientBoostingRegressor({ nEstimators: 5 }).fit(X, y);
    const p5 = g5.predict(first2);
    expect(p5[0]).toBeCloseTo(1.609026119128142, 10);
    expect(p5[1]).toBeCloseTo(3.7071599869287186, 10);
    const g = new GradientBoostingRegressor().fit(X, y);
    const p = g.predict(first2);
    expect(p[0]).toBeCloseTo(0.7337469354853536, 10);
    expect(p[1]).toBeCloseTo(6.145196829641755, 10);
    // sklearn breaks ties between equally good features at random (random_state 0, 1, 2 give
    // [0.3102, 0.6161, 0.0737], [0.3071, 0.6186, 0.0743], [0.3074, 0.6209, 0.0717])
    const imp = g.featureImportances();
    [0.3101878927711395, 0.6160859494994857, 0.0737261577293748].forEach((v, f) => expect(Math.abs(imp[f] - v)).toBeLessThan(0.015));
  });

  test('computeDci on codes that copy the factors is disentangled and complete', () => {
    const rng = new Rng(5);
    const n = 120;
    const D = 3;
    const F = 2;
    const codes = new Float32Array(n * D);
    const factors = new Float32Array(n * F);
    for (let i = 0; i < n; i++) {
      factors[i * F] = rng.uniform();
      factors[i * F + 1] = rng.int(3);
      codes[i * D] = factors[i * F + 1] * 2 + 0.01 * rng.normal(); // factor 1
      codes[i * D + 1] = rng.normal(); // noise
      codes[i * D + 2] = -3 * factors[i * F]; // factor 0
    }
    const r = computeDci(codes, factors, n, D, F, { nEstimators: 30 });
    expect(r.train_samples).toBe(60);
    expect(r.test_samples).toBe(60);
    expect(r.disentanglement).toBeGreaterThan(0.8);
    expect(r.completeness).toBeGreaterThan(0.8);
    expect(r.importance[2][0]).toBeGreaterThan(0.9);
    expect(r.importance[0][1]).toBeGreaterThan(0.9);
    expect(r.per_factor[0].test_r2).toBeGreaterThan(0.9);
    expect(r.per_factor[1].test_r2).toBeGreaterThan(0.9);
  });
});

describe('emorl-eval --type dci', () => {
  const data = path.join(tmp, 'tetrominoes.h5');
  const noFactors = path.join(tmp, 'no-factors.h5');
  const configFile = path.join(tmp, 'dci.json');
  let checkpoint = '';
  const NET = { K: 4, input_size: [3, 35, 35], z_size: 4, image_decoder: 'small', image_likelihood: 'Gaussian', stochastic_layers: 1, refinement_iters: 1, log_scale: Math.log(0.1), geco_warm_start: 1 };

  /**
   * 35×35 images of two big objects (left and right of a random column, entity 0 empty, entity 3
   * absent) so that even an untrained model's slots overlap them by IoU >= 0.1; factors: the
   * column, the two colours' red channels, visibility.
   */
  const halves = path.join(tmp, 'halves.h5');
  async function writeHalves(n: number): Promise<void> {
    const rng = new Rng(11);
    const P = 35 * 35;
    const imgs = new Uint8Array(n * P * 3);
    const masks = new Uint8Array(n * 4 * P);
    const factors = new Float32Array(n * 4 * 4);
    for (let b = 0; b < n; b++) {
      const c = 8 + rng.int(20);
      const red = [rng.int(2), rng.int(2)];
      for (let y = 0; y < 35; y++)
        for (let x = 0; x < 35; x++) {
          const o = x < c ? 1 : 2;
          masks[(b * 4 + o) * P + y * 35 + x] = 255;
          imgs[(b * P + y * 35 + x) * 3] = red[o - 1] ? 220 : 30;
          imgs[(b * P + y * 35 + x) * 3 + 1] = o === 1 ? 200 : 60;
        }
      factors.set([0, 0, 0, 1], b * 16);
      factors.set([c, red[0], 0, 1], b * 16 + 4);
      factors.set([c, red[1], 1, 1], b * 16 + 8);
    }
    await withH5File(halves, 'w', (f) => {
      f.write('test/imgs', imgs, [n, 35, 35, 3], 'uint8');
      f.write('test/masks', masks, [n, 4, 35, 35, 1], 'uint8');
      f.write('test/factors', factors, [n, 4, 4], 'float32');
    });
  }

  beforeAll(async () => {
    await initBackend('cpu');
    await generateDataset('tetrominoes', { out: data, train: 2, test: 4, seed: 1 });
    await writeHalves(8);
    await withH5File(noFactors, 'w', (f) => {
      f.write('test/imgs', new Uint8Array(2 * 35 * 35 * 3), [2, 35, 35, 3], 'uint8');
      f.write('test/masks', new Uint8Array(2 * 4 * 35 * 35), [2, 4, 35, 35, 1], 'uint8');
    });
    fs.writeFileSync(
      configFile,
      JSON.stringify({ Net: NET, dataset: { masks: true, factors: true }, seed: 1, test: { batch_size: 4, output_size: [3, 35, 35], num_images_to_process: 8, eval_type: 'dci_clevr', mode: 'test', model: 'EfficientMORL' } }),
    );
    const config = experimentConfig({
      Net: NET,
      training: { batch_size: 2, lr: 1e-3, use_scheduler: false, use_geco: false, refinement_curriculum: [[-1, 1]], checkpoint_freq: 1, tensorboard_freq: 100, log_freq: 1, ari_freq: 0 },
      seed: 3,
    });
    const summary = await train({ config, dataFile: data, outDir: path.join(tmp, 'run'), steps: 1, log: quiet, progress: false, handleSignals: false });
    checkpoint = summary.lastCheckpoint as string;
  }, 300000);

  test('dci and the original name dci_clevr are supported', () => {
    expect(SUPPORTED_EVAL_TYPES).toContain('dci');
    expect(SUPPORTED_EVAL_TYPES).toContain('dci_clevr');
  });

  test('writes dci.txt (the original dict) and dci.json with the scores', async () => {
    const out = path.join(tmp, 'out');
    const summary = await runEval({ checkpoint, config: configFile, data: halves, out, log: quiet });
    expect(summary.type).toBe('dci_clevr');
    const txt = fs.readFileSync(path.join(out, 'dci.txt'), 'utf8');
    expect(txt).toMatch(/^\{'informativeness_train': [-\d.e]+, 'informativeness_test': [-\d.e]+, 'disentanglement': [-\d.e]+, 'completeness': [-\d.e]+\}$/);
    const r = JSON.parse(fs.readFileSync(path.join(out, 'dci.json'), 'utf8'));
    expect(r.codes).toBe(4);
    expect(r.factors).toBe(3); // 4 columns, visibility dropped
    expect(r.matched_per_image).toHaveLength(8);
    expect(r.matched).toBeGreaterThanOrEqual(2);
    expect(r.matched).toBe(r.train_samples + r.test_samples);
    expect(r.importance).toHaveLength(4);
    expect(r.importance[0]).toHaveLength(3);
    for (const k of ['disentanglement', 'completeness']) {
      expect(r[k]).toBeGreaterThanOrEqual(-1e-9);
      expect(r[k]).toBeLessThanOrEqual(1 + 1e-9);
    }
    expect(r.per_factor).toHaveLength(3);
  }, 120000);

  test('runs on generated Tetrominoes (6 factors): scores, or a clear error when no slot overlaps an object enough', async () => {
    const out = path.join(tmp, 'out-tetrominoes');
    let error: Error | undefined;
    try {
      await runEval({ checkpoint, config: configFile, data, out, type: 'dci', images: 4, log: quiet });
    } catch (err) {
      error = err as Error;
    }
    if (error) {
      expect(error.message).toMatch(/slot\/object pairs matched \(IoU >= 0\.1, objects of >= 50 pixels\) over 4 images; at least 2 are needed/);
    } else {
      const r = JSON.parse(fs.readFileSync(path.join(out, 'dci.json'), 'utf8'));
      expect(r.factors).toBe(6); // 7 columns, visibility dropped
      expect(r.importance).toHaveLength(4);
    }
  }, 120000);

  test('clear errors before any work without factors or masks', async () => {
    const out = path.join(tmp, 'out-bad');
    await expect(runEval({ checkpoint, config: configFile, data: noFactors, out, type: 'dci', log: quiet })).rejects.toThrow(/no factors \('test\/factors'\); dci needs ground-truth factors/);
    expect(fs.existsSync(out)).toBe(false);
    const noMasks = path.join(tmp, 'no-masks.h5');
    await withH5File(noMasks, 'w', (f) => {
      f.write('test/imgs', new Uint8Array(2 * 35 * 35 * 3), [2, 35, 35, 3], 'uint8');
      f.write('test/factors', new Float32Array(2 * 4 * 7), [2, 4, 7], 'float32');
    });
    await expect(runEval({ checkpoint, config: configFile, data: noMasks, out, type: 'dci', log: quiet })).rejects.toThrow(EvalError);
    await expect(runEval({ checkpoint, config: configFile, data: noMasks, out, type: 'dci', log: quiet })).rejects.toThrow(/no masks/);
  });
});
