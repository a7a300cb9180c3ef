/**
 * The image encoder as one op (HVAENetworks.encoder_pt_1/2 and the key/value maps in the
 * original): its convolutions (a conv stack), the projected positional embedding added to every
 * image, then per pixel LayerNorm, Linear + ReLU, Linear, and the keys and values
 *
 *   h = convs(x),  f = LN(h + pos W_posᵀ + b_pos),  f = ReLU(f W1ᵀ + b1) W2ᵀ + b2,
 *   k = f W_kᵀ,  v = f W_vᵀ   ([B, H·W, Z] each).
 *
 * encoderReference runs it on any Ops; on a GPU device (lib/ops/native.ts) the whole encoder is
 * one addon call each way with every activation kept on the device in between.
 */
import { tf } from '../tf';
import { addToEach } from './broadcast';
import type { ConvStackLayer } from './conv';
import type { Ops } from './index';

export interface EncoderArgs {
  /** the images NHWC [B, H, W, C]: data (no gradient is taken with respect to them) */
  x: tf.Tensor4D;
  convs: ConvStackLayer[];
  /** the positional grid [H, W, pc] of the last map (a constant) */
  pos: tf.Tensor3D;
  posWeight: tf.Tensor;
  posBias: tf.Tensor;
  lnWeight: tf.Tensor;
  lnBias: tf.Tensor;
  w1: tf.Tensor;
  b1: tf.Tensor;
  w2: tf.Tensor;
  b2: tf.Tensor;
  /** [Z, D], no bias */
  wk: tf.Tensor;
  /** [Z, D], no bias */
  wv: tf.Tensor;
}

export interface EncoderOutput {
  /** [B, H*W, Z] */
  k: tf.Tensor3D;
  /** [B, H*W, Z] */
  v: tf.Tensor3D;
}

/** The LayerNorm's ε (nn.LayerNorm's default, as in the original). */
export const ENCODER_LN_EPS = 1e-5;

export function encoderReference(ops: Ops, a: EncoderArgs): EncoderOutput {
  const h = ops.convStack(a.x, a.convs);
  const [B, H, W, D] = h.shape;
  const posProj = ops.linear(a.pos, a.posWeight, a.posBias);
  let f: tf.Tensor = addToEach(h, posProj).reshape([B, H * W, D]);
  f = ops.layerNorm(f, a.lnWeight, a.lnBias, ENCODER_LN_EPS);
  f = ops.linear(f, a.w1, a.b1, 'relu');
  f = ops.linear(f, a.w2, a.b2);
  return { k: ops.linear(f, a.wk) as tf.Tensor3D, v: ops.linear(f, a.wv) as tf.Tensor3D };
}
