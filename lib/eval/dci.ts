/**
 * The original eval.py's `dci_clevr` evaluation: disentanglement, completeness and informativeness
 * (Eastwood & Williams 2018; the original's lib/dci.py, from disentanglement_lib).
 *
 * Per image: the final posterior's means (λ's loc) are decoded to slot masks (for Slot Attention:
 * the slots, with the model's own masks; see eval-model.ts), which (upsampled to the true masks'
 * size when smaller, as for the ARI) are matched to the ground-truth objects by IoU with the
 * original's `matching_iou`: background left out, objects whose visibility (the factors'
 * last column) is 0 skipped, objects with fewer than 50 pixels skipped, the total IoU maximised by
 * linear assignment, pairs with IoU < 0.1 dropped. Each matched pair gives a sample: the slot's
 * posterior mean (the code) and the object's factors (the first min(8, F−1) columns: the
 * original's `factors[:, :8]`, x y z rotation size material shape colour on CLEVR; everything but
 * the visibility on datasets with fewer columns).
 *
 * The samples are split in halves as sklearn's `train_test_split(test_size=0.5, random_state=5,
 * shuffle=True)` (numpy's RandomState(5) permutation, reproduced exactly). Per factor a
 * `GradientBoostingRegressor()` (defaults, see trees.ts) is fitted on the train half and its
 * feature importances fill a column of the importance matrix [codes, factors]. The original meant
 * to use classifiers for its discrete factors, but its loop rebinds `model` to the first fitted
 * estimator, so every factor is fitted with the regressor chosen for the first (continuous) one;
 * this follows what it runs. Its informativeness is the fraction of exact matches
 * `predict(X) == y`, averaged over factors, which a regressor almost never achieves; that value is
 * reported as the original computes it (informativeness_train / _test), with the mean squared
 * error and R² per factor beside it.
 *
 * disentanglement = Σ_codes ρ_i (1 − H_K(P_i.)), completeness = Σ_factors ρ_j (1 − H_D(P_.j)),
 * with entropies in base (number of factors) / (number of codes) of the importance rows / columns
 * (+1e-11, normalised) and ρ the rows' / columns' share of the total importance.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { matchByIou } from '../metrics/iou';
import { tf } from '../tf';
import type { DisentangleContext } from './disentangle';
import { resizeBicubicF32 } from './metrics';
import { GradientBoostingRegressor, GBT_DEFAULTS, samples } from './trees';

/** The original's matching thresholds (lib/metrics.py matching_iou). */
export const DCI_MIN_TRUE_PIXELS = 50;
export const DCI_MIN_IOU = 0.1;
/** The original keeps factors[:, :8]. */
export const DCI_MAX_FACTORS = 8;
export const DCI_SPLIT_SEED = 5;

/** An importance matrix [codes, factors], row-major. */
export interface ImportanceMatrix {
  data: ArrayLike<number>;
  codes: number;
  factors: number;
}

/** scipy.stats.entropy(p + 1e-11, base) of one vector (normalised first). */
function entropy(values: number[], base: number): number {
  const p = values.map((v) => v + 1e-11);
  const s = p.reduce((a, b) => a + b, 0);
  let h = 0;
  for (const v of p) {
    const q = v / s;
    if (q > 0) h -= q * Math.log(q);
  }
  return h / Math.log(base);
}

function rowsCols(m: ImportanceMatrix): { rows: number[][]; cols: number[][]; total: number } {
  const { codes: D, factors: K, data } = m;
  if (data.length !== D * K) throw new Error(`importance matrix: ${data.length} values for ${D}×${K}`);
  const rows = Array.from({ length: D }, (_, i) => Array.from({ length: K }, (_, j) => data[i * K + j]));
  const cols = Array.from({ length: K }, (_, j) => rows.map((r) => r[j]));
  let total = 0;
  for (let i = 0; i < data.length; i++) total += data[i];
  return { rows, cols, total };
}

/** lib/dci.py disentanglement(): per-code 1 − entropy over factors, weighted by the code's share. */
export function disentanglement(m: ImportanceMatrix): number {
  const { rows, total } = rowsCols(m);
  let s = 0;
  for (const r of rows) {
    const w = total === 0 ? 1 / rows.length : r.reduce((a, b) => a + b, 0) / total;
    s += (1 - entropy(r, m.factors)) * w;
  }
  return s;
}

/** lib/dci.py completeness(): per-factor 1 − entropy over codes, weighted by the factor's share. */
export function completeness(m: ImportanceMatrix): number {
  const { cols, total } = rowsCols(m);
  let s = 0;
  for (const c of cols) {
    const w = total === 0 ? 1 / cols.length : c.reduce((a, b) => a + b, 0) / total;
    s += (1 - entropy(c, m.codes)) * w;
  }
  return s;
}

/** numpy's MT19937 seeded as RandomState(seed). */
class Mt19937 {
  private mt = new Uint32Array(624);
  private i = 624;
  constructor(seed: number) {
    this.mt[0] = seed >>> 0;
    for (let k = 1; k < 624; k++) {
      const prev = this.mt[k - 1] ^ (this.mt[k - 1] >>> 30);
      this.mt[k] = (Math.imul(1812433253, prev) + k) >>> 0;
    }
  }
  next(): number {
    const mt = this.mt;
    if (this.i >= 624) {
      for (let k = 0; k < 624; k++) {
        const y = (mt[k] & 0x80000000) | (mt[(k + 1) % 624] & 0x7fffffff);
        mt[k] = mt[(k + 397) % 624] ^ (y >>> 1) ^ (y & 1 ? 0x9908b0df : 0);
      }
      this.i = 0;
    }
    let y = mt[this.i++];
    y ^= y >>> 11;
    y ^= (y << 7) & 0x9d2c5680;
    y ^= (y << 15) & 0xefc60000;
    y ^= y >>> 18;
    return y >>> 0;
  }
}

/** numpy.random.RandomState(seed).permutation(n). */
export function numpyPermutation(n: number, seed: number): Int32Array {
  const rng = new Mt19937(seed);
  const a = Int32Array.from({ length: n }, (_, i) => i);
  for (let i = n - 1; i >= 1; i--) {
    let mask = i;
    mask |= mask >>> 1;
    mask |= mask >>> 2;
    mask |= mask >>> 4;
    mask |= mask >>> 8;
    mask |= mask >>> 16;
    let j: number;
    do j = (rng.next() & mask) >>> 0;
    while (j > i);
    const t = a[i];
    a[i] = a[j];
    a[j] = t;
  }
  return a;
}

/** sklearn train_test_split(test_size=0.5, random_state=seed, shuffle=True): row indices. */
export function trainTestSplit(n: number, seed = DCI_SPLIT_SEED): { train: Int32Array; test: Int32Array } {
  const nTest = Math.ceil(0.5 * n);
  const perm = numpyPermutation(n, seed);
  return { test: perm.slice(0, nTest), train: perm.slice(nTest) };
}

export interface FactorScores {
  /** fraction of exact matches predict(X) == y (the original's "loss") */
  train_accuracy: number;
  test_accuracy: number;
  train_mse: number;
  test_mse: number;
  /** 1 − MSE / variance of the test targets (NaN when they are constant) */
  test_r2: number;
}

export interface DciScores {
  informativeness_train: number;
  informativeness_test: number;
  disentanglement: number;
  completeness: number;
}

export interface DciResult extends DciScores {
  /** [codes][factors] */
  importance: number[][];
  per_factor: FactorScores[];
  train_samples: number;
  test_samples: number;
}

/** lib/dci.py _compute_dci on samples: codes [n, D] and factors [n, F] (row-major). */
export function computeDci(codes: Float32Array, factors: Float32Array, n: number, D: number, F: number, options: { seed?: number; nEstimators?: number } = {}): DciResult {
  if (codes.length !== n * D || factors.length !== n * F) throw new Error(`computeDci: ${codes.length} codes / ${factors.length} factors for ${n} samples of ${D} / ${F}`);
  if (n < 2) throw new Error(`computeDci: ${n} matched objects; at least 2 are needed for a train/test split`);
  const { train, test } = trainTestSplit(n, options.seed ?? DCI_SPLIT_SEED);
  const pick = (rows: Int32Array) => samples({ data: Float32Array.from({ length: rows.length * D }, (_, q) => codes[rows[Math.floor(q / D)] * D + (q % D)]), n: rows.length, p: D });
  const Xtr = pick(train);
  const Xte = pick(test);
  const importance = Array.from({ length: D }, () => new Array<number>(F).fill(0));
  const perFactor: FactorScores[] = [];
  for (let j = 0; j < F; j++) {
    const ytr = Float64Array.from(train, (r) => factors[r * F + j]);
    const yte = Float64Array.from(test, (r) => factors[r * F + j]);
    const gbt = new GradientBoostingRegressor({ nEstimators: options.nEstimators ?? GBT_DEFAULTS.nEstimators }).fit(Xtr, ytr);
    const imp = gbt.featureImportances();
    for (let i = 0; i < D; i++) importance[i][j] = Math.abs(imp[i]);
    const ptr = gbt.predict(Xtr);
    const pte = gbt.predict(Xte);
    const acc = (p: Float64Array, y: Float64Array) => p.reduce((s, v, i) => s + (v === y[i] ? 1 : 0), 0) / y.length;
    const mse = (p: Float64Array, y: Float64Array) => p.reduce((s, v, i) => s + (v - y[i]) ** 2, 0) / y.length;
    const mean = yte.reduce((a, b) => a + b, 0) / yte.length;
    const variance = yte.reduce((s, v) => s + (v - mean) ** 2, 0) / yte.length;
    const testMse = mse(pte, yte);
    perFactor.push({ train_accuracy: acc(ptr, ytr), test_accuracy: acc(pte, yte), train_mse: mse(ptr, ytr), test_mse: testMse, test_r2: variance > 0 ? 1 - testMse / variance : NaN });
  }
  const m: ImportanceMatrix = { data: importance.flat(), codes: D, factors: F };
  const avg = (k: 'train_accuracy' | 'test_accuracy') => perFactor.reduce((s, f) => s + f[k], 0) / F;
  return {
    informativeness_train: avg('train_accuracy'),
    informativeness_test: avg('test_accuracy'),
    disentanglement: disentanglement(m),
    completeness: completeness(m),
    importance,
    per_factor: perFactor,
    train_samples: train.length,
    test_samples: test.length,
  };
}

/** Python's repr of a float (as str(dict) prints it). */
function pyFloat(v: number): string {
  if (Number.isNaN(v)) return 'nan';
  if (!Number.isFinite(v)) return v > 0 ? 'inf' : '-inf';
  if (Number.isInteger(v) && Math.abs(v) < 1e16) return v.toFixed(1);
  return String(v).replace(/e([+-])(\d)$/, 'e$10$2');
}

/** Codes and factors of the matched slot/object pairs of the first ctx.n images. */
export async function collectDciSamples(ctx: DisentangleContext): Promise<{ codes: Float32Array; factors: Float32Array; n: number; D: number; F: number; matchedPerImage: number[] }> {
  const { model, ds } = ctx;
  const [C, H, W] = model.cfg.input_size;
  const { K, z_size: Z } = model.cfg;
  const { numEntities: O, maskHeight: Hm, maskWidth: Wm, numFactors: Fall, factorEntities } = ds.info;
  if (!O || !Fall) throw new Error(`${ds.info.file}: DCI needs masks and factors`);
  if (factorEntities !== O) throw new Error(`${ds.info.file}: factors describe ${factorEntities} entities but the masks have ${O}`);
  const F = Math.min(DCI_MAX_FACTORS, Fall - 1);
  const codes: number[] = [];
  const factors: number[] = [];
  const matchedPerImage: number[] = [];
  for (let start = 0; start < ctx.n; start += ctx.batchSize) {
    const B = Math.min(ctx.batchSize, ctx.n - start);
    const batch = await ds.readBatch(Array.from({ length: B }, (_, i) => start + i));
    const x = tf.tensor4d(batch.images, [B, C, H, W]);
    let loc: Float32Array;
    let masks: Float32Array;
    try {
      ({ codes: loc, masks } = model.codes(x));
    } finally {
      x.dispose();
    }
    if (Hm !== H || Wm !== W) masks = resizeBicubicF32(masks, B * K, H, W, Hm, Wm);
    const fac = batch.factors!;
    const presence = Float64Array.from({ length: B * O }, (_, q) => fac[q * Fall + Fall - 1]);
    const { matches } = matchByIou(
      { data: batch.masks!, shape: [B, O, 1, Hm, Wm] },
      { data: masks, shape: [B, K, 1, Hm, Wm] },
      { presence, minTruePixels: DCI_MIN_TRUE_PIXELS, minIou: DCI_MIN_IOU },
    );
    matches.forEach((m, b) => {
      matchedPerImage.push(m.trueIndex.length);
      for (let q = 0; q < m.trueIndex.length; q++) {
        const k = m.predIndex[q];
        const o = m.trueIndex[q];
        for (let d = 0; d < Z; d++) codes.push(loc[(b * K + k) * Z + d]);
        for (let f = 0; f < F; f++) factors.push(fac[(b * O + o) * Fall + f]);
      }
    });
    ctx.onProgress?.(start + B);
  }
  return { codes: Float32Array.from(codes), factors: Float32Array.from(factors), n: matchedPerImage.reduce((a, b) => a + b, 0), D: Z, F, matchedPerImage };
}

/** The dci evaluation: appends the original's dict line to dci.txt and writes dci.json. */
export async function dci(ctx: DisentangleContext): Promise<string[]> {
  const s = await collectDciSamples(ctx);
  if (s.n < 2) throw new Error(`DCI: only ${s.n} slot/object pairs matched (IoU >= ${DCI_MIN_IOU}, objects of >= ${DCI_MIN_TRUE_PIXELS} pixels) over ${ctx.n} images; at least 2 are needed`);
  const r = computeDci(s.codes, s.factors, s.n, s.D, s.F);
  const txt = path.join(ctx.out, 'dci.txt');
  fs.appendFileSync(
    txt,
    `{'informativeness_train': ${pyFloat(r.informativeness_train)}, 'informativeness_test': ${pyFloat(r.informativeness_test)}, 'disentanglement': ${pyFloat(r.disentanglement)}, 'completeness': ${pyFloat(r.completeness)}}`,
  );
  const json = path.join(ctx.out, 'dci.json');
  fs.writeFileSync(
    json,
    JSON.stringify(
      {
        type: 'dci',
        images: ctx.n,
        matched: s.n,
        matched_per_image: s.matchedPerImage,
        codes: s.D,
        factors: s.F,
        estimator: { name: 'GradientBoostingRegressor', ...GBT_DEFAULTS, min_samples_split: 2, min_samples_leaf: 1 },
        split: { test_size: 0.5, random_state: DCI_SPLIT_SEED },
        ...r,
      },
      (_k, v) => (typeof v === 'number' && !Number.isFinite(v) ? String(v) : v),
      2,
    ),
  );
  ctx.log(`DCI over ${s.n} matched objects (${r.train_samples} train, ${r.test_samples} test): disentanglement ${r.disentanglement.toFixed(4)}, completeness ${r.completeness.toFixed(4)}, informativeness (exact-match accuracy) train ${r.informativeness_train.toFixed(4)} test ${r.informativeness_test.toFixed(4)}`);
  return [txt, json];
}
