/**
 * The bottom-up hierarchical inference of EfficientMORL (HVAENetworks.forward): L stochastic
 * layers, each one round of slot-attention-style competition followed by a DualGRU update of the
 * posterior parameters λ = (μ, s).
 *
 *   slots  = LayerNorm(z)                       z: the previous layer's posterior sample
 *   attn   = softmax_slots(q kᵀ / sqrt(d)) + ε   q = to_q(slots)
 *   attn   = attn / Σ_pixels attn                (weighted mean over pixels per slot)
 *   u      = attn · v
 *   μ, s   = DualGRU(u, (μ, s))                  two GRUs fed the same update
 *   μ, s   = μ + MLP(LN(μ)),  s + MLP(LN(s))
 *   z      ~ N(μ, σ(s))
 */
import { tf } from '../tf';
import type { NetConfig } from '../config/net';
import type { Ops } from '../ops';
import type { ParamStore } from '../params/store';
import type { NoiseSource } from './noise';
import { gaussianFromParams, rsample, type Gaussian } from './priors';

export const ATTN_EPS = 1e-8;

export interface HvaeOutput {
  /** q(z^l) for l = 0..L-2 (the last layer's posterior is rebuilt from `lambda` by the caller) */
  posteriors: Gaussian[];
  /** the last layer's posterior parameters [B*K, 2z] = (μ, s) */
  lambda: tf.Tensor2D;
  /** the noise for the last layer's sample (the caller samples it from `lambda`) */
  lambdaEps: tf.Tensor;
  /** attention per layer [B,K,H*W] (softmax over slots + ε, before the renormalisation) */
  attn: tf.Tensor3D[];
  /** samples of layers 0..L-2 [B*K, z] (for visualising the intermediate decodes) */
  samples: tf.Tensor2D[];
}

function residualMlp(p: ParamStore, ops: Ops, x: tf.Tensor2D, norm: string, mlp: string): tf.Tensor2D {
  const h = ops.layerNorm(x, p.get(`${norm}.weight`), p.get(`${norm}.bias`));
  const y = ops.linear(tf.relu(ops.linear(h, p.get(`${mlp}.0.weight`), p.get(`${mlp}.0.bias`))), p.get(`${mlp}.2.weight`), p.get(`${mlp}.2.bias`));
  return tf.add(x, y) as tf.Tensor2D;
}

/** k, v: [B, H*W, z] from the encoder. */
export function hvaeInference(
  p: ParamStore,
  ops: Ops,
  cfg: NetConfig,
  k: tf.Tensor3D,
  v: tf.Tensor3D,
  noise: NoiseSource,
): HvaeOutput {
  const { K, z_size: z, stochastic_layers: L } = cfg;
  const B = k.shape[0];
  const N = B * K;
  const h = 'hvae_networks';
  const scale = Math.pow(z, -0.5);

  // λ_0: the learned initial posterior, shared by every slot of every image
  let lambda = tf.tile(p.get<tf.Tensor2D>(`${h}.init_posterior`), [N, 1]) as tf.Tensor2D;
  let [mu, sp] = tf.split(lambda, 2, 1) as [tf.Tensor2D, tf.Tensor2D];
  let eps = noise.normal([N, z]);
  if (L === 0) return { posteriors: [], lambda, lambdaEps: eps, attn: [], samples: [] };
  let slots = rsample(gaussianFromParams(mu, sp), eps);

  const posteriors: Gaussian[] = [];
  const attns: tf.Tensor3D[] = [];
  const samples: tf.Tensor2D[] = [];
  for (let layer = 0; layer < L; layer++) {
    const normed = ops.layerNorm(slots.reshape([B, K, z]), p.get(`${h}.norm_slots.weight`), p.get(`${h}.norm_slots.bias`));
    const q = tf.mul(ops.linear(normed, p.get(`${h}.to_q.weight`)), scale) as tf.Tensor3D;
    const dots = tf.matMul(q, k, false, true); // [B,K,HW]
    // softmax over the slots (axis 1): slots compete for each pixel
    let attn = tf.add(tf.exp(tf.sub(dots, tf.logSumExp(dots, 1, true))), ATTN_EPS) as tf.Tensor3D;
    attns.push(attn);
    attn = tf.div(attn, tf.sum(attn, -1, true));
    const updates = tf.matMul(attn, v).reshape([N, z]) as tf.Tensor2D;

    if (cfg.use_DualGRU) {
      const c = `${h}.gru.cell`;
      [mu, sp] = ops.dualGruCell(updates, mu, sp, {
        weightIh1: p.get(`${c}.weight_ih_1`),
        weightHh1: p.get(`${c}.weight_hh_1`),
        weightIh2: p.get(`${c}.weight_ih_2`),
        weightHh2: p.get(`${c}.weight_hh_2`),
        weightIn1: p.get(`${c}.weight_in_1`),
        weightHn1: p.get(`${c}.weight_hn_1`),
        weightIn2: p.get(`${c}.weight_in_2`),
        weightHn2: p.get(`${c}.weight_hn_2`),
        biasIh: p.get(`${c}.bias_ih`),
        biasHh: p.get(`${c}.bias_hh`),
        biasIn: p.get(`${c}.bias_in`),
        biasHn: p.get(`${c}.bias_hn`),
      });
    } else {
      // one GRU over (μ, s) jointly, its input the update projected to 2z
      const projected = ops.linear(updates, p.get(`${h}.project_update.weight`), p.get(`${h}.project_update.bias`)) as tf.Tensor2D;
      const next = ops.gruCell(projected, tf.concat([mu, sp], 1) as tf.Tensor2D, {
        weightIh: p.get(`${h}.gru.weight_ih_l0`),
        weightHh: p.get(`${h}.gru.weight_hh_l0`),
        biasIh: p.get(`${h}.gru.bias_ih_l0`),
        biasHh: p.get(`${h}.gru.bias_hh_l0`),
      });
      [mu, sp] = tf.split(next, 2, 1) as [tf.Tensor2D, tf.Tensor2D];
    }
    mu = residualMlp(p, ops, mu, `${h}.norm_mu_pre_ff`, `${h}.mlp_mu`);
    sp = residualMlp(p, ops, sp, `${h}.norm_softplus_pre_ff`, `${h}.mlp_softplus`);
    // λ is one tensor so that the refinement can differentiate the loss with respect to it
    lambda = tf.concat([mu, sp], 1) as tf.Tensor2D;
    eps = noise.normal([N, z]);
    if (layer === L - 1) break;
    [mu, sp] = tf.split(lambda, 2, 1) as [tf.Tensor2D, tf.Tensor2D];
    const posterior = gaussianFromParams(mu, sp);
    posteriors.push(posterior);
    slots = rsample(posterior, eps);
    samples.push(slots);
  }
  return { posteriors, lambda, lambdaEps: eps, attn: attns, samples };
}
