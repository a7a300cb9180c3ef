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
import type { EncoderOutput, Ops, SlotCompetition } from '../ops';
import { addSameShape, concatColumns, repeatRows, scaleBy, splitColumns } from '../ops/nn';
import { paramKey } from '../params/spec';
import type { ParamStore } from '../params/store';
import type { NoiseSource } from './noise';
import { gaussianFromParams, rsample, type Gaussian } from './priors';

export { ATTN_EPS } from '../ops/attention';

export interface HvaeOutput {
  /** q(z^l) for l = 0..L-2 (the last layer's posterior is rebuilt from `lambda` by the caller) */
  posteriors: Gaussian[];
  /** the last layer's posterior parameters [B*K, 2z] = (μ, s) */
  lambda: tf.Tensor2D;
  /** the noise for the last layer's sample (the caller samples it from `lambda`) */
  lambdaEps: tf.Tensor;
  /** attention per layer [B,K,H*W] (softmax over slots + ε, before the renormalisation); empty unless kept */
  attn: tf.Tensor3D[];
  /** samples of layers 0..L-2 [B*K, z] (for visualising the intermediate decodes) */
  samples: tf.Tensor2D[];
}

/**
 * One round of attention (shared with the Slot Attention baseline): slots [B,K,z] are
 * layer-normalised (`norm_slots`), projected to queries (`to_q`, scaled by z^-1/2) and compete
 * for the pixels: attn = softmax over slots of q kᵀ, plus ε; each slot's update is the
 * attn-weighted mean of v over the pixels. `prefix`: the module holding norm_slots and to_q.
 * Returns updates [B,K,z] and, with keepAttn, attn [B,K,H*W] before the renormalisation over pixels.
 */
export function attendSlots(
  p: ParamStore,
  ops: Ops,
  prefix: string,
  slots: tf.Tensor3D,
  kv: EncoderOutput,
  keepAttn = true,
): SlotCompetition {
  const z = slots.shape[2];
  const scale = Math.pow(z, -0.5);
  const normed = ops.layerNorm(slots, p.get(paramKey(prefix, 'norm_slots.weight')), p.get(paramKey(prefix, 'norm_slots.bias')));
  const q = scaleBy(ops.linear(normed, p.get(paramKey(prefix, 'to_q.weight'))) as tf.Tensor3D, scale);
  // softmax over the slots: slots compete for each pixel (lib/ops/attention.ts)
  return ops.slotCompetition(q, kv, keepAttn);
}

/** x + MLP(LayerNorm(x)) over the last axis: Linear, ReLU, Linear (`mlp`.0 and `mlp`.2). */
export function residualMlp<T extends tf.Tensor>(p: ParamStore, ops: Ops, x: T, norm: string, mlp: string): T {
  const h = ops.layerNorm(x, p.get(`${norm}.weight`), p.get(`${norm}.bias`));
  const y = ops.linear(ops.linear(h, p.get(`${mlp}.0.weight`), p.get(`${mlp}.0.bias`), 'relu'), p.get(`${mlp}.2.weight`), p.get(`${mlp}.2.bias`));
  return addSameShape(x, y as T);
}

/** kv: the encoder's keys and values [B, H*W, z]; keepAttn: return each layer's attention. */
export function hvaeInference(
  p: ParamStore,
  ops: Ops,
  cfg: NetConfig,
  kv: EncoderOutput,
  noise: NoiseSource,
  keepAttn = true,
): HvaeOutput {
  const { K, z_size: z, stochastic_layers: L } = cfg;
  const B = kv.resident ? kv.resident.shape[0] : kv.k.shape[0];
  const N = B * K;
  const h = 'hvae_networks';

  // λ_0: the learned initial posterior, shared by every slot of every image
  let lambda = repeatRows(p.get<tf.Tensor2D>(`${h}.init_posterior`), N);
  let [mu, sp] = splitColumns(lambda);
  let eps = noise.normal([N, z]);
  if (L === 0) return { posteriors: [], lambda, lambdaEps: eps, attn: [], samples: [] };
  let slots = rsample(gaussianFromParams(ops, mu, sp), eps);

  const posteriors: Gaussian[] = [];
  const attns: tf.Tensor3D[] = [];
  const samples: tf.Tensor2D[] = [];
  for (let layer = 0; layer < L; layer++) {
    const att = attendSlots(p, ops, h, slots.reshape([B, K, z]) as tf.Tensor3D, kv, keepAttn);
    if (att.attn) attns.push(att.attn);
    const updates = att.updates.reshape([N, z]) as tf.Tensor2D;

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
      const next = ops.gruCell(projected, concatColumns([mu, sp]), {
        weightIh: p.get(`${h}.gru.weight_ih_l0`),
        weightHh: p.get(`${h}.gru.weight_hh_l0`),
        biasIh: p.get(`${h}.gru.bias_ih_l0`),
        biasHh: p.get(`${h}.gru.bias_hh_l0`),
      });
      [mu, sp] = splitColumns(next);
    }
    mu = residualMlp(p, ops, mu, `${h}.norm_mu_pre_ff`, `${h}.mlp_mu`);
    sp = residualMlp(p, ops, sp, `${h}.norm_softplus_pre_ff`, `${h}.mlp_softplus`);
    eps = noise.normal([N, z]);
    if (layer === L - 1) {
      // λ is one tensor so that the refinement can differentiate the loss with respect to it
      lambda = concatColumns([mu, sp]);
      break;
    }
    const posterior = gaussianFromParams(ops, mu, sp);
    posteriors.push(posterior);
    slots = rsample(posterior, eps);
    samples.push(slots);
  }
  return { posteriors, lambda, lambdaEps: eps, attn: attns, samples };
}
