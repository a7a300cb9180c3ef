/**
 * The loss of one stage from its per-image nll [B] and its per-slot KL terms [B·K] (one per
 * stochastic layer at stage 0, else one), batch means over B, or over the global batch Bg when a
 * data-parallel shard computes its share:
 *
 *   kl_b  = Σ_layers Σ_k KL[b·K + k]
 *   plain: loss = mean_b(nll_b + β kl_b)
 *   GECO:  loss = β mean_b(kl_b) − softplus(β_geco)·(C − mean(nll) + stop(C_ema − (C − mean(nll))))·B/Bg
 *
 * stageLossReference writes this with tfjs ops, as the model first did. stageLoss is one op each
 * way with the reference's float32 roundings, values and gradients (the tfjs kernels' formulas:
 * a mean is Σ_double f(x/n), a sum is accumulated in double and rounded once): the ~10 kernels of
 * the reference, their saved inputs and their ~15 gradient kernels, for every stage of a pass and
 * again in the refinement's inner gradients, become one tape node.
 */
import { tf } from '../tf';
import { f32 } from '../ops/arrays';

export interface StageLossSpec {
  /** slots per image */
  K: number;
  /** the KL weight β */
  klBeta: number;
  /** the global batch when this batch is a data-parallel shard of it (≥ B), else undefined */
  lossBatchSize?: number;
  /** GECO's form: the target C, the EMA C_ema and the multiplier softplus(β_geco) (Geco.multiplier) */
  geco?: { target: number; cEma: number; multiplier: number };
}

export interface StageLoss {
  loss: tf.Scalar;
  /** the batch means of nll and kl (logged), as the reference's bmean */
  nllMean: number;
  klMean: number;
}

const f = Math.fround;

/** The reference in tfjs ops. */
export function stageLossReference(nll: tf.Tensor1D, klPerSlot: tf.Tensor1D[], spec: StageLossSpec): StageLoss {
  const B = nll.shape[0];
  const Bg = spec.lossBatchSize;
  const bmean = (t: tf.Tensor): tf.Scalar => (Bg === undefined ? tf.mean(t) : tf.div(tf.sum(t), Bg)) as tf.Scalar;
  let kl: tf.Tensor1D = tf.zeros([B]);
  for (const k of klPerSlot) kl = tf.add(kl, tf.sum(k.reshape([B, spec.K]), 1)) as tf.Tensor1D;
  let loss: tf.Scalar;
  const g = spec.geco;
  if (g) {
    const ct = tf.sub(f(g.target), tf.mean(nll));
    const frozen = tf.scalar((tf.sub(f(g.cEma), ct).dataSync() as Float32Array)[0]);
    let c = tf.mul(g.multiplier, tf.add(ct, frozen)) as tf.Scalar;
    if (Bg !== undefined && Bg !== B) c = tf.mul(c, B / Bg);
    loss = tf.sub(tf.mul(spec.klBeta, bmean(kl)), c) as tf.Scalar;
  } else {
    loss = bmean(tf.add(nll, tf.mul(spec.klBeta, kl)));
  }
  return { loss, nllMean: (bmean(nll).dataSync() as Float32Array)[0], klMean: (bmean(kl).dataSync() as Float32Array)[0] };
}

/** Σ x_i / n as tfjs' Mean computes it: each quotient rounded, the sum in double, rounded once. */
function meanF32(x: Float32Array): number {
  let s = 0;
  for (let i = 0; i < x.length; i++) s += f(x[i] / x.length);
  return f(s);
}

/** Σ x_i / d as tf.div(tf.sum(x), d): the sum in double, rounded, then divided. */
function sumOverF32(x: Float32Array, d: number): number {
  let s = 0;
  for (let i = 0; i < x.length; i++) s += x[i];
  return f(f(s) / f(d));
}

/** The stage's loss, one op each way (stageLossReference's bits). */
export function stageLoss(nll: tf.Tensor1D, klPerSlot: tf.Tensor1D[], spec: StageLossSpec): StageLoss {
  const B = nll.shape[0];
  const { K } = spec;
  const Bg = spec.lossBatchSize;
  if (!Number.isInteger(K) || K < 1) throw new Error(`stageLoss: K must be an integer >= 1, got ${K}`);
  if (Bg !== undefined && (!Number.isInteger(Bg) || Bg < B)) throw new Error(`stageLoss: lossBatchSize must be an integer >= the batch size ${B}, got ${Bg}`);
  if (nll.rank !== 1) throw new Error(`stageLoss: nll must be [B], got [${nll.shape}]`);
  for (const k of klPerSlot) {
    if (k.rank !== 1 || k.shape[0] !== B * K) throw new Error(`stageLoss: each per-slot KL must be [B·K] = [${B * K}], got [${k.shape}]`);
  }
  if ([nll, ...klPerSlot].some((t) => t.dtype !== 'float32')) return stageLossReference(nll, klPerSlot, spec);
  const bmean = (x: Float32Array) => (Bg === undefined ? meanF32(x) : sumOverF32(x, Bg));
  const beta = f(spec.klBeta);
  const g = spec.geco;
  let nllMean = 0, klMean = 0;
  const op = tf.customGrad((...args: unknown[]) => {
    const nv = f32(args[0] as tf.Tensor);
    // kl_b: each layer's per-image sum (double, rounded), added in float32 onto 0
    const kl = new Float32Array(B);
    for (let l = 1; l < 1 + klPerSlot.length; l++) {
      const kv = f32(args[l] as tf.Tensor);
      for (let b = 0; b < B; b++) {
        let s = 0;
        for (let k = 0; k < K; k++) s += kv[b * K + k];
        kl[b] = f(kl[b] + f(s));
      }
    }
    nllMean = bmean(nv);
    klMean = bmean(kl);
    let loss: number;
    // GECO: the constraint's scalars and the factor B/Bg on it
    const nllMeanOverB = g ? meanF32(nv) : 0;
    const share = Bg !== undefined && Bg !== B ? f(B / Bg) : 1;
    const multiplier = g ? f(g.multiplier) : 0;
    if (g) {
      const ct = f(f(g.target) - nllMeanOverB);
      const frozen = f(f(g.cEma) - ct);
      let c = f(multiplier * f(ct + frozen));
      if (share !== 1) c = f(c * share);
      loss = f(f(beta * klMean) - c);
    } else {
      const t = new Float32Array(B);
      for (let b = 0; b < B; b++) t[b] = f(nv[b] + f(beta * kl[b]));
      loss = bmean(t);
    }
    return {
      value: tf.scalar(loss, 'float32'),
      gradFunc: (dy: tf.Tensor) => {
        const d = f32(dy)[0];
        // the gradient of a batch mean (Mean: dy/n; sum / Bg: dy/Bg) at each image
        const perImage = (x: number) => f(x / (Bg === undefined ? B : f(Bg)));
        let dNll: number, dKl: number;
        if (g) {
          dKl = perImage(f(d * beta));
          let dc = -d;
          if (share !== 1) dc = f(dc * share);
          dNll = f(-f(dc * multiplier) / B); // C − mean(nll): the mean over this batch
        } else {
          const dt = perImage(d);
          dNll = dt;
          dKl = f(dt * beta);
        }
        // filled arrays rather than tf.fill: a kernel each, and recorded when a tape is open
        return [tf.tensor1d(new Float32Array(B).fill(dNll)), ...klPerSlot.map(() => tf.tensor1d(new Float32Array(B * K).fill(dKl)))];
      },
    };
  });
  const loss = (op as (...t: tf.Tensor[]) => tf.Scalar)(nll, ...klPerSlot);
  return { loss, nllMean, klMean };
}

/** The reference: Σ_i w_i·loss_i in tfjs ops, added in order onto 0. */
export function weightedTotalReference(losses: tf.Scalar[], weights: number[]): tf.Scalar {
  let total: tf.Scalar = tf.scalar(0);
  losses.forEach((l, i) => (total = tf.add(total, tf.mul(weights[i], l)) as tf.Scalar));
  return total;
}

/** Σ_i w_i·loss_i of the stages' losses, one op each way (weightedTotalReference's bits). */
export function weightedTotal(losses: tf.Scalar[], weights: number[]): tf.Scalar {
  if (losses.length !== weights.length) throw new Error(`weightedTotal: ${losses.length} losses but ${weights.length} weights`);
  if (losses.length === 0 || losses.some((l) => l.dtype !== 'float32' || l.rank !== 0)) return weightedTotalReference(losses, weights);
  const w = weights.map(f);
  const op = tf.customGrad((...args: unknown[]) => {
    let total = 0;
    for (let i = 0; i < w.length; i++) total = f(total + f(w[i] * f32(args[i] as tf.Tensor)[0]));
    return {
      value: tf.scalar(total, 'float32'),
      gradFunc: (dy: tf.Tensor) => {
        const d = f32(dy)[0];
        return w.map((wi) => tf.scalar(f(d * wi), 'float32'));
      },
    };
  });
  return (op as (...t: tf.Tensor[]) => tf.Scalar)(...losses);
}
