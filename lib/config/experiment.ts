/**
 * A training run's config in the original JSON format: the sections `Net` (lib/config/net.ts),
 * `dataset`, `training` and `seed`, accepted as the original's configs/train/…/EMORL.json files
 * are written. Missing keys take the original's defaults; unknown keys and wrong types are errors
 * that name the key (a misspelt key would otherwise silently fall back to a default).
 */
import { NetConfig, netConfig } from './net';
import type { PreprocessStyle } from '../data/clevr';

export interface DatasetConfig {
  /** Directory the dataset file is relative to ('' for the working directory). */
  data_path: string;
  h5_path: string;
  /** Read masks (the training loop uses them for its held-out ARI when present). */
  masks: boolean;
  factors: boolean;
  clevr_preprocess_style: PreprocessStyle;
}

export interface TrainingConfig {
  batch_size: number;
  /** The original's dataloader workers; the loop reads in one reader thread, so unused. */
  num_workers: number;
  /** Which split to train on ('train'; the CLEVR6 128×128 config trains on 'test'). */
  mode: 'train' | 'val' | 'test';
  model: 'EfficientMORL' | 'SlotAttention';
  /** The last step; the original runs steps 0..iters inclusive. */
  iters: number;
  /** [step, I] pairs: from `step` on, use I refinement steps. */
  refinement_curriculum: Array<[number, number]>;
  lr: number;
  warmup: number;
  decay_rate: number;
  decay_steps: number;
  kl_beta_init: number;
  use_scheduler: boolean;
  tensorboard_freq: number;
  checkpoint_freq: number;
  load_from_checkpoint: boolean;
  checkpoint: string;
  run_suffix: string;
  out_dir: string;
  use_geco: boolean;
  clip_grad_norm: boolean;
  /** Per pixel and channel; the loop multiplies by C·H·W. */
  geco_reconstruction_target: number;
  geco_step_size_acceleration: number;
  geco_ema_alpha: number;
  geco_beta_stepsize: number;
  tqdm: boolean;
  /** The original's torch.distributed port; kept so its configs load. */
  DDP_port: number;
  // emorl's own additions
  /** Checkpoints kept in the output folder (older ones are deleted). */
  keep_checkpoints: number;
  /** Consecutive non-finite steps (skipped) before the run stops. */
  max_nonfinite_steps: number;
  /** Steps between scalar log lines (JSON lines). */
  log_freq: number;
  /** Steps between foreground-ARI evaluations on a held-out batch (0: never). */
  ari_freq: number;
  /** Images in the held-out ARI batch. */
  ari_batch_size: number;
}

export interface ExperimentConfig {
  Net: NetConfig;
  dataset: DatasetConfig;
  training: TrainingConfig;
  seed: number;
}

/** The original train.py / datasets.py defaults, plus ours. */
export const DEFAULT_DATASET: Readonly<DatasetConfig> = Object.freeze({
  data_path: '',
  h5_path: '',
  masks: false,
  factors: false,
  clevr_preprocess_style: '' as PreprocessStyle,
});

export const DEFAULT_TRAINING: Readonly<TrainingConfig> = Object.freeze({
  batch_size: 16,
  num_workers: 8,
  mode: 'train' as const,
  model: 'EfficientMORL' as const,
  iters: 500000,
  refinement_curriculum: [
    [-1, 3],
    [100000, 1],
    [200000, 1],
  ] as Array<[number, number]>,
  lr: 3e-4,
  warmup: 10000,
  decay_rate: 0.5,
  decay_steps: 100000,
  kl_beta_init: 1,
  use_scheduler: false,
  tensorboard_freq: 100,
  checkpoint_freq: 25000,
  load_from_checkpoint: false,
  checkpoint: '',
  run_suffix: 'debug',
  out_dir: 'experiments',
  use_geco: true,
  clip_grad_norm: true,
  geco_reconstruction_target: -23000,
  geco_step_size_acceleration: 1,
  geco_ema_alpha: 0.99,
  geco_beta_stepsize: 1e-6,
  tqdm: false,
  DDP_port: 29500,
  keep_checkpoints: 3,
  max_nonfinite_steps: 10,
  log_freq: 10,
  ari_freq: 1000,
  ari_batch_size: 32,
});

export class ExperimentConfigError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'ExperimentConfigError';
  }
}

type Kind = 'number' | 'integer' | 'boolean' | 'string';

function check(section: string, key: string, value: unknown, kind: Kind): void {
  const where = `${section}.${key}`;
  const ok =
    kind === 'integer'
      ? typeof value === 'number' && Number.isInteger(value)
      : kind === 'number'
        ? typeof value === 'number' && Number.isFinite(value)
        : typeof value === kind;
  if (!ok) throw new ExperimentConfigError(`${where}: must be ${kind === 'integer' ? 'an integer' : `a ${kind}`}, got ${JSON.stringify(value)}`);
}

function section<T extends object>(name: string, raw: unknown, defaults: Readonly<T>, kinds: Record<keyof T, Kind | 'custom'>): T {
  if (raw === undefined) return { ...defaults };
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) {
    throw new ExperimentConfigError(`${name}: must be an object, got ${JSON.stringify(raw)}`);
  }
  const known = Object.keys(defaults);
  for (const key of Object.keys(raw)) {
    if (!known.includes(key)) throw new ExperimentConfigError(`${name}.${key}: unknown key (known: ${known.join(', ')})`);
  }
  const out = { ...defaults, ...(raw as Partial<T>) };
  for (const key of known as Array<keyof T & string>) {
    const kind = kinds[key];
    if (kind !== 'custom') check(name, key, out[key], kind);
  }
  return out;
}

function positive(where: string, v: number, allowZero = false): void {
  if (allowZero ? v < 0 : v <= 0) throw new ExperimentConfigError(`${where}: must be ${allowZero ? '>= 0' : '> 0'}, got ${v}`);
}

/** Validates a parsed config object (the JSON file's content, overrides applied). */
export function experimentConfig(raw: unknown): ExperimentConfig {
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) {
    throw new ExperimentConfigError(`config must be a JSON object, got ${JSON.stringify(raw)}`);
  }
  const top = raw as Record<string, unknown>;
  const sections = ['Net', 'dataset', 'training', 'seed'];
  for (const key of Object.keys(top)) {
    if (!sections.includes(key)) throw new ExperimentConfigError(`${key}: unknown section (known: ${sections.join(', ')})`);
  }
  const Net = netConfig((top.Net ?? {}) as Record<string, unknown>);
  const dataset = section('dataset', top.dataset, DEFAULT_DATASET, {
    data_path: 'string',
    h5_path: 'string',
    masks: 'boolean',
    factors: 'boolean',
    clevr_preprocess_style: 'custom',
  });
  if (!['', 'clevr-small', 'clevr-large'].includes(dataset.clevr_preprocess_style)) {
    throw new ExperimentConfigError(
      `dataset.clevr_preprocess_style: must be '', 'clevr-small' or 'clevr-large', got ${JSON.stringify(dataset.clevr_preprocess_style)}`,
    );
  }
  const training = section('training', top.training, DEFAULT_TRAINING, {
    batch_size: 'integer',
    num_workers: 'integer',
    mode: 'custom',
    model: 'custom',
    iters: 'integer',
    refinement_curriculum: 'custom',
    lr: 'number',
    warmup: 'integer',
    decay_rate: 'number',
    decay_steps: 'number',
    kl_beta_init: 'number',
    use_scheduler: 'boolean',
    tensorboard_freq: 'integer',
    checkpoint_freq: 'integer',
    load_from_checkpoint: 'boolean',
    checkpoint: 'string',
    run_suffix: 'string',
    out_dir: 'string',
    use_geco: 'boolean',
    clip_grad_norm: 'boolean',
    geco_reconstruction_target: 'number',
    geco_step_size_acceleration: 'number',
    geco_ema_alpha: 'number',
    geco_beta_stepsize: 'number',
    tqdm: 'boolean',
    DDP_port: 'integer',
    keep_checkpoints: 'integer',
    max_nonfinite_steps: 'integer',
    log_freq: 'integer',
    ari_freq: 'integer',
    ari_batch_size: 'integer',
  });
  if (!['train', 'val', 'test'].includes(training.mode)) {
    throw new ExperimentConfigError(`training.mode: must be 'train', 'val' or 'test', got ${JSON.stringify(training.mode)}`);
  }
  if (training.model !== 'EfficientMORL' && training.model !== 'SlotAttention') {
    throw new ExperimentConfigError(`training.model: must be 'EfficientMORL' or 'SlotAttention', got ${JSON.stringify(training.model)}`);
  }
  if (training.model === 'SlotAttention' && training.use_geco) {
    // Its loss is the reconstruction error alone: there is no KL for GECO to balance.
    throw new ExperimentConfigError('training.use_geco: SlotAttention has no KL term; set it to false');
  }
  const curriculum = training.refinement_curriculum as unknown;
  if (
    !Array.isArray(curriculum) ||
    curriculum.length === 0 ||
    !curriculum.every((p) => Array.isArray(p) && p.length === 2 && p.every((v) => Number.isInteger(v)) && p[1] >= 0)
  ) {
    throw new ExperimentConfigError(
      `training.refinement_curriculum: must be a non-empty list of [step, refinement_iters] integer pairs, got ${JSON.stringify(curriculum)}`,
    );
  }
  for (let i = 1; i < curriculum.length; i++) {
    if (curriculum[i][0] < curriculum[i - 1][0]) {
      throw new ExperimentConfigError(`training.refinement_curriculum: steps must not decrease, got ${JSON.stringify(curriculum)}`);
    }
  }
  positive('training.batch_size', training.batch_size);
  positive('training.iters', training.iters, true);
  positive('training.lr', training.lr);
  positive('training.warmup', training.warmup, true);
  positive('training.decay_rate', training.decay_rate);
  positive('training.decay_steps', training.decay_steps);
  positive('training.kl_beta_init', training.kl_beta_init, true);
  positive('training.tensorboard_freq', training.tensorboard_freq);
  positive('training.checkpoint_freq', training.checkpoint_freq);
  positive('training.geco_ema_alpha', training.geco_ema_alpha);
  positive('training.geco_beta_stepsize', training.geco_beta_stepsize, true);
  positive('training.geco_step_size_acceleration', training.geco_step_size_acceleration);
  positive('training.keep_checkpoints', training.keep_checkpoints);
  positive('training.max_nonfinite_steps', training.max_nonfinite_steps);
  positive('training.log_freq', training.log_freq);
  positive('training.ari_freq', training.ari_freq, true);
  positive('training.ari_batch_size', training.ari_batch_size);
  if (training.geco_ema_alpha >= 1) throw new ExperimentConfigError(`training.geco_ema_alpha: must be < 1, got ${training.geco_ema_alpha}`);
  const seed = top.seed ?? 1;
  if (typeof seed !== 'number' || !Number.isSafeInteger(seed) || seed < 0) {
    throw new ExperimentConfigError(`seed: must be a non-negative integer, got ${JSON.stringify(seed)}`);
  }
  return { Net, dataset, training, seed };
}

/** Parses `value` the way a command-line override means it: JSON if it parses, else a string. */
function overrideValue(value: string): unknown {
  try {
    return JSON.parse(value);
  } catch {
    return value;
  }
}

/**
 * Applies `section.key=value` overrides (`training.lr=1e-4`, `Net.K=5`,
 * `training.refinement_curriculum=[[-1,1]]`, `seed=3`) to a raw config object, in order.
 */
export function applyOverrides(raw: Record<string, unknown>, overrides: string[]): Record<string, unknown> {
  const out = structuredClone(raw);
  for (const o of overrides) {
    const eq = o.indexOf('=');
    if (eq <= 0) throw new ExperimentConfigError(`override '${o}': expected section.key=value`);
    const path = o.slice(0, eq).split('.');
    if (path.some((p) => p.length === 0) || path.length > 2) {
      throw new ExperimentConfigError(`override '${o}': expected section.key=value (or seed=value)`);
    }
    const value = overrideValue(o.slice(eq + 1));
    if (path.length === 1) {
      out[path[0]] = value;
    } else {
      const [sec, key] = path;
      const target = (out[sec] ?? {}) as Record<string, unknown>;
      if (typeof target !== 'object' || Array.isArray(target)) {
        throw new ExperimentConfigError(`override '${o}': '${sec}' is not a section`);
      }
      target[key] = value;
      out[sec] = target;
    }
  }
  return out;
}

/** Parses config JSON text; `source` names the file in errors. */
export function parseExperimentConfig(text: string, source: string, overrides: string[] = []): ExperimentConfig {
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (err) {
    throw new ExperimentConfigError(`${source}: not valid JSON (${(err as Error).message})`);
  }
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) {
    throw new ExperimentConfigError(`${source}: config must be a JSON object`);
  }
  try {
    return experimentConfig(applyOverrides(raw as Record<string, unknown>, overrides));
  } catch (err) {
    const e = err as Error;
    e.message = `${source}: ${e.message}`;
    throw e;
  }
}

/**
 * The smallest Gaussian nll the model can reach, and the config's GECO target, both summed over
 * C·H·W. The original's Gaussian nll omits the 0.5·log 2π term, so its minimum is C·H·W·log_scale;
 * a target below it can never be met and β then grows for the whole run.
 */
export function gecoTargetCheck(c: ExperimentConfig): { target: number; attainableMin?: number; unreachable: boolean } {
  const [C, H, W] = c.Net.input_size;
  const target = c.training.geco_reconstruction_target * C * H * W;
  if (c.Net.image_likelihood !== 'Gaussian') return { target, unreachable: false };
  const attainableMin = C * H * W * c.Net.log_scale;
  return { target, attainableMin, unreachable: target < attainableMin };
}
