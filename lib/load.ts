/**
 * Loading a trained model from a file: an emorl training checkpoint (.emorl, which carries its
 * config and says which model it holds) or a PyTorch checkpoint of the original code (.pth,
 * which needs the Net config; an EfficientMORL or a SlotAttention state_dict, told apart by the
 * latter's top-level 'init_slots' unless the caller names the model).
 */
import * as fs from 'node:fs';
import type { NetConfig } from './config/net';
import type { TrainingConfig } from './config/experiment';
import { EfficientMORL, type ModelOptions } from './model/efficient-morl';
import { SlotAttention } from './model/slot-attention';
import { defaultOps } from './ops/native';
import { readPth } from './params/pth';
import { loadTrainingCheckpoint } from './train/loop';

/** The models a checkpoint can hold (training.model / test.model). */
export type ModelKind = TrainingConfig['model'];
export const MODEL_KINDS: readonly ModelKind[] = ['EfficientMORL', 'SlotAttention'];

interface LoadedCommon {
  /** The Net config the weights belong to. */
  config: NetConfig;
  /** The training step the weights were saved at, when the file says. */
  step?: number;
  klBeta?: number;
}

/** What loadModel returns: `kind` says which model `model` is. */
export type LoadedModel = (LoadedCommon & { kind: 'EfficientMORL'; model: EfficientMORL }) | (LoadedCommon & { kind: 'SlotAttention'; model: SlotAttention });

export interface LoadOptions extends ModelOptions {
  /**
   * The model the file must hold: for a .pth, the naming its state_dict follows (default: the
   * model it looks like); for a .emorl, checked against the model the checkpoint records.
   * A mismatch throws a ModelKindError.
   */
  model?: ModelKind;
}

/** 'an EfficientMORL' / 'a SlotAttention' */
export function aModel(kind: ModelKind): string {
  return `${/^[AEIOU]/.test(kind) ? 'an' : 'a'} ${kind}`;
}

/** The file holds another model than the one asked for. */
export class ModelKindError extends Error {
  constructor(
    readonly file: string,
    readonly found: ModelKind,
    readonly expected: ModelKind,
  ) {
    super(`${file}: holds ${aModel(found)} model, not ${aModel(expected)} model`);
    this.name = 'ModelKindError';
  }
}

function build(kind: ModelKind, config: Partial<NetConfig>, opts: ModelOptions): EfficientMORL | SlotAttention {
  return kind === 'SlotAttention' ? new SlotAttention(config, opts) : new EfficientMORL(config, opts);
}

function loaded(model: EfficientMORL | SlotAttention, extra: { step?: number; klBeta?: number }): LoadedModel {
  return model instanceof SlotAttention
    ? { kind: 'SlotAttention', model, config: model.cfg, ...extra }
    : { kind: 'EfficientMORL', model, config: model.cfg, ...extra };
}

export function loadModel(file: string, netConfig?: Partial<NetConfig>, options: LoadOptions = {}): LoadedModel {
  const { model: expected, ...modelOptions } = options;
  const opts = { ...modelOptions, ops: modelOptions.ops ?? defaultOps() };
  if (expected !== undefined && !MODEL_KINDS.includes(expected)) throw new Error(`model must be one of ${MODEL_KINDS.join(', ')}, got ${JSON.stringify(expected)}`);
  if (!fs.existsSync(file)) throw new Error(`${file}: no such checkpoint`);
  const head = Buffer.alloc(8);
  const fd = fs.openSync(file, 'r');
  try {
    fs.readSync(fd, head, 0, 8, 0);
  } finally {
    fs.closeSync(fd);
  }
  if (head.toString('ascii') === 'EMORLCK1') {
    const ckpt = loadTrainingCheckpoint(file);
    const kind = ckpt.meta.config.training.model;
    if (expected !== undefined && kind !== expected) throw new ModelKindError(file, kind, expected);
    const model = build(kind, ckpt.meta.config.Net, opts);
    try {
      model.params.load(ckpt.params);
    } catch (err) {
      model.dispose();
      throw err;
    }
    return loaded(model, { step: ckpt.meta.trainer.step, klBeta: ckpt.meta.trainer.klBeta });
  }
  if (!netConfig) throw new Error(`${file}: a PyTorch checkpoint carries no config; pass the Net config (e.g. from configs/train/…/EMORL.json)`);
  const pth = readPth(file, { model: expected });
  if (expected !== undefined && pth.model !== expected) throw new ModelKindError(file, pth.model, expected);
  const model = build(pth.model, netConfig, opts);
  try {
    model.params.load(Object.fromEntries(pth.params));
  } catch (err) {
    model.dispose();
    throw err;
  }
  return loaded(model, { step: pth.step, klBeta: pth.klBeta });
}
