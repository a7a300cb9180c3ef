/**
 * One training step (lossAndGrads + clip + Adam) and one inference batch of the Tetrominoes
 * config (K 4, 35x35, z 32, small decoder, L 3, I 3), tfjsOps vs nativeOps, each in its own
 * process (so that each peak RSS is its own), against the original PyTorch code's times on the
 * same 2-thread machine (2.2 s per training step, 1.0 s per inference batch, batch 32).
 * Build first (npm run build), then:
 *
 *   node dist/bench/model-native.js [--batch 32] [--tfjs-batch 4] [--repeat 3] [--skip-tfjs]
 *   node dist/bench/model-native.js --ops native|tfjs --batch N --repeat N   (one run, JSON line)
 *
 * tfjsOps at batch 32 takes minutes per step, so it is timed at --tfjs-batch (default 4) and its
 * times are scaled linearly to batch 32 (the work is linear in the batch; said in the report).
 */
import { spawnSync } from 'node:child_process';
import { tf, initBackend } from '../lib/tf';
import { EfficientMORL } from '../lib/model/efficient-morl';
import { Adam, clipGradNorm } from '../lib/optim/adam';
import { SeededNoise } from '../lib/model/noise';
import { tfjsOps } from '../lib/ops';
import { nativeOps, nativeOpsAvailable } from '../lib/ops/native';
import { nativeStatus } from '../lib/native';
import type { NetConfig } from '../lib/config/net';

const TETROMINOES: Partial<NetConfig> = {
  K: 4, input_size: [3, 35, 35], z_size: 32, image_decoder: 'small', image_likelihood: 'Gaussian',
  stochastic_layers: 3, refinement_iters: 3, log_scale: -1.2039728,
};
const PYTORCH = { train: 2.2, infer: 1.0, batch: 32 };

function arg(name: string, def: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 && i + 1 < process.argv.length ? process.argv[i + 1] : def;
}

interface RunResult {
  ops: string;
  batch: number;
  train: number[];
  infer: number[];
  peakRssMiB: number;
}

async function runOne(opsName: string, batch: number, repeat: number): Promise<RunResult> {
  await initBackend('cpu');
  const ops = opsName === 'native' ? nativeOps : tfjsOps;
  const model = new EfficientMORL(TETROMINOES, { ops, seed: 1 });
  const [C, H, W] = model.cfg.input_size;
  const images = tf.tidy(() => tf.sub(tf.mul(tf.randomUniform([batch, C, H, W], 0, 1, 'float32', 3), 2), 1));
  const adam = new Adam(model.params, { lr: 4e-4 });
  const train: number[] = [];
  const infer: number[] = [];
  for (let r = 0; r < repeat; r++) {
    let t = performance.now();
    const res = model.lossAndGrads(images, { noise: new SeededNoise(r) });
    const clipped = clipGradNorm(res.grads, 5);
    adam.applyGradients(clipped.grads);
    for (const g of clipped.grads.values()) g.dispose();
    res.dispose();
    train.push((performance.now() - t) / 1000);
    t = performance.now();
    model.infer(images, { noise: new SeededNoise(r) }).dispose();
    infer.push((performance.now() - t) / 1000);
  }
  images.dispose();
  adam.dispose();
  model.dispose();
  return { ops: opsName, batch, train, infer, peakRssMiB: process.resourceUsage().maxRSS / 1024 };
}

function child(opsName: string, batch: number, repeat: number): RunResult {
  const r = spawnSync(process.execPath, [process.argv[1], '--ops', opsName, '--batch', String(batch), '--repeat', String(repeat)], {
    encoding: 'utf8',
    stdio: ['ignore', 'pipe', 'inherit'],
    maxBuffer: 1 << 24,
  });
  const line = (r.stdout ?? '').trim().split('\n').pop() ?? '';
  if (r.status !== 0 || !line.startsWith('{')) throw new Error(`the ${opsName} run failed (status ${r.status}): ${r.stdout}`);
  return JSON.parse(line) as RunResult;
}

async function main(): Promise<void> {
  const only = arg('ops', '');
  if (only) {
    console.log(JSON.stringify(await runOne(only, Number(arg('batch', '32')), Number(arg('repeat', '3')))));
    return;
  }
  const batch = Number(arg('batch', String(PYTORCH.batch)));
  const tfjsBatch = Number(arg('tfjs-batch', '4'));
  const repeat = Number(arg('repeat', '3'));
  const st = nativeStatus();
  console.log(`Tetrominoes config (K 4, 35x35, z 32, small decoder, L 3, I 3), batch ${batch}; ` +
    `addon: ${st.available ? `${st.info?.gemmIsa}, ${st.info?.threads} threads` : `unavailable (${st.reason})`}`);
  const fmt = (a: number[]): string => a.map((x) => x.toFixed(2)).join(' / ');
  const best = (a: number[]): number => Math.min(...a);
  const rows: string[] = [];
  let nativeBest: { train: number; infer: number } | null = null;
  if (st.available && nativeOpsAvailable()) {
    const n = child('native', batch, repeat);
    nativeBest = { train: best(n.train), infer: best(n.infer) };
    rows.push(`nativeOps  batch ${batch}: train step ${fmt(n.train)} s, inference ${fmt(n.infer)} s, peak RSS ${n.peakRssMiB.toFixed(0)} MiB`);
  } else {
    rows.push('nativeOps: skipped (addon unavailable or without NHWC kernels; npm run build:native)');
  }
  let tfjsScaled: { train: number; infer: number } | null = null;
  if (!process.argv.includes('--skip-tfjs')) {
    const t = child('tfjs', tfjsBatch, 1);
    const s = batch / tfjsBatch;
    tfjsScaled = { train: best(t.train) * s, infer: best(t.infer) * s };
    rows.push(`tfjsOps    batch ${tfjsBatch}: train step ${fmt(t.train)} s, inference ${fmt(t.infer)} s, peak RSS ${t.peakRssMiB.toFixed(0)} MiB` +
      ` -> scaled x${s} to batch ${batch}: train ${tfjsScaled.train.toFixed(1)} s, inference ${tfjsScaled.infer.toFixed(1)} s (estimate)`);
  }
  rows.push(`PyTorch    batch ${PYTORCH.batch}: train step ${PYTORCH.train} s, inference ${PYTORCH.infer} s (the original, same machine, 2 threads)`);
  if (nativeBest) {
    const f = batch / PYTORCH.batch;
    rows.push(`native vs PyTorch: train ${(nativeBest.train / (PYTORCH.train * f)).toFixed(2)}x, inference ${(nativeBest.infer / (PYTORCH.infer * f)).toFixed(2)}x PyTorch's time` +
      (tfjsScaled ? `; native is ${(tfjsScaled.train / nativeBest.train).toFixed(1)}x (train) / ${(tfjsScaled.infer / nativeBest.infer).toFixed(1)}x (inference) faster than tfjsOps` : ''));
  }
  for (const r of rows) console.log(r);
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
