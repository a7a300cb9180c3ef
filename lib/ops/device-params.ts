/**
 * The decoder's weights and biases kept on the GPU device its stages run on, with their Adam step
 * there too: the stages of a pass sum the gradients of these weights on the device
 * (shareDecoderWeights), Adam updates them in the stages' own buffers, and the next pass decodes
 * with the result. Neither the weights nor their gradients cross the bus in a training step; only
 * one norm per tensor comes down, for gradient clipping.
 *
 * The host copies (the tf.Variables) then go stale. They are brought up to date when something on
 * the host reads them: the ops' readers (f32, contentTag, through resident.ts), ParamStore.snapshot
 * (checkpoints, checksums) and Adam.exportState (the moments). A host write (ParamStore.set, a
 * loaded checkpoint) makes the host copy current again, and the next stage uploads it.
 */
import { tf } from '../tf';
import type { ParamStore } from '../params/store';
import { addonOps, contentTag, freshTag, workspaceFor, type AdamStepScalars, type DeviceDecoderParamsSpec, type StageDevice } from './addon';
import type { DecoderSpec } from './decoder-stage';
import { setHostRefresh } from './resident';

interface Param {
  name: string;
  variable: tf.Variable;
  /** index in the decoder's layer stack */
  layer: number;
  bias: boolean;
  size: number;
  /** the tag under which the device holds the current values; null: the host's are current (tagged by contentTag) */
  deviceTag: number | null;
  /** the host copy is older than the device's */
  stale: boolean;
}

/** the owner of each device-resident weight, by its variable */
const ownerOf = new WeakMap<object, DeviceDecoderParams>();

export class DeviceDecoderParams {
  /** state_dict names, in the order the device keeps them */
  readonly names: readonly string[];
  readonly workspace: object;
  private readonly params: Param[];
  private readonly layers: number;
  /** a pass's summed gradients wait on the device for the optimizer step */
  private pending = false;

  /**
   * The weighted layers of `spec` (the decoder's stack as decoderStack builds it from `store`) kept
   * on `device` from now on, in the workspace the decoding stages use there.
   */
  constructor(spec: DecoderSpec, store: ParamStore, readonly device: StageDevice) {
    if (device === 'cpu') throw new Error('DeviceDecoderParams: the decoder runs on the CPU; its weights stay on the host');
    this.layers = spec.layers.length;
    this.params = [];
    spec.layers.forEach((L, layer) => {
      if (L.kind === 'spatialBroadcast') return;
      for (const [t, bias] of [[L.weight, false], [L.bias, true]] as const) {
        const variable = t as tf.Variable;
        const name = store.keyOfVariableName(variable.name ?? '');
        if (name === undefined || !(t instanceof tf.Variable)) throw new Error(`DeviceDecoderParams: layer ${layer}'s ${bias ? 'bias' : 'weight'} is not a variable of the parameter store`);
        if (!variable.trainable) throw new Error(`DeviceDecoderParams: '${name}' is not trainable`);
        if (ownerOf.has(variable)) throw new Error(`DeviceDecoderParams: '${name}' already lives on a device`);
        this.params.push({ name, variable, layer, bias, size: variable.size, deviceTag: null, stale: false });
      }
    });
    if (!this.params.length) throw new Error('DeviceDecoderParams: the decoder has no weighted layer');
    this.names = this.params.map((p) => p.name);
    // the decoding stages' workspace (decoderNll: keyed by the last weighted layer's weight)
    this.workspace = workspaceFor(this.params[this.params.length - 2].variable);
    for (const p of this.params) ownerOf.set(p.variable, this);
    store.attachDeviceOwner(this);
  }

  /**
   * The tag under which the stages' workspace (on `device`) holds the current values of `t`, when
   * the device has them and the host may not; else null (the host's values are current, under their
   * contentTag). A stage given both of a layer's tensors this way takes them from its workspace.
   */
  deviceTag(t: tf.Tensor, workspace: object | undefined, device: StageDevice): number | null {
    if (workspace !== this.workspace || device !== this.device) return null;
    return this.params.find((p) => p.variable === t)?.deviceTag ?? null;
  }

  /**
   * Sums the kept gradient sets of a pass's stages (decoderParamGradSums' arguments): the weights'
   * sums stay on the device for adamStep, the positional embedding's (buffer 0) is returned.
   */
  sumGradients(ids: number[], us: number[], sizes: number[]): Float32Array {
    if (this.pending) throw new Error('DeviceDecoderParams: a second pass\'s gradients before an optimizer step took (or discarded) the first\'s');
    const sums = addonOps().decoderParamGradSums({ workspace: this.workspace, device: this.device, ids, us, sizes, keep: this.paramsSpec() });
    this.pending = true;
    return sums[0]!;
  }

  /** Whether a pass's gradients wait on the device. */
  get hasGradients(): boolean {
    return this.pending;
  }

  /** The L2 norm of each weight's waiting gradient (l2Norm's bits), by name; empty when none waits. */
  gradNorms(): Map<string, number> {
    if (!this.pending) return new Map();
    const norms = addonOps().decoderGradNorms(this.spec());
    return new Map(this.params.map((p, j) => [p.name, norms[j]]));
  }

  /** Adam on the device from the waiting gradients (none: nothing to do, as for a parameter without a gradient). */
  adamStep(s: AdamStepScalars): void {
    if (!this.pending) return;
    const newTags = this.params.map(() => freshTag());
    addonOps().decoderAdam({ ...this.spec(), ...s, newTags });
    this.pending = false;
    this.params.forEach((p, j) => {
      p.deviceTag = newTags[j];
      p.stale = true;
      setHostRefresh(p.variable, () => this.pull());
    });
  }

  /** Drops the waiting gradients (a skipped step). */
  discardGradients(): void {
    this.pending = false;
  }

  /** Brings every stale host copy up to date (one download). */
  pull(): void {
    const stale = this.params.filter((p) => p.stale);
    if (!stale.length) return;
    const data = addonOps().decoderParamsRead({ ...this.spec(stale), part: 'weights' });
    let offset = 0;
    for (const p of stale) {
      const t = tf.tensor(data.slice(offset, offset + p.size), p.variable.shape, 'float32');
      offset += p.size;
      p.variable.assign(t);
      t.dispose();
      p.stale = false;
      setHostRefresh(p.variable, null);
    }
  }

  /** The host wrote `name` (ParamStore.set): its host copy is the current one, for the next stage to upload. */
  hostWrote(name: string): void {
    const p = this.params.find((q) => q.name === name);
    if (!p) return;
    p.deviceTag = null;
    p.stale = false;
    setHostRefresh(p.variable, null);
  }

  /** Adam's moments on the device, by name (they exist after a step or a writeMoments). */
  readMoments(): { m: Map<string, Float32Array>; v: Map<string, Float32Array> } {
    const split = (data: Float32Array): Map<string, Float32Array> => {
      let offset = 0;
      return new Map(this.params.map((p) => [p.name, data.slice(offset, (offset += p.size))]));
    };
    const a = addonOps();
    return { m: split(a.decoderParamsRead({ ...this.spec(), part: 'm' })), v: split(a.decoderParamsRead({ ...this.spec(), part: 'v' })) };
  }

  /** Puts Adam's moments (every weight's, by name) on the device. */
  writeMoments(m: Map<string, Float32Array>, v: Map<string, Float32Array>): void {
    const join = (which: string, moments: Map<string, Float32Array>): Float32Array => {
      const out = new Float32Array(this.params.reduce((n, p) => n + p.size, 0));
      let offset = 0;
      for (const p of this.params) {
        const d = moments.get(p.name);
        if (!d || d.length !== p.size) throw new Error(`DeviceDecoderParams: ${which} for '${p.name}' ${d ? `has ${d.length} values, not ${p.size}` : 'is missing'}`);
        out.set(d, offset);
        offset += p.size;
      }
      return out;
    };
    const mm = join('m', m), vv = join('v', v);
    const a = addonOps();
    a.decoderParamsWrite({ ...this.spec(), part: 'm', data: mm });
    a.decoderParamsWrite({ ...this.spec(), part: 'v', data: vv });
  }

  /** The owner of a weight kept on a device, if any. */
  static of(t: tf.Tensor): DeviceDecoderParams | undefined {
    return ownerOf.get(t);
  }

  /** The owner that keeps the weights of `spec` on `device` already (a second trainer of one model), if any. */
  static ownerOf(spec: DecoderSpec, device: StageDevice): DeviceDecoderParams | undefined {
    const first = spec.layers.find((L): L is Exclude<typeof L, { kind: 'spatialBroadcast' }> => L.kind !== 'spatialBroadcast');
    const owner = first ? ownerOf.get(first.weight) : undefined;
    if (owner && owner.device !== device) throw new Error(`DeviceDecoderParams: the decoder's weights live on ${owner.device}, not ${device}`);
    return owner;
  }

  private paramsSpec(of: Param[] = this.params): { layers: number; params: { layer: number; bias: boolean; size: number; tag: number }[] } {
    // the device holds each weight under its device tag, or (current on the host) under its content tag
    return { layers: this.layers, params: of.map((p) => ({ layer: p.layer, bias: p.bias, size: p.size, tag: p.deviceTag ?? contentTag(p.variable) })) };
  }

  private spec(of: Param[] = this.params): DeviceDecoderParamsSpec {
    return { workspace: this.workspace, device: this.device, ...this.paramsSpec(of) };
  }
}
