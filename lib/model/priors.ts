/**
 * Diagonal Gaussians parameterised as the original does — (μ, s) with σ = sqrt(softplus(min(s,80))
 * + 1e-5) — their reparameterised samples, the KL between two of them, and the hierarchical
 * prior network p(z^l | z^{l±1}) (IndependentPrior in the original) shared by every layer.
 */
import { tf } from '../tf';
import type { Ops } from '../ops';
import type { ParamStore } from '../params/store';

export interface Gaussian {
  /** [N, z] */
  loc: tf.Tensor2D;
  /** [N, z] */
  std: tf.Tensor2D;
}

/** σ = sqrt(log(1 + exp(min(s, 80))) + 1e-5): the clamp keeps exp finite in float32. */
export function softplusToStd(s: tf.Tensor): tf.Tensor {
  return tf.sqrt(tf.add(tf.log(tf.add(1, tf.exp(tf.minimum(s, 80)))), 1e-5));
}

export function gaussianFromParams(loc: tf.Tensor2D, softplusParam: tf.Tensor2D): Gaussian {
  return { loc, std: softplusToStd(softplusParam) as tf.Tensor2D };
}

/** z = μ + ε σ */
export function rsample(q: Gaussian, eps: tf.Tensor): tf.Tensor2D {
  return tf.add(q.loc, tf.mul(eps, q.std)) as tf.Tensor2D;
}

/**
 * KL(q ‖ p) summed over the last axis, in torch.distributions' form
 * ½(r + ((μq−μp)/σp)² − 1 − log r) with r = (σq/σp)². p = null is the standard normal.
 */
export function klDiag(q: Gaussian, p: Gaussian | null): tf.Tensor1D {
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
  const hid = ops.elu(ops.linear(z, p.get(`${n}.z_linear.0.weight`), p.get(`${n}.z_linear.0.bias`)));
  const loc = ops.linear(hid, p.get(`${n}.z_mu.weight`), p.get(`${n}.z_mu.bias`)) as tf.Tensor2D;
  const sp = ops.linear(hid, p.get(`${n}.z_softplus.weight`), p.get(`${n}.z_softplus.bias`)) as tf.Tensor2D;
  return gaussianFromParams(loc, sp);
}
