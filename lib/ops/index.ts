/**
 * The hot-path ops behind one interface. The model calls these through an `Ops` object, so that
 * a native implementation (the addon) can be dropped in without touching the model code.
 */
import type { tf } from '../tf';
import { broadcastConv2d, spatialBroadcast } from './broadcast';
import { conv2d, convStackWith, convTranspose2d, withoutParamGrads, type ConvStackLayer } from './conv';
import { slotCompetition } from './attention';
import { decoderNllReference, type DecoderNllArgs, type DecoderNllResult, type DecoderSpec } from './decoder-stage';
import { encoderReference, type EncoderArgs, type EncoderOutput } from './encoder-stage';
import { dualGruCell, elu, gruCell, layerNorm, linear } from './nn';
import type { StageDevice } from './addon';
import { jsGaussianKernels, type GaussianKernels } from '../model/priors';

export interface Ops {
  conv2d: typeof conv2d;
  convTranspose2d: typeof convTranspose2d;
  /** conv2d layer after layer (the encoder's stack; on a GPU device one stage with its maps kept there) */
  convStack(x: tf.Tensor4D, layers: ConvStackLayer[]): tf.Tensor4D;
  /** z [n,c] tiled over a grid plus a positional embedding [gh,gw,c] */
  spatialBroadcast: typeof spatialBroadcast;
  /** conv2d(spatialBroadcast(z, pos)) without forming the broadcast map (the decoders' first layer) */
  broadcastConv2d: typeof broadcastConv2d;
  linear: typeof linear;
  layerNorm: typeof layerNorm;
  elu: typeof elu;
  gruCell: typeof gruCell;
  dualGruCell: typeof dualGruCell;
  /**
   * The element loops of the diagonal Gaussians' ops (model/priors.ts): σ = sqrt(softplus(min(s, 80))
   * + 1e-5) and KL(q ‖ p) summed over z, each way
   */
  gaussian: GaussianKernels;
  /** Runs a forward+backward pass in which parameter gradients are not needed (may skip them). */
  withoutParamGrads: typeof withoutParamGrads;
  /**
   * softmax over slots of q kᵀ + ε, and the attn-renormalised mean of v per slot (attention.ts), on
   * the encoder's keys and values (kept on a device by that device's encoder, when asked to)
   */
  slotCompetition: typeof slotCompetition;
  /** A decoding stage: the decoder's layer stack and the image likelihood of its output (decoder-stage.ts) */
  decoderNll(args: DecoderNllArgs): DecoderNllResult;
  /**
   * The layer stack for the several decoding stages of one pass on the positional embedding `pos`
   * (decoderNll with this spec and that pos): the native ops sum the stages' gradients of the
   * weights and the embedding themselves and give them to the tape once; the reference returns
   * `spec` as it is.
   */
  shareDecoderWeights(spec: DecoderSpec, pos: tf.Tensor3D): DecoderSpec;
  /** The image encoder: convolutions, positional embedding, LayerNorm + MLP, keys and values (encoder-stage.ts) */
  encoder(args: EncoderArgs): EncoderOutput;
  /**
   * GPU ops only: their device, where the decoder's, the encoder's and the GRUs' weights can stay with their
   * optimizer step (device-params.ts DeviceParams)
   */
  paramsDevice?: StageDevice;
}

/** The reference implementation: tfjs ops plus TypeScript im2col/GEMM convolutions. */
export const tfjsOps: Ops = {
  conv2d,
  convTranspose2d,
  convStack: (x, layers) => convStackWith(tfjsOps.conv2d, x, layers),
  spatialBroadcast,
  broadcastConv2d,
  linear,
  layerNorm,
  elu,
  gruCell,
  dualGruCell,
  gaussian: jsGaussianKernels,
  withoutParamGrads,
  slotCompetition,
  decoderNll: (args) => decoderNllReference(tfjsOps, args),
  shareDecoderWeights: (spec) => spec,
  encoder: (args) => encoderReference(tfjsOps, args),
};

export type { ConvOptions, ConvTransposeOptions, ConvStackLayer } from './conv';
export type { EncoderArgs, EncoderOutput, HostKeysValues, ResidentKeysValues } from './encoder-stage';
export type { SlotCompetition } from './attention';
export type { GruWeights, DualGruWeights } from './nn';
