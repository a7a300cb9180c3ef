/**
 * Loading a trained model from a file: an emorl training checkpoint (.emorl, which carries its
 * config) or a PyTorch checkpoint of the original code (.pth, which needs the Net config).
 */
import * as fs from 'node:fs';
import type { NetConfig } from './config/net';
import { EfficientMORL, type ModelOptions } from './model/efficient-morl';
import { defaultOps } from './ops/native';
import { readPth } from './params/pth';
import { loadTrainingCheckpoint } from './train/loop';

export interface LoadedModel {
  model: EfficientMORL;
  /** The Net config the weights belong to. */
  config: NetConfig;
  /** The training step the weights were saved at, when the file says. */
  step?: number;
  klBeta?: number;
}

export function loadModel(file: string, netConfig?: Partial<NetConfig>, modelOptions: ModelOptions = {}): LoadedModel {
  const opts = { ...modelOptions, ops: modelOptions.ops ?? defaultOps() };
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
    if (ckpt.meta.config.training.model !== 'EfficientMORL') {
      throw new Error(`${file}: a ${ckpt.meta.config.training.model} checkpoint; loadModel and emorl-eval take EfficientMORL checkpoints so far`);
    }
    const config = ckpt.meta.config.Net;
    const model = new EfficientMORL(config, opts);
    model.params.load(ckpt.params);
    return { model, config: model.cfg, step: ckpt.meta.trainer.step, klBeta: ckpt.meta.trainer.klBeta };
  }
  if (!netConfig) throw new Error(`${file}: a PyTorch checkpoint carries no config; pass the Net config (e.g. from configs/train/…/EMORL.json)`);
  const pth = readPth(file);
  const model = new EfficientMORL(netConfig, opts);
  model.params.load(Object.fromEntries(pth.params));
  return { model, config: model.cfg, step: pth.step, klBeta: pth.klBeta };
}
