/**
 * EfficientMORL (Emami et al., ICML 2021): bottom-up hierarchical inference (hvae.ts) followed by
 * I steps of iterative amortized refinement (refinement.ts), trained with a per-stage ELBO or its
 * GECO form. This file is the glue; it mirrors EfficientMORL.two_stage_inference of the original.
 *
 * Order of the random draws (the replay order of the golden fixtures):
 *   1. the initial slots, sampled from the learned init_posterior        [B·K, z]
 *   2. one posterior sample per HVAE layer 0..L-1                         [B·K, z] each
 *   3. at stage 0, the KL's prior samples: reversed prior — for layer L-2 down to 0 a fresh
 *      sample of q(z^{layer+1}); bottom-up prior — for layer 1..L-1 one of q(z^{layer-1})
 *   4. one posterior sample per refinement step                           [B·K, z] each
 *
 * Layouts: activations are NHWC inside; inputs and returned images follow the original's
 * [B, C, H, W] / [B, K, C, H, W].
 */
import { tf } from '../tf';
import { netConfig, type NetConfig } from '../config/net';
import { tfjsOps, type Ops } from '../ops';
import { DeviceParams } from '../ops/device-params';
import { ParamStore } from '../params/store';
import { netParamSpecs } from '../params/spec';
import { Rng } from '../util/rng';
import { decode, decoderStack } from './decoders';
import { encode, encoderParams } from './encoder';
import type { Geco } from './geco';
import { hvaeInference } from './hvae';
import { SeededNoise, type NoiseSource } from './noise';
import { klDiagWith, posteriorFromLambda, priorFromSample, rsample, sampleWithKl, type Gaussian } from './priors';
import { stageLoss, weightedTotal, type StageLossSpec } from './stage-loss';
import { refinementStep } from './refinement';
import { addSameShape, channelsLast } from '../ops/nn';
import { f32 } from '../ops/arrays';

export interface ModelOptions {
  /** seed of the parameter initialisation and of the default noise source (default 0) */
  seed?: number;
  /** the hot-path ops (default: the tfjs reference implementation) */
  ops?: Ops;
}

export interface PassOptions {
  /** the β of β-VAE weighting the KL (default 1) */
  klBeta?: number;
  /** the training step (GECO replaces the plain loss from geco_warm_start on) (default 0) */
  globalStep?: number;
  /** GECO; when absent (or klBeta is 0, or before the warm start) the loss is mean(nll + β·kl) */
  geco?: Geco | null;
  /** refinement steps I for this pass (default: the config's); 0 runs the HVAE alone */
  refinementIters?: number;
  /** where the standard-normal draws come from (default: the model's seeded source) */
  noise?: NoiseSource;
  /**
   * Data-parallel training: the GLOBAL batch size the batch means divide by (default: this
   * batch's B). With it, the loss is Σ over this shard / lossBatchSize, so summing the ranks'
   * losses and gradients gives the global batch's; the reported nll, kl, stage losses and deltas
   * are this shard's shares of the global means in the same way.
   */
  lossBatchSize?: number;
}

export interface CollectOptions {
  /** return per-stage images, masks, attention and posterior parameters (default true for infer) */
  outputs?: boolean;
  /** also decode the samples of the HVAE layers 0..L-2 (the original's `debug` mode) */
  decodeHvaeLayers?: boolean;
}

/** What one inference stage produced (tensors in the original's layouts). */
export interface StageOutputs {
  /** the stage index t: t < L-1 are intermediate HVAE layers, L-1+i is refinement step i */
  t: number;
  /** RGB components [B,K,C,H,W] in (0,1) */
  means: tf.Tensor;
  /** log mask probabilities [B,K,1,H,W] (log-softmax over slots) */
  masks: tf.Tensor;
  /** Σ_k m_k μ_k [B,C,H,W] in (0,1) */
  recons: tf.Tensor;
  /** posterior parameters (μ, s) [B,K,2z]; absent for the intermediate HVAE decodes */
  lambda?: tf.Tensor;
}

export interface PassOutputs {
  /** every stage, ordered by t */
  stages: StageOutputs[];
  /** per HVAE layer, [B,K,1,H,W]: softmax over slots + 1e-8, before renormalising over pixels */
  attn: tf.Tensor[];
}

export interface LossValues {
  /** Σ_i (I+3-i)/(I+1) · loss_i */
  totalLoss: number;
  /** mean nll at the last stage */
  nll: number;
  /** mean KL at the last stage */
  kl: number;
  /** each stage's loss */
  stageLosses: number[];
  /** mean L2 norm of each refinement update Δλ */
  deltas: number[];
  /** whether the GECO form of the loss was used */
  usedGeco: boolean;
}

export interface InferenceResult extends LossValues {
  outputs: PassOutputs;
  dispose(): void;
}

export interface GradResult extends LossValues {
  /** d totalLoss / d parameter, keyed by state_dict name (the caller disposes them) */
  grads: Map<string, tf.Tensor>;
  outputs?: PassOutputs;
  dispose(): void;
}

interface PassInternals extends LossValues {
  total: tf.Scalar;
  outputs?: PassOutputs;
  /** detached samples of HVAE layers 0..L-2, for decoding after the pass */
  hvaeSamples: tf.Tensor2D[];
}

/**
 * The weight of stage i in the total loss. The paper's Eq. 8 weights later stages more; the
 * original code weights them (I+3-i)/(I+1), i.e. *earlier* stages more ("the opposite of
 * IODINE", says its comment), and the golden values follow the code, so we do too.
 */
export function stageWeight(i: number, I: number): number {
  return (I + 2 - i + 1) / (I + 1);
}

function disposeOutputs(o: PassOutputs | undefined): void {
  if (!o) return;
  for (const s of o.stages) {
    s.means.dispose();
    s.masks.dispose();
    s.recons.dispose();
    s.lambda?.dispose();
  }
  for (const a of o.attn) a.dispose();
}

/** A detached copy: a new leaf with the same values (what `.detach()` does in PyTorch). */
function detach<T extends tf.Tensor>(t: T): T {
  return tf.tensor(Float32Array.from(t.dataSync() as Float32Array), t.shape, 'float32') as T;
}

/** (x + 1) / 2 from x's values, rounded as tf.div(tf.add(x, 1), 2): a constant of the pass, kept off the tape. */
function unitRange(x: tf.Tensor4D): tf.Tensor4D {
  const v = f32(x);
  const out = new Float32Array(v.length);
  for (let i = 0; i < v.length; i++) out[i] = Math.fround(v[i] + 1) / 2;
  return tf.tensor4d(out, x.shape);
}

/**
 * Σ_rows ‖row‖₂ / divisor of a [rows, D] tensor, in double from its values: a logged figure (the
 * refinement's step sizes), so it stays off the gradient tape.
 */
function meanRowNorm(t: tf.Tensor2D, divisor: number): number {
  const [rows, D] = t.shape;
  const v = f32(t);
  let sum = 0;
  for (let r = 0, i = 0; r < rows; r++) {
    let sq = 0;
    for (let j = 0; j < D; j++, i++) sq += v[i] * v[i];
    sum += Math.sqrt(sq);
  }
  return Math.fround(sum / divisor);
}

/**
 * tfjs keeps the tensors a gradient tape saved for the backward pass until that pass ends; a
 * forward pass that throws (say, a replay that runs out of draws) never gets there, and they
 * would leak. This releases them. (It reads the engine's internal state: the tape is not public.)
 */
export function releaseAbandonedTape(): void {
  const state = (tf.engine() as unknown as { state?: { activeTape?: { saved?: tf.Tensor[] }[] | null; gradientDepth?: number } }).state;
  if (!state || !state.activeTape || state.gradientDepth !== 0) return;
  for (const node of state.activeTape) for (const t of node.saved ?? []) t.dispose();
  state.activeTape = null;
}

/** Checks images [B,C,H,W] against Net.input_size; throws on wrong shape or non-finite pixels. */
export function checkImageBatch(cfg: NetConfig, images: tf.Tensor): asserts images is tf.Tensor4D {
  const [C, H, W] = cfg.input_size;
  if (images.rank !== 4) throw new Error(`images must be [B, C, H, W], got rank ${images.rank} [${images.shape}]`);
  const [B, c, h, w] = images.shape;
  if (B < 1) throw new Error('images: empty batch');
  if (c !== C) throw new Error(`images have ${c} channels, Net.input_size expects C = ${C} (shape [${images.shape}])`);
  if (h !== H || w !== W) throw new Error(`images are ${h}x${w}, Net.input_size expects ${H}x${W} (shape [${images.shape}])`);
  if (images.dtype !== 'float32') throw new Error(`images must be float32, got ${images.dtype}`);
  const d = images.dataSync() as Float32Array;
  for (let i = 0; i < d.length; i++) {
    if (!Number.isFinite(d[i])) throw new Error(`images: non-finite pixel value ${d[i]} at flat index ${i}`);
  }
}

export class EfficientMORL {
  readonly cfg: NetConfig;
  readonly params: ParamStore;
  readonly ops: Ops;
  /** the default noise source (seeded from the model seed) */
  noise: NoiseSource;

  constructor(config: Partial<NetConfig> | NetConfig, opts: ModelOptions = {}) {
    this.cfg = netConfig(config as Record<string, unknown>);
    const seed = opts.seed ?? 0;
    const rng = new Rng(seed);
    this.params = new ParamStore(netParamSpecs(this.cfg), rng);
    this.noise = new SeededNoise(new Rng(seed ^ 0x5eed));
    this.ops = opts.ops ?? tfjsOps;
  }

  dispose(): void {
    this.params.dispose();
  }

  /** Checks images [B,C,H,W] against the config; throws on wrong shape or non-finite pixels. */
  checkImages(images: tf.Tensor): asserts images is tf.Tensor4D {
    checkImageBatch(this.cfg, images);
  }

  private resolve(o: PassOptions): Required<Omit<PassOptions, 'geco' | 'lossBatchSize'>> & { geco: Geco | null } {
    const I = o.refinementIters ?? this.cfg.refinement_iters;
    if (!Number.isInteger(I) || I < 0) throw new Error(`refinementIters must be an integer >= 0, got ${I}`);
    return {
      klBeta: o.klBeta ?? 1,
      globalStep: o.globalStep ?? 0,
      geco: o.geco ?? null,
      refinementIters: I,
      noise: o.noise ?? this.noise,
    };
  }

  /** Whether a pass with these options uses the GECO loss (the original's condition). */
  usesGeco(o: PassOptions): boolean {
    const klBeta = o.klBeta ?? 1;
    return o.geco != null && klBeta !== 0 && (o.globalStep ?? 0) >= this.cfg.geco_warm_start;
  }

  /**
   * The forward pass. Works both under an outer gradient tape (training) and without one
   * (inference): the refinement's ∂loss_i/∂λ_i is taken with tf.valueAndGrads around the stage's
   * own computation, which nests in an outer tape the way autograd.grad(create_graph=True) does.
   */
  private runPass(images: tf.Tensor4D, opts: PassOptions, collect: boolean, paramGrads: boolean): PassInternals {
    // Tensors that must outlive the inner gradient scopes (released here, also on errors), and
    // the outputs handed to the caller (released here only if the pass fails).
    const kept: tf.Tensor[] = [];
    const handedOut: tf.Tensor[] = [];
    try {
      return this.runPassWith(images, opts, collect, paramGrads, kept, handedOut);
    } catch (err) {
      for (const t of handedOut) t.dispose();
      throw err;
    } finally {
      for (const t of kept) t.dispose();
    }
  }

  /** `paramGrads`: the pass runs under a training tape that will take parameter gradients. */
  private runPassWith(images: tf.Tensor4D, opts: PassOptions, collect: boolean, paramGrads: boolean, kept: tf.Tensor[], handedOut: tf.Tensor[]): PassInternals {
    const cfg = this.cfg;
    const p = this.params;
    const ops = this.ops;
    const o = this.resolve(opts);
    const noise = o.noise;
    const { K, z_size: z, stochastic_layers: L } = cfg;
    const [C, H, W] = cfg.input_size;
    const B = images.shape[0];
    const N = B * K;
    const I = o.refinementIters;

    // Tensors created inside the inner gradient scopes that later stages need.
    const keep = <T extends tf.Tensor>(t: T): T => {
      kept.push(tf.keep(t));
      return t;
    };
    // Outputs handed to the caller: independent copies, so disposing internals never frees them.
    const out = <T extends tf.Tensor>(t: T): T => {
      const c = tf.keep(t.clone());
      handedOut.push(c);
      return c;
    };

    const x = channelsLast(images);
    const target = unitRange(x); // the likelihood's target is in [0,1]
    const logVar = Math.fround(2 * Math.fround(cfg.log_scale));
    const decoder = decoderStack(p, ops, cfg);
    const decoderSpec = ops.shareDecoderWeights(decoder.spec, decoder.pos); // every stage of this pass decodes with it

    const useGeco = this.usesGeco(o);
    const cEma = useGeco ? (p.get('geco_C_ema').dataSync() as Float32Array)[0] : 0;
    const beta = useGeco ? (p.get('geco_beta').dataSync() as Float32Array)[0] : 0;
    // Batch means: over this batch, or (data parallel) this shard's share of the global batch's.
    const Bg = opts.lossBatchSize;
    if (Bg !== undefined && (!Number.isInteger(Bg) || Bg < B)) throw new Error(`lossBatchSize must be an integer >= the batch size ${B}, got ${Bg}`);
    const lossSpec: StageLossSpec = {
      K,
      klBeta: o.klBeta,
      lossBatchSize: Bg,
      // GECO's constraint has the value softplus(β)·C_ema whatever the batch: each shard adds its
      // share B/Bg of it (and of its gradient, softplus(β)·∂(−mean nll)).
      geco: useGeco ? { target: o.geco!.target, cEma, multiplier: o.geco!.multiplier(beta) } : undefined,
    };

    const hv = hvaeInference(p, ops, cfg, encode(p, ops, x), noise, collect);

    /**
     * KL at stage 0, per layer (stageLoss sums them). Reversed prior: q(z^{L-1}) against N(0, I), and each
     * lower q(z^l) against p(z^l | z^{l+1}) built from a fresh sample of q(z^{l+1}). Bottom-up
     * prior: q(z^0) against N(0, I), q(z^l) against p(z^l | z^{l-1}). Returns the terms and the
     * prior the refinement steps use (reversed prior++: p(z^0 | z^1); otherwise N(0, I)).
     */
    const hierarchicalKl = (qTop: Gaussian): { klPerSlot: tf.Tensor1D[]; refinementPrior: Gaussian | null } => {
      if (L === 0) return { klPerSlot: [], refinementPrior: null };
      const qs = [...hv.posteriors, qTop];
      const klPerSlot: tf.Tensor1D[] = [];
      let prior: Gaussian | null = null;
      if (!cfg.bottom_up_prior) {
        for (let l = L - 1; l >= 0; l--) {
          prior = l === L - 1 ? null : priorFromSample(p, ops, rsample(qs[l + 1], noise.normal([N, z])));
          klPerSlot.push(klDiagWith(ops.gaussian, qs[l], prior));
        }
      } else {
        for (let l = 0; l < L; l++) {
          prior = l === 0 ? null : priorFromSample(p, ops, rsample(qs[l - 1], noise.normal([N, z])));
          klPerSlot.push(klDiagWith(ops.gaussian, qs[l], prior));
        }
      }
      return { klPerSlot, refinementPrior: cfg.reverse_prior_plusplus ? prior : null };
    };

    let refinementPrior: Gaussian | null = null;

    interface Stage {
      loss: tf.Scalar;
      /** the batch means (logged) */
      nll: number;
      kl: number;
      /** per-slot means and log masks (when the pass collects outputs) */
      means?: tf.Tensor5D;
      logMasks?: tf.Tensor5D;
    }
    /**
     * One stage: sample z ~ q(λ), decode, score. A function of λ so that it can be differentiated:
     * stages before the last by the refinement's inner gradient, every stage by a training tape.
     */
    const stage = (i: number, lambda: tf.Tensor2D, eps: tf.Tensor): Stage => {
      // stage 0's posterior also feeds the hierarchical KL's prior; a refinement stage's only z and its KL
      let z: tf.Tensor2D;
      let klPerSlot: tf.Tensor1D[];
      if (i === 0) {
        const q = posteriorFromLambda(ops.gaussian, lambda);
        z = rsample(q, eps);
        const h = hierarchicalKl(q);
        klPerSlot = h.klPerSlot;
        if (h.refinementPrior) refinementPrior = { loc: keep(h.refinementPrior.loc), std: keep(h.refinementPrior.std) };
      } else {
        const s = sampleWithKl(ops.gaussian, lambda, eps, refinementPrior);
        z = s.z;
        klPerSlot = [s.kl];
      }
      const { nll, means, logMasks } = ops.decoderNll({
        spec: decoderSpec,
        z,
        pos: decoder.pos,
        target,
        K,
        logVar,
        likelihood: cfg.image_likelihood,
        grads: paramGrads ? 'all' : i < I ? 'input' : 'none',
        outputs: collect,
      });
      const l = stageLoss(nll, klPerSlot, lossSpec);
      return { loss: l.loss, nll: l.nllMean, kl: l.klMean, means, logMasks };
    };

    const stages: StageOutputs[] = [];
    const stageLosses: number[] = [];
    const deltas: number[] = [];
    let lambda = hv.lambda;
    let eps = hv.lambdaEps;
    let hidden: tf.Tensor2D | null = I > 0 ? (tf.zeros([N, z]) as tf.Tensor2D) : null;
    let dLambda: tf.Tensor2D | null = null;
    const losses: tf.Scalar[] = [];
    let last: Stage | null = null;
    for (let i = 0; i <= I; i++) {
      if (i > 0) {
        const r = refinementStep(p, ops, lambda, dLambda!, hidden!);
        lambda = addSameShape(lambda, r.delta);
        hidden = r.hidden;
        deltas.push(meanRowNorm(r.delta, Bg === undefined ? N : Bg * K));
        eps = noise.normal([N, z]);
      }
      let s: Stage;
      if (i < I) {
        // The next refinement step reads ∂loss_i/∂λ_i (first order, detached).
        let captured: Stage | null = null;
        const lam = lambda;
        const stepEps = eps;
        const { grads } = ops.withoutParamGrads(() =>
          tf.valueAndGrads((l: tf.Tensor) => {
            const st = stage(i, l as tf.Tensor2D, stepEps);
            if (st.means) keep(st.means);
            if (st.logMasks) keep(st.logMasks);
            captured = st;
            return st.loss;
          })([lam]),
        );
        s = captured!;
        dLambda = keep(detach(grads[0] as tf.Tensor2D));
        grads[0].dispose();
      } else {
        s = stage(i, lambda, eps);
      }
      stageLosses.push((s.loss.dataSync() as Float32Array)[0]);
      losses.push(s.loss);
      if (collect && s.means && s.logMasks) {
        const recons = tf.sum(tf.mul(s.means, tf.exp(s.logMasks)), 1).transpose([0, 3, 1, 2]);
        stages.push({
          t: L - 1 + i,
          means: out(s.means.transpose([0, 1, 4, 2, 3])),
          masks: out(s.logMasks.transpose([0, 1, 4, 2, 3])),
          recons: out(recons),
          lambda: out(lambda.reshape([B, K, 2 * z])),
        });
      }
      last = s;
    }
    const total = weightedTotal(losses, losses.map((_, i) => stageWeight(i, I)));
    const { nll, kl } = last!;
    const outputs: PassOutputs | undefined = collect
      ? { stages, attn: hv.attn.map((a) => out(a.reshape([B, K, 1, H, W]))) }
      : undefined;
    const hvaeSamples = collect ? hv.samples.map((t) => out(detach(t))) : [];
    return {
      total,
      totalLoss: (total.dataSync() as Float32Array)[0],
      nll,
      kl,
      stageLosses,
      deltas,
      usedGeco: useGeco,
      outputs,
      hvaeSamples,
    };
  }

  /** Decodes the detached samples of HVAE layers 0..L-2 (outside any tape) into stage outputs. */
  private decodeHvaeSamples(samples: tf.Tensor2D[], B: number): StageOutputs[] {
    const { K } = this.cfg;
    const [C, H, W] = this.cfg.input_size;
    return samples.map((zs, t) =>
      tf.tidy(() => {
        const dec = decode(this.params, this.ops, this.cfg, zs);
        const means = dec.rgb.reshape([B, K, H, W, C]);
        const logits = dec.maskLogits.reshape([B, K, H, W, 1]);
        const logMasks = tf.sub(logits, tf.logSumExp(logits, 1, true));
        const recons = tf.sum(tf.mul(means, tf.exp(logMasks)), 1).transpose([0, 3, 1, 2]);
        return { t, means: tf.keep(means.transpose([0, 1, 4, 2, 3])), masks: tf.keep(logMasks.transpose([0, 1, 4, 2, 3])), recons: tf.keep(recons) };
      }),
    );
  }

  private finishOutputs(r: PassInternals, B: number, decodeHvaeLayers: boolean): PassOutputs | undefined {
    if (!r.outputs) return undefined;
    if (decodeHvaeLayers && r.hvaeSamples.length > 0) {
      r.outputs.stages = [...this.decodeHvaeSamples(r.hvaeSamples, B), ...r.outputs.stages];
    }
    for (const s of r.hvaeSamples) s.dispose();
    return r.outputs;
  }

  /**
   * Inference: images [B,C,H,W] in [-1,1] -> every stage's components, masks, reconstructions,
   * posterior parameters, the attention maps and the losses. No parameter gradients are taken
   * (the refinement still differentiates each stage's loss with respect to λ, as it must).
   */
  infer(images: tf.Tensor, opts: PassOptions & CollectOptions = {}): InferenceResult {
    this.checkImages(images);
    const B = images.shape[0];
    const collect = opts.outputs ?? true;
    // Everything the pass creates is released here; its outputs were tf.keep()-ed.
    let r: PassInternals | null = null;
    try {
      tf.tidy(() => {
        r = this.runPass(images, opts, collect, false);
      });
    } catch (err) {
      releaseAbandonedTape(); // the refinement's inner gradient tape, if it failed inside
      throw err;
    }
    r = r! as PassInternals;
    const outputs = this.finishOutputs(r, B, opts.decodeHvaeLayers ?? false) ?? { stages: [], attn: [] };
    return {
      totalLoss: r.totalLoss,
      nll: r.nll,
      kl: r.kl,
      stageLosses: r.stageLosses,
      deltas: r.deltas,
      usedGeco: r.usedGeco,
      outputs,
      dispose: () => disposeOutputs(outputs),
    };
  }

  /**
   * Keeps the decoder's, the encoder's and the GRUs' weights on the GPU device the ops run on, their
   * gradients made and their optimizer step taken there (Adam.attachDevice): from now on
   * lossAndGrads leaves them out of its gradients. None when the ops do not run on a GPU.
   */
  keepWeightsOnDevice(): DeviceParams[] {
    const device = this.ops.paramsDevice;
    if (!device) return [];
    const p = this.params;
    let decoder!: DeviceParams;
    tf.tidy(() => {
      decoder = DeviceParams.forDecoder(decoderStack(p, this.ops, this.cfg).spec, p, device); // its positional tensors are dropped
    });
    const gru = (prefix: string, names: string[]) => names.map((n) => p.get(`${prefix}${n}`));
    const cell = ['weight_ih_l0', 'weight_hh_l0', 'bias_ih_l0', 'bias_hh_l0'];
    // the DualGRU's tensors in the device's order (DeviceParamsSpec)
    const dual = ['weight_ih_1', 'weight_in_1', 'weight_hh_1', 'weight_hn_1', 'weight_ih_2', 'weight_in_2', 'weight_hh_2', 'weight_hn_2', 'bias_ih', 'bias_hh', 'bias_in', 'bias_hn'];
    return [
      decoder,
      DeviceParams.forEncoder(encoderParams(p), p, device),
      DeviceParams.forGru(this.cfg.use_DualGRU ? gru('hvae_networks.gru.cell.', dual) : gru('hvae_networks.gru.', cell), p, device),
      DeviceParams.forGru(gru('refinenet.recurrence.', cell), p, device),
    ];
  }

  /**
   * Training: the total loss and its gradient for every trainable parameter (keyed by
   * state_dict name; not the weights a device keeps: keepWeightsOnDevice). Leak-free: everything
   * but the returned gradients (and outputs, if asked for) is released; call `dispose()` on the
   * result when done.
   */
  lossAndGrads(images: tf.Tensor, opts: PassOptions & CollectOptions = {}): GradResult {
    this.checkImages(images);
    const B = images.shape[0];
    const collect = opts.outputs ?? false;
    let r: PassInternals | null = null;
    let value: tf.Scalar;
    let grads: tf.NamedTensorMap;
    try {
      ({ value, grads } = tf.variableGrads(() => {
        r = this.runPass(images as tf.Tensor4D, opts, collect, true);
        return r.total;
      }, this.params.tapeVariables()));
    } catch (err) {
      releaseAbandonedTape();
      throw err;
    }
    value.dispose();
    const res = r! as PassInternals;
    const named = new Map<string, tf.Tensor>();
    for (const [varName, g] of Object.entries(grads)) {
      // a device's weights have their gradients there: the tape differentiated their anchors (0)
      if (this.params.isAnchor(varName)) {
        g.dispose();
        continue;
      }
      const key = this.params.keyOfVariableName(varName);
      if (key === undefined) throw new Error(`gradient for a foreign variable '${varName}'`);
      named.set(key, g);
    }
    const outputs = this.finishOutputs(res, B, opts.decodeHvaeLayers ?? false);
    return {
      totalLoss: res.totalLoss,
      nll: res.nll,
      kl: res.kl,
      stageLosses: res.stageLosses,
      deltas: res.deltas,
      usedGeco: res.usedGeco,
      grads: named,
      outputs,
      dispose: () => {
        for (const g of named.values()) g.dispose();
        disposeOutputs(outputs);
      },
    };
  }
}
