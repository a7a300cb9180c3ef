/**
 * The slots' competition for the pixels (one attention round of EfficientMORL's HVAE layers and of
 * Slot Attention), the reference in tfjs ops:
 *
 *   attn    = softmax over slots of q kᵀ, plus ε          [B, K, N]
 *   updates = (attn / Σ_pixels attn) · v                   [B, K, d]
 *
 * q [B, K, d] (already scaled), k and v [B, N, d] (the encoder's output). `attn` is returned for
 * inspection, when asked for: the model's losses depend on `updates` only, and the native versions
 * pass no gradient through `attn`.
 */
import { tf } from '../tf';
import { hostKeysValues, type EncoderOutput } from './encoder-stage';

export const ATTN_EPS = 1e-8;

/** The competition's result; `attn` only when asked for (keepAttn). */
export interface SlotCompetition {
  attn?: tf.Tensor3D;
  updates: tf.Tensor3D;
}

export function slotCompetition(q: tf.Tensor3D, kv: EncoderOutput, keepAttn = true): SlotCompetition {
  const { k, v } = hostKeysValues(kv, 'slotCompetition');
  const dots = tf.matMul(q, k, false, true); // [B,K,N]
  const attn = tf.add(tf.exp(tf.sub(dots, tf.logSumExp(dots, 1, true))), ATTN_EPS) as tf.Tensor3D;
  const renormed = tf.div(attn, tf.sum(attn, -1, true));
  return { attn: keepAttn ? attn : undefined, updates: tf.matMul(renormed, v) as tf.Tensor3D };
}
