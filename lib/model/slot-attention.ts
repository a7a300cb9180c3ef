/**
 * The Slot Attention baseline the original project ships (class SlotAttention in lib/model.py;
 * Locatello et al., 2020), on the same building blocks as EfficientMORL:
 *
 *   k, v   = encoder(x)                           the shared conv encoder + positional embedding
 *   slots  ~ N(μ₀, σ₀)                            init_slots = (μ₀, s₀), σ₀ = sqrt(softplus(s₀) + 1e-5)
 *   3 times:
 *     attn   = softmax_slots(q kᵀ / sqrt(z)) + ε   q = to_q(LayerNorm(slots))      (hvae.ts)
 *     u      = (attn / Σ_pixels attn) · v
 *     slots  = GRU(u, slots)                       nn.GRU, one step
 *     slots  = slots + MLP(LayerNorm(slots))       norm_pre_ff, mlp
 *   μ_k, logits_k = image_decoder(slots_k)        the spatial-broadcast decoder (decoders.ts)
 *   m      = log_softmax over slots of the logits
 *   loss   = Σ (x01 − Σ_k exp(m_k) μ_k)² / B       x01 = (x + 1) / 2
 *
 * One standard-normal draw per pass: the initial slots [B·K, z]. The parameters are named as the
 * original's state_dict (slot-attention-spec.ts). Layouts: inputs [B,C,H,W] in [-1,1], outputs in
 * the original's [B,K,C,H,W]; NHWC inside.
 */
import { tf } from '../tf';
import { netConfig, type NetConfig } from '../config/net';
import { tfjsOps, type Ops } from '../ops';
import { channelsLast, repeatRows } from '../ops/nn';
import { slotAttentionParamSpecs } from '../params/slot-attention-spec';
import { ParamStore } from '../params/store';
import { Rng } from '../util/rng';
import { decoderStack } from './decoders';
import { checkImageBatch, releaseAbandonedTape, type ModelOptions } from './efficient-morl';
import { encode } from './encoder';
import { attendSlots, residualMlp } from './hvae';
import { SeededNoise, type NoiseSource } from './noise';
import { posteriorFromLambda, rsample } from './priors';

/** The original's `attention_iters`. */
export const SLOT_ATTENTION_ITERS = 3;

export interface SlotAttentionPassOptions {
  /** where the initial slots' standard-normal draw comes from (default: the model's seeded source) */
  noise?: NoiseSource;
  /** return the outputs below (default: true for infer, false for lossAndGrads) */
  outputs?: boolean;
  /**
   * Data-parallel training: the GLOBAL batch size the summed error divides by (default: this
   * batch's B), so that the ranks' losses and gradients sum to the global batch's.
   */
  lossBatchSize?: number;
}

/** One pass's tensors, in the original's layouts (the caller disposes them via the result). */
export interface SlotAttentionOutputs {
  /** the original's `x_means`: per-slot RGB [B,K,C,H,W] in (0,1) */
  xMeans: tf.Tensor;
  /** the original's `masks`: log mask probabilities [B,K,1,H,W] (log-softmax over slots) */
  masks: tf.Tensor;
  /** the original's `slots`: the final slots [B,K,z] */
  slots: tf.Tensor;
  /** Σ_k exp(masks_k) x_means_k [B,C,H,W] in (0,1) */
  recons: tf.Tensor;
  /** per attention iteration [B,K,1,H,W]: softmax over slots + 1e-8, before renormalising over pixels */
  attn: tf.Tensor[];
}

export interface SlotAttentionInference {
  /** the original's `total_loss`: summed squared error divided by the batch size */
  totalLoss: number;
  outputs: SlotAttentionOutputs;
  dispose(): void;
}

export interface SlotAttentionGradResult {
  totalLoss: number;
  /** d totalLoss / d parameter, keyed by state_dict name */
  grads: Map<string, tf.Tensor>;
  outputs?: SlotAttentionOutputs;
  dispose(): void;
}

interface PassResult {
  total: tf.Scalar;
  outputs?: SlotAttentionOutputs;
}

function disposeOutputs(o: SlotAttentionOutputs | undefined): void {
  if (!o) return;
  o.xMeans.dispose();
  o.masks.dispose();
  o.slots.dispose();
  o.recons.dispose();
  for (const a of o.attn) a.dispose();
}

export class SlotAttention {
  readonly cfg: NetConfig;
  readonly params: ParamStore;
  readonly ops: Ops;
  /** the default noise source (seeded from the model seed) */
  noise: NoiseSource;

  /**
   * `config`: the original's Net config; the baseline reads K, z_size, input_size and
   * image_decoder (the other keys are validated and ignored, as the original ignores them).
   */
  constructor(config: Partial<NetConfig> | NetConfig, opts: ModelOptions = {}) {
    this.cfg = netConfig(config as Record<string, unknown>);
    const seed = opts.seed ?? 0;
    this.params = new ParamStore(slotAttentionParamSpecs(this.cfg), new Rng(seed));
    this.noise = new SeededNoise(new Rng(seed ^ 0x5eed));
    this.ops = opts.ops ?? tfjsOps;
  }

  dispose(): void {
    this.params.dispose();
  }

  /** Checks images [B,C,H,W] against Net.input_size; throws on wrong shape or non-finite pixels. */
  checkImages(images: tf.Tensor): asserts images is tf.Tensor4D {
    checkImageBatch(this.cfg, images);
  }

  /** The forward pass; `out` marks tensors handed to the caller (kept beyond any scope). */
  /** `paramGrads`: the pass runs under a training tape that will take parameter gradients. */
  private pass(images: tf.Tensor4D, noise: NoiseSource, collect: boolean, paramGrads: boolean, handedOut: tf.Tensor[], lossBatchSize?: number): PassResult {
    const p = this.params;
    const ops = this.ops;
    const { K, z_size: z } = this.cfg;
    const [C, H, W] = this.cfg.input_size;
    const B = images.shape[0];
    const N = B * K;
    const out = <T extends tf.Tensor>(t: T): T => {
      const c = tf.keep(t.clone());
      handedOut.push(c);
      return c;
    };

    const x = channelsLast(images);
    const kv = encode(p, ops, x, '');

    // the initial slots: one sample of the learned Gaussian, shared by every slot of every image
    const init = posteriorFromLambda(ops.gaussian, repeatRows(p.get<tf.Tensor2D>('init_slots'), N));
    let slots = rsample(init, noise.normal([N, z])).reshape([B, K, z]) as tf.Tensor3D;

    const gru = {
      weightIh: p.get<tf.Tensor2D>('gru.weight_ih_l0'),
      weightHh: p.get<tf.Tensor2D>('gru.weight_hh_l0'),
      biasIh: p.get<tf.Tensor1D>('gru.bias_ih_l0'),
      biasHh: p.get<tf.Tensor1D>('gru.bias_hh_l0'),
    };
    const attns: tf.Tensor3D[] = [];
    for (let i = 0; i < SLOT_ATTENTION_ITERS; i++) {
      const att = attendSlots(p, ops, '', slots, kv, collect);
      if (att.attn) attns.push(att.attn);
      const next = ops.gruCell(att.updates.reshape([N, z]) as tf.Tensor2D, slots.reshape([N, z]) as tf.Tensor2D, gru);
      slots = residualMlp(p, ops, next.reshape([B, K, z]) as tf.Tensor3D, 'norm_pre_ff', 'mlp');
    }

    const target = tf.div(tf.add(x, 1), 2) as tf.Tensor4D;
    if (lossBatchSize !== undefined && (!Number.isInteger(lossBatchSize) || lossBatchSize < B)) {
      throw new Error(`lossBatchSize must be an integer >= the batch size ${B}, got ${lossBatchSize}`);
    }
    // Σ (x01 − recons)² is twice the nll of the unit-variance Gaussian likelihood (logVar 0), so
    // the decoding stage op (one native call on nativeOps) computes it with the decoder.
    const decoder = decoderStack(p, ops, this.cfg, '');
    const dec = ops.decoderNll({
      spec: decoder.spec,
      z: slots.reshape([N, z]) as tf.Tensor2D,
      pos: decoder.pos,
      target,
      K,
      logVar: 0,
      likelihood: 'Gaussian',
      grads: paramGrads ? 'all' : 'none',
      outputs: collect,
    });
    const total = tf.div(tf.mul(tf.sum(dec.nll), 2), lossBatchSize ?? B) as tf.Scalar;

    const means = dec.means;
    const logMasks = dec.logMasks;
    const recons = means && logMasks ? (tf.sum(tf.mul(means, tf.exp(logMasks)), 1) as tf.Tensor4D) : undefined; // [B,H,W,C]
    const outputs: SlotAttentionOutputs | undefined = collect && means && logMasks && recons
      ? {
          xMeans: out(means.transpose([0, 1, 4, 2, 3])),
          masks: out(logMasks.transpose([0, 1, 4, 2, 3])),
          slots: out(slots),
          recons: out(recons.transpose([0, 3, 1, 2])),
          attn: attns.map((a) => out(a.reshape([B, K, 1, H, W]))),
        }
      : undefined;
    return { total, outputs };
  }

  /**
   * Inference: images [B,C,H,W] in [-1,1] -> the loss, per-slot means, masks, final slots,
   * reconstructions and attention maps. No gradients are taken; call `dispose()` when done.
   */
  infer(images: tf.Tensor, opts: SlotAttentionPassOptions = {}): SlotAttentionInference {
    this.checkImages(images);
    const handedOut: tf.Tensor[] = [];
    let totalLoss = 0;
    let outputs: SlotAttentionOutputs | undefined;
    try {
      tf.tidy(() => {
        const r = this.pass(images, opts.noise ?? this.noise, opts.outputs ?? true, false, handedOut, opts.lossBatchSize);
        totalLoss = (r.total.dataSync() as Float32Array)[0];
        outputs = r.outputs;
      });
    } catch (err) {
      for (const t of handedOut) t.dispose();
      throw err;
    }
    const o = outputs ?? { xMeans: tf.zeros([0]), masks: tf.zeros([0]), slots: tf.zeros([0]), recons: tf.zeros([0]), attn: [] };
    return { totalLoss, outputs: o, dispose: () => disposeOutputs(o) };
  }

  /**
   * Training: the loss and its gradient for every parameter, keyed by state_dict name.
   * Leak-free: everything but the returned gradients (and outputs, if asked for) is released;
   * call `dispose()` on the result when done.
   */
  lossAndGrads(images: tf.Tensor, opts: SlotAttentionPassOptions = {}): SlotAttentionGradResult {
    this.checkImages(images);
    const handedOut: tf.Tensor[] = [];
    let r: PassResult | null = null;
    let value: tf.Scalar;
    let grads: tf.NamedTensorMap;
    try {
      ({ value, grads } = tf.variableGrads(() => {
        r = this.pass(images as tf.Tensor4D, opts.noise ?? this.noise, opts.outputs ?? false, true, handedOut, opts.lossBatchSize);
        return r.total;
      }, this.params.trainableVariables()));
    } catch (err) {
      releaseAbandonedTape();
      for (const t of handedOut) t.dispose();
      throw err;
    }
    const totalLoss = (value.dataSync() as Float32Array)[0];
    value.dispose();
    const named = new Map<string, tf.Tensor>();
    for (const [varName, g] of Object.entries(grads)) {
      const key = this.params.keyOfVariableName(varName);
      if (key === undefined) throw new Error(`gradient for a foreign variable '${varName}'`);
      named.set(key, g);
    }
    const outputs = (r as PassResult | null)?.outputs;
    return {
      totalLoss,
      grads: named,
      outputs,
      dispose: () => {
        for (const g of named.values()) g.dispose();
        disposeOutputs(outputs);
      },
    };
  }
}
