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
   * The caller reads k and v only through ops.slotCompetition (the models): the native ops then
   * keep them where they made them (a GPU device's memory, or the CPU kernels' arrays) and return
   * EncoderOutput.resident, and the attention rounds sum dk and dv there for the encoder's
   * backward pass; the TypeScript ops ignore it.
   */
  attentionOnly?: boolean;
}

/** The encoder's keys and values [B, H·W, Z] as tensors. */
export interface HostKeysValues {
  k: tf.Tensor3D;
  v: tf.Tensor3D;
  resident?: undefined;
}

/**
 * Keys and values [B, H·W, Z] kept by the ops that made them (EncoderArgs.attentionOnly): only
 * those ops' slotCompetition reads them (and sums their gradients where they are).
 */
export interface ResidentKeysValues {
  /** where they are: 'cpu' (the CPU kernels' arrays) or a GPU device */
  readonly device: string;
  /** [B, H·W, Z] */
  readonly shape: readonly [number, number, number];
  /**
   * A one-element tensor standing for k and v on the gradient tape: the ops that read them take it
   * as an input, so that the encoder's backward pass runs after theirs. Its gradient carries no
   * values (dk and dv are summed where k and v are).
   */
  readonly token: tf.Tensor;
}

export type EncoderOutput = HostKeysValues | { k?: undefined; v?: undefined; resident: ResidentKeysValues };

/** k and v as tensors; a clear error when they were left on a device. */
export function hostKeysValues(kv: EncoderOutput, who: string): HostKeysValues {
  if (kv.resident) {
    throw new Error(`${who}: the keys and values are kept by the ops that made them, on ${kv.resident.device} (encoder attentionOnly); attend with those ops`);
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
