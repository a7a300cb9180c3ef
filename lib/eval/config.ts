/**
 * Test configs in the original's JSON format (configs/test/<dataset>/<type>/EMORL*.json and
 * SlotAttention*.json): the
 * `Net`, `dataset`, `seed` and `test` sections. Unknown keys and wrong types are errors naming
 * the key. The `test` section's defaults are those of the original eval.py.
 */
import * as fs from 'node:fs';
import { netConfig, type NetConfig } from '../config/net';
import { DEFAULT_DATASET, type DatasetConfig } from '../config/experiment';

/** The eval types emorl-eval runs (the original's names; `dci` is `dci_clevr` under a shorter name; clevrtex is not done). */
export const SUPPORTED_EVAL_TYPES = ['ARI_MSE_KL', 'sample_viz', 'disentanglement_preprocessing', 'activeness', 'disentanglement_viz', 'make_gifs', 'dci', 'dci_clevr'] as const;
export type EvalType = (typeof SUPPORTED_EVAL_TYPES)[number];

export interface TestSection {
  batch_size: number;
  /** [C,H,W] of the model's images (for visualisation in the original) */
  output_size: [number, number, number];
  mode: 'train' | 'val' | 'test';
  num_images_to_process: number;
  eval_type: string;
  disentangle_slot: number;
  /** 'EfficientMORL' or 'SlotAttention' (the Net section then needs K, input_size, z_size, image_decoder only) */
  model: 'EfficientMORL' | 'SlotAttention';
  num_workers: number;
  DDP_port: number;
  out_dir: string;
  checkpoint: string;
  use_geco: boolean;
  /** per pixel and channel (multiplied by C·H·W as the original does) */
  geco_reconstruction_target: number;
  geco_ema_alpha: number;
  geco_step_size_acceleration: number;
  geco_beta_stepsize: number;
  experiment_name: string;
  clevrtex_variant: string;
}

export interface TestConfig {
  Net: NetConfig;
  dataset: DatasetConfig;
  seed: number;
  test: TestSection;
}

export class TestConfigError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'TestConfigError';
  }
}

export const DEFAULT_TEST: Readonly<TestSection> = Object.freeze({
  batch_size: 1,
  output_size: [3, 64, 64] as [number, number, number],
  mode: 'test' as const,
  num_images_to_process: 320,
  eval_type: 'disentanglement',
  disentangle_slot: 0,
  model: 'EfficientMORL' as const,
  num_workers: 8,
  DDP_port: 29500,
  out_dir: '',
  checkpoint: '',
  use_geco: false,
  geco_reconstruction_target: -20500,
  geco_ema_alpha: 0.99,
  geco_step_size_acceleration: 1,
  geco_beta_stepsize: 1e-6,
  experiment_name: 'NAME_HERE',
  clevrtex_variant: 'full',
});

type Kind = 'integer' | 'number' | 'boolean' | 'string' | 'size3' | 'mode';

const TEST_KINDS: Record<keyof TestSection, Kind> = {
  batch_size: 'integer',
  output_size: 'size3',
  mode: 'mode',
  num_images_to_process: 'integer',
  eval_type: 'string',
  disentangle_slot: 'integer',
  model: 'string',
  num_workers: 'integer',
  DDP_port: 'integer',
  out_dir: 'string',
  checkpoint: 'string',
  use_geco: 'boolean',
  geco_reconstruction_target: 'number',
  geco_ema_alpha: 'number',
  geco_step_size_acceleration: 'number',
  geco_beta_stepsize: 'number',
  experiment_name: 'string',
  clevrtex_variant: 'string',
};

const DATASET_KINDS: Record<keyof DatasetConfig, Kind> = {
  data_path: 'string',
  h5_path: 'string',
  masks: 'boolean',
  factors: 'boolean',
  clevr_preprocess_style: 'string',
};

function checkValue(where: string, v: unknown, kind: Kind): void {
  let ok: boolean;
  let want: string;
  switch (kind) {
    case 'integer':
      ok = typeof v === 'number' && Number.isInteger(v);
      want = 'an integer';
      break;
    case 'number':
      ok = typeof v === 'number' && Number.isFinite(v);
      want = 'a number';
      break;
    case 'size3':
      ok = Array.isArray(v) && v.length === 3 && v.every((d) => Number.isInteger(d) && d > 0);
      want = 'three positive integers [C, H, W]';
      break;
    case 'mode':
      ok = v === 'train' || v === 'val' || v === 'test';
      want = "'train', 'val' or 'test'";
      break;
    default:
      ok = typeof v === kind;
      want = `a ${kind}`;
  }
  if (!ok) throw new TestConfigError(`${where}: must be ${want}, got ${JSON.stringify(v)}`);
}

function section<T extends object>(name: string, raw: unknown, defaults: Readonly<T>, kinds: Record<keyof T, Kind>): T {
  if (raw === undefined) return { ...defaults };
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) {
    throw new TestConfigError(`${name}: must be an object, got ${JSON.stringify(raw)}`);
  }
  const known = Object.keys(kinds);
  for (const key of Object.keys(raw)) {
    if (!known.includes(key)) throw new TestConfigError(`${name}.${key}: unknown key (known: ${known.join(', ')})`);
  }
  const out = { ...defaults, ...(raw as Partial<T>) };
  for (const key of known as Array<keyof T & string>) checkValue(`${name}.${key}`, out[key], kinds[key]);
  return out;
}

/** Validates a parsed test config object. */
export function testConfig(raw: unknown): TestConfig {
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) {
    throw new TestConfigError(`config must be a JSON object, got ${JSON.stringify(raw)}`);
  }
  const top = raw as Record<string, unknown>;
  const sections = ['Net', 'dataset', 'seed', 'test'];
  for (const key of Object.keys(top)) {
    if (!sections.includes(key)) throw new TestConfigError(`${key}: unknown section (known: ${sections.join(', ')})`);
  }
  let Net: NetConfig;
  try {
    Net = netConfig((top.Net ?? {}) as Record<string, unknown>);
  } catch (err) {
    throw new TestConfigError((err as Error).message);
  }
  const dataset = section('dataset', top.dataset, DEFAULT_DATASET, DATASET_KINDS);
  if (!['', 'clevr-small', 'clevr-large'].includes(dataset.clevr_preprocess_style)) {
    throw new TestConfigError(
      `dataset.clevr_preprocess_style: must be '', 'clevr-small' or 'clevr-large', got ${JSON.stringify(dataset.clevr_preprocess_style)}`,
    );
  }
  const seed = top.seed ?? 1;
  checkValue('seed', seed, 'integer');
  const test = section('test', top.test, DEFAULT_TEST, TEST_KINDS);
  if (test.batch_size < 1) throw new TestConfigError(`test.batch_size: must be >= 1, got ${test.batch_size}`);
  if (test.num_images_to_process < 1) throw new TestConfigError(`test.num_images_to_process: must be >= 1, got ${test.num_images_to_process}`);
  if (test.model !== 'EfficientMORL' && test.model !== 'SlotAttention') {
    throw new TestConfigError(`test.model: must be 'EfficientMORL' or 'SlotAttention', got ${JSON.stringify(test.model)}`);
  }
  return { Net, dataset, seed: seed as number, test };
}

export function parseTestConfig(text: string, source: string): TestConfig {
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (err) {
    throw new TestConfigError(`${source}: not valid JSON (${(err as Error).message})`);
  }
  try {
    return testConfig(raw);
  } catch (err) {
    if (err instanceof TestConfigError) throw new TestConfigError(`${source}: ${err.message}`);
    throw err;
  }
}

export function loadTestConfigFile(file: string): TestConfig {
  if (!fs.existsSync(file)) throw new Error(`${file}: no such config file`);
  return parseTestConfig(fs.readFileSync(file, 'utf8'), file);
}
