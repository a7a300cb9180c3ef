/**
 * The training loop: data in, steps (trainer.ts), logs and checkpoints out. Plain and visible:
 *
 *   for step in [start, end):
 *     batch ← iterator;  result ← trainer.step(batch)
 *     log scalars (JSON lines, TensorBoard), images every tensorboard_freq, held-out ARI
 *     checkpoint every checkpoint_freq, at the end, and when SIGINT/SIGTERM arrives
 *
 * A checkpoint holds everything that decides the rest of the run (parameters, Adam's moments,
 * GECO's state, the step, the noise RNG and the data iterator's position), so a resumed run
 * continues exactly as the uninterrupted one would have.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { SingleBar } from 'cli-progress';
import { tf } from '../tf';
import { experimentConfig, gecoTargetCheck, type ExperimentConfig } from '../config/experiment';
import { H5ImageDataset, type Batch } from '../data/dataset';
import { BatchIterator, type IteratorPosition } from '../data/iterator';
import { adjustedRandIndex } from '../metrics';
import { SeededNoise, ShardedNoise, type NoiseSource } from '../model/noise';
import type { AdamState } from '../optim/adam';
import type { ParamRecord } from '../params/store';
import { mixSeeds, Rng, type RngState } from '../util/rng';
import { imageGrid } from '../util/image-grid';
import { checkpointName, latestCheckpoint, readCheckpoint, saveRunCheckpoint, type CheckpointData, type TensorEntry } from './checkpoint';
import { allgatherUint32, barrier, DistributedError, shardRange, type Communicator } from './distributed';
import { TensorBoardWriter } from './tensorboard';
import { opsForBackend } from '../ops/native';
import { Trainer, type StepResult, type TrainerState } from './trainer';

export class TrainingError extends Error {
  /** Data parallel: every rank stops with this same error at the same step (decided on reduced values). */
  readonly allRanks: boolean;

  constructor(message: string, opts: { allRanks?: boolean } = {}) {
    super(message);
    this.name = 'TrainingError';
    this.allRanks = opts.allRanks ?? false;
  }
}

/** Data-parallel training (distributed.ts): this process is one of `comm.worldSize` ranks. */
export interface DistributedOptions {
  comm: Communicator;
  /** Compare the ranks' parameter checksums every this many steps (default 100; 0: only at start and end). */
  checksumEvery?: number;
}

export interface TrainCallbacks {
  /** After every step (applied or skipped). */
  onStep?: (result: StepResult) => void | Promise<void>;
  /** After every checkpoint written. */
  onCheckpoint?: (file: string, step: number) => void | Promise<void>;
}

export interface TrainOptions {
  config: ExperimentConfig;
  /** The processed .h5 dataset to train on. */
  dataFile: string;
  /** The run folder: checkpoints/, log.jsonl, tb/, config.json. */
  outDir: string;
  /** Total steps of the run (default: the config's iters + 1, as the original runs 0..iters). */
  steps?: number;
  /** Continue from a checkpoint: a file, or true for the newest one in outDir/checkpoints. */
  resume?: string | boolean;
  /** Start from these weights (state_dict names), e.g. imported from a PyTorch .pth. */
  initialParams?: ParamRecord;
  callbacks?: TrainCallbacks;
  /** Show a progress bar on stderr (default: when stderr is a terminal). */
  progress?: boolean;
  /** Write checkpoints and stop on SIGINT/SIGTERM (default true). */
  handleSignals?: boolean;
  /** Where human-readable messages go (default: stderr). */
  log?: (message: string) => void;
  /** Read-ahead batches of the data iterator (default 2). */
  prefetch?: number;
  /**
   * Data parallel: every rank calls train() with the same options and its communicator. Each
   * walks the same global batches and trains on its contiguous share; rank 0 alone writes the
   * checkpoints, logs, TensorBoard events and progress. training.batch_size is the GLOBAL batch.
   */
  distributed?: DistributedOptions;
  /** 'native' (the C++ addon), 'js' (pure TypeScript) or 'auto' (default: native when built) */
  backend?: string;
  /** where the decoding stages, the encoder and the GRU cells run: 'cpu' (default) or 'cuda:N' (see nativeOpsOn) */
  device?: string;
  /** 'fp32' (default) or 'bf16': the CPU convolutions' products (see ConvPrecision) */
  precision?: string;
}

export interface TrainSummary {
  /** The next step a resumed run would take. */
  step: number;
  stoppedBy: 'done' | 'signal';
  lastCheckpoint?: string;
  skippedSteps: number;
  last?: StepResult;
  outDir: string;
}

interface RunMeta {
  kind: 'emorl-training-checkpoint';
  config: ExperimentConfig;
  trainer: TrainerState;
  noiseRng: RngState;
  iterator: IteratorPosition;
  adamSteps: number;
  dataFile: string;
}

const PARAM = 'param/';
const ADAM_M = 'adam.m/';
const ADAM_V = 'adam.v/';

function buildCheckpoint(trainer: Trainer, noise: SeededNoise, iterator: IteratorPosition, dataFile: string): CheckpointData {
  const tensors = new Map<string, TensorEntry>();
  for (const [name, v] of Object.entries(trainer.parameters())) tensors.set(PARAM + name, v);
  const adam = trainer.optimizer.exportState();
  for (const [name, v] of adam.m) tensors.set(ADAM_M + name, v);
  for (const [name, v] of adam.v) tensors.set(ADAM_V + name, v);
  const meta: RunMeta = {
    kind: 'emorl-training-checkpoint',
    config: trainer.config,
    trainer: { ...trainer.state },
    noiseRng: noise.rng.state(),
    iterator,
    adamSteps: adam.steps,
    dataFile: path.resolve(dataFile),
  };
  return { meta: meta as unknown as Record<string, unknown>, tensors };
}

/** What a training checkpoint holds, split back into its parts. */
export interface LoadedTrainingCheckpoint {
  file: string;
  meta: RunMeta;
  params: ParamRecord;
  adam: AdamState;
}

export function loadTrainingCheckpoint(file: string): LoadedTrainingCheckpoint {
  const ckpt = readCheckpoint(file);
  const meta = ckpt.meta as unknown as RunMeta;
  if (meta.kind !== 'emorl-training-checkpoint') throw new TrainingError(`${file}: not a training checkpoint (kind ${JSON.stringify(meta.kind)})`);
  try {
    meta.config = experimentConfig(meta.config);
  } catch (err) {
    throw new TrainingError(`${file}: stored config is invalid: ${(err as Error).message}`);
  }
  const params: ParamRecord = {};
  const adam: AdamState = { steps: meta.adamSteps, m: new Map(), v: new Map() };
  for (const [name, t] of ckpt.tensors) {
    if (name.startsWith(PARAM)) params[name.slice(PARAM.length)] = t;
    else if (name.startsWith(ADAM_M)) adam.m.set(name.slice(ADAM_M.length), t);
    else if (name.startsWith(ADAM_V)) adam.v.set(name.slice(ADAM_V.length), t);
    else throw new TrainingError(`${file}: unexpected tensor '${name}'`);
  }
  return { file, meta, params, adam };
}

/** Checks that the data fits the model before any long work starts. */
async function checkData(config: ExperimentConfig, dataFile: string): Promise<{ hasTestMasks: boolean }> {
  const ds = await H5ImageDataset.open(dataFile, { split: config.training.mode, preprocess: config.dataset.clevr_preprocess_style });
  try {
    const [C, H, W] = config.Net.input_size;
    const { channels, height, width } = ds.info;
    if (channels !== C || height !== H || width !== W) {
      throw new TrainingError(
        `${dataFile}: '${config.training.mode}/imgs' gives ${channels}×${height}×${width} images (C×H×W${config.dataset.clevr_preprocess_style ? ` after '${config.dataset.clevr_preprocess_style}'` : ''}), but Net.input_size is [${C}, ${H}, ${W}]`,
      );
    }
  } finally {
    ds.close();
  }
  let hasTestMasks = false;
  try {
    const test = await H5ImageDataset.open(dataFile, { split: 'test', masks: true, preprocess: config.dataset.clevr_preprocess_style });
    hasTestMasks = test.length > 0;
    test.close();
  } catch {
    hasTestMasks = false;
  }
  return { hasTestMasks };
}

function checkWritable(dir: string): void {
  try {
    fs.mkdirSync(dir, { recursive: true });
    const probe = path.join(dir, `.write-test-${process.pid}`);
    fs.writeFileSync(probe, '');
    fs.rmSync(probe);
  } catch (err) {
    throw new TrainingError(`${dir}: output folder is not writable (${(err as Error).message})`);
  }
}

/** A held-out batch with masks, for the foreground ARI logged during training. */
interface HeldOut {
  images: tf.Tensor4D;
  masks: Batch['masks'];
  shape: [number, number, number, number];
}

async function loadHeldOut(config: ExperimentConfig, dataFile: string): Promise<HeldOut> {
  const ds = await H5ImageDataset.open(dataFile, { split: 'test', masks: true, preprocess: config.dataset.clevr_preprocess_style });
  try {
    const n = Math.min(config.training.ari_batch_size, ds.length);
    const batch = await ds.readBatch(Array.from({ length: n }, (_, i) => i));
    const [C, H, W] = config.Net.input_size;
    const { numEntities, maskHeight, maskWidth } = ds.info;
    if (maskHeight !== H || maskWidth !== W) {
      throw new TrainingError(`${dataFile}: test masks are ${maskHeight}×${maskWidth}, the model's images ${H}×${W}; held-out ARI needs equal sizes`);
    }
    return { images: tf.tensor4d(batch.images, [n, C, H, W]), masks: batch.masks, shape: [n, numEntities, H, W] };
  } finally {
    ds.close();
  }
}

function heldOutAri(trainer: Trainer, held: HeldOut, refinementIters: number): number {
  // Its own noise stream, so that evaluating never shifts the training draws.
  const probs = trainer.finalMasks(held.images, refinementIters, new SeededNoise(new Rng(mixSeeds(trainer.config.seed, 0xa41))));
  const [n, , H, W] = held.shape;
  const ari = adjustedRandIndex({ data: held.masks as Uint8Array, shape: held.shape }, { data: probs, shape: [n, trainer.config.Net.K, H, W] }, { excludeBackground: true });
  let sum = 0;
  for (const a of ari) sum += a;
  return sum / ari.length;
}

/** Image grids of the first few images of a step, as the original logs them. */
function logImages(tb: TensorBoardWriter, step: number, images: tf.Tensor, outputs: NonNullable<ReturnType<Trainer['step']>['outputs']>, config: ExperimentConfig): void {
  const [C, H, W] = config.Net.input_size;
  const K = config.Net.K;
  const n = Math.min(4, images.shape[0]);
  const put = (tag: string, data: Float32Array, rows: number, cols: number, channels: number) => {
    const g = imageGrid(data, rows, cols, channels, H, W);
    tb.image(step, tag, g.data, g.height, g.width, 3);
  };
  tf.tidy(() => {
    const first = <T extends tf.Tensor>(t: T) => t.slice(0, n) as T;
    put('train/images', tf.div(tf.add(first(images), 1), 2).dataSync() as Float32Array, 1, n, C);
    for (const s of outputs.stages) {
      put(`train/recons_stage_${s.t}`, first(s.recons).dataSync() as Float32Array, 1, n, C);
    }
    const last = outputs.stages[outputs.stages.length - 1];
    const masks = tf.exp(first(last.masks)); // [n,K,1,H,W]
    put('train/masks', masks.dataSync() as Float32Array, n, K, 1);
    put('train/components', tf.mul(first(last.means), masks).dataSync() as Float32Array, n, K, C);
    outputs.attn.forEach((a, l) => {
      const att = first(a);
      const scaled = tf.div(att, tf.max(att, [2, 3, 4], true));
      put(`train/attention_${l}`, scaled.dataSync() as Float32Array, n, K, 1);
    });
  });
}

/** Trains; resolves when the run is done or was stopped by a signal (after checkpointing). */
export async function train(opts: TrainOptions): Promise<TrainSummary> {
  const comm = opts.distributed?.comm;
  try {
    return await trainRank(opts);
  } catch (err) {
    // The other ranks must not wait for this one in a collective that will never come.
    comm?.close?.();
    throw err;
  }
}

async function trainRank(opts: TrainOptions): Promise<TrainSummary> {
  const comm = opts.distributed?.comm;
  const rank = comm?.rank ?? 0;
  const world = comm?.worldSize ?? 1;
  const isRoot = rank === 0;
  const checksumEvery = opts.distributed?.checksumEvery ?? 100;
  if (!Number.isInteger(checksumEvery) || checksumEvery < 0) throw new TrainingError(`checksumEvery must be an integer >= 0, got ${checksumEvery}`);
  const rootLog = opts.log ?? ((m: string) => process.stderr.write(`${m}\n`));
  // Data parallel: rank 0 speaks for the job.
  const log = isRoot ? rootLog : () => undefined;
  let config = opts.config;
  const outDir = path.resolve(opts.outDir);
  const ckptDir = path.join(outDir, 'checkpoints');
  if (isRoot) checkWritable(outDir);

  let resumed: LoadedTrainingCheckpoint | undefined;
  if (opts.resume) {
    const file = typeof opts.resume === 'string' ? opts.resume : latestCheckpoint(ckptDir);
    if (!file) throw new TrainingError(`${ckptDir}: no checkpoint to resume from`);
    resumed = loadTrainingCheckpoint(file);
    config = resumed.meta.config;
  }
  let shard: [number, number] = [0, config.training.batch_size];
  if (comm) {
    try {
      shard = shardRange(config.training.batch_size, rank, world);
    } catch (err) {
      if (err instanceof DistributedError) throw new TrainingError(err.message);
      throw err;
    }
  }
  const { hasTestMasks } = await checkData(config, opts.dataFile);
  const totalSteps = opts.steps ?? config.training.iters + 1;
  if (!Number.isInteger(totalSteps) || totalSteps < 0) throw new TrainingError(`steps must be a non-negative integer, got ${totalSteps}`);

  const geco = gecoTargetCheck(config);
  if (config.training.use_geco && geco.unreachable) {
    log(
      `warning: GECO target ${geco.target.toFixed(1)} (training.geco_reconstruction_target × C·H·W) is below the smallest ` +
        `Gaussian nll the model can reach, C·H·W·log_scale = ${geco.attainableMin?.toFixed(1)}; β will grow for the whole run (as in the original)`,
    );
  }

  const trainer = new Trainer(config, { comm, ops: opsForBackend(opts.backend ?? 'auto', opts.device ?? 'cpu', opts.precision ?? 'fp32') });
  const noise = new SeededNoise(new Rng(mixSeeds(config.seed, 0x7e15e)));
  // Data parallel: every rank draws the global noise and keeps its rows (the checkpoint keeps
  // the one global RNG state, as a single-rank run's).
  const stepNoise: NoiseSource = world > 1 ? new ShardedNoise(noise, rank, world) : noise;
  let start: IteratorPosition = { epoch: 0, batch: 0 };
  if (resumed) {
    trainer.model.params.load(resumed.params);
    trainer.optimizer.importState(resumed.adam);
    trainer.state = { ...resumed.meta.trainer };
    noise.rng.setState(resumed.meta.noiseRng);
    start = resumed.meta.iterator;
    log(`resumed from ${resumed.file} at step ${trainer.state.step}`);
  } else if (opts.initialParams) {
    // Strict: every parameter of this configuration must be there, with its shape.
    trainer.model.params.load(opts.initialParams);
  }

  const iterator = await BatchIterator.open(
    opts.dataFile,
    { split: config.training.mode, preprocess: config.dataset.clevr_preprocess_style },
    { batchSize: config.training.batch_size, seed: config.seed, prefetch: opts.prefetch ?? 2 },
    start,
  );
  const held = isRoot && hasTestMasks && config.training.ari_freq > 0 ? await loadHeldOut(config, opts.dataFile) : undefined;
  if (isRoot) fs.writeFileSync(path.join(outDir, 'config.json'), JSON.stringify(config, null, 2));
  const jsonl = isRoot ? fs.openSync(path.join(outDir, 'log.jsonl'), 'a') : undefined;
  const tb = isRoot ? new TensorBoardWriter(path.join(outDir, 'tb')) : undefined;

  let stopSignal: NodeJS.Signals | undefined;
  const onSignal = (sig: NodeJS.Signals) => {
    if (stopSignal) return;
    stopSignal = sig;
    log(`\n${sig}: finishing the current step, then writing a checkpoint`);
  };
  const handleSignals = opts.handleSignals ?? true;
  if (handleSignals) {
    process.on('SIGINT', onSignal);
    process.on('SIGTERM', onSignal);
  }

  const showBar = isRoot && (opts.progress ?? Boolean(process.stderr.isTTY));
  const bar = showBar
    ? new SingleBar({
        stream: process.stderr,
        format: 'step {value}/{total} [{bar}] loss {loss} nll {nll} kl {kl} β {beta} | {rate} steps/s | ETA {eta_formatted}',
        hideCursor: true,
      })
    : undefined;
  bar?.start(totalSteps, trainer.state.step, { loss: '-', nll: '-', kl: '-', beta: '-', rate: '-' });

  let lastCheckpoint: string | undefined;
  const checkpoint = async (): Promise<void> => {
    if (isRoot) {
      lastCheckpoint = saveRunCheckpoint(ckptDir, trainer.state.step, buildCheckpoint(trainer, noise, iterator.position(), opts.dataFile), config.training.keep_checkpoints);
      await opts.callbacks?.onCheckpoint?.(lastCheckpoint, trainer.state.step);
    } else {
      lastCheckpoint = path.join(ckptDir, checkpointName(trainer.state.step));
    }
    // Nobody runs ahead of (or stops before) a checkpoint rank 0 is writing.
    if (comm) await barrier(comm);
  };
  /** Data parallel: all ranks must hold bit-identical parameters (a collective: every rank calls it). */
  const verifyRanks = async (): Promise<void> => {
    if (!comm || world === 1) return;
    const sums = await allgatherUint32(comm, trainer.parameterChecksum());
    if (sums.some((c) => c !== sums[0])) {
      throw new TrainingError(
        `ranks diverged at step ${trainer.state.step}: parameter checksums ${sums.map((c, r) => `rank ${r} ${c.toString(16).padStart(8, '0')}`).join(', ')}`,
        { allRanks: true },
      );
    }
  };
  // Data parallel: the stop the ranks agreed on (a signal on any rank, reduced with the gradients).
  let stopAll = false;

  let last: StepResult | undefined;
  const t0 = Date.now();
  const firstStep = trainer.state.step;
  try {
    await verifyRanks();
    while (trainer.state.step < totalSteps && !(comm ? stopAll : stopSignal)) {
      // A prefetched batch is an already-settled promise, and awaiting it never returns to the
      // event loop; yield once per step so that signals (and the reader thread) are serviced.
      await new Promise<void>((resolve) => setImmediate(resolve));
      if (stopSignal && !comm) break;
      const step = trainer.state.step;
      const batch = await iterator.next();
      const [C, H, W] = config.Net.input_size;
      // Data parallel: this rank's contiguous share of the global batch.
      const [lo, hi] = comm ? shard : [0, batch.size];
      if (hi > batch.size) throw new TrainingError(`batch of ${batch.size} images, expected ${config.training.batch_size}`);
      const chw = C * H * W;
      const images = tf.tensor4d(comm ? batch.images.subarray(lo * chw, hi * chw) : batch.images, [hi - lo, C, H, W]);
      const wantImages = isRoot && step % config.training.tensorboard_freq === 0;
      let r: ReturnType<Trainer['step']>;
      try {
        if (comm) {
          const d = await trainer.stepAsync(images, { noise: stepNoise, outputs: wantImages, stopRequested: stopSignal !== undefined });
          if (d.stopRequested) stopAll = true;
          const { stopRequested: _, ...rest } = d;
          r = rest;
        } else {
          r = trainer.step(images, { noise, outputs: wantImages });
        }
      } catch (err) {
        images.dispose();
        throw err;
      }
      try {
        if (wantImages && r.outputs && tb) logImages(tb, step, images, r.outputs, config);
      } finally {
        r.release();
        images.dispose();
      }
      last = r;
      if (!r.applied) {
        log(`step ${step}: skipped (${r.skipReason}); ${trainer.state.consecutiveNonFinite} in a row`);
        if (trainer.state.consecutiveNonFinite >= config.training.max_nonfinite_steps) {
          await checkpoint();
          throw new TrainingError(
            `stopped: ${trainer.state.consecutiveNonFinite} consecutive steps had non-finite losses or gradients (training.max_nonfinite_steps); the last good state is in ${lastCheckpoint}`,
            { allRanks: true },
          );
        }
      }
      const rate = (trainer.state.step - firstStep) / Math.max(1e-3, (Date.now() - t0) / 1000);
      const scalars: Record<string, number> = config.training.model === 'SlotAttention' ? { 'train/MSE': r.totalLoss, 'train/lr': r.lr, 'train/grad_norm': r.gradNorm } : {
        'train/total_loss': r.totalLoss,
        'train/NLL': r.nll,
        'train/KL': r.kl,
        'train/KL_beta': r.klBeta,
        'train/lr': r.lr,
        'train/grad_norm': r.gradNorm,
        'train/refinement_iters': r.refinementIters,
      };
      if (config.training.use_geco) {
        scalars['train/geco_beta'] = r.gecoBeta;
        scalars['train/geco_C_ema'] = r.gecoCEma;
      }
      r.deltas.forEach((d, i) => (scalars[`train/norm_delta_lamda_${i}`] = d));
      if (held && step % config.training.ari_freq === 0) {
        scalars['train/heldout_fg_ari'] = heldOutAri(trainer, held, r.refinementIters);
      }
      if (tb && (step % config.training.tensorboard_freq === 0 || 'train/heldout_fg_ari' in scalars)) tb.scalars(step, scalars);
      if (jsonl !== undefined && (step % config.training.log_freq === 0 || !r.applied || 'train/heldout_fg_ari' in scalars)) {
        const line = {
          step,
          time: new Date().toISOString(),
          applied: r.applied,
          lr: r.lr,
          total_loss: r.totalLoss,
          nll: r.nll,
          kl: r.kl,
          kl_beta: r.klBeta,
          geco_beta: r.gecoBeta,
          geco_C_ema: r.gecoCEma,
          grad_norm: r.gradNorm,
          refinement_iters: r.refinementIters,
          deltas: r.deltas,
          steps_per_s: rate,
          skipped_steps: trainer.state.skippedSteps,
          ...(scalars['train/heldout_fg_ari'] !== undefined ? { heldout_fg_ari: scalars['train/heldout_fg_ari'] } : {}),
        };
        fs.writeSync(jsonl, JSON.stringify(line) + '\n');
      }
      bar?.update(trainer.state.step, {
        loss: r.totalLoss.toFixed(1),
        nll: r.nll.toFixed(1),
        kl: r.kl.toFixed(1),
        beta: r.gecoBeta.toFixed(3),
        rate: rate.toFixed(2),
      });
      await opts.callbacks?.onStep?.(r);
      if (checksumEvery > 0 && trainer.state.step % checksumEvery === 0) await verifyRanks();
      if (trainer.state.step % config.training.checkpoint_freq === 0 && trainer.state.step < totalSteps) await checkpoint();
    }
    await verifyRanks();
    await checkpoint();
  } finally {
    bar?.stop();
    if (handleSignals) {
      process.off('SIGINT', onSignal);
      process.off('SIGTERM', onSignal);
    }
    if (jsonl !== undefined) fs.closeSync(jsonl);
    tb?.close();
    held?.images.dispose();
    await iterator.close();
    trainer.dispose();
  }
  return {
    step: trainer.state.step,
    stoppedBy: (comm ? stopAll : stopSignal) ? 'signal' : 'done',
    lastCheckpoint,
    skippedSteps: trainer.state.skippedSteps,
    last,
    outDir,
  };
}
