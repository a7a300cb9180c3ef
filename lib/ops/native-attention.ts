/**
 * slotCompetition (lib/ops/attention.ts) with the three batched products on the addon's GEMM and
 * the softmax over slots, the ε and the renormalisation over pixels as single native passes
 * (native/attention.h), forward and backward, instead of a dozen broadcasting tfjs ops and their
 * gradients. With p the softmax,
 * a = p + ε, s = Σ_pixels a and w = a / s:
 *
 *   d/dw = dU vᵀ,  dv = wᵀ dU,  d/da = (d/dw − Σ_pixels (d/dw) w) / s,
 *   d/ddots = p (d/da − Σ_slots p d/da),  dq = (d/ddots) k,  dk = (d/ddots)ᵀ q.
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
  const dv = v.shape[2];
  if (k.shape[0] !== B || k.shape[2] !== d) throw new Error(`slotCompetition: keys [${k.shape}] do not fit queries [${q.shape}]`);
  if (v.shape[0] !== B || v.shape[1] !== N) throw new Error(`slotCompetition: values [${v.shape}] do not fit keys [${k.shape}]`);
  const m = addonOps();
  let attnOut: Float32Array | null = null;
  const op = tf.customGrad((qt, kt, vt, save) => {
    const qd = f32(qt as tf.Tensor), kd = f32(kt as tf.Tensor), vd = f32(vt as tf.Tensor);
    const dots = m.matmul(qd, [B, K, d], kd, [B, N, d], false, true);
    // the softmax over slots, a = p + ε, s = Σ_pixels a, w = a / s (native/attention.h)
    const { p, a, w, s } = m.slotSoftmax({ dots, B, K, N, eps: ATTN_EPS });
    attnOut = a;
    const updates = m.matmul(w, [B, K, N], vd, [B, N, dv], false, false);
    (save as tf.GradSaveFunc)([qt as tf.Tensor, kt as tf.Tensor, vt as tf.Tensor]);
    return {
      value: tf.tensor3d(updates, [B, K, dv]),
      gradFunc: (dy: tf.Tensor, saved: tf.Tensor[]) => {
        const g = f32(dy);
        const q2 = f32(saved[0]), k2 = f32(saved[1]), v2 = f32(saved[2]);
        const dW = m.matmul(g, [B, K, dv], v2, [B, N, dv], false, true); // [B,K,N]
        const dV = m.matmul(w, [B, K, N], g, [B, K, dv], true, false); // [B,N,dv]
        const dd = m.slotSoftmaxBackward({ g: dW, w, p, s, B, K, N }); // d/ddots
        const dQ = m.matmul(dd, [B, K, N], k2, [B, N, d], false, false);
        const dK = m.matmul(dd, [B, K, N], q2, [B, K, d], true, false);
        return [tf.tensor3d(dQ, [B, K, d]), tf.tensor3d(dK, [B, N, d]), tf.tensor3d(dV, [B, N, dv])];
      },
    };
  });
  const updates = op(q, k, v) as tf.Tensor3D;
  return { attn: keepAttn ? tf.tensor3d(attnOut!, [B, K, N]) : undefined, updates };
}
