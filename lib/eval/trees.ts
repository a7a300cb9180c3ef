/**
 * Gradient-boosted regression trees with impurity-based feature importances, as scikit-learn's
 * `GradientBoostingRegressor()` with its defaults (the estimator the original's DCI uses):
 * squared-error loss, learning_rate 0.1, n_estimators 100, subsample 1.0, max_depth 3,
 * min_samples_split 2, min_samples_leaf 1, criterion 'friedman_mse', max_features None, the mean
 * of y as the initial prediction.
 *
 * As in scikit-learn, inputs are float32 (values are rounded with Math.fround), a split lies
 * halfway between two consecutive distinct feature values (values closer than 1e-7 count as
 * equal), a node is a leaf at depth max_depth, with fewer than 2 samples or with an impurity of at
 * most the float64 epsilon, and the best split maximises Friedman's improvement
 * (n_r·S_l − n_l·S_r)² / (n_l·n_r) (the first best in scan order wins). scikit-learn visits
 * features in a random order, so its ties between features depend on random_state; here the
 * lowest feature index wins, which makes the fit deterministic.
 *
 * feature_importances_: per tree, the summed weighted impurity decrease n·imp − n_l·imp_l −
 * n_r·imp_r of each feature's splits divided by the number of samples; averaged over the trees
 * that split at all, then normalised to sum to 1 (all zeros when no tree splits).
 */

export interface RegressionTree {
  /** per node: the split feature, or -1 for a leaf */
  feature: Int32Array;
  threshold: Float64Array;
  left: Int32Array;
  right: Int32Array;
  /** per node: the mean target (the prediction at leaves) */
  value: Float64Array;
  /** unnormalised importances: weighted impurity decrease per feature / number of samples */
  importances: Float64Array;
}

export interface GbtOptions {
  nEstimators?: number;
  learningRate?: number;
  maxDepth?: number;
}

export const GBT_DEFAULTS: Readonly<Required<GbtOptions>> = Object.freeze({ nEstimators: 100, learningRate: 0.1, maxDepth: 3 });

const FEATURE_THRESHOLD = 1e-7;
const EPSILON = 2.220446049250313e-16;

/** Row-major samples [n, p] as float32 (scikit-learn's tree dtype). */
export interface Samples {
  data: Float32Array;
  n: number;
  p: number;
}

export function samples(rows: ArrayLike<number>[] | { data: ArrayLike<number>; n: number; p: number }): Samples {
  if (Array.isArray(rows)) {
    const n = rows.length;
    const p = n ? rows[0].length : 0;
    const data = new Float32Array(n * p);
    rows.forEach((r, i) => {
      if (r.length !== p) throw new Error(`samples: row ${i} has ${r.length} values, expected ${p}`);
      for (let j = 0; j < p; j++) data[i * p + j] = r[j];
    });
    return { data, n, p };
  }
  const { data, n, p } = rows as { data: ArrayLike<number>; n: number; p: number };
  if (data.length !== n * p) throw new Error(`samples: ${data.length} values for ${n}×${p}`);
  return { data: Float32Array.from(data), n, p };
}

/** Sample indices sorted by each feature's value: [p][n]. */
function presort(X: Samples): Int32Array[] {
  const out: Int32Array[] = [];
  for (let f = 0; f < X.p; f++) {
    const idx = Int32Array.from({ length: X.n }, (_, i) => i);
    idx.sort((a, b) => X.data[a * X.p + f] - X.data[b * X.p + f] || a - b);
    out.push(idx);
  }
  return out;
}

/** Fits one depth-limited regression tree (grown level by level, all nodes of a level in one scan per feature). */
export function fitRegressionTree(X: Samples, y: ArrayLike<number>, maxDepth: number, sorted: Int32Array[] = presort(X)): RegressionTree {
  const { n, p, data } = X;
  if (y.length !== n) throw new Error(`fitRegressionTree: ${y.length} targets for ${n} samples`);
  const feature: number[] = [];
  const threshold: number[] = [];
  const left: number[] = [];
  const right: number[] = [];
  const value: number[] = [];
  const weighted: number[] = []; // n_node · impurity
  const count: number[] = [];
  const importances = new Float64Array(p);
  const nodeOf = new Int32Array(n);
  const newNode = (sum: number, sq: number, cnt: number): number => {
    const mean = sum / cnt;
    feature.push(-1);
    threshold.push(0);
    left.push(-1);
    right.push(-1);
    value.push(mean);
    weighted.push(cnt * (sq / cnt - mean * mean));
    count.push(cnt);
    return feature.length - 1;
  };
  {
    let s = 0;
    let q = 0;
    for (let i = 0; i < n; i++) {
      s += y[i];
      q += y[i] * y[i];
    }
    if (n === 0) throw new Error('fitRegressionTree: no samples');
    newNode(s, q, n);
  }
  let level = [0];
  for (let depth = 0; depth < maxDepth && level.length; depth++) {
    // nodes of this level that may split
    const active = level.filter((a) => count[a] >= 2 && weighted[a] / count[a] > EPSILON);
    if (!active.length) break;
    const slot = new Map<number, number>();
    active.forEach((a, s) => slot.set(a, s));
    const m = active.length;
    const totSum = new Float64Array(m);
    const totCnt = new Float64Array(m);
    for (let i = 0; i < n; i++) {
      const s = slot.get(nodeOf[i]);
      if (s === undefined) continue;
      totSum[s] += y[i];
      totCnt[s]++;
    }
    const best = new Float64Array(m).fill(-Infinity);
    const bestF = new Int32Array(m).fill(-1);
    const bestT = new Float64Array(m);
    const lSum = new Float64Array(m);
    const lCnt = new Float64Array(m);
    const last = new Float64Array(m);
    const slotOf = new Int32Array(n).fill(-1);
    for (let i = 0; i < n; i++) slotOf[i] = slot.get(nodeOf[i]) ?? -1;
    for (let f = 0; f < p; f++) {
      lSum.fill(0);
      lCnt.fill(0);
      const order = sorted[f];
      for (let r = 0; r < n; r++) {
        const i = order[r];
        const s = slotOf[i];
        if (s < 0) continue;
        const x = data[i * p + f];
        if (lCnt[s] > 0 && x > last[s] + FEATURE_THRESHOLD) {
          const nl = lCnt[s];
          const nr = totCnt[s] - nl;
          const diff = nr * lSum[s] - nl * (totSum[s] - lSum[s]);
          const proxy = (diff * diff) / (nl * nr);
          if (proxy > best[s]) {
            best[s] = proxy;
            bestF[s] = f;
            let t = last[s] / 2 + x / 2;
            if (t === x || !Number.isFinite(t)) t = last[s];
            bestT[s] = t;
          }
        }
        lSum[s] += y[i];
        lCnt[s]++;
        last[s] = x;
      }
    }
    // split: children sums, then nodes
    const cs = new Float64Array(m * 4); // left sum, left sq, right sum, right sq
    const cc = new Float64Array(m * 2);
    for (let i = 0; i < n; i++) {
      const s = slotOf[i];
      if (s < 0 || bestF[s] < 0) continue;
      const goLeft = data[i * p + bestF[s]] <= bestT[s];
      cs[s * 4 + (goLeft ? 0 : 2)] += y[i];
      cs[s * 4 + (goLeft ? 1 : 3)] += y[i] * y[i];
      cc[s * 2 + (goLeft ? 0 : 1)]++;
    }
    const next: number[] = [];
    active.forEach((a, s) => {
      if (bestF[s] < 0) return;
      const l = newNode(cs[s * 4], cs[s * 4 + 1], cc[s * 2]);
      const r = newNode(cs[s * 4 + 2], cs[s * 4 + 3], cc[s * 2 + 1]);
      feature[a] = bestF[s];
      threshold[a] = bestT[s];
      left[a] = l;
      right[a] = r;
      importances[bestF[s]] += weighted[a] - weighted[l] - weighted[r];
      next.push(l, r);
    });
    for (let i = 0; i < n; i++) {
      const s = slotOf[i];
      if (s < 0 || bestF[s] < 0) continue;
      const a = active[s];
      nodeOf[i] = data[i * p + bestF[s]] <= bestT[s] ? left[a] : right[a];
    }
    level = next;
  }
  for (let f = 0; f < p; f++) importances[f] /= n;
  return {
    feature: Int32Array.from(feature),
    threshold: Float64Array.from(threshold),
    left: Int32Array.from(left),
    right: Int32Array.from(right),
    value: Float64Array.from(value),
    importances,
  };
}

export function predictTree(tree: RegressionTree, X: Samples, i: number): number {
  let node = 0;
  while (tree.feature[node] >= 0) node = X.data[i * X.p + tree.feature[node]] <= tree.threshold[node] ? tree.left[node] : tree.right[node];
  return tree.value[node];
}

export class GradientBoostingRegressor {
  readonly options: Required<GbtOptions>;
  init = 0;
  trees: RegressionTree[] = [];
  nFeatures = 0;

  constructor(options: GbtOptions = {}) {
    this.options = { ...GBT_DEFAULTS, ...options };
  }

  fit(X: Samples, y: ArrayLike<number>): this {
    const { n } = X;
    if (y.length !== n) throw new Error(`GradientBoostingRegressor.fit: ${y.length} targets for ${n} samples`);
    if (n === 0) throw new Error('GradientBoostingRegressor.fit: no samples');
    this.nFeatures = X.p;
    let s = 0;
    for (let i = 0; i < n; i++) s += y[i];
    this.init = s / n;
    const raw = new Float64Array(n).fill(this.init);
    const residual = new Float64Array(n);
    const sorted = presort(X);
    this.trees = [];
    for (let m = 0; m < this.options.nEstimators; m++) {
      for (let i = 0; i < n; i++) residual[i] = y[i] - raw[i];
      const tree = fitRegressionTree(X, residual, this.options.maxDepth, sorted);
      for (let i = 0; i < n; i++) raw[i] += this.options.learningRate * predictTree(tree, X, i);
      this.trees.push(tree);
    }
    return this;
  }

  predict(X: Samples): Float64Array {
    if (X.p !== this.nFeatures) throw new Error(`GradientBoostingRegressor.predict: ${X.p} features, fitted on ${this.nFeatures}`);
    const out = new Float64Array(X.n);
    for (let i = 0; i < X.n; i++) {
      let v = this.init;
      for (const t of this.trees) v += this.options.learningRate * predictTree(t, X, i);
      out[i] = v;
    }
    return out;
  }

  /** scikit-learn's feature_importances_ (sums to 1, or all zeros when no tree splits). */
  featureImportances(): Float64Array {
    const out = new Float64Array(this.nFeatures);
    const relevant = this.trees.filter((t) => t.feature.length > 1);
    if (!relevant.length) return out;
    for (const t of relevant) for (let f = 0; f < this.nFeatures; f++) out[f] += t.importances[f] / relevant.length;
    let s = 0;
    for (let f = 0; f < this.nFeatures; f++) s += out[f];
    if (s > 0) for (let f = 0; f < this.nFeatures; f++) out[f] /= s;
    return out;
  }
}
