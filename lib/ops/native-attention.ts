/**
 * slotCompetition (lib/ops/attention.ts) on the CPU as one fused addon call each way
 * (native/attention.h): per image, one pass over the pixels computes the softmax over slots, the
 * renormalisation over pixels and the updates; the backward pass, with p the softmax,
 * a = p + ε, s = Σ_pixels a, w = a / s and U the updates,
 *
 *   dW = dU vᵀ,  d/da = (dW − dU·U) / s,  d/ddots = p (d/da − Σ_slots p d/da),
 *   dq = (d/ddots) k,  dk = (d/ddots)ᵀ q,  dv = wᵀ dU.
 *
 * `attn` is a plain tensor (no gradient through it), as the interface allows.
 */
import { tf } from '../tf';
import { f32 } from './arrays';
import { addonOps } from './addon';
import { ATTN_EPS, type SlotCompetition } from './attention';
import { hostKeysValues, type EncoderOutput } from './encoder-stage';

export function slotCompetition(q: tf.Tensor3D, kv: EncoderOutput, keepAttn = true): SlotCompetition {
  const { k, v } = hostKeysValues(kv, 'slotCompetition');
  const [B, K, d] = q.shape;
  const [, N] = k.shape;
  const C = v.shape[2];
  if (k.shape[0] !== B || k.shape[2] !== d) throw new Error(`slotCompetition: keys [${k.shape}] do not fit queries [${q.shape}]`);
  if (v.shape[0] !== B || v.shape[1] !== N) throw new Error(`slotCompetition: values [${v.shape}] do not fit keys [${k.shape}]`);
  const m = addonOps();
  let p: Float32Array | null = null;
  const op = tf.customGrad((qt, kt, vt, save) => {
    const spec = { q: f32(qt as tf.Tensor), k: f32(kt as tf.Tensor), v: f32(vt as tf.Tensor), B, K, N, d, C, eps: ATTN_EPS };
    const f = m.slotAttention(spec);
    p = f.p;
    (save as tf.GradSaveFunc)([]);
    return {
      value: tf.tensor3d(f.updates, [B, K, C]),
      gradFunc: (dy: tf.Tensor) => {
        const g = m.slotAttentionBackward({ ...spec, p: f.p, s: f.s, updates: f.updates, dU: f32(dy) });
        return [tf.tensor3d(g.dq, [B, K, d]), tf.tensor3d(g.dk, [B, N, d]), tf.tensor3d(g.dv, [B, N, C])];
      },
    };
  });
  const updates = op(q, k, v) as tf.Tensor3D;
  return { attn: keepAttn ? attnOf(p!, [B, K, N]) : undefined, updates };
}

/** attn = p + ε (the softmax before the renormalisation over pixels), as a tensor. */
export function attnOf(p: Float32Array, shape: [number, number, number]): tf.Tensor3D {
  const a = new Float32Array(p.length);
  for (let i = 0; i < a.length; i++) a[i] = p[i] + ATTN_EPS;
  return tf.tensor3d(a, shape);
}
