/**
 * Adam as torch.optim.Adam (1.13, single-tensor path, no weight decay, no amsgrad) and
 * torch.nn.utils.clip_grad_norm_, acting on the parameter store by state_dict name.
 *
 *   m ← β1 m + (1-β1) g;  v ← β2 v + (1-β2) g²
 *   p ← p − (lr / (1-β1^t)) · m / (sqrt(v) / sqrt(1-β2^t) + ε)
 */
import { tf } from '../tf';
import type { ParamStore } from '../params/store';

export interface AdamOptions {
  lr?: number;
  beta1?: number;
  beta2?: number;
  eps?: number;
}

/**
 * The global L2 norm of all gradients and, if it exceeds maxNorm, the gradients scaled by
 * maxNorm / (norm + 1e-6) (PyTorch clamps that coefficient at 1 and always multiplies; a factor
 * of exactly 1 changes nothing, so we skip it). Returns new tensors in a new map; the caller
 * disposes both maps' tensors as it sees fit.
 */
export function clipGradNorm(grads: Map<string, tf.Tensor>, maxNorm: number): { grads: Map<string, tf.Tensor>; norm: number } {
  // per-tensor norms, then the norm of those (as torch.norm(torch.stack(norms)))
  let sumSq = 0;
  for (const g of grads.values()) {
    const t = tf.norm(g);
    const n = (t.dataSync() as Float32Array)[0];
    t.dispose();
    sumSq += n * n;
  }
  const norm = Math.fround(Math.sqrt(sumSq));
  const coef = Math.min(1, maxNorm / (norm + 1e-6));
  const out = new Map<string, tf.Tensor>();
  for (const [k, g] of grads) out.set(k, coef < 1 ? tf.mul(g, Math.fround(coef)) : g.clone());
  return { grads: out, norm };
}

export interface AdamState {
  steps: number;
  m: Map<string, { shape: number[]; data: Float32Array }>;
  v: Map<string, { shape: number[]; data: Float32Array }>;
}

export class Adam {
  readonly lr: number;
  readonly beta1: number;
  readonly beta2: number;
  readonly eps: number;
  private step = 0;
  private readonly m = new Map<string, tf.Tensor>();
  private readonly v = new Map<string, tf.Tensor>();

  constructor(
    private readonly params: ParamStore,
    opts: AdamOptions = {},
  ) {
    this.lr = opts.lr ?? 1e-3;
    this.beta1 = opts.beta1 ?? 0.9;
    this.beta2 = opts.beta2 ?? 0.999;
    this.eps = opts.eps ?? 1e-8;
    for (const [name, val] of [
      ['lr', this.lr],
      ['eps', this.eps],
    ] as const) {
      if (!(val >= 0) || !Number.isFinite(val)) throw new Error(`Adam: ${name} must be a finite number >= 0, got ${val}`);
    }
    for (const [name, val] of [
      ['beta1', this.beta1],
      ['beta2', this.beta2],
    ] as const) {
      if (!(val >= 0 && val < 1)) throw new Error(`Adam: ${name} must be in [0, 1), got ${val}`);
    }
  }

  /** The number of steps taken. */
  get steps(): number {
    return this.step;
  }

  /**
   * One update of every parameter that has a gradient (parameters without one are left alone,
   * as PyTorch skips grad-less parameters). `lr` overrides the rate for this step (schedules).
   */
  applyGradients(grads: Map<string, tf.Tensor>, lr: number = this.lr): void {
    // check every gradient first, so that a bad one leaves the optimizer untouched
    for (const [name, g] of grads) {
      const param = this.params.variable(name);
      if (!param.trainable) throw new Error(`Adam: '${name}' is not a trainable parameter`);
      if (g.shape.length !== param.shape.length || g.shape.some((d, i) => d !== param.shape[i])) {
        throw new Error(`Adam: gradient for '${name}' has shape [${g.shape}], the parameter [${param.shape}]`);
      }
    }
    this.step++;
    const t = this.step;
    const bc1 = 1 - Math.pow(this.beta1, t);
    const bc2Sqrt = Math.sqrt(1 - Math.pow(this.beta2, t));
    const stepSize = lr / bc1;
    for (const [name, g] of grads) {
      const param = this.params.variable(name);
      const m0 = this.m.get(name);
      const v0 = this.v.get(name);
      const [m1, v1, p1] = tf.tidy(() => {
        const m = m0 ? tf.add(tf.mul(m0, this.beta1), tf.mul(g, 1 - this.beta1)) : tf.mul(g, 1 - this.beta1);
        const v = v0 ? tf.add(tf.mul(v0, this.beta2), tf.mul(tf.square(g), 1 - this.beta2)) : tf.mul(tf.square(g), 1 - this.beta2);
        const denom = tf.add(tf.div(tf.sqrt(v), bc2Sqrt), this.eps);
        const p = tf.sub(param, tf.mul(tf.div(m, denom), stepSize));
        return [m, v, p];
      });
      m0?.dispose();
      v0?.dispose();
      this.m.set(name, m1);
      this.v.set(name, v1);
      param.assign(p1);
      p1.dispose();
    }
  }

  /** The optimizer's state (step count and both moments by parameter name), for checkpoints. */
  exportState(): AdamState {
    const copy = (m: Map<string, tf.Tensor>): AdamState['m'] =>
      new Map([...m].map(([k, t]): [string, { shape: number[]; data: Float32Array }] => [k, { shape: [...t.shape], data: Float32Array.from(t.dataSync() as Float32Array) }]));
    return { steps: this.step, m: copy(this.m), v: copy(this.v) };
  }

  /** Restores `exportState()`'s result; shapes are checked against the parameters. */
  importState(state: AdamState): void {
    if (!Number.isInteger(state.steps) || state.steps < 0) throw new Error(`Adam: bad step count ${state.steps}`);
    for (const [which, moments] of [['m', state.m], ['v', state.v]] as const) {
      for (const [name, { shape, data }] of moments) {
        const param = this.params.variable(name);
        if (shape.length !== param.shape.length || shape.some((d, i) => d !== param.shape[i])) {
          throw new Error(`Adam: saved ${which} for '${name}' has shape [${shape}], the parameter [${param.shape}]`);
        }
        if (data.length !== param.size) throw new Error(`Adam: saved ${which} for '${name}' has ${data.length} values`);
      }
    }
    this.dispose();
    this.step = state.steps;
    for (const [name, { shape, data }] of state.m) this.m.set(name, tf.tensor(Float32Array.from(data), shape, 'float32'));
    for (const [name, { shape, data }] of state.v) this.v.set(name, tf.tensor(Float32Array.from(data), shape, 'float32'));
  }

  dispose(): void {
    for (const x of this.m.values()) x.dispose();
    for (const x of this.v.values()) x.dispose();
    this.m.clear();
    this.v.clear();
  }
}
