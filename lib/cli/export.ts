/** What `emorl-export` does: write a training checkpoint's weights in another format. */
import type { AdamState } from '../optim/adam';
import { writePth, type PthExportOptions, type PthTensor } from '../params/pth';
import { loadTrainingCheckpoint } from '../train/loop';

export interface ExportOptions {
  checkpoint: string;
  to: string;
  out: string;
  layout?: 'checkpoint' | 'state_dict';
}

function adamForPth(adam: AdamState, lr: number): NonNullable<PthExportOptions['optimizer']> {
  const state = new Map<string, { step: number; exp_avg: Float32Array; exp_avg_sq: Float32Array }>();
  for (const [name, m] of adam.m) {
    const v = adam.v.get(name);
    if (v) state.set(name, { step: adam.steps, exp_avg: m.data, exp_avg_sq: v.data });
  }
  return { lr, betas: [0.9, 0.999], eps: 1e-8, weight_decay: 0, state };
}

/** Exports; returns a one-line description of what was written. */
export function exportCommand(opts: ExportOptions): string {
  if (opts.to !== 'pth') throw new Error(`--to ${opts.to}: unsupported format (supported: pth)`);
  const ckpt = loadTrainingCheckpoint(opts.checkpoint);
  const params = new Map<string, PthTensor>(Object.entries(ckpt.params));
  const layout = opts.layout ?? 'checkpoint';
  writePth(opts.out, params, {
    layout,
    // The original's train.py stores the step it just finished; ours is the next one to run.
    step: Math.max(0, ckpt.meta.trainer.step - 1),
    kl_beta: ckpt.meta.trainer.klBeta,
    optimizer: layout === 'checkpoint' ? adamForPth(ckpt.adam, ckpt.meta.config.training.lr) : undefined,
  });
  // A SlotAttention checkpoint's names are its state_dict's (top level: init_slots, encoder_pt_1…,
  // image_decoder…), as the original SlotAttention saves them; readPth reads them back as such.
  return `wrote ${opts.out}: ${params.size} tensors of a ${ckpt.meta.config.training.model} model (${layout === 'checkpoint' ? "the original train.py's checkpoint layout" : 'a bare state_dict'}) from ${opts.checkpoint}`;
}
