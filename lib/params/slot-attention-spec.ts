/**
 * Every tensor of the original Slot Attention baseline's state_dict (class SlotAttention in
 * lib/model.py): its name, PyTorch shape and how the original initialises it.
 *
 * Initialisation, as the original does it:
 * - only the image decoder goes through init_weights(..., 'xavier'): Xavier-normal with gain 0.02
 *   on every convolution and on its positional projection, zero biases;
 * - everything else keeps PyTorch's defaults: nn.Linear and nn.Conv2d (kaiming_uniform with
 *   a = sqrt(5)) give U(±1/sqrt(fan_in)) for weight and bias; nn.GRU U(±1/sqrt(H));
 *   LayerNorm weight 1, bias 0;
 * - init_slots = [0…0, 1…1] (the mean, then the softplus parameter, of the initial slots).
 *
 * Names are the original's (no `hvae_networks.` prefix: the modules sit at the top level).
 */
import type { NetConfig } from '../config/net';
import { ENC_CH, MLP_HIDDEN, type Init, type ParamSpec } from './spec';

const XAVIER: Init = { kind: 'xavier', gain: 0.02 };
const ZERO: Init = { kind: 'const', value: 0 };
const ONE: Init = { kind: 'const', value: 1 };

/** The Slot Attention baseline's parameters; only K, z_size, input_size and image_decoder matter. */
export function slotAttentionParamSpecs(cfg: NetConfig): ParamSpec[] {
  const z = cfg.z_size;
  const C = cfg.input_size[0];
  const specs: ParamSpec[] = [];
  const add = (name: string, shape: number[], init: Init): void => {
    specs.push({ name, shape, init, trainable: true });
  };
  const uniform = (fanIn: number): Init => ({ kind: 'uniform', bound: 1 / Math.sqrt(fanIn) });
  /** nn.Linear with PyTorch's default initialisation */
  const linear = (name: string, out: number, inp: number, bias = true): void => {
    add(`${name}.weight`, [out, inp], uniform(inp));
    if (bias) add(`${name}.bias`, [out], uniform(inp));
  };
  /** nn.Conv2d with PyTorch's default initialisation */
  const conv = (name: string, out: number, inp: number, k: number): void => {
    add(`${name}.weight`, [out, inp, k, k], uniform(inp * k * k));
    add(`${name}.bias`, [out], uniform(inp * k * k));
  };
  const layerNorm = (name: string, dim: number): void => {
    add(`${name}.weight`, [dim], ONE);
    add(`${name}.bias`, [dim], ZERO);
  };
  const xavierConv = (name: string, out: number, inp: number, k: number): void => {
    add(`${name}.weight`, [out, inp, k, k], XAVIER);
    add(`${name}.bias`, [out], ZERO);
  };
  const xavierConvT = (name: string, inp: number, out: number, k: number): void => {
    add(`${name}.weight`, [inp, out, k, k], XAVIER);
    add(`${name}.bias`, [out], ZERO);
  };

  // state_dict order: the module's own parameter first, then its submodules in definition order
  add('init_slots', [1, 2 * z], { kind: 'init_posterior' });
  linear('pos_embed_projection', ENC_CH, 4);
  conv('encoder_pt_1.0', ENC_CH, C, 5);
  conv('encoder_pt_1.2', ENC_CH, ENC_CH, 5);
  conv('encoder_pt_1.4', ENC_CH, ENC_CH, 5);
  conv('encoder_pt_1.6', ENC_CH, ENC_CH, 5);
  layerNorm('encoder_pt_2.0', ENC_CH);
  linear('encoder_pt_2.1', ENC_CH, ENC_CH);
  linear('encoder_pt_2.3', ENC_CH, ENC_CH);
  layerNorm('norm_slots', z);
  layerNorm('norm_pre_ff', z);
  linear('to_q', z, z, false);
  linear('to_k', z, ENC_CH, false);
  linear('to_v', z, ENC_CH, false);
  linear('mlp.0', MLP_HIDDEN, z);
  linear('mlp.2', z, MLP_HIDDEN);
  const g = uniform(z);
  add('gru.weight_ih_l0', [3 * z, z], g);
  add('gru.weight_hh_l0', [3 * z, z], g);
  add('gru.bias_ih_l0', [3 * z], g);
  add('gru.bias_hh_l0', [3 * z], g);

  const d = 'image_decoder';
  switch (cfg.image_decoder) {
    case 'small':
      xavierConv(`${d}.decode.0`, 32, z, 5);
      xavierConv(`${d}.decode.2`, 32, 32, 5);
      xavierConv(`${d}.decode.4`, 32, 32, 5);
      xavierConv(`${d}.decode.6`, 4, 32, 3);
      break;
    case 'iodine':
      xavierConv(`${d}.decode.0`, 64, z, 3);
      xavierConv(`${d}.decode.2`, 64, 64, 3);
      xavierConv(`${d}.decode.4`, 64, 64, 3);
      xavierConv(`${d}.decode.6`, 64, 64, 3);
      xavierConv(`${d}.decode.8`, 4, 64, 3);
      break;
    case 'big':
      xavierConvT(`${d}.decode.0`, z, 64, 5);
      xavierConvT(`${d}.decode.2`, 64, 64, 5);
      xavierConvT(`${d}.decode.4`, 64, 64, 5);
      xavierConvT(`${d}.decode.6`, 64, 64, 5);
      xavierConvT(`${d}.decode.8`, 64, 64, 5);
      xavierConvT(`${d}.decode.10`, 64, 4, 3);
      break;
  }
  add(`${d}.pos_embed_projection.weight`, [z, 4], XAVIER);
  add(`${d}.pos_embed_projection.bias`, [z], ZERO);
  return specs;
}
