/**
 * Times one training step (loss + gradients + clip + Adam) and one inference batch of the model
 * on small configs, with the process' peak RSS. Build first (npm run build), then:
 *
 *   node dist/bench/model.js [--config tetrominoes|iodine|all] [--batch N] [--repeat N]
 */
import { tf, initBackend } from '../lib/tf';
import { experimentConfig } from '../lib/config/experiment';
import { SeededNoise } from '../lib/model/noise';
import { Trainer } from '../lib/train/trainer';
import type { NetConfig } from '../lib/config/net';

const CONFIGS: Record<string, Partial<NetConfig>> = {
  // the original's Tetrominoes config
  tetrominoes: { K: 4, input_size: [3, 35, 35], z_size: 32, image_decoder: 'small', image_likelihood: 'Gaussian', stochastic_layers: 3, refinement_iters: 3, log_scale: -1.2039728 },
  // a small CLEVR-like config with the iodine decoder and the GMM likelihood
  iodine: { K: 5, input_size: [3, 24, 24], z_size: 16, image_decoder: 'iodine', image_likelihood: 'GMM', stochastic_layers: 3, refinement_iters: 2, log_scale: Math.log(0.1) },
};

function arg(name: string, def: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 && i + 1 < process.argv.length ? process.argv[i + 1] : def;
}

function peakRssMiB(): number {
  // resourceUsage().maxRSS is in KiB
  return process.resourceUsage().maxRSS / 1024;
}

async function main(): Promise<void> {
  await initBackend('cpu');
  const which = arg('config', 'all');
  const batch = Number(arg('batch', '4'));
  const repeat = Number(arg('repeat', '2'));
  const names = which === 'all' ? Object.keys(CONFIGS) : [which];
  for (const name of names) {
    const cfg = CONFIGS[name];
    if (!cfg) throw new Error(`unknown --config ${name} (known: ${Object.keys(CONFIGS).join(', ')}, all)`);
    const trainer = new Trainer(
      experimentConfig({ Net: cfg, training: { lr: 4e-4, use_scheduler: false, use_geco: false, refinement_curriculum: [[-1, cfg.refinement_iters ?? 3]] } }),
      { seed: 1 },
    );
    const model = trainer.model;
    const [C, H, W] = model.cfg.input_size;
    const images = tf.tidy(() => tf.sub(tf.mul(tf.randomUniform([batch, C, H, W], 0, 1, 'float32', 3), 2), 1));
    const trainMs: number[] = [];
    const inferMs: number[] = [];
    for (let r = 0; r < repeat; r++) {
      let t = performance.now();
      trainer.step(images, { noise: new SeededNoise(r) }).release();
      trainMs.push(performance.now() - t);
      t = performance.now();
      const inf = model.infer(images, { noise: new SeededNoise(r) });
      inf.dispose();
      inferMs.push(performance.now() - t);
    }
    const fmt = (a: number[]): string => a.map((x) => (x / 1000).toFixed(2)).join(' / ');
    images.dispose();
    trainer.dispose();
    console.log(
      `${name} (batch ${batch}, K ${model.cfg.K}, ${H}x${W}, L ${model.cfg.stochastic_layers}, I ${model.cfg.refinement_iters}): ` +
        `train step ${fmt(trainMs)} s, inference ${fmt(inferMs)} s, peak RSS ${peakRssMiB().toFixed(0)} MiB, tensors left ${tf.memory().numTensors}`,
    );
  }
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
