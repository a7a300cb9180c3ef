/**
 * slotCompetition (lib/ops/attention.ts) on the CPU as one fused addon call each way
 * (native/attention.h): per image, one pass over the pixels computes the softmax over slots, the
 * renormalisation over pixels and the updates; the backward pass, with p the softmax,
 * a = p + ε, s = Σ_pixels a, w = a / s and U the updates,
 *
 *   dW = dU vᵀ,  d/da = (dW − dU·U) / s,  d/ddots = p (d/da − Σ_slots p d/da),
 *   dq = (d/ddots) k,  dk = (d/ddots)ᵀ q,  dv = wᵀ dU.
 *
 * On keys and values the CPU encoder kept (CpuKeysValues), dk and dv are added onto its sums.
 * `attn` is a plain tensor (no gradient through it), as the interface allows.
 */
import { tf } from '../tf';
import { f32 } from './arrays';
import { addonOps } from './addon';
import { ATTN_EPS, type SlotCompetition } from './attention';
import { hostKeysValues, type EncoderOutput } from './encoder-stage';
import { CpuKeysValues } from './kept-kv';

export function slotCompetition(q: tf.Tensor3D, kv: EncoderOutput, keepAttn = true): SlotCompetition {
  const kept = kv.resident;
  if (kept && !(kept instanceof CpuKeysValues)) {
    throw new Error(`slotCompetition on the CPU: the keys and values are kept on ${kept.device} by other ops`);
  }
  const host = kept ? null : hostKeysValues(kv, 'slotCompetition');
  const [B, K, d] = q.shape;
  const kShape = kept ? kept.shape : host!.k.shape;
  const vShape = kept ? kept.shape : host!.v.shape;
  const N = kShape[1], C = vShape[2];
  if (kShape[0] !== B || kShape[2] !== d) throw new Error(`slotCompetition: keys [${kShape}] do not fit queries [${q.shape}]`);
  if (vShape[0] !== B || vShape[1] !== N) throw new Error(`slotCompetition: values [${vShape}] do not fit keys [${kShape}]`);
  const m = addonOps();
  let p: Float32Array | null = null;
  // on kept keys and values the op's inputs are q and the token, and dk, dv are summed in place
  const op = tf.customGrad((...args) => {
    const save = args.pop() as tf.GradSaveFunc;
    const t = args as tf.Tensor[];
    const spec = { q: f32(t[0]), k: kept ? kept.k : f32(t[1]), v: kept ? kept.v : f32(t[2]), B, K, N, d, C, eps: ATTN_EPS };
    const f = m.slotAttention(spec);
    p = f.p;
    save([]);
    return {
      value: tf.tensor3d(f.updates, [B, K, C]),
      gradFunc: (dy: tf.Tensor) => {
        const back = { ...spec, p: f.p, s: f.s, updates: f.updates, dU: f32(dy) };
        if (kept) {
          const sums = kept.sums();
          const g = m.slotAttentionBackward({ ...back, dkInto: sums.dk, dvInto: sums.dv });
          return [tf.tensor3d(g.dq, [B, K, d]), tf.zeros(t[1].shape)];
        }
        const g = m.slotAttentionBackward(back);
        return [tf.tensor3d(g.dq, [B, K, d]), tf.tensor3d(g.dk!, [B, N, d]), tf.tensor3d(g.dv!, [B, N, C])];
      },
    };
  });
  const updates = (kept ? op(q, kept.token) : op(q, host!.k, host!.v)) as tf.Tensor3D;
  return { attn: keepAttn ? attnOf(p!, [B, K, N]) : undefined, updates };
}

/** attn = p + ε (the softmax before the renormalisation over pixels), as a tensor. */
export function attnOf(p: Float32Array, shape: [number, number, number]): tf.Tensor3D {
  const a = new Float32Array(p.length);
  for (let i = 0; i < a.length; i++) a[i] = p[i] + ATTN_EPS;
  return tf.tensor3d(a, shape);
}
