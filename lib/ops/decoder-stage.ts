/**
 * A decoding stage as one op: the spatial-broadcast decoder's layer stack applied to the slot
 * latents, then the image likelihood of its output,
 *
 *   raw = layers(z, pos)                 [B·K, H, W, C+1]: C colour logits, one mask logit
 *   μ = sigmoid(raw[..., :C]),  log m = log_softmax over slots of raw[..., C]
 *   nll_b = Gaussian or GMM negative log-likelihood of image b (lib/model/likelihoods.ts)
 *
 * This module holds the description of a layer stack (DecoderSpec), the stack itself on any Ops
 * (runDecoderLayers, used by every decode), and the reference decoderNll in plain ops. The native
 * decoderNll (lib/ops/native.ts) runs the same stage in one addon call that also takes its whole
 * backward pass at once, for a unit upstream gradient of every image's nll, which is why the
 * caller says up front which gradients it will ask for.
 */
import { tf } from '../tf';
import { gaussianNll, gmmNll } from '../model/likelihoods';
import type { Ops } from './index';
import type { FusedActivation } from './conv';

export type DecoderLayerSpec =
  /** conv2d(spatialBroadcast(z, pos)) without forming the broadcast map (Ops.broadcastConv2d) */
  | { kind: 'broadcastConv'; weight: tf.Tensor4D; bias: tf.Tensor1D; pad: number; activation: FusedActivation }
  /** z tiled over the grid plus pos (Ops.spatialBroadcast) */
  | { kind: 'spatialBroadcast' }
  | { kind: 'conv'; weight: tf.Tensor4D; bias: tf.Tensor1D; pad: number; activation: FusedActivation }
  | { kind: 'convTranspose'; weight: tf.Tensor4D; bias: tf.Tensor1D; stride: number; pad: number; outputPad: number; activation: FusedActivation };

export interface DecoderSpec {
  layers: DecoderLayerSpec[];
}

/** The layer stack on `ops`: z [n, c] and the projected positional embedding pos [gh, gw, c] → raw [n, H, W, C+1]. */
export function runDecoderLayers(ops: Ops, spec: DecoderSpec, z: tf.Tensor2D, pos: tf.Tensor3D): tf.Tensor4D {
  let x: tf.Tensor4D | null = null;
  for (const L of spec.layers) {
    switch (L.kind) {
      case 'broadcastConv':
        x = ops.broadcastConv2d(z, pos, L.weight, L.bias, { pad: L.pad, activation: L.activation });
        break;
      case 'spatialBroadcast':
        x = ops.spatialBroadcast(z, pos);
        break;
      case 'conv':
        if (!x) throw new Error('decoder: a convolution cannot be the first layer');
        x = ops.conv2d(x, L.weight, L.bias, { pad: L.pad, activation: L.activation });
        break;
      case 'convTranspose':
        if (!x) throw new Error('decoder: a transposed convolution cannot be the first layer');
        x = ops.convTranspose2d(x, L.weight, L.bias, { stride: L.stride, pad: L.pad, outputPad: L.outputPad, activation: L.activation });
        break;
    }
  }
  if (!x) throw new Error('decoder: no layers');
  return x;
}

/** Which gradients the caller will take through the stage. */
export type StageGrads = 'none' | 'input' | 'all';

export interface DecoderNllArgs {
  spec: DecoderSpec;
  /** slot latents [B·K, c] (image-major) */
  z: tf.Tensor2D;
  /** projected positional embedding [gh, gw, c] */
  pos: tf.Tensor3D;
  /** the images [B, H, W, C] in [0, 1] (a constant: no gradient) */
  target: tf.Tensor4D;
  K: number;
  /** 2·log_scale, as a float32 value */
  logVar: number;
  likelihood: 'Gaussian' | 'GMM';
  /**
   * 'none': no gradient will be taken; 'input': only d/dz (the refinement's inner gradient);
   * 'all': d/dz, d/dpos and the layers' weights and biases.
   */
  grads: StageGrads;
  /** also return the per-slot means and log masks */
  outputs: boolean;
}

export interface DecoderNllResult {
  /** per-image negative log-likelihood [B] */
  nll: tf.Tensor1D;
  /** μ [B, K, H, W, C] (when outputs were asked for) */
  means?: tf.Tensor5D;
  /** log m [B, K, H, W, 1] (when outputs were asked for) */
  logMasks?: tf.Tensor5D;
}

/** Splits raw [B·K, H, W, C+1] into μ [B,K,H,W,C] and log m [B,K,H,W,1]. */
export function meansAndLogMasks(raw: tf.Tensor4D, B: number, K: number): { means: tf.Tensor5D; logMasks: tf.Tensor5D } {
  const [, H, W, C1] = raw.shape;
  const [rgbLogits, maskLogits] = tf.split(raw, [C1 - 1, 1], 3);
  const means = tf.sigmoid(rgbLogits).reshape([B, K, H, W, C1 - 1]) as tf.Tensor5D;
  const logits = maskLogits.reshape([B, K, H, W, 1]);
  const logMasks = tf.sub(logits, tf.logSumExp(logits, 1, true)) as tf.Tensor5D;
  return { means, logMasks };
}

/** Checks the shapes every implementation relies on; returns B. */
export function checkDecoderNllArgs(a: DecoderNllArgs): number {
  const [B, , , C] = a.target.shape;
  if (!Number.isInteger(a.K) || a.K < 1) throw new Error(`decoderNll: K must be an integer >= 1, got ${a.K}`);
  if (a.z.shape[0] !== B * a.K) throw new Error(`decoderNll: z has ${a.z.shape[0]} rows but the target's ${B} images x K=${a.K} slots need ${B * a.K}`);
  if (a.pos.shape[2] !== a.z.shape[1]) throw new Error(`decoderNll: z has ${a.z.shape[1]} channels, the positional embedding [${a.pos.shape}] ${a.pos.shape[2]}`);
  if (!Number.isFinite(a.logVar)) throw new Error(`decoderNll: logVar must be finite, got ${a.logVar}`);
  if (C < 1) throw new Error(`decoderNll: the target [${a.target.shape}] has no channels`);
  return B;
}

/** The reference: the stack on `ops`, then the likelihood in tfjs ops (gradients by tfjs autodiff). */
export function decoderNllReference(ops: Ops, a: DecoderNllArgs): DecoderNllResult {
  const B = checkDecoderNllArgs(a);
  const raw = runDecoderLayers(ops, a.spec, a.z, a.pos);
  const [, H, W, C1] = raw.shape;
  const [, th, tw, tc] = a.target.shape;
  if (H !== th || W !== tw || C1 !== tc + 1) throw new Error(`decoderNll: the decoder's output [${raw.shape}] does not fit the target [${a.target.shape}] (+1 mask channel)`);
  const { means, logMasks } = meansAndLogMasks(raw, B, a.K);
  const likelihood = a.likelihood === 'GMM' ? gmmNll : gaussianNll;
  const nll = likelihood(a.target, means, logMasks, tf.scalar(Math.fround(a.logVar)));
  return a.outputs ? { nll, means, logMasks } : { nll };
}
