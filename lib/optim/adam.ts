/**
 * Adam as torch.optim.Adam (1.13, single-tensor path, no weight decay, no amsgrad) and
 * torch.nn.utils.clip_grad_norm_, acting on the parameter store by state_dict name.
 *
 *   m ← β1 m + (1-β1) g;  v ← β2 v + (1-β2) g²
 *   p ← p − (lr / (1-β1^t)) · m / (sqrt(v) / sqrt(1-β2^t) + ε)
 */
import { tf } from '../tf';
import type { ParamStore } from '../params/store';
import { addonOps, nativeOpsAvailable, type AdamStepScalars, type NativeAddon } from '../ops/addon';

/**
 * Parameters whose gradients, moments and updates live on a GPU device (ops/device-params.ts
 * DeviceParams): Adam takes the step there, with the same scalars and the same bits.
 */
export interface DeviceParamGroup {
  readonly names: readonly string[];
  /** a pass's gradients wait on the device */
  readonly hasGradients: boolean;
  adamStep(s: AdamStepScalars): void;
  readMoments(): { m: Map<string, Float32Array>; v: Map<string, Float32Array> };
  writeMoments(m: Map<string, Float32Array>, v: Map<string, Float32Array>): void;
}

export interface AdamOptions {
  lr?: number;
  beta1?: number;
  beta2?: number;
  eps?: number;
  /**
   * The update loops on the addon (native/optimizer.h; default: when it is built) or in
   * TypeScript. Both round every operation alike: the same bits.
   */
  native?: boolean;
}

/** The addon when `native` (default: when it is built), else null; asking for it without one throws. */
function optimizerAddon(native: boolean | undefined): NativeAddon | null {
  if (native === false || (native === undefined && !nativeOpsAvailable())) return null;
  return addonOps();
}

/**
 * The global L2 norm of all gradients and, if it exceeds maxNorm, the gradients scaled by
 * maxNorm / (norm + 1e-6) (PyTorch clamps that coefficient at 1 and always multiplies; a factor
 * of exactly 1 changes nothing, so we skip it). Returns new tensors in a new map; the caller
 * disposes both maps' tensors as it sees fit.
 */
export function clipGradNorm(grads: Map<string, tf.Tensor>, maxNorm: number, opts: { native?: boolean } = {}): { grads: Map<string, tf.Tensor>; norm: number } {
  const { norm, scale } = clipScale(grads, maxNorm, opts);
  const out = new Map<string, tf.Tensor>();
  for (const [k, g] of grads) out.set(k, scale !== 1 ? tf.mul(g, scale) : g.clone());
  return { grads: out, norm };
}

/**
 * clipGradNorm's norm and the factor it scales the gradients by, as a float32 value (exactly 1:
 * no clipping), without making the scaled copies: Adam.applyGradients takes the factor.
 */
export function clipScale(grads: Map<string, tf.Tensor>, maxNorm: number, opts: { native?: boolean } = {}): { norm: number; scale: number } {
  return clipFromNorms(gradNorms(grads, opts).values(), maxNorm);
}

/** Each gradient's L2 norm (tf.norm's roundings), by name, in the map's order. */
export function gradNorms(grads: Map<string, tf.Tensor>, opts: { native?: boolean } = {}): Map<string, number> {
  const addon = optimizerAddon(opts.native);
  const out = new Map<string, number>();
  for (const [k, g] of grads) {
    const x = g.dataSync() as Float32Array;
    out.set(k, addon ? addon.l2Norm(x) : tensorNorm(x));
  }
  return out;
}

/**
 * clipScale from the per-tensor norms, in order (as torch.norm(torch.stack(norms))): the order of
 * the sum is part of the result's bits.
 */
export function clipFromNorms(norms: Iterable<number>, maxNorm: number): { norm: number; scale: number } {
  let sumSq = 0;
  for (const n of norms) sumSq += n * n;
  const norm = Math.fround(Math.sqrt(sumSq));
  const coef = Math.min(1, maxNorm / (norm + 1e-6));
  return { norm, scale: coef < 1 ? Math.fround(coef) : 1 };
}

/**
 * A tensor's L2 norm in float32 as tf.norm computes it: squares rounded to float32, summed in
 * order in double, the sum rounded, then its square root.
 */
function tensorNorm(x: Float32Array): number {
  let t = 0;
  for (let i = 0; i < x.length; i++) t += Math.fround(Math.pow(Math.abs(x[i]), 2));
  return Math.fround(Math.sqrt(Math.fround(t)));
}

export interface AdamState {
  steps: number;
  m: Map<string, { shape: number[]; data: Float32Array }>;
  v: Map<string, { shape: number[]; data: Float32Array }>;
}

/**
 * The moments are plain float32 arrays and each parameter's update is one loop, every operation
 * rounded to float32 in the order the tensor version took (so the results are the same, bit for
 * bit): a few tfjs ops per parameter and step were most of the optimizer's time.
 */
export class Adam {
  readonly lr: number;
  readonly beta1: number;
  readonly beta2: number;
  readonly eps: number;
  private step = 0;
  private readonly m = new Map<string, Float32Array>();
  private readonly v = new Map<string, Float32Array>();
  private readonly addon: NativeAddon | null;
  /** groups of parameters on a device, each with whether it holds their moments (made by a step there or restored) */
  private readonly device = new Map<DeviceParamGroup, { moments: boolean }>();

  constructor(
    private readonly params: ParamStore,
    opts: AdamOptions = {},
  ) {
    this.lr = opts.lr ?? 1e-3;
    this.beta1 = opts.beta1 ?? 0.9;
    this.beta2 = opts.beta2 ?? 0.999;
    this.eps = opts.eps ?? 1e-8;
    this.addon = optimizerAddon(opts.native);
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

  /**
   * Hands the parameters of `group` to a device: their gradients are summed there, and every
   * applyGradients takes their step there too (when a pass left gradients), with the same step
   * count, rate and clipping factor. Moments held here for them move to the device.
   */
  attachDevice(group: DeviceParamGroup): void {
    if (this.device.has(group)) throw new Error('Adam: the device group is attached already');
    const onDevice = this.deviceNames();
    for (const name of group.names) {
      if (!this.params.variable(name).trainable) throw new Error(`Adam: '${name}' is not a trainable parameter`);
      if (onDevice.has(name)) throw new Error(`Adam: '${name}' is in another device group`);
    }
    const held = group.names.filter((n) => this.m.has(n));
    if (held.length && held.length !== group.names.length) throw new Error(`Adam: moments for some of the device's parameters only (${held.join(', ')})`);
    if (held.length) {
      group.writeMoments(new Map(held.map((n) => [n, this.m.get(n)!])), new Map(held.map((n) => [n, this.v.get(n)!])));
      for (const n of held) {
        this.m.delete(n);
        this.v.delete(n);
      }
    }
    this.device.set(group, { moments: held.length > 0 });
  }

  /** the names of every device group's parameters */
  private deviceNames(): Set<string> {
    return new Set([...this.device.keys()].flatMap((g) => [...g.names]));
  }

  /** The number of steps taken. */
  get steps(): number {
    return this.step;
  }

  /**
   * One update of every parameter that has a gradient (parameters without one are left alone,
   * as PyTorch skips grad-less parameters). `lr` overrides the rate for this step (schedules);
   * `gradScale` (a float32 value in (0, 1]: clipScale's) multiplies every gradient first, as
   * clipGradNorm's scaled copies would.
   */
  applyGradients(grads: Map<string, tf.Tensor>, lr: number = this.lr, gradScale = 1): void {
    if (!(gradScale > 0 && gradScale <= 1) || Math.fround(gradScale) !== gradScale) {
      throw new Error(`Adam: gradScale must be a float32 value in (0, 1], got ${gradScale}`);
    }
    // check every gradient first, so that a bad one leaves the optimizer untouched
    const onDevice = this.deviceNames();
    for (const [name, g] of grads) {
      const param = this.params.variable(name);
      if (!param.trainable) throw new Error(`Adam: '${name}' is not a trainable parameter`);
      if (onDevice.has(name)) throw new Error(`Adam: '${name}' lives on the device; its gradient is made there, not given here`);
      if (g.shape.length !== param.shape.length || g.shape.some((d, i) => d !== param.shape[i])) {
        throw new Error(`Adam: gradient for '${name}' has shape [${g.shape}], the parameter [${param.shape}]`);
      }
    }
    this.step++;
    const t = this.step;
    const f = Math.fround;
    // the scalars as float32, as tfjs made them
    const b1 = f(this.beta1), c1 = f(1 - this.beta1), b2 = f(this.beta2), c2 = f(1 - this.beta2), eps = f(this.eps);
    const bc2Sqrt = f(Math.sqrt(1 - Math.pow(this.beta2, t)));
    const stepSize = f(lr / (1 - Math.pow(this.beta1, t)));
    for (const [name, grad] of grads) {
      const param = this.params.variable(name);
      const g = grad.dataSync() as Float32Array;
      const p = param.dataSync() as Float32Array;
      const first = !this.m.has(name);
      const m = this.m.get(name) ?? new Float32Array(g.length);
      const v = this.v.get(name) ?? new Float32Array(g.length);
      const next = this.addon
        ? this.addon.adamUpdate({ p, g, m, v, first, scale: gradScale, b1, c1, b2, c2, eps, bc2Sqrt, stepSize })
        : adamLoop(p, g, m, v, first, gradScale, b1, c1, b2, c2, eps, bc2Sqrt, stepSize);
      this.m.set(name, m);
      this.v.set(name, v);
      const p1 = tf.tensor(next, param.shape, 'float32');
      param.assign(p1);
      p1.dispose();
    }
    for (const [group, state] of this.device) {
      if (!group.hasGradients) continue;
      group.adamStep({ first: !state.moments, scale: gradScale, b1, c1, b2, c2, eps, bc2Sqrt, stepSize });
      state.moments = true;
    }
  }

  /** The optimizer's state (step count and both moments by parameter name), for checkpoints. */
  exportState(): AdamState {
    const onDevice = [...this.device].filter(([, s]) => s.moments).map(([g]) => g.readMoments());
    // by parameter order, wherever each moment lives
    const copy = (host: Map<string, Float32Array>, device: Map<string, Float32Array>[]): AdamState['m'] => {
      const out: AdamState['m'] = new Map();
      for (const k of this.params.names()) {
        const data = host.get(k) ?? device.find((d) => d.has(k))?.get(k);
        if (data) out.set(k, { shape: [...this.params.variable(k).shape], data: Float32Array.from(data) });
      }
      return out;
    };
    return { steps: this.step, m: copy(this.m, onDevice.map((d) => d.m)), v: copy(this.v, onDevice.map((d) => d.v)) };
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
    const saved = [...this.device.keys()].map((g) => ({ g, held: g.names.filter((n) => state.m.has(n) || state.v.has(n)) }));
    for (const { g, held } of saved) {
      if (held.length && held.length !== g.names.length) throw new Error(`Adam: saved moments for some of a device group's parameters only (${held.join(', ')})`);
    }
    const device = this.deviceNames();
    this.dispose();
    this.step = state.steps;
    for (const [name, { data }] of state.m) if (!device.has(name)) this.m.set(name, Float32Array.from(data));
    for (const [name, { data }] of state.v) if (!device.has(name)) this.v.set(name, Float32Array.from(data));
    for (const { g, held } of saved) {
      if (!held.length) continue;
      const take = (m: AdamState['m']): Map<string, Float32Array> => new Map(g.names.map((n) => [n, m.get(n)?.data ?? new Float32Array(0)]));
      g.writeMoments(take(state.m), take(state.v));
      this.device.get(g)!.moments = true;
    }
  }

  /** Forgets the moments (they are plain arrays: nothing to release but the references; the device's are made afresh on its next step). */
  dispose(): void {
    this.m.clear();
    this.v.clear();
    for (const s of this.device.values()) s.moments = false;
  }
}

/**
 * The reference update of one parameter (native/optimizer.h adam_update is the same loop): m and
 * v in place, the next values returned, every operation rounded to float32 in the order the
 * tensor version took.
 */
function adamLoop(p: Float32Array, g: Float32Array, m: Float32Array, v: Float32Array, first: boolean, scale: number,
  b1: number, c1: number, b2: number, c2: number, eps: number, bc2Sqrt: number, stepSize: number): Float32Array {
  const f = Math.fround;
  const next = new Float32Array(g.length);
  for (let i = 0; i < g.length; i++) {
    const gi = scale !== 1 ? f(g[i] * scale) : g[i];
    // m ← β1 m + (1-β1) g;  v ← β2 v + (1-β2) g²
    m[i] = first ? f(gi * c1) : f(f(m[i] * b1) + f(gi * c1));
    const sq = f(gi * gi);
    v[i] = first ? f(sq * c2) : f(f(v[i] * b2) + f(sq * c2));
    // p − (m / (sqrt(v) / sqrt(1-β2^t) + ε)) · lr / (1-β1^t)
    const denom = f(f(f(Math.sqrt(v[i])) / bc2Sqrt) + eps);
    next[i] = f(p[i] - f(f(m[i] / denom) * stepSize));
  }
  return next;
}
