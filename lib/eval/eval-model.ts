/**
 * What the evaluations need of a model, for EfficientMORL and the Slot Attention baseline alike
 * (the original eval.py's `if test['model'] == ...` branches, in one place):
 *
 *                      EfficientMORL                              SlotAttention
 *   stages             HVAE layers (decoded), then refinement     one (t = 0)
 *                      steps: means_t / masks_t
 *   attention          the HVAE layer's (t < L), else the last    the last of the 3 iterations
 *                      layer's
 *   KL                 the top-level KL                           none
 *   latents            a sample of the final posterior            the slots
 *   codes (DCI)        the final posterior's mean, masks by       the slots and the model's masks
 *                      decoding it
 *   decoder            hvae_networks.image_decoder                image_decoder (top level)
 *
 * EfficientMORL runs at step geco_warm_start + 1 with the given pass options, as before.
 */
import type { NetConfig } from '../config/net';
import type { LoadedModel, ModelKind } from '../load';
import { decode } from '../model/decoders';
import type { EfficientMORL, PassOptions } from '../model/efficient-morl';
import { posteriorFromLambda, rsample } from '../model/priors';
import type { SlotAttention } from '../model/slot-attention';
import type { Ops } from '../ops';
import type { ParamStore } from '../params/store';
import { tf } from '../tf';
import type { Rng } from '../util/rng';

/** One inference stage's tensors, in the original's layouts (owned by the pass). */
export interface EvalStage {
  t: number;
  /** RGB components [B,K,C,H,W] in (0,1) */
  means: tf.Tensor;
  /** log mask probabilities [B,K,1,H,W] */
  masks: tf.Tensor;
  /** Σ_k m_k μ_k [B,C,H,W] */
  recons: tf.Tensor;
  /** the attention map shown for this stage [B,K,1,h,w], when the model has one */
  attention?: tf.Tensor;
}

export interface EvalPass {
  /** ordered by t; the last is the final one */
  stages: EvalStage[];
  /** the top-level KL (mean over the batch); undefined for a model without one */
  kl?: number;
  dispose(): void;
}

export interface EvalModel {
  readonly kind: ModelKind;
  readonly cfg: NetConfig;
  readonly K: number;
  /** latent size per slot */
  readonly z: number;
  /** whether run() gives a KL */
  readonly hasKl: boolean;
  /** every stage of one pass on images [B,C,H,W] in [-1,1] */
  run(x: tf.Tensor4D): EvalPass;
  /** latents [B·K, z] to perturb: a final-posterior sample (EfficientMORL, draws from `rng`) or the slots */
  latents(x: tf.Tensor4D, rng: Rng): Float32Array;
  /** DCI: per-slot codes [B·K, z] and the masks [B,K,H,W] (in [0,1]) they give */
  codes(x: tf.Tensor4D): { codes: Float32Array; masks: Float32Array };
  /** Decodes groups of K slot latents [G·K, z] into images [G,C,H,W] and masks [G,K,H,W] (in [0,1]). */
  decodeScenes(z: Float32Array, G: number): { images: Float32Array; masks: Float32Array };
  dispose(): void;
}

/** Decodes groups of K latents with the image decoder under `prefix`: images [G,C,H,W], masks [G,K,H,W]. */
export function decodeScenes(p: ParamStore, ops: Ops, cfg: NetConfig, prefix: string, z: Float32Array, G: number): { images: Float32Array; masks: Float32Array } {
  const [C, H, W] = cfg.input_size;
  const { K, z_size: Z } = cfg;
  return tf.tidy(() => {
    const dec = decode(p, ops, cfg, tf.tensor2d(z, [G * K, Z]), prefix);
    const rgb = dec.rgb.reshape([G, K, H, W, C]);
    const logits = dec.maskLogits.reshape([G, K, H, W, 1]);
    const m = tf.exp(tf.sub(logits, tf.logSumExp(logits, 1, true)));
    const images = tf.sum(tf.mul(rgb, m), 1).transpose([0, 3, 1, 2]);
    return { images: images.dataSync() as Float32Array, masks: m.reshape([G, K, H, W]).dataSync() as Float32Array };
  });
}

/** What both adapters read of their model's config. */
abstract class ConfiguredEval {
  abstract readonly model: { readonly cfg: NetConfig };
  get cfg(): NetConfig {
    return this.model.cfg;
  }
  get K(): number {
    return this.model.cfg.K;
  }
  get z(): number {
    return this.model.cfg.z_size;
  }
}

class EfficientMorlEval extends ConfiguredEval implements EvalModel {
  readonly kind = 'EfficientMORL' as const;
  readonly hasKl = true;
  constructor(
    readonly model: EfficientMORL,
    readonly pass: PassOptions,
  ) {
    super();
  }

  run(x: tf.Tensor4D): EvalPass {
    const result = this.model.infer(x, { ...this.pass, decodeHvaeLayers: true });
    const attn = result.outputs.attn;
    // attention of stage t: the HVAE layer's for t < L, else the last layer's (as the original)
    const stages = result.outputs.stages.map((s) => ({ t: s.t, means: s.means, masks: s.masks, recons: s.recons, attention: attn.length ? attn[Math.min(s.t, attn.length - 1)] : undefined }));
    return { stages, kl: result.kl, dispose: () => result.dispose() };
  }

  /** The final stage's posterior parameters [B·K, 2z] of one pass, as a tensor the callback may use. */
  private withLambda<T>(x: tf.Tensor4D, f: (lam: tf.Tensor2D) => T): T {
    const B = x.shape[0];
    const result = this.model.infer(x, this.pass);
    try {
      const last = result.outputs.stages[result.outputs.stages.length - 1];
      if (!last.lambda) throw new Error('the final stage has no posterior parameters');
      const lam = last.lambda.reshape([B * this.K, 2 * this.z]) as tf.Tensor2D;
      try {
        return f(lam);
      } finally {
        lam.dispose();
      }
    } finally {
      result.dispose();
    }
  }

  latents(x: tf.Tensor4D, rng: Rng): Float32Array {
    const B = x.shape[0];
    const { K, z: Z } = this;
    return this.withLambda(x, (lam) => {
      const z = tf.tidy(() => {
        const eps = tf.tensor2d(rng.normals(B * K * Z), [B * K, Z]);
        return rsample(posteriorFromLambda(this.model.ops.gaussian, lam), eps);
      });
      const out = Float32Array.from(z.dataSync() as Float32Array);
      z.dispose();
      return out;
    });
  }

  codes(x: tf.Tensor4D): { codes: Float32Array; masks: Float32Array } {
    const loc = this.withLambda(x, (lam) => tf.tidy(() => tf.split(lam, 2, 1)[0].dataSync() as Float32Array));
    return { codes: loc, masks: this.decodeScenes(loc, x.shape[0]).masks };
  }

  decodeScenes(z: Float32Array, G: number): { images: Float32Array; masks: Float32Array } {
    return decodeScenes(this.model.params, this.model.ops, this.model.cfg, 'hvae_networks', z, G);
  }

  dispose(): void {
    this.model.dispose();
  }
}

class SlotAttentionEval extends ConfiguredEval implements EvalModel {
  readonly kind = 'SlotAttention' as const;
  readonly hasKl = false;
  constructor(readonly model: SlotAttention) {
    super();
  }

  run(x: tf.Tensor4D): EvalPass {
    const r = this.model.infer(x);
    const o = r.outputs;
    const attention = o.attn.length ? o.attn[o.attn.length - 1] : undefined;
    return { stages: [{ t: 0, means: o.xMeans, masks: o.masks, recons: o.recons, attention }], dispose: () => r.dispose() };
  }

  latents(x: tf.Tensor4D): Float32Array {
    const r = this.model.infer(x);
    try {
      return Float32Array.from(r.outputs.slots.dataSync() as Float32Array);
    } finally {
      r.dispose();
    }
  }

  codes(x: tf.Tensor4D): { codes: Float32Array; masks: Float32Array } {
    const r = this.model.infer(x);
    try {
      const codes = Float32Array.from(r.outputs.slots.dataSync() as Float32Array);
      const masks = tf.tidy(() => tf.exp(r.outputs.masks).dataSync() as Float32Array);
      return { codes, masks };
    } finally {
      r.dispose();
    }
  }

  decodeScenes(z: Float32Array, G: number): { images: Float32Array; masks: Float32Array } {
    return decodeScenes(this.model.params, this.model.ops, this.model.cfg, '', z, G);
  }

  dispose(): void {
    this.model.dispose();
  }
}

/** The evaluation view of a loaded model; `pass` is EfficientMORL's (Slot Attention takes none). */
export function evalModel(loaded: LoadedModel, pass: PassOptions): EvalModel {
  return loaded.kind === 'SlotAttention' ? new SlotAttentionEval(loaded.model) : new EfficientMorlEval(loaded.model, pass);
}
