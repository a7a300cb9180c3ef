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
import type { EncoderParams } from '../ops/device-params';

export type { EncoderOutput };

/** The encoder's parameters under `prefix`: the convolutions and the head's tensors (posWeight … wv), as the encoder stage takes them. */
export function encoderParams(p: ParamStore, prefix = 'hvae_networks'): EncoderParams {
  const e = paramKey(prefix, 'encoder_pt_1');
  const m = paramKey(prefix, 'encoder_pt_2');
  return {
    convs: [0, 2, 4, 6].map((i) => ({ weight: p.get(`${e}.${i}.weight`), bias: p.get(`${e}.${i}.bias`) })),
    head: [
      p.get(paramKey(prefix, 'pos_embed_projection.weight')), p.get(paramKey(prefix, 'pos_embed_projection.bias')),
      p.get(`${m}.0.weight`), p.get(`${m}.0.bias`), p.get(`${m}.1.weight`), p.get(`${m}.1.bias`), p.get(`${m}.3.weight`), p.get(`${m}.3.bias`),
      p.get(paramKey(prefix, 'to_k.weight')), p.get(paramKey(prefix, 'to_v.weight')),
    ],
  };
}

/**
 * x: images NHWC [B,H,W,C] in [-1,1] (the original feeds them to the encoder unscaled).
 * `prefix`: the module holding the encoder's parameters ('' for the Slot Attention baseline,
 * whose encoder sits at the top of its state_dict).
 */
export function encode(p: ParamStore, ops: Ops, x: tf.Tensor4D, prefix = 'hvae_networks'): EncoderOutput {
  const [, H, W] = x.shape;
  const { convs, head } = encoderParams(p, prefix);
  const [posWeight, posBias, lnWeight, lnBias, w1, b1, w2, b2, wk, wv] = head;
  return ops.encoder({
    x,
    convs: convs.map((c) => ({ ...c, pad: 2, activation: 'relu' as const })),
    pos: tf.tensor3d(positionalEmbedding(H, W), [H, W, 4]),
    posWeight, posBias, lnWeight, lnBias, w1, b1, w2, b2, wk, wv,
    // the models read k and v only through ops.slotCompetition
    attentionOnly: true,
  });
}
