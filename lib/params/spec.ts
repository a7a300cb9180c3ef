/**
 * Every tensor of the original EfficientMORL state_dict for a config: its name, its PyTorch
 * shape, and how the original initialises it.
 *
 * Initialisation, as lib/model.py does it:
 * - init_weights(..., 'xavier') — Xavier-normal with gain 0.02 and zero bias — on the encoder
 *   convolutions and MLP, to_q/k/v, the residual MLPs, the whole image decoder (its positional
 *   projection included), the prior MLP, project_update, and the refinement MLP and heads;
 * - the DualGRU cell draws every weight and bias from a standard normal (torch.randn);
 * - the rest keeps PyTorch's defaults: nn.GRU U(±1/sqrt(H)); the encoder's positional projection
 *   (an nn.Linear never passed to init_weights) U(±1/sqrt(fan_in)) for weight and bias;
 *   LayerNorm weight 1, bias 0;
 * - init_posterior = [0…0, 1…1]; geco_C_ema = 0, geco_beta = 0.55 (buffers-like, not trained).
 */
import type { NetConfig } from '../config/net';

export type Init =
  | { kind: 'xavier'; gain: number }
  | { kind: 'uniform'; bound: number }
  | { kind: 'normal'; std: number }
  | { kind: 'const'; value: number }
  | { kind: 'init_posterior' };

export interface ParamSpec {
  name: string;
  shape: number[];
  init: Init;
  /** false for the GECO state the original keeps as requires_grad=False parameters */
  trainable: boolean;
}

const XAVIER: Init = { kind: 'xavier', gain: 0.02 };
const ZERO: Init = { kind: 'const', value: 0 };
const ONE: Init = { kind: 'const', value: 1 };

/** A state_dict key inside module `prefix` ('' is the top level). */
export function paramKey(prefix: string, name: string): string {
  return prefix === '' ? name : `${prefix}.${name}`;
}

/** The width of the encoder's feature maps (fixed in the original). */
export const ENC_CH = 64;
/** The hidden width of the prior and refinement MLPs (fixed in the original). */
export const MLP_HIDDEN = 128;

export function netParamSpecs(cfg: NetConfig): ParamSpec[] {
  const z = cfg.z_size;
  const C = cfg.input_size[0];
  const specs: ParamSpec[] = [];
  const add = (name: string, shape: number[], init: Init, trainable = true): void => {
    specs.push({ name, shape, init, trainable });
  };
  const xavierLinear = (name: string, out: number, inp: number, bias = true): void => {
    add(`${name}.weight`, [out, inp], XAVIER);
    if (bias) add(`${name}.bias`, [out], ZERO);
  };
  const layerNorm = (name: string, dim: number): void => {
    add(`${name}.weight`, [dim], ONE);
    add(`${name}.bias`, [dim], ZERO);
  };
  const conv = (name: string, out: number, inp: number, k: number): void => {
    add(`${name}.weight`, [out, inp, k, k], XAVIER);
    add(`${name}.bias`, [out], ZERO);
  };
  const convT = (name: string, inp: number, out: number, k: number): void => {
    add(`${name}.weight`, [inp, out, k, k], XAVIER);
    add(`${name}.bias`, [out], ZERO);
  };
  const torchGru = (name: string, inp: number, hidden: number): void => {
    const b = { kind: 'uniform', bound: 1 / Math.sqrt(hidden) } as const;
    add(`${name}.weight_ih_l0`, [3 * hidden, inp], b);
    add(`${name}.weight_hh_l0`, [3 * hidden, hidden], b);
    add(`${name}.bias_ih_l0`, [3 * hidden], b);
    add(`${name}.bias_hh_l0`, [3 * hidden], b);
  };

  add('geco_C_ema', [], ZERO, false);
  add('geco_beta', [], { kind: 'const', value: 0.55 }, false);

  const h = 'hvae_networks';
  add(`${h}.init_posterior`, [1, 2 * z], { kind: 'init_posterior' });
  const pb = { kind: 'uniform', bound: 1 / Math.sqrt(4) } as const;
  add(`${h}.pos_embed_projection.weight`, [ENC_CH, 4], pb);
  add(`${h}.pos_embed_projection.bias`, [ENC_CH], pb);
  conv(`${h}.encoder_pt_1.0`, ENC_CH, C, 5);
  conv(`${h}.encoder_pt_1.2`, ENC_CH, ENC_CH, 5);
  conv(`${h}.encoder_pt_1.4`, ENC_CH, ENC_CH, 5);
  conv(`${h}.encoder_pt_1.6`, ENC_CH, ENC_CH, 5);
  layerNorm(`${h}.encoder_pt_2.0`, ENC_CH);
  xavierLinear(`${h}.encoder_pt_2.1`, ENC_CH, ENC_CH);
  xavierLinear(`${h}.encoder_pt_2.3`, ENC_CH, ENC_CH);
  layerNorm(`${h}.norm_slots`, z);
  layerNorm(`${h}.norm_mu_pre_ff`, z);
  layerNorm(`${h}.norm_softplus_pre_ff`, z);
  xavierLinear(`${h}.to_q`, z, z, false);
  xavierLinear(`${h}.to_k`, z, ENC_CH, false);
  xavierLinear(`${h}.to_v`, z, ENC_CH, false);
  if (cfg.use_DualGRU) {
    const n = { kind: 'normal', std: 1 } as const;
    const g = `${h}.gru.cell`;
    add(`${g}.weight_ih_1`, [2 * z, z], n);
    add(`${g}.weight_hh_1`, [2 * z, z], n);
    add(`${g}.weight_ih_2`, [2 * z, z], n);
    add(`${g}.weight_hh_2`, [2 * z, z], n);
    add(`${g}.bias_ih`, [4 * z], n);
    add(`${g}.bias_hh`, [4 * z], n);
    add(`${g}.weight_in_1`, [z, z], n);
    add(`${g}.weight_hn_1`, [z, z], n);
    add(`${g}.weight_in_2`, [z, z], n);
    add(`${g}.weight_hn_2`, [z, z], n);
    add(`${g}.bias_in`, [2 * z], n);
    add(`${g}.bias_hn`, [2 * z], n);
  } else {
    torchGru(`${h}.gru`, 2 * z, 2 * z);
    xavierLinear(`${h}.project_update`, 2 * z, z);
  }
  xavierLinear(`${h}.mlp_mu.0`, 2 * z, z);
  xavierLinear(`${h}.mlp_mu.2`, z, 2 * z);
  xavierLinear(`${h}.mlp_softplus.0`, 2 * z, z);
  xavierLinear(`${h}.mlp_softplus.2`, z, 2 * z);

  const d = `${h}.image_decoder`;
  switch (cfg.image_decoder) {
    case 'small':
      conv(`${d}.decode.0`, 32, z, 5);
      conv(`${d}.decode.2`, 32, 32, 5);
      conv(`${d}.decode.4`, 32, 32, 5);
      conv(`${d}.decode.6`, 4, 32, 3);
      break;
    case 'iodine':
      conv(`${d}.decode.0`, 64, z, 3);
      conv(`${d}.decode.2`, 64, 64, 3);
      conv(`${d}.decode.4`, 64, 64, 3);
      conv(`${d}.decode.6`, 64, 64, 3);
      conv(`${d}.decode.8`, 4, 64, 3);
      break;
    case 'big':
      convT(`${d}.decode.0`, z, 64, 5);
      convT(`${d}.decode.2`, 64, 64, 5);
      convT(`${d}.decode.4`, 64, 64, 5);
      convT(`${d}.decode.6`, 64, 64, 5);
      convT(`${d}.decode.8`, 64, 64, 5);
      convT(`${d}.decode.10`, 64, 4, 3);
      break;
  }
  xavierLinear(`${d}.pos_embed_projection`, z, 4);

  xavierLinear(`${h}.indep_prior.z_linear.0`, MLP_HIDDEN, z);
  xavierLinear(`${h}.indep_prior.z_mu`, z, MLP_HIDDEN);
  xavierLinear(`${h}.indep_prior.z_softplus`, z, MLP_HIDDEN);

  torchGru('refinenet.recurrence', z, z);
  xavierLinear('refinenet.encoding.0', MLP_HIDDEN, 4 * z);
  xavierLinear('refinenet.encoding.2', z, MLP_HIDDEN);
  xavierLinear('refinenet.loc', z, z);
  xavierLinear('refinenet.softplus', z, z);
  return specs;
}

/** PyTorch's fan computation (torch.nn.init._calculate_fan_in_and_fan_out). */
export function fans(shape: number[]): [number, number] {
  if (shape.length < 2) throw new Error(`fan in/out needs a tensor of rank >= 2, got [${shape}]`);
  const receptive = shape.slice(2).reduce((a, b) => a * b, 1);
  return [shape[1] * receptive, shape[0] * receptive];
}
