/**
 * The GPU checks of one device session in one process (bench/gpu-kit.sh packs this with Node for a
 * GPU machine that has none): training steps of a small model with every GPU op on cuda:0 against
 * the same steps on the CPU kernels (the losses and gradient norms, as test/gpu-decoder.test.ts
 * checks on the emulator), then the device's FP32 peak and what crosses the bus per step. Exits 2
 * when the addon sees no CUDA device, 1 when a check fails.
 *
 *   node dist/bench/gpu-session.js [--device cuda:N]
 */
import { tf, initBackend } from '../lib/tf';
import { experimentConfig } from '../lib/config/experiment';
import { nativeStatus } from '../lib/native';
import { addonOps, deviceTraffic } from '../lib/ops/addon';
import { nativeOps, nativeOpsOn, parseStageDevice } from '../lib/ops/native';
import type { Ops } from '../lib/ops';
import { Trainer } from '../lib/train/trainer';

async function main(): Promise<number> {
  await initBackend('cpu');
  const i = process.argv.indexOf('--device');
  const device = parseStageDevice(i > 0 ? process.argv[i + 1] : 'cuda:0');
  const st = nativeStatus();
  console.log(`addon ${st.path}: cudaBuilt ${st.info?.cudaBuilt}, ${st.info?.cudaDevices ?? 0} CUDA devices${st.info?.cudaError ? ` (${st.info.cudaError})` : ''}`);
  if (device !== 'simt' && !(st.info?.cudaDevices ?? 0)) return 2;
  let ok = true;
  for (const [decoder, likelihood] of [['small', 'GMM'], ['iodine', 'Gaussian'], ['big', 'GMM']] as const) {
    // the big decoder makes 96x96 images: minutes on the emulator
    if (decoder === 'big' && device === 'simt') continue;
    const S = decoder === 'big' ? 96 : 12;
    const config = experimentConfig({
      Net: { K: 3, input_size: [3, S, S], z_size: 8, image_decoder: decoder, image_likelihood: likelihood, stochastic_layers: 2, refinement_iters: 2 },
      training: { batch_size: decoder === 'big' ? 2 : 4, lr: 1e-3, use_scheduler: false, use_geco: true, geco_reconstruction_target: -0.5, refinement_curriculum: [[-1, 2]] },
      seed: 5,
    });
    const images = tf.randomUniform([decoder === 'big' ? 2 : 4, 3, S, S], -1, 1, 'float32', 9);
    const run = (ops: Ops) => {
      const t = new Trainer(config, { ops });
      try {
        return [0, 1, 2].map(() => {
          const r = t.step(images);
          return [r.totalLoss, r.nll, r.kl, r.gradNorm];
        });
      } finally {
        t.dispose();
      }
    };
    const cpu = run(nativeOps), dev = run(nativeOpsOn(device));
    images.dispose();
    let worst = 0;
    cpu.forEach((row, s) => row.forEach((v, j) => (worst = Math.max(worst, Math.abs(dev[s][j] - v) / Math.max(1, Math.abs(v))))));
    const pass = worst <= 1e-4;
    ok &&= pass;
    console.log(`${pass ? 'ok  ' : 'FAIL'} 3 training steps, ${decoder} decoder, ${likelihood}: losses and gradient norms on ${device} within ${worst.toExponential(2)} of the CPU's (tolerance 1e-4)`);
  }
  if (device !== 'simt') console.log(`FP32 FMA peak of ${device}: ${addonOps().gpuPeakGflops(Number(device.slice(5)), 1).toFixed(0)} GFLOP/s`);
  const t = deviceTraffic();
  console.log(`bus so far: ${(t.upBytes / 2 ** 20).toFixed(1)} MiB up in ${t.uploads} copies, ${(t.downBytes / 2 ** 20).toFixed(1)} MiB down in ${t.downloads}`);
  return ok ? 0 : 1;
}

main().then((code) => process.exit(code), (err) => {
  console.error(err instanceof Error ? err.stack ?? err.message : err);
  process.exit(1);
});
