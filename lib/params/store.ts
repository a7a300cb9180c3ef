/**
 * The parameter store: one tf.Variable per state_dict tensor, keyed by the original name and
 * held in PyTorch's layout, so that loading, saving, gradients and optimizer state all speak the
 * original's names and shapes.
 */
import { tf } from '../tf';
import { Rng } from '../util/rng';
import { fans, type ParamSpec } from './spec';

/** A tensor's values and shape, as files and fixtures hold them. */
export interface ParamArray {
  data: Float32Array;
  shape: number[];
}

export type ParamRecord = Record<string, ParamArray>;

export class ParamError extends Error {
  constructor(
    readonly key: string,
    message: string,
  ) {
    super(`parameter '${key}': ${message}`);
    this.name = 'ParamError';
  }
}

let nextStoreId = 0;

function sizeOf(shape: number[]): number {
  return shape.reduce((a, b) => a * b, 1);
}

function initValues(spec: ParamSpec, rng: Rng): Float32Array {
  const n = sizeOf(spec.shape);
  const v = new Float32Array(n);
  const init = spec.init;
  switch (init.kind) {
    case 'const':
      v.fill(init.value);
      break;
    case 'uniform':
      for (let i = 0; i < n; i++) v[i] = rng.range(-init.bound, init.bound);
      break;
    case 'normal':
      for (let i = 0; i < n; i++) v[i] = init.std * rng.normal();
      break;
    case 'xavier': {
      const [fanIn, fanOut] = fans(spec.shape);
      const std = init.gain * Math.sqrt(2 / (fanIn + fanOut));
      for (let i = 0; i < n; i++) v[i] = std * rng.normal();
      break;
    }
    case 'init_posterior':
      // [loc = 0 … 0, softplus parameter = 1 … 1]
      v.fill(1, n / 2);
      break;
  }
  return v;
}

/**
 * Parameters whose current values may live on a device (ops/device-params.ts): the store brings
 * their host copies up to date before it reads them, and says when the host wrote one.
 */
export interface DeviceOwner {
  readonly names: readonly string[];
  /** makes every host copy current */
  pull(): void;
  /** the host wrote `name`: its host copy is now the current one */
  hostWrote(name: string): void;
}

export class ParamStore {
  private readonly vars = new Map<string, tf.Variable>();
  private readonly owners = new Map<string, DeviceOwner>();
  /** one per device owner, by tfjs variable name (tapeVariables) */
  private readonly anchors = new Map<string, tf.Variable>();
  private readonly specByName = new Map<string, ParamSpec>();
  private readonly prefix: string;
  private disposed = false;

  /** Creates every parameter of `specs`, initialised as the original does, from `rng`. */
  constructor(
    readonly specs: ParamSpec[],
    rng: Rng,
  ) {
    this.prefix = `emorl${nextStoreId++}/`;
    for (const spec of specs) {
      if (this.specByName.has(spec.name)) throw new ParamError(spec.name, 'declared twice');
      this.specByName.set(spec.name, spec);
      const values = initValues(spec, rng);
      const initial = tf.tensor(values, spec.shape, 'float32');
      this.vars.set(spec.name, tf.variable(initial, spec.trainable, this.prefix + spec.name));
      initial.dispose(); // the variable holds its own reference to the data
    }
  }

  names(): string[] {
    return this.specs.map((s) => s.name);
  }

  trainableNames(): string[] {
    return this.specs.filter((s) => s.trainable).map((s) => s.name);
  }

  has(name: string): boolean {
    return this.vars.has(name);
  }

  /** The variable for a state_dict key. */
  get<T extends tf.Tensor = tf.Tensor<any>>(name: string): T {
    this.ensureLive();
    const v = this.vars.get(name);
    if (!v) throw new ParamError(name, 'no such parameter in this model');
    return v as unknown as T;
  }

  variable(name: string): tf.Variable {
    return this.get<tf.Variable>(name);
  }

  /** The state_dict key of one of this store's variables (from tfjs' variable name). */
  keyOfVariableName(varName: string): string | undefined {
    return varName.startsWith(this.prefix) ? varName.slice(this.prefix.length) : undefined;
  }

  trainableVariables(): tf.Variable[] {
    return this.trainableNames().map((n) => this.variable(n));
  }

  /**
   * Hands `owner.names` to a device that keeps (and updates) their current values. Returns the
   * owner's anchor: a trainable scalar, not a parameter, that a training tape differentiates in
   * their place (tapeVariables), for the ops whose only trainable inputs are the owner's to take
   * it as an input too, so that the tape still runs their backward (which leaves the gradients on
   * the device).
   */
  attachDeviceOwner(owner: DeviceOwner): tf.Variable {
    this.ensureLive();
    for (const n of owner.names) {
      const spec = this.specByName.get(n);
      if (!spec) throw new ParamError(n, 'no such parameter in this model');
      if (this.owners.has(n)) throw new ParamError(n, 'already kept on a device');
    }
    for (const n of owner.names) this.owners.set(n, owner);
    // outside the prefix: no state_dict key
    const zero = tf.scalar(0);
    const anchor = tf.variable(zero, true, `${this.prefix.slice(0, -1)}#anchor${this.anchors.size}`);
    zero.dispose(); // the variable holds its own reference to the data
    this.anchors.set(anchor.name, anchor);
    return anchor;
  }

  /**
   * The variables a training tape differentiates: the trainable parameters the host trains, and
   * the anchor of each device owner (whose parameters' gradients stay on the device).
   */
  tapeVariables(): tf.Variable[] {
    return [...this.trainableNames().filter((n) => !this.owners.has(n)).map((n) => this.variable(n)), ...this.anchors.values()];
  }

  /** Whether tfjs' variable `varName` is a device owner's anchor (tapeVariables). */
  isAnchor(varName: string): boolean {
    return this.anchors.has(varName);
  }

  /** Sets one parameter, checking its shape. */
  set(name: string, value: ParamArray): void {
    const spec = this.specByName.get(name);
    if (!spec) throw new ParamError(name, 'no such parameter in this model');
    if (value.shape.length !== spec.shape.length || value.shape.some((d, i) => d !== spec.shape[i])) {
      throw new ParamError(name, `shape [${value.shape}] does not match the model's [${spec.shape}]`);
    }
    if (value.data.length !== sizeOf(spec.shape)) {
      throw new ParamError(name, `${value.data.length} values for shape [${spec.shape}]`);
    }
    const t = tf.tensor(Float32Array.from(value.data), spec.shape, 'float32');
    this.variable(name).assign(t);
    t.dispose();
    this.owners.get(name)?.hostWrote(name);
  }

  /**
   * Loads a whole state_dict. With `strict` (the default) every model parameter must be present
   * and no unknown key may appear; shapes are always checked.
   */
  load(record: ParamRecord, strict = true): void {
    const keys = Object.keys(record);
    for (const k of keys) {
      if (!this.specByName.has(k)) {
        if (strict) throw new ParamError(k, 'unexpected key: not a parameter of this model configuration');
      }
    }
    if (strict) {
      for (const s of this.specs) if (!(s.name in record)) throw new ParamError(s.name, 'missing from the loaded state_dict');
    }
    // check all shapes before changing anything
    for (const k of keys) {
      const spec = this.specByName.get(k);
      if (!spec) continue;
      const v = record[k];
      if (v.shape.length !== spec.shape.length || v.shape.some((d, i) => d !== spec.shape[i])) {
        throw new ParamError(k, `shape [${v.shape}] does not match the model's [${spec.shape}]`);
      }
    }
    for (const k of keys) if (this.specByName.has(k)) this.set(k, record[k]);
  }

  /** A copy of every parameter's values, keyed by state_dict name. */
  snapshot(): ParamRecord {
    for (const o of new Set(this.owners.values())) o.pull();
    const out: ParamRecord = {};
    for (const s of this.specs) {
      out[s.name] = { data: Float32Array.from(this.get(s.name).dataSync() as Float32Array), shape: [...s.shape] };
    }
    return out;
  }

  dispose(): void {
    if (this.disposed) return;
    this.disposed = true;
    for (const v of [...this.vars.values(), ...this.anchors.values()]) v.dispose();
    this.vars.clear();
    this.anchors.clear();
  }

  private ensureLive(): void {
    if (this.disposed) throw new Error('ParamStore: used after dispose()');
  }
}
