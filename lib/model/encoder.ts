/**
 * The image encoder (HVAENetworks.encoder_pt_1/2 in the original): four 5×5 convolutions with
 * ReLU, a projected positional embedding added, then LayerNorm + MLP per pixel; the attention
 * keys and values are linear maps of its output.
 */
import { tf } from '../tf';
import type { Ops } from '../ops';
import type { ParamStore } from '../params/store';
import { ENC_CH, paramKey } from '../params/spec';
import { positionalEmbedding } from './positional';
import { addToEach } from '../ops/broadcast';

export interface EncoderOutput {
  /** [B, H*W, z] */
  k: tf.Tensor3D;
  /** [B, H*W, z] */
  v: tf.Tensor3D;
}

/**
 * x: images NHWC [B,H,W,C] in [-1,1] (the original feeds them to the encoder unscaled).
 * `prefix`: the module holding the encoder's parameters ('' for the Slot Attention baseline,
 * whose encoder sits at the top of its state_dict).
 */
export function encode(p: ParamStore, ops: Ops, x: tf.Tensor4D, prefix = 'hvae_networks'): EncoderOutput {
  const [B, H, W] = x.shape;
  const e = paramKey(prefix, 'encoder_pt_1');
  const h = ops.convStack(x, [0, 2, 4, 6].map((i) => ({ weight: p.get(`${e}.${i}.weight`), bias: p.get(`${e}.${i}.bias`), pad: 2, activation: 'relu' as const })));
  const pos = tf.tensor3d(positionalEmbedding(H, W), [H, W, 4]);
  const posProj = ops.linear(pos, p.get(paramKey(prefix, 'pos_embed_projection.weight')), p.get(paramKey(prefix, 'pos_embed_projection.bias')));
  let f: tf.Tensor = addToEach(h, posProj).reshape([B, H * W, ENC_CH]);
  const m = paramKey(prefix, 'encoder_pt_2');
  f = ops.layerNorm(f, p.get(`${m}.0.weight`), p.get(`${m}.0.bias`));
  f = ops.linear(f, p.get(`${m}.1.weight`), p.get(`${m}.1.bias`), 'relu');
  f = ops.linear(f, p.get(`${m}.3.weight`), p.get(`${m}.3.bias`));
  return {
    k: ops.linear(f, p.get(paramKey(prefix, 'to_k.weight'))) as tf.Tensor3D,
    v: ops.linear(f, p.get(paramKey(prefix, 'to_v.weight'))) as tf.Tensor3D,
  };
}
