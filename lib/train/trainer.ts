/**
 * One optimisation step of EfficientMORL exactly as the original train.py takes it, and the
 * state that makes a run resumable:
 *
 *   I ← curriculum(step); loss, grads ← model(images); lr ← schedule(step);
 *   clip grads to global norm 5; Adam(lr); then GECO: C_ema ← C − nll at the warm-start step,
 *   afterwards C_ema ← EMA, β ← max(0.55, β − step·C_ema).
 *
 * A step whose loss or gradients are not finite changes nothing (no update, no GECO step) and is
 * counted; the caller decides when too many in a row end the run.
 */
import { tf } from '../tf';
import type { ExperimentConfig } from '../config/experiment';
import { EfficientMORL, type PassOutputs } from '../model/efficient-morl';
import { SlotAttention } from '../model/slot-attention';
import { Geco } from '../model/geco';
import type { NoiseSource } from '../model/noise';
import { Adam, clipFromNorms, clipScale, gradNorms } from '../optim/adam';
import type { DeviceParams } from '../ops/device-params';
import type { Ops } from '../ops';
import { defaultOps } from '../ops/native';
import type { ParamRecord } from '../params/store';
import { checksumArrays, type Communicator } from './distributed';
import { learningRate, refinementItersAt } from './schedule';

/** PyTorch's clip_grad_norm_ bound that the original hard-codes. */
export const CLIP_GRAD_NORM = 5.0;

export interface StepResult {
  step: number;
  lr: number;
  refinementIters: number;
  totalLoss: number;
  nll: number;
  kl: number;
  deltas: number[];
  /** Global gradient norm before clipping. */
  gradNorm: number;
  klBeta: number;
  gecoCEma: number;
  gecoBeta: number;
  /** False when the step was skipped for a non-finite loss or gradient. */
  applied: boolean;
  /** Why a step was skipped. */
  skipReason?: string;
}

export interface StepOptions {
  /** The draws of this step (default: the model's seeded noise). */
  noise?: NoiseSource;
  /** Keep per-stage outputs (for image logging); the caller disposes them via `release`. */
  outputs?: boolean;
  /** Data parallel: this rank asks every rank to stop after this step (reduced with the gradients). */
  stopRequested?: boolean;
}

/** What `stepAsync` adds: whether any rank asked to stop (false without a communicator unless asked). */
export interface DistributedStepResult {
  stopRequested: boolean;
}

/** The trainer's own state (beyond parameters and optimizer moments), as a checkpoint stores it. */
export interface TrainerState {
  /** The next step to run. */
  step: number;
  klBeta: number;
  consecutiveNonFinite: number;
  skippedSteps: number;
}

/** The models a config's `training.model` names. */
export type TrainableModel = EfficientMORL | SlotAttention;

/** NaN for a model without that parameter (Slot Attention keeps no GECO state). */
function scalarParam(model: TrainableModel, name: string): number {
  return model.params.has(name) ? (model.params.get(name).dataSync() as Float32Array)[0] : NaN;
}

function setScalarParam(model: TrainableModel, name: string, value: number): void {
  model.params.set(name, { data: Float32Array.of(value), shape: [] });
}

/** What a training pass of either model gives the loop, in EfficientMORL's terms. */
interface PassResult {
  totalLoss: number;
  nll: number;
  kl: number;
  deltas: number[];
  grads: Map<string, tf.Tensor>;
  outputs?: PassOutputs;
  dispose(): void;
}

type StepReturn = StepResult & { outputs?: PassOutputs; release: () => void };

export class Trainer {
  readonly model: TrainableModel;
  readonly optimizer: Adam;
  readonly geco: Geco | null;
  /**
   * The decoder's, the encoder's and the GRUs' weights kept on the GPU device the model runs on, with their
   * optimizer step there (ops/device-params.ts); none: every parameter is trained on the host.
   */
  readonly deviceParams: DeviceParams[];
  /** Data parallel: the ranks' gradient sum (absent: this process trains alone). */
  readonly comm: Communicator | undefined;
  state: TrainerState;

  constructor(
    readonly config: ExperimentConfig,
    opts: {
      model?: TrainableModel;
      seed?: number;
      ops?: Ops;
      comm?: Communicator;
      /**
       * On a GPU device, keep the decoder's, the encoder's and the GRUs' weights there with their Adam step
       * (default: yes). Data-parallel ranks sum those gradients there too when the communicator can
       * (NCCL), else through the host.
       */
      deviceOptimizer?: boolean;
    } = {},
  ) {
    this.comm = opts.comm;
    // The native kernels when the addon is built, else the TypeScript reference (same maths).
    const modelOptions = { seed: opts.seed ?? config.seed, ops: opts.ops ?? defaultOps() };
    this.model =
      opts.model ?? (config.training.model === 'SlotAttention' ? new SlotAttention(config.Net, modelOptions) : new EfficientMORL(config.Net, modelOptions));
    this.optimizer = new Adam(this.model.params, { lr: config.training.lr });
    this.deviceParams = (opts.deviceOptimizer ?? true) && this.model instanceof EfficientMORL ? this.model.keepWeightsOnDevice() : [];
    for (const group of this.deviceParams) this.optimizer.attachDevice(group);
    const t = config.training;
    const [C, H, W] = config.Net.input_size;
    this.geco = t.use_geco
      ? new Geco({ target: t.geco_reconstruction_target * C * H * W, alpha: t.geco_ema_alpha, stepSizeAcceleration: t.geco_step_size_acceleration })
      : null;
    this.state = { step: 0, klBeta: t.kl_beta_init, consecutiveNonFinite: 0, skippedSteps: 0 };
  }

  dispose(): void {
    this.optimizer.dispose();
    this.model.dispose();
  }

  /** Refinement steps the curriculum gives at a step. */
  refinementItersAt(step: number): number {
    return refinementItersAt(step, this.config.training.refinement_curriculum, this.config.Net.refinement_iters);
  }

  /**
   * Runs the current step on a batch [B,C,H,W] in [-1,1] and advances the step counter. With
   * `outputs`, the result's `release()` frees the per-stage tensors in `gradResult.outputs`.
   */
  step(images: tf.Tensor, opts: StepOptions = {}): StepReturn {
    if (this.comm) throw new Error('Trainer.step: a data-parallel trainer steps with `await stepAsync(...)`');
    const I = this.model instanceof SlotAttention ? 0 : this.refinementItersAt(this.state.step);
    return this.finish(this.pass(images, I, opts), I);
  }

  /**
   * The same step for data-parallel training: `images` is this rank's shard of the global
   * batch, and `opts.noise` gives this rank's rows of the global draws (ShardedNoise). The loss
   * is normalised by the global batch size, the gradients and reported scalars are summed over
   * the ranks, and the update that follows is the same on every rank. Without a communicator it
   * is `step()`.
   */
  async stepAsync(images: tf.Tensor, opts: StepOptions = {}): Promise<StepReturn & DistributedStepResult> {
    const comm = this.comm;
    if (!comm) return { ...this.step(images, opts), stopRequested: Boolean(opts.stopRequested) };
    const I = this.model instanceof SlotAttention ? 0 : this.refinementItersAt(this.state.step);
    const local = this.pass(images, I, opts, images.shape[0] * comm.worldSize);
    let reduced: PassResult;
    let stop: boolean;
    try {
      const keys = [...local.grads.keys()].sort();
      const grads = keys.map((k) => local.grads.get(k)!.dataSync() as Float32Array);
      // the gradients waiting on a device: summed there when the communicator can, else with the rest
      const waiting = this.deviceParams.filter((g) => g.hasGradients);
      const viaHost = comm.allreduceDeviceGradients ? [] : waiting;
      if (comm.allreduceDeviceGradients) for (const g of waiting) comm.allreduceDeviceGradients(g);
      const scalars = Float32Array.from([local.totalLoss, local.nll, local.kl, opts.stopRequested ? 1 : 0, local.deltas.length, ...local.deltas]);
      const sums = await comm.allreduceSum([...grads, ...viaHost.map((g) => g.readGradients()), scalars]);
      viaHost.forEach((g, i) => g.writeGradients(sums[keys.length + i]));
      const s = sums[sums.length - 1];
      if (s[4] !== comm.worldSize * local.deltas.length) throw new Error(`ranks disagree on the number of refinement steps (sum ${s[4]})`);
      const summed = new Map<string, tf.Tensor>();
      keys.forEach((k, i) => summed.set(k, tf.tensor(sums[i], local.grads.get(k)!.shape, 'float32')));
      for (const g of local.grads.values()) g.dispose();
      local.grads.clear();
      stop = s[3] > 0;
      reduced = {
        totalLoss: s[0],
        nll: s[1],
        kl: s[2],
        deltas: Array.from(s.subarray(5)),
        grads: summed,
        outputs: local.outputs,
        dispose: () => local.dispose(),
      };
    } catch (err) {
      local.dispose();
      for (const group of this.deviceParams) group.discardGradients();
      throw err;
    }
    return { ...this.finish(reduced, I), stopRequested: stop };
  }

  /** Clipping, Adam and GECO after the (reduced) loss and gradients of the current step. */
  private finish(r: PassResult, I: number): StepReturn {
    const step = this.state.step;
    const t = this.config.training;
    const lr = learningRate(step, t);
    const base = {
      step,
      lr,
      refinementIters: I,
      totalLoss: r.totalLoss,
      nll: r.nll,
      kl: r.kl,
      deltas: r.deltas,
      klBeta: this.state.klBeta,
    };
    let skipReason: string | undefined;
    if (![r.totalLoss, r.nll, r.kl].every(Number.isFinite)) skipReason = `non-finite loss (total ${r.totalLoss}, nll ${r.nll}, kl ${r.kl})`;
    let gradNorm = NaN;
    if (!skipReason) {
      // clipping scales the gradients inside Adam's loop (no scaled copies)
      const { norm, scale } = t.clip_grad_norm ? this.clipScale(r.grads) : { norm: this.globalNorm(r.grads), scale: 1 };
      gradNorm = norm;
      if (!Number.isFinite(norm)) skipReason = `non-finite gradient norm ${norm}`;
      else this.optimizer.applyGradients(r.grads, lr, scale);
    }
    for (const group of this.deviceParams) group.discardGradients(); // a skipped step's (an applied step took them)
    const outputs = r.outputs;
    for (const g of r.grads.values()) g.dispose();
    this.state.step = step + 1;
    if (skipReason) {
      this.state.consecutiveNonFinite++;
      this.state.skippedSteps++;
    } else {
      this.state.consecutiveNonFinite = 0;
      this.gecoUpdate(step, r.nll);
    }
    return {
      ...base,
      gradNorm,
      gecoCEma: scalarParam(this.model, 'geco_C_ema'),
      gecoBeta: scalarParam(this.model, 'geco_beta'),
      applied: !skipReason,
      skipReason,
      outputs,
      release: () => r.dispose(),
    };
  }

  /**
   * clipScale over every gradient, the device's included: the per-tensor norms summed in the
   * parameters' order, as the host alone would sum them.
   */
  private clipScale(grads: Map<string, tf.Tensor>): { norm: number; scale: number } {
    if (!this.deviceParams.length) return clipScale(grads, CLIP_GRAD_NORM);
    const host = gradNorms(grads);
    const device = new Map(this.deviceParams.flatMap((group) => [...group.gradNorms()]));
    const names = this.model.params.trainableNames().filter((n) => host.has(n) || device.has(n));
    return clipFromNorms(names.map((n) => host.get(n) ?? device.get(n)!), CLIP_GRAD_NORM);
  }

  /** The global gradient norm (reported when not clipping), the device's gradients included. */
  private globalNorm(grads: Map<string, tf.Tensor>): number {
    let sumSq = 0;
    for (const g of grads.values()) {
      const sq = tf.tidy(() => tf.sum(tf.square(g)));
      sumSq += (sq.dataSync() as Float32Array)[0];
      sq.dispose();
    }
    for (const group of this.deviceParams) for (const n of group.gradNorms().values()) sumSq += n * n;
    return Math.sqrt(sumSq);
  }

  /** Loss and gradients of the current step, in one shape for both models. */
  private pass(images: tf.Tensor, refinementIters: number, opts: StepOptions, lossBatchSize?: number): PassResult {
    const step = this.state.step;
    if (this.model instanceof SlotAttention) {
      // The original trains Slot Attention on its reconstruction loss alone (reported as nll).
      const r = this.model.lossAndGrads(images, { noise: opts.noise, outputs: opts.outputs ?? false, lossBatchSize });
      const o = r.outputs;
      return {
        totalLoss: r.totalLoss,
        nll: r.totalLoss,
        kl: 0,
        deltas: [],
        grads: r.grads,
        outputs: o ? { stages: [{ t: 0, means: o.xMeans, masks: o.masks, recons: o.recons }], attn: o.attn } : undefined,
        dispose: () => r.dispose(),
      };
    }
    return this.model.lossAndGrads(images, {
      klBeta: this.state.klBeta,
      globalStep: step,
      geco: this.geco,
      refinementIters,
      noise: opts.noise,
      outputs: opts.outputs ?? false,
      lossBatchSize,
    });
  }

  /** Mask probabilities [B,K,H,W] of the final stage, for evaluation during training. */
  finalMasks(images: tf.Tensor, refinementIters: number, noise: NoiseSource): Float32Array {
    const r = this.model instanceof SlotAttention ? this.model.infer(images, { noise }) : this.model.infer(images, { refinementIters, noise });
    try {
      const masks = 'stages' in r.outputs ? r.outputs.stages[r.outputs.stages.length - 1].masks : r.outputs.masks;
      return tf.tidy(() => tf.exp(masks).dataSync() as Float32Array);
    } finally {
      r.dispose();
    }
  }

  /** The original's GECO bookkeeping after the optimizer step. */
  private gecoUpdate(step: number, nll: number): void {
    if (!this.geco) return;
    const warm = this.config.Net.geco_warm_start;
    if (step === warm) {
      setScalarParam(this.model, 'geco_C_ema', this.geco.initEma(nll));
    } else if (step > warm) {
      const cEma = this.geco.updateEma(scalarParam(this.model, 'geco_C_ema'), nll);
      setScalarParam(this.model, 'geco_C_ema', cEma);
      const beta = this.geco.stepBeta(cEma, scalarParam(this.model, 'geco_beta'), this.config.training.geco_beta_stepsize);
      setScalarParam(this.model, 'geco_beta', beta);
    }
  }

  /** Parameters (GECO's state among them), keyed by state_dict name. */
  parameters(): ParamRecord {
    return this.model.params.snapshot();
  }

  /** A CRC-32 of every parameter's bits (sorted by name): equal on ranks that hold the same model. */
  parameterChecksum(): number {
    const p = this.parameters();
    return checksumArrays(Object.keys(p).sort().map((k) => p[k].data as Float32Array));
  }
}
