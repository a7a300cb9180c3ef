/**
 * The spatial-broadcast image decoders (ImageDecoder in the original). Each slot's z is tiled
 * over a grid, a projected positional embedding is added, and a conv stack maps it to 4 channels:
 * sigmoid RGB means and one mask logit.
 *   small  (Tetrominoes, Multi-dSprites): grid (H+6)×(W+6), 5×5 convs without enough padding to
 *          keep the size (each trims 2), 32 channels, ReLU, then a 3×3 to 4 channels;
 *   iodine (CLEVR): grid (H+10)×(W+10), five unpadded 3×3 convs, 64 channels, ELU;
 *   big    (Slot Attention's): a 6×6 grid upsampled ×16 by four stride-2 transposed convs.
 */
import { tf } from '../tf';
import type { NetConfig } from '../config/net';
import { BIG_DECODER_GRID } from '../config/net';
import type { Ops } from '../ops';
import type { FusedActivation } from '../ops/conv';
import { runDecoderLayers, type DecoderLayerSpec, type DecoderSpec } from '../ops/decoder-stage';
import { paramKey } from '../params/spec';
import type { ParamStore } from '../params/store';
import { positionalEmbedding } from './positional';

export interface DecoderOutput {
  /** [n, H, W, 3] in (0,1) */
  rgb: tf.Tensor4D;
  /** [n, H, W, 1] mask logits */
  maskLogits: tf.Tensor4D;
}

export function decoderGrid(cfg: NetConfig): [number, number] {
  const [, H, W] = cfg.input_size;
  switch (cfg.image_decoder) {
    case 'small':
      return [H + 6, W + 6];
    case 'iodine':
      return [H + 10, W + 10];
    case 'big':
      return [BIG_DECODER_GRID, BIG_DECODER_GRID];
  }
}

/**
 * The decoder's layer stack (lib/ops/decoder-stage.ts) and its projected positional embedding
 * [gh, gw, z_size], from the parameters under `prefix` ('' for the Slot Attention baseline).
 */
export function decoderStack(p: ParamStore, ops: Ops, cfg: NetConfig, prefix = 'hvae_networks'): { spec: DecoderSpec; pos: tf.Tensor3D } {
  const [gh, gw] = decoderGrid(cfg);
  const d = paramKey(prefix, 'image_decoder');
  const grid = tf.tensor3d(positionalEmbedding(gh, gw), [gh, gw, 4]);
  const pos = ops.linear(grid, p.get(`${d}.pos_embed_projection.weight`), p.get(`${d}.pos_embed_projection.bias`)) as tf.Tensor3D;
  const weight = (i: number): tf.Tensor4D => p.get(`${d}.decode.${i}.weight`);
  const bias = (i: number): tf.Tensor1D => p.get(`${d}.decode.${i}.bias`);
  const conv = (i: number, pad: number, activation: FusedActivation): DecoderLayerSpec => ({ kind: 'conv', weight: weight(i), bias: bias(i), pad, activation });
  const convT = (i: number, stride: number, pad: number, outputPad: number, activation: FusedActivation): DecoderLayerSpec =>
    ({ kind: 'convTranspose', weight: weight(i), bias: bias(i), stride, pad, outputPad, activation });
  let layers: DecoderLayerSpec[];
  switch (cfg.image_decoder) {
    case 'small':
      // layer 0 straight from (z, positional embedding): see ops.broadcastConv2d
      layers = [{ kind: 'broadcastConv', weight: weight(0), bias: bias(0), pad: 1, activation: 'relu' }, conv(2, 1, 'relu'), conv(4, 1, 'relu'), conv(6, 1, 'linear')];
      break;
    case 'iodine':
      layers = [{ kind: 'broadcastConv', weight: weight(0), bias: bias(0), pad: 0, activation: 'elu' }, conv(2, 0, 'elu'), conv(4, 0, 'elu'), conv(6, 0, 'elu'), conv(8, 0, 'linear')];
      break;
    case 'big':
      layers = [{ kind: 'spatialBroadcast' }, ...[0, 2, 4, 6].map((i) => convT(i, 2, 2, 1, 'relu')), convT(8, 1, 2, 0, 'relu'), convT(10, 1, 1, 0, 'linear')];
      break;
  }
  return { spec: { layers }, pos };
}

/**
 * z: [n, z_size] -> per-slot RGB and mask logits. `prefix`: the module holding `image_decoder`
 * ('' for the Slot Attention baseline).
 */
export function decode(p: ParamStore, ops: Ops, cfg: NetConfig, z: tf.Tensor2D, prefix = 'hvae_networks'): DecoderOutput {
  const { spec, pos } = decoderStack(p, ops, cfg, prefix);
  const x = runDecoderLayers(ops, spec, z, pos);
  const [rgbLogits, maskLogits] = tf.split(x, [3, 1], 3);
  return { rgb: tf.sigmoid(rgbLogits) as tf.Tensor4D, maskLogits: maskLogits as tf.Tensor4D };
}
