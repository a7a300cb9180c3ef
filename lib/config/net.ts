/**
 * The original code's `Net` config (sacred ingredient in lib/model.py): keys, defaults and
 * validation. Errors name the offending key.
 */

export type ImageDecoderKind = 'small' | 'big' | 'iodine';
export type ImageLikelihoodKind = 'Gaussian' | 'GMM';

export interface NetConfig {
  /** number of slots */
  K: number;
  /** [C, H, W] */
  input_size: [number, number, number];
  z_size: number;
  /** L: number of HVAE (stochastic) layers */
  stochastic_layers: number;
  /** I: number of refinement steps */
  refinement_iters: number;
  /** log of the likelihood's standard deviation (natural log) */
  log_scale: number;
  /** global step from which GECO replaces the plain ELBO loss */
  geco_warm_start: number;
  image_decoder: ImageDecoderKind;
  image_likelihood: ImageLikelihoodKind;
  use_DualGRU: boolean;
  /** if false, the reversed prior is used */
  bottom_up_prior: boolean;
  /** refinement steps use p(z^0 | z^1) from the HVAE as their KL prior (needs bottom_up_prior false) */
  reverse_prior_plusplus: boolean;
}

/** The original's defaults (lib/model.py `cfg`). */
export const DEFAULT_NET_CONFIG: Readonly<NetConfig> = Object.freeze({
  K: 4,
  input_size: [3, 64, 64] as [number, number, number],
  z_size: 64,
  stochastic_layers: 3,
  refinement_iters: 3,
  log_scale: Math.log(0.1),
  geco_warm_start: 1000,
  image_decoder: 'iodine' as ImageDecoderKind,
  image_likelihood: 'Gaussian' as ImageLikelihoodKind,
  use_DualGRU: true,
  bottom_up_prior: false,
  reverse_prior_plusplus: true,
});

/** The big decoder upsamples a 6x6 grid by 2^4 with its four stride-2 transposed convolutions. */
export const BIG_DECODER_GRID = 6;
export const BIG_DECODER_OUTPUT = BIG_DECODER_GRID * 16;

export class ConfigError extends Error {
  constructor(
    readonly key: string,
    message: string,
  ) {
    super(`Net.${key}: ${message}`);
    this.name = 'ConfigError';
  }
}

const KEYS = Object.keys(DEFAULT_NET_CONFIG) as (keyof NetConfig)[];

function posInt(key: string, v: unknown, min = 1): number {
  if (typeof v !== 'number' || !Number.isInteger(v) || v < min) {
    throw new ConfigError(key, `must be an integer >= ${min}, got ${JSON.stringify(v)}`);
  }
  return v;
}

function bool(key: string, v: unknown): boolean {
  if (typeof v !== 'boolean') throw new ConfigError(key, `must be true or false, got ${JSON.stringify(v)}`);
  return v;
}

/**
 * Merges `overrides` over the defaults and validates the result. Unknown keys are errors (a
 * misspelt key would otherwise silently fall back to a default).
 */
export function netConfig(overrides: Partial<Record<keyof NetConfig, unknown>> | Record<string, unknown> = {}): NetConfig {
  for (const k of Object.keys(overrides)) {
    if (!(KEYS as string[]).includes(k)) throw new ConfigError(k, `unknown key (known: ${KEYS.join(', ')})`);
  }
  const raw = { ...DEFAULT_NET_CONFIG, ...overrides } as Record<string, unknown>;
  const K = posInt('K', raw.K);
  const z_size = posInt('z_size', raw.z_size);
  const stochastic_layers = posInt('stochastic_layers', raw.stochastic_layers, 0);
  const refinement_iters = posInt('refinement_iters', raw.refinement_iters, 0);
  const geco_warm_start = raw.geco_warm_start;
  if (typeof geco_warm_start !== 'number' || !Number.isFinite(geco_warm_start)) {
    throw new ConfigError('geco_warm_start', `must be a number, got ${JSON.stringify(geco_warm_start)}`);
  }
  const log_scale = raw.log_scale;
  if (typeof log_scale !== 'number' || !Number.isFinite(log_scale)) {
    throw new ConfigError('log_scale', `must be a finite number, got ${JSON.stringify(log_scale)}`);
  }
  const size = raw.input_size;
  if (!Array.isArray(size) || size.length !== 3) {
    throw new ConfigError('input_size', `must be [C, H, W], got ${JSON.stringify(size)}`);
  }
  const [C, H, W] = size.map((v, i) => posInt(`input_size[${i}]`, v));
  if (C !== 3) {
    // The encoder's first convolution is Conv2d(3, 64, ...) and the decoders emit 3 RGB channels.
    throw new ConfigError('input_size', `the model takes RGB images (C = 3), got C = ${C}`);
  }
  const image_decoder = raw.image_decoder;
  if (image_decoder !== 'small' && image_decoder !== 'big' && image_decoder !== 'iodine') {
    throw new ConfigError('image_decoder', `must be 'small', 'big' or 'iodine', got ${JSON.stringify(image_decoder)}`);
  }
  if (image_decoder === 'big' && (H !== BIG_DECODER_OUTPUT || W !== BIG_DECODER_OUTPUT)) {
    throw new ConfigError(
      'input_size',
      `the 'big' decoder produces ${BIG_DECODER_OUTPUT}x${BIG_DECODER_OUTPUT} images (a ${BIG_DECODER_GRID}x${BIG_DECODER_GRID} grid upsampled 16x), got ${H}x${W}`,
    );
  }
  const image_likelihood = raw.image_likelihood;
  if (image_likelihood !== 'Gaussian' && image_likelihood !== 'GMM') {
    throw new ConfigError('image_likelihood', `must be 'Gaussian' or 'GMM', got ${JSON.stringify(image_likelihood)}`);
  }
  const use_DualGRU = bool('use_DualGRU', raw.use_DualGRU);
  const bottom_up_prior = bool('bottom_up_prior', raw.bottom_up_prior);
  const reverse_prior_plusplus = bool('reverse_prior_plusplus', raw.reverse_prior_plusplus);
  if (reverse_prior_plusplus && bottom_up_prior) {
    // The original asserts this: the ++ prior is the reversed prior's p(z^0 | z^1).
    throw new ConfigError('reverse_prior_plusplus', 'cannot be true together with bottom_up_prior');
  }
  return {
    K,
    input_size: [C, H, W],
    z_size,
    stochastic_layers,
    refinement_iters,
    log_scale,
    geco_warm_start,
    image_decoder,
    image_likelihood,
    use_DualGRU,
    bottom_up_prior,
    reverse_prior_plusplus,
  };
}
