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
  /**
   * Ops that run the encoder on a GPU device leave k and v there (EncoderOutput.resident) for their
   * slotCompetition, instead of copying them to host tensors; other ops ignore it. For callers
   * whose only use of k and v is the attention (the models).
   */
  keepOnDevice?: boolean;
}

/** The encoder's keys and values [B, H·W, Z] as tensors. */
export interface HostKeysValues {
  k: tf.Tensor3D;
  v: tf.Tensor3D;
  resident?: undefined;
}

/**
 * Keys and values [B, H·W, Z] that stay on the GPU device where the encoder made them: only that
 * device's slotCompetition reads them (and sums their gradients there).
 */
export interface ResidentKeysValues {
  readonly device: string;
  /** [B, H·W, Z] */
  readonly shape: readonly [number, number, number];
  /**
   * A one-element tensor standing for k and v on the gradient tape: the ops that read them take it
   * as an input, so that the encoder's backward pass runs after theirs. Its gradient carries no
   * values (dk and dv are summed on the device).
   */
  readonly token: tf.Tensor;
}

export type EncoderOutput = HostKeysValues | { k?: undefined; v?: undefined; resident: ResidentKeysValues };

/** k and v as tensors; a clear error when they were left on a device. */
export function hostKeysValues(kv: EncoderOutput, who: string): HostKeysValues {
  if (kv.resident) {
    throw new Error(`${who}: the keys and values are on ${kv.resident.device} (encoder keepOnDevice); use the ops of that device`);
  }
  return kv;
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
