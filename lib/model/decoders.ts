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
 * z: [n, z_size] -> per-slot RGB and mask logits. `prefix`: the module holding `image_decoder`
 * ('' for the Slot Attention baseline).
 */
export function decode(p: ParamStore, ops: Ops, cfg: NetConfig, z: tf.Tensor2D, prefix = 'hvae_networks'): DecoderOutput {
  const [gh, gw] = decoderGrid(cfg);
  const d = paramKey(prefix, 'image_decoder');
  const pos = tf.tensor3d(positionalEmbedding(gh, gw), [gh, gw, 4]);
  const posProj = ops.linear(pos, p.get(`${d}.pos_embed_projection.weight`), p.get(`${d}.pos_embed_projection.bias`));
  const w = (i: number): tf.Tensor4D => p.get(`${d}.decode.${i}.weight`);
  const b = (i: number): tf.Tensor1D => p.get(`${d}.decode.${i}.bias`);
  let x: tf.Tensor4D;
  switch (cfg.image_decoder) {
    case 'small':
      // layer 0 straight from (z, positional embedding): see ops.broadcastConv2d
      x = ops.broadcastConv2d(z, posProj as tf.Tensor3D, w(0), b(0), { pad: 1, activation: 'relu' });
      for (const i of [2, 4]) x = ops.conv2d(x, w(i), b(i), { pad: 1, activation: 'relu' });
      x = ops.conv2d(x, w(6), b(6), { pad: 1 });
      break;
    case 'iodine':
      x = ops.broadcastConv2d(z, posProj as tf.Tensor3D, w(0), b(0), { activation: 'elu' });
      for (const i of [2, 4, 6]) x = ops.conv2d(x, w(i), b(i), { activation: 'elu' });
      x = ops.conv2d(x, w(8), b(8));
      break;
    case 'big':
      x = ops.spatialBroadcast(z, posProj as tf.Tensor3D);
      for (const i of [0, 2, 4, 6]) x = ops.convTranspose2d(x, w(i), b(i), { stride: 2, pad: 2, outputPad: 1, activation: 'relu' });
      x = ops.convTranspose2d(x, w(8), b(8), { stride: 1, pad: 2, activation: 'relu' });
      x = ops.convTranspose2d(x, w(10), b(10), { stride: 1, pad: 1 });
      break;
  }
  const [rgbLogits, maskLogits] = tf.split(x, [3, 1], 3);
  return { rgb: tf.sigmoid(rgbLogits) as tf.Tensor4D, maskLogits: maskLogits as tf.Tensor4D };
}
