/**
 * The image encoder (HVAENetworks.encoder_pt_1/2 in the original): four 5×5 convolutions with
 * ReLU, a projected positional embedding added, then LayerNorm + MLP per pixel; the attention
 * keys and values are linear maps of its output.
 */
import { tf } from '../tf';
import type { Ops } from '../ops';
import type { ParamStore } from '../params/store';
import { paramKey } from '../params/spec';
import { positionalEmbedding } from './positional';
import type { EncoderOutput } from '../ops/encoder-stage';

export type { EncoderOutput };

/**
 * x: images NHWC [B,H,W,C] in [-1,1] (the original feeds them to the encoder unscaled).
 * `prefix`: the module holding the encoder's parameters ('' for the Slot Attention baseline,
 * whose encoder sits at the top of its state_dict).
 */
export function encode(p: ParamStore, ops: Ops, x: tf.Tensor4D, prefix = 'hvae_networks'): EncoderOutput {
  const [, H, W] = x.shape;
  const e = paramKey(prefix, 'encoder_pt_1');
  const m = paramKey(prefix, 'encoder_pt_2');
  const pos = tf.tensor3d(positionalEmbedding(H, W), [H, W, 4]);
  return ops.encoder({
    x,
    convs: [0, 2, 4, 6].map((i) => ({ weight: p.get(`${e}.${i}.weight`), bias: p.get(`${e}.${i}.bias`), pad: 2, activation: 'relu' as const })),
    pos,
    posWeight: p.get(paramKey(prefix, 'pos_embed_projection.weight')),
    posBias: p.get(paramKey(prefix, 'pos_embed_projection.bias')),
    lnWeight: p.get(`${m}.0.weight`),
    lnBias: p.get(`${m}.0.bias`),
    w1: p.get(`${m}.1.weight`),
    b1: p.get(`${m}.1.bias`),
    w2: p.get(`${m}.3.weight`),
    b2: p.get(`${m}.3.bias`),
    wk: p.get(paramKey(prefix, 'to_k.weight')),
    wv: p.get(paramKey(prefix, 'to_v.weight')),
    // the models read k and v only through ops.slotCompetition
    attentionOnly: true,
  });
}
