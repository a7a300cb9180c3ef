/**
 * Diagonal Gaussians parameterised as the original does — (μ, s) with σ = sqrt(softplus(min(s,80))
 * + 1e-5) — their reparameterised samples, the KL between two of them, and the hierarchical
 * prior network p(z^l | z^{l±1}) (IndependentPrior in the original) shared by every layer.
 *
 * σ and the KL run as one op each way over plain arrays (GaussianKernels): loops that round every
 * step to float32 as the tfjs ops of the reference formulas (…Reference below) and their autodiff
 * round them, so the values and gradients are the same bits. The loops here are the TypeScript
 * ones; the native ops (lib/ops/native.ts) run the addon's (native/gaussian.h), a few times faster.
 * As chains of tfjs ops they had cost ~1.7 ms (σ) and ~3.5 ms (KL) forward and backward on
 * [128, 64], tens of ms per training step.
 */
import { tf } from '../tf';
import type { Ops } from '../ops';
import type { KlDiagSpec } from '../ops/addon';
import { cutColumns, f32, joinColumns } from '../ops/arrays';
import { multiOutputOp } from '../ops/multi-output';
import type { ParamStore } from '../params/store';

export interface Gaussian {
  /** [N, z] */
  loc: tf.Tensor2D;
  /** [N, z] */
  std: tf.Tensor2D;
}

/** The element loops behind softplusToStd and klDiag: the same signatures as the addon's. */
export interface GaussianKernels {
  softplusStd(spec: { s: Float32Array }): Float32Array;
  softplusStdBackward(spec: { g: Float32Array; s: Float32Array; std: Float32Array }): Float32Array;
  klDiag(spec: KlDiagSpec): Float32Array;
  klDiagBackward(spec: KlDiagSpec & { g: Float32Array }): { dqLoc: Float32Array; dqStd: Float32Array; dpLoc: Float32Array | null; dpStd: Float32Array | null };
}

const f = Math.fround;
const STD_EPS = f(1e-5);

/** The TypeScript loops (each JS double operation rounded to float32 when stored, or by fround). */
export const jsGaussianKernels: GaussianKernels = {
  softplusStd({ s }) {
    const y = new Float32Array(s.length);
    for (let i = 0; i < s.length; i++) y[i] = Math.sqrt(f(f(Math.log(f(1 + f(Math.exp(Math.min(s[i], 80)))))) + STD_EPS));
    return y;
  },
  // sqrt: g / (2σ); + 1e-5, 1 + ·: unchanged; log: / a; exp: · e; min(·, 80): · [s <= 80]
  softplusStdBackward({ g, s, std }) {
    const ds = new Float32Array(s.length);
    for (let i = 0; i < s.length; i++) {
      const e = f(Math.exp(Math.min(s[i], 80)));
      const a = f(1 + e);
      ds[i] = f(f(f(g[i] / (2 * std[i])) / a) * e) * (s[i] <= 80 ? 1 : 0);
    }
    return ds;
  },
  // per element: r = σq/σp, x = (μq−μp)/σp (p absent: r = σq, x = μq); ½(r² + x² − 1 − log r²)
  klDiag({ qLoc: mq, qStd: sq, pLoc: mp, pStd: sp, rows, D }) {
    const kl = new Float32Array(rows);
    for (let row = 0, i = 0; row < rows; row++) {
      let sum = 0;
      for (let j = 0; j < D; j++, i++) {
        const r = sp ? f(sq[i] / sp[i]) : sq[i];
        const x = sp && mp ? f(f(mq[i] - mp[i]) / sp[i]) : mq[i];
        const vr = f(r * r);
        sum += f(0.5 * f(f(f(vr + f(x * x)) - 1) - f(Math.log(vr))));
      }
      kl[row] = sum;
    }
    return kl;
  },
  klDiagBackward({ g, qLoc: mq, qStd: sq, pLoc: mp, pStd: sp, rows, D }) {
    const n = rows * D;
    const dqLoc = new Float32Array(n), dqStd = new Float32Array(n);
    const dpLoc = sp ? new Float32Array(n) : null, dpStd = sp ? new Float32Array(n) : null;
    for (let row = 0, i = 0; row < rows; row++) {
      // ½·w: dw = g·½; w = (vr + t1 − 1) − log vr: d vr = −dw/vr + dw; d t1 = dw
      const dw = f(g[row] * 0.5);
      for (let j = 0; j < D; j++, i++) {
        const r = sp ? f(sq[i] / sp[i]) : sq[i];
        const x = sp && mp ? f(f(mq[i] - mp[i]) / sp[i]) : mq[i];
        const vr = f(r * r);
        const dvr = f(f(-dw / vr) + dw);
        const dr = f(dvr * f(r * 2)); // r²
        const dx = f(dw * f(x * 2)); // x²
        if (!sp || !mp || !dpLoc || !dpStd) {
          dqStd[i] = dr;
          dqLoc[i] = dx;
          continue;
        }
        const d = f(mq[i] - mp[i]);
        const s2 = f(sp[i] * sp[i]);
        dqStd[i] = f(dr / sp[i]); // r = σq / σp
        const dd = f(dx / sp[i]); // x = d / σp
        dqLoc[i] = dd;
        dpLoc[i] = -dd;
        dpStd[i] = f(-f(f(dr * sq[i]) / s2) + -f(f(dx * d) / s2));
      }
    }
    return { dqLoc, dqStd, dpLoc, dpStd };
  },
};

/** The reference: σ = sqrt(log(1 + exp(min(s, 80))) + 1e-5) in tfjs ops (the clamp keeps exp finite in float32). */
export function softplusToStdReference(s: tf.Tensor): tf.Tensor {
  return tf.sqrt(tf.add(tf.log(tf.add(1, tf.exp(tf.minimum(s, 80)))), 1e-5));
}

/** σ = sqrt(log(1 + exp(min(s, 80))) + 1e-5), one op each way with `kernels` (softplusToStdReference's bits). */
export function softplusToStdWith(kernels: GaussianKernels, s: tf.Tensor): tf.Tensor {
  if (s.dtype !== 'float32') return softplusToStdReference(s);
  const op = tf.customGrad((x) => {
    const sv = f32(x as tf.Tensor);
    const std = kernels.softplusStd({ s: sv });
    return {
      value: tf.tensor(std, s.shape, 'float32'),
      gradFunc: (dy: tf.Tensor) => tf.tensor(kernels.softplusStdBackward({ g: f32(dy), s: sv, std }), s.shape, 'float32'),
    };
  });
  return op(s);
}

/**
 * KL(q ‖ p) summed over the last axis, in torch.distributions' form
 * ½(r + ((μq−μp)/σp)² − 1 − log r) with r = (σq/σp)². p = null is the standard normal.
 * One op each way with `kernels` (klDiagReference's bits).
 */
export function klDiagWith(kernels: GaussianKernels, q: Gaussian, p: Gaussian | null): tf.Tensor1D {
  const inputs = p ? [q.loc, q.std, p.loc, p.std] : [q.loc, q.std];
  const [rows, D] = q.loc.shape;
  if (inputs.some((t) => t.dtype !== 'float32' || t.rank !== 2 || t.shape[0] !== rows || t.shape[1] !== D)) return klDiagReference(q, p);
  const op = tf.customGrad((...args: unknown[]) => {
    const [qLoc, qStd, pLoc, pStd] = args.slice(0, inputs.length).map((t) => f32(t as tf.Tensor));
    const spec: KlDiagSpec = pLoc ? { qLoc, qStd, pLoc, pStd, rows, D } : { qLoc, qStd, rows, D };
    return {
      value: tf.tensor1d(kernels.klDiag(spec), 'float32'),
      gradFunc: (dy: tf.Tensor) => {
        const g = kernels.klDiagBackward({ ...spec, g: f32(dy) });
        const shape = q.loc.shape;
        const grads = [tf.tensor(g.dqLoc, shape, 'float32'), tf.tensor(g.dqStd, shape, 'float32')];
        if (g.dpLoc && g.dpStd) grads.push(tf.tensor(g.dpLoc, shape, 'float32'), tf.tensor(g.dpStd, shape, 'float32'));
        return grads;
      },
    };
  });
  return (op as (...t: tf.Tensor[]) => tf.Tensor)(...inputs) as tf.Tensor1D;
}

export function gaussianFromParams(ops: Ops, loc: tf.Tensor2D, softplusParam: tf.Tensor2D): Gaussian {
  return { loc, std: softplusToStdWith(ops.gaussian, softplusParam) as tf.Tensor2D };
}

/** λ [N, 2z] as float32 (μ | s) halves, or null when the fused ops below do not apply. */
function lambdaHalves(lambda: tf.Tensor2D): { N: number; D: number } | null {
  const [N, D2] = lambda.shape;
  return lambda.dtype === 'float32' && lambda.rank === 2 && D2 % 2 === 0 ? { N, D: D2 / 2 } : null;
}

/** The reference: q = N(μ, σ(s)) from λ = [μ | s] with tf.split and softplusToStdReference. */
export function posteriorFromLambdaReference(lambda: tf.Tensor2D): Gaussian {
  const [loc, sp] = tf.split(lambda, 2, 1) as [tf.Tensor2D, tf.Tensor2D];
  return { loc, std: softplusToStdReference(sp) as tf.Tensor2D };
}

/**
 * q = N(μ, σ(s)) from λ = [μ | s] [N, 2z]: the split and σ as one op with two outputs each way
 * (posteriorFromLambdaReference's bits), where tf.split alone is a kernel each way.
 */
export function posteriorFromLambda(kernels: GaussianKernels, lambda: tf.Tensor2D): Gaussian {
  const h = lambdaHalves(lambda);
  if (!h) return posteriorFromLambdaReference(lambda);
  const { N, D } = h;
  const [loc, std] = multiOutputOp('posteriorFromLambda', [lambda], (lam) => {
    const [mu, s] = cutColumns(f32(lam), [D, D], N);
    const sigma = kernels.softplusStd({ s });
    return {
      values: [tf.tensor2d(mu, [N, D]), tf.tensor2d(sigma, [N, D])],
      gradFunc: ([dLoc, dStd]) => [tf.tensor2d(joinColumns([f32(dLoc), kernels.softplusStdBackward({ g: f32(dStd), s, std: sigma })], [D, D], N), [N, 2 * D])],
    };
  });
  return { loc: loc as tf.Tensor2D, std: std as tf.Tensor2D };
}

/** The reference: z = μ + εσ and KL(q ‖ p) of q = posteriorFromLambdaReference(λ), in tfjs ops. */
export function sampleWithKlReference(lambda: tf.Tensor2D, eps: tf.Tensor, prior: Gaussian | null): { z: tf.Tensor2D; kl: tf.Tensor1D } {
  const q = posteriorFromLambdaReference(lambda);
  return { z: rsampleReference(q, eps), kl: klDiagReference(q, prior) };
}

/**
 * z = μ + εσ (ε a constant draw) and KL(q ‖ p) per row for q = N(μ, σ(s)), λ = [μ | s]: one op
 * each way for a stage whose posterior feeds nothing else. μ and σ are then not tensors of the
 * tape, which would sum their two consumers' gradients with an Add kernel each; the backward sums
 * them itself (a sum of two float32 terms is the same bits in either order), so the values and
 * the gradients of λ and of the prior are sampleWithKlReference's bits.
 */
export function sampleWithKl(kernels: GaussianKernels, lambda: tf.Tensor2D, eps: tf.Tensor, prior: Gaussian | null): { z: tf.Tensor2D; kl: tf.Tensor1D } {
  const h = lambdaHalves(lambda);
  const same = (t: tf.Tensor) => h !== null && t.dtype === 'float32' && t.rank === 2 && t.shape[0] === h.N && t.shape[1] === h.D;
  if (!h || !same(eps) || (prior && (!same(prior.loc) || !same(prior.std)))) return sampleWithKlReference(lambda, eps, prior);
  const { N, D } = h;
  const e = f32(eps);
  const inputs = prior ? [lambda, prior.loc, prior.std] : [lambda];
  const [z, kl] = multiOutputOp('sampleWithKl', inputs, (lam, pLocT, pStdT) => {
    const [qLoc, s] = cutColumns(f32(lam), [D, D], N);
    const qStd = kernels.softplusStd({ s });
    const spec: KlDiagSpec = prior ? { qLoc, qStd, pLoc: f32(pLocT), pStd: f32(pStdT), rows: N, D } : { qLoc, qStd, rows: N, D };
    return {
      values: [tf.tensor2d(reparameterize(qLoc, qStd, e), [N, D]), tf.tensor1d(kernels.klDiag(spec), 'float32')],
      gradFunc: ([dz, dkl]) => {
        const g = f32(dz);
        const k = kernels.klDiagBackward({ ...spec, g: f32(dkl) });
        const dLoc = new Float32Array(N * D), dStd = new Float32Array(N * D);
        for (let i = 0; i < dLoc.length; i++) {
          dLoc[i] = g[i] + k.dqLoc[i];
          dStd[i] = f(g[i] * e[i]) + k.dqStd[i];
        }
        const ds = kernels.softplusStdBackward({ g: dStd, s, std: qStd });
        const dLambda = tf.tensor2d(joinColumns([dLoc, ds], [D, D], N), [N, 2 * D]);
        return k.dpLoc && k.dpStd ? [dLambda, tf.tensor2d(k.dpLoc, [N, D]), tf.tensor2d(k.dpStd, [N, D])] : [dLambda];
      },
    };
  });
  return { z: z as tf.Tensor2D, kl: kl as tf.Tensor1D };
}

/** z = μ + f32(ε·σ) element by element, rounded as tfjs' Mul then Add. */
function reparameterize(loc: Float32Array, std: Float32Array, eps: Float32Array): Float32Array {
  const z = new Float32Array(loc.length);
  for (let i = 0; i < z.length; i++) z[i] = loc[i] + f(eps[i] * std[i]);
  return z;
}

/** The reference: z = μ + ε σ in tfjs ops. */
export function rsampleReference(q: Gaussian, eps: tf.Tensor): tf.Tensor2D {
  return tf.add(q.loc, tf.mul(eps, q.std)) as tf.Tensor2D;
}

/**
 * z = μ + ε σ (ε a constant draw), one op each way with rsampleReference's bits: dμ = dz,
 * dσ = dz·ε. (The reference's two kernels save three inputs and take five more kernels back.)
 */
export function rsample(q: Gaussian, eps: tf.Tensor): tf.Tensor2D {
  const shape = q.loc.shape;
  const same = (t: tf.Tensor) => t.dtype === 'float32' && t.rank === 2 && t.shape[0] === shape[0] && t.shape[1] === shape[1];
  if (!same(q.loc) || !same(q.std) || !same(eps)) return rsampleReference(q, eps);
  const e = f32(eps);
  const op = tf.customGrad((loc, std) => {
    return {
      value: tf.tensor2d(reparameterize(f32(loc as tf.Tensor), f32(std as tf.Tensor), e), shape),
      gradFunc: (dy: tf.Tensor) => {
        const g = f32(dy);
        const ds = new Float32Array(g.length);
        for (let i = 0; i < g.length; i++) ds[i] = g[i] * e[i];
        return [tf.tensor2d(Float32Array.from(g), shape), tf.tensor2d(ds, shape)];
      },
    };
  });
  return op(q.loc, q.std) as tf.Tensor2D;
}

/** The reference: klDiag in tfjs ops. */
export function klDiagReference(q: Gaussian, p: Gaussian | null): tf.Tensor1D {
  let varRatio: tf.Tensor;
  let t1: tf.Tensor;
  if (p === null) {
    varRatio = tf.square(q.std);
    t1 = tf.square(q.loc);
  } else {
    varRatio = tf.square(tf.div(q.std, p.std));
    t1 = tf.square(tf.div(tf.sub(q.loc, p.loc), p.std));
  }
  const kl = tf.mul(0.5, tf.sub(tf.sub(tf.add(varRatio, t1), 1), tf.log(varRatio)));
  return tf.sum(kl, -1) as tf.Tensor1D;
}

/** The prior network: z -> Linear(z,128) ELU -> (Linear(128,z) for μ, Linear(128,z) for s). */
export function priorFromSample(p: ParamStore, ops: Ops, z: tf.Tensor2D): Gaussian {
  const n = 'hvae_networks.indep_prior';
  const hid = ops.linear(z, p.get(`${n}.z_linear.0.weight`), p.get(`${n}.z_linear.0.bias`), 'elu');
  const loc = ops.linear(hid, p.get(`${n}.z_mu.weight`), p.get(`${n}.z_mu.bias`)) as tf.Tensor2D;
  const sp = ops.linear(hid, p.get(`${n}.z_softplus.weight`), p.get(`${n}.z_softplus.bias`)) as tf.Tensor2D;
  return gaussianFromParams(ops, loc, sp);
}
