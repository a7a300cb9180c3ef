/**
 * The GPU checks of one device session in one process (bench/gpu-kit.sh packs this with Node for a
 * GPU machine that has none): training steps of a small model with every GPU op on cuda:0 against
 * the same steps on the CPU kernels (the losses and gradient norms, as test/gpu-decoder.test.ts
 * checks on the emulator); the decoder's gradients summed on the device over a pass's stages
 * against per-stage downloads (the same bits); the decoder's, the encoder's and the GRUs' Adam step on the device against
 * Adam on the host (the same bits); the golden PyTorch fixture on the device (its loss and every gradient
 * against the recorded ones, with test/model-native.test.ts's fp32 tolerances), when there is a
 * copy; then the device's FP32 peak and what crosses the bus. Exits 2 when the addon sees no CUDA
 * device, 1 when a check fails.
 *
 *   node dist/bench/gpu-session.js [--device cuda:N] [--fixture tetrominoes-small-gaussian.h5]
 */
import * as fs from 'node:fs';
import { tf, initBackend } from '../lib/tf';
import { experimentConfig } from '../lib/config/experiment';
import { nativeStatus } from '../lib/native';
import { addonOps, deviceTraffic } from '../lib/ops/addon';
import { nativeOps, nativeOpsOn, parseStageDevice } from '../lib/ops/native';
import type { Ops } from '../lib/ops';
import { Trainer } from '../lib/train/trainer';
import { EfficientMORL } from '../lib/model/efficient-morl';
import { ReplayNoise, SeededNoise, type RecordedDraw } from '../lib/model/noise';
import { withH5File } from '../lib/io/h5';
import { readArray, readParamGroup } from '../lib/params/h5';
import type { StageDevice } from '../lib/ops/addon';
import type { ParamRecord } from '../lib/params/store';
import { LocalGroup, type Communicator } from '../lib/train/distributed';
import { NcclCommunicator, ncclStatus, ncclUniqueId } from '../lib/train/nccl';

/** The golden fixture's recorded pass (group no_geco) through nativeOpsOn(device): true when it matches. */
async function goldenCheck(device: StageDevice, file: string): Promise<boolean> {
  const fx = await withH5File(file, 'r', async (f) => {
    const noise: RecordedDraw[] = [];
    for (const k of f.keys('no_geco/noise').sort()) noise.push(await readArray(f, `no_geco/noise/${k}`));
    return {
      net: JSON.parse(String(f.attr('', 'net_config'))) as Record<string, unknown>,
      images: await readArray(f, 'input/images'),
      params: await readParamGroup(f, 'params'),
      noise,
      klBeta: Number(f.attr('no_geco', 'kl_beta') ?? 1),
      globalStep: Number(f.attr('no_geco', 'global_step') ?? 0),
      total: (await readArray(f, 'no_geco/outputs/total_loss')).data[0],
      grads: await readParamGroup(f, 'no_geco/grads'),
    };
  });
  const model = new EfficientMORL(fx.net, { ops: nativeOpsOn(device) });
  const images = tf.tensor(fx.images.data, fx.images.shape);
  try {
    model.params.load(fx.params);
    const res = model.lossAndGrads(images, { noise: new ReplayNoise(fx.noise), klBeta: fx.klBeta, globalStep: fx.globalStep, geco: null });
    const lossErr = Math.abs(res.totalLoss - fx.total) / Math.abs(fx.total);
    // each gradient against its own scale (norm_slots.bias is zero in exact arithmetic: against the largest)
    let globalMax = 0;
    for (const g of Object.values(fx.grads)) for (const v of g.data) globalMax = Math.max(globalMax, Math.abs(v));
    let worst = 0, at = '';
    for (const [k, g] of Object.entries(fx.grads)) {
      const ours = res.grads.get(k)!.dataSync() as Float32Array;
      let diff = 0, scale = 0;
      for (let i = 0; i < g.data.length; i++) {
        diff = Math.max(diff, Math.abs(ours[i] - g.data[i]));
        scale = Math.max(scale, Math.abs(g.data[i]));
      }
      const e = diff / (k === 'hvae_networks.norm_slots.bias' ? globalMax : scale || 1);
      if (e > worst) [worst, at] = [e, k];
    }
    res.dispose();
    const pass = lossErr <= 1e-4 && worst <= 1e-3;
    console.log(`${pass ? 'ok  ' : 'FAIL'} golden fixture ${file} on ${device}: loss within ${lossErr.toExponential(2)} (tolerance 1e-4), `
      + `gradients within ${worst.toExponential(2)} of their scale (worst ${at}; tolerance 1e-3)`);
    return pass;
  } finally {
    images.dispose();
    model.dispose();
  }
}

/**
 * The decoder's gradients summed on the device over a pass's stages (shareDecoderWeights, kept
 * sets) against every stage downloading its own for the tape to add: the same bits, as
 * test/model-native.test.ts checks on the emulator. True when they are.
 */
function sharedWeightsCheck(device: StageDevice): boolean {
  const cfg = { K: 3, input_size: [3, 12, 11] as [number, number, number], z_size: 8, image_decoder: 'small' as const, image_likelihood: 'GMM' as const, stochastic_layers: 2, refinement_iters: 2 };
  const ops = nativeOpsOn(device);
  const shared = new EfficientMORL(cfg, { ops, seed: 21 });
  const own = new EfficientMORL(cfg, { ops: { ...ops, shareDecoderWeights: (spec) => spec }, seed: 21 });
  const images = tf.randomUniform([2, 3, 12, 11], -1, 1, 'float32', 21);
  const rs = shared.lossAndGrads(images, { noise: new SeededNoise(5) });
  const ro = own.lossAndGrads(images, { noise: new SeededNoise(5) });
  try {
    let differ = rs.totalLoss === ro.totalLoss ? 0 : 1;
    for (const [k, g] of ro.grads) {
      const a = g.dataSync(), b = rs.grads.get(k)!.dataSync();
      for (let i = 0; i < a.length; i++) if (!Object.is(a[i], b[i])) differ++;
    }
    console.log(`${differ ? 'FAIL' : 'ok  '} the decoder's gradients summed on ${device} over a pass's stages: ${differ ? `${differ} values differ from` : 'the same bits as'} per-stage downloads summed on the host`);
    return differ === 0;
  } finally {
    rs.dispose();
    ro.dispose();
    images.dispose();
    shared.dispose();
    own.dispose();
  }
}

/**
 * Three training steps with the decoder's, the encoder's and the GRUs' weights and their Adam step on the device against the
 * same steps with Adam on the host (both decoding on the device): every parameter the same bits,
 * and the bus per step without the weights and their gradients. Then the same steps as one
 * data-parallel rank, whose device gradients go through its communicator's allreduce: NCCL on the
 * device's memory on a CUDA device with NCCL, else the host (a one-rank LocalGroup): the same bits.
 */
async function deviceOptimizerCheck(device: StageDevice): Promise<boolean> {
  const S = 12;
  const config = experimentConfig({
    Net: { K: 3, input_size: [3, S, S], z_size: 8, image_decoder: 'small', image_likelihood: 'GMM', stochastic_layers: 2, refinement_iters: 2 },
    training: { batch_size: 4, lr: 1e-3, use_scheduler: false, use_geco: true, geco_reconstruction_target: -0.5, refinement_curriculum: [[-1, 2]] },
    seed: 5,
  });
  const images = tf.randomUniform([4, 3, S, S], -1, 1, 'float32', 9);
  const run = async (deviceOptimizer: boolean, comm?: Communicator) => {
    const t = new Trainer(config, { ops: nativeOpsOn(device), deviceOptimizer, comm });
    try {
      const bus: number[][] = [];
      for (let i = 0; i < 3; i++) {
        const b0 = deviceTraffic();
        (await t.stepAsync(images)).release();
        const b1 = deviceTraffic();
        bus.push([b1.upBytes - b0.upBytes, b1.downBytes - b0.downBytes]);
      }
      return { params: t.parameters(), bus: bus[2] };
    } finally {
      t.dispose();
      comm?.close?.();
    }
  };
  const differing = (a: ParamRecord, b: ParamRecord) => {
    let n = 0;
    for (const k of Object.keys(a)) for (let i = 0; i < a[k].data.length; i++) if (!Object.is(a[k].data[i], b[k].data[i])) n++;
    return n;
  };
  const host = await run(false), dev = await run(true);
  const nccl = device !== 'simt' && ncclStatus().available;
  const rank = await run(true, nccl ? new NcclCommunicator(ncclUniqueId(), 0, 1, Number(device.slice(5))) : LocalGroup.create(1)[0]);
  images.dispose();
  const differ = differing(host.params, dev.params), rankDiffer = differing(dev.params, rank.params);
  const kib = (b: number) => (b / 1024).toFixed(1);
  console.log(`${differ ? 'FAIL' : 'ok  '} 3 training steps with the decoder's, the encoder's and the GRUs' Adam on ${device}: ${differ} parameter values differ from Adam on the host; ` +
    `bus per step ${kib(dev.bus[0])} KiB up, ${kib(dev.bus[1])} KiB down (Adam on the host: ${kib(host.bus[0])}, ${kib(host.bus[1])})`);
  console.log(`${rankDiffer ? 'FAIL' : 'ok  '} the same steps as one data-parallel rank, its device gradients summed ${nccl ? 'by NCCL on the device' : 'through the host'}: ` +
    `${rankDiffer} parameter values differ; bus per step ${kib(rank.bus[0])} KiB up, ${kib(rank.bus[1])} KiB down`);
  return differ === 0 && rankDiffer === 0;
}

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
  ok = sharedWeightsCheck(device) && ok;
  ok = (await deviceOptimizerCheck(device)) && ok;
  const fi = process.argv.indexOf('--fixture');
  const fixture = fi > 0 ? process.argv[fi + 1] : 'fixtures/tetrominoes-small-gaussian.h5';
  if (fs.existsSync(fixture)) ok = (await goldenCheck(device, fixture)) && ok;
  else console.log(`skip the golden fixture: no ${fixture}`);
  if (device !== 'simt') console.log(`FP32 FMA peak of ${device}: ${addonOps().gpuPeakGflops(Number(device.slice(5)), 1).toFixed(0)} GFLOP/s`);
  const t = deviceTraffic();
  console.log(`bus so far: ${(t.upBytes / 2 ** 20).toFixed(1)} MiB up in ${t.uploads} copies, ${(t.downBytes / 2 ** 20).toFixed(1)} MiB down in ${t.downloads}`);
  return ok ? 0 : 1;
}

main().then((code) => process.exit(code), (err) => {
  console.error(err instanceof Error ? err.stack ?? err.message : err);
  process.exit(1);
});
