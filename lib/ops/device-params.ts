/**
 * A stage's weights (the decoder's, the encoder's, a GRU's) kept on the GPU device its calls run on,
 * with their Adam step there too: the stage's backward leaves their gradients on the device (the
 * decoder's stages of a pass sum theirs there: shareDecoderWeights; a GRU's calls add theirs up
 * there), Adam updates them in the stage's own buffers, and the next call runs with the result.
 * Neither the weights nor their gradients cross the bus in a training step; only one norm per
 * tensor comes down, for gradient clipping.
 *
 * The host copies (the tf.Variables) then go stale. They are brought up to date when something on
 * the host reads them: the ops' readers (f32, contentTag, through resident.ts), ParamStore.snapshot
 * (checkpoints, checksums) and Adam.exportState (the moments). A host write (ParamStore.set, a
 * loaded checkpoint) makes the host copy current again, and the next call uploads it.
 */
import { tf } from '../tf';
import type { ParamStore } from '../params/store';
import { addonOps, contentTag, freshTag, workspaceFor, type AdamStepScalars, type DeviceParamsCallSpec, type DeviceParamsSpec, type GruResidentSpec, type StageDevice } from './addon';
import type { DecoderSpec } from './decoder-stage';
import { f32 } from './arrays';
import { setHostRefresh } from './resident';

/** An encoder's parameters as the encoder stage takes them (EncoderArgs' convolutions and head tensors, posWeight … wv). */
export interface EncoderParams {
  convs: { weight: tf.Tensor; bias: tf.Tensor }[];
  head: tf.Tensor[];
}

interface Param {
  name: string;
  variable: tf.Variable;
  /** its place in the stage (DeviceParamsSpec) */
  index: number;
  bias: boolean;
  size: number;
  /** the tag under which the device holds the current values; null: the host's are current (tagged by contentTag) */
  deviceTag: number | null;
  /** the host copy is older than the device's */
  stale: boolean;
}

/** the owner of each device-resident weight, by its variable */
const ownerOf = new WeakMap<object, DeviceParams>();

/**
 * A layer's weight and bias as a GPU call in `workspace` on `device` takes them: when an optimizer
 * there made their values, just the tags the device knows them by (the call takes them from its
 * workspace); otherwise their host data (a stale host copy is brought up to date first, so it holds
 * the device's values) under those tags or their content tags.
 */
export function layerTensors(w: tf.Tensor, b: tf.Tensor, workspace: object | undefined, device: StageDevice):
  { w: Float32Array; b: Float32Array; wTag: number; bTag: number } | { resident: true; wTag: number; bTag: number } {
  const owner = ownerOf.get(w);
  const wTag = owner?.deviceTag(w, workspace, device) ?? null;
  const bTag = owner?.deviceTag(b, workspace, device) ?? null;
  if (wTag !== null && bTag !== null) return { resident: true, wTag, bTag };
  return { w: f32(w), b: f32(b), wTag: wTag ?? contentTag(w), bTag: bTag ?? contentTag(b) };
}

export class DeviceParams {
  /** state_dict names, in the order the device keeps them */
  readonly names: readonly string[];
  private readonly params: Param[];
  /** a pass's gradients wait on the device for the optimizer step */
  private pending = false;

  private constructor(
    readonly stage: DeviceParamsSpec['stage'],
    private readonly layers: number,
    entries: { tensor: tf.Tensor; index: number; bias: boolean }[],
    /** the workspace the stage's calls use (where the weights live) */
    readonly workspace: object,
    store: ParamStore,
    readonly device: StageDevice,
  ) {
    if (device === 'cpu') throw new Error(`DeviceParams: the ${stage} runs on the CPU; its weights stay on the host`);
    if (!entries.length) throw new Error(`DeviceParams: the ${stage} has no weights`);
    this.params = entries.map(({ tensor, index, bias }) => {
      const variable = tensor as tf.Variable;
      const name = store.keyOfVariableName(variable.name ?? '');
      if (name === undefined || !(tensor instanceof tf.Variable)) throw new Error(`DeviceParams: a tensor of the ${stage} (place ${index}) is not a variable of the parameter store`);
      if (!variable.trainable) throw new Error(`DeviceParams: '${name}' is not trainable`);
      if (ownerOf.has(variable)) throw new Error(`DeviceParams: '${name}' already lives on a device`);
      return { name, variable, index, bias, size: variable.size, deviceTag: null, stale: false };
    });
    this.names = this.params.map((p) => p.name);
    for (const p of this.params) ownerOf.set(p.variable, this);
    this.anchor = store.attachDeviceOwner(this);
  }

  /**
   * The store's anchor for these weights (ParamStore.tapeVariables): an op whose only trainable
   * inputs are these weights (the encoder's) takes it as an input too, so that a tape
   * differentiating the anchors rather than the weights still runs its backward; its gradient is 0.
   */
  readonly anchor: tf.Variable;

  /** The weighted layers of the decoder's stack `spec` (decoderStack's, from `store`), in the workspace its stages use on `device`. */
  static forDecoder(spec: DecoderSpec, store: ParamStore, device: StageDevice): DeviceParams {
    const entries = spec.layers.flatMap((L, index) => (L.kind === 'spatialBroadcast' ? [] : [{ tensor: L.weight, index, bias: false }, { tensor: L.bias, index, bias: true }]));
    if (!entries.length) throw new Error('DeviceParams: the decoder has no weighted layer');
    // decoderNll's workspace: keyed by the last weighted layer's weight
    return DeviceParams.ownerOf(entries[0].tensor, device) ?? new DeviceParams('decoder', spec.layers.length, entries, workspaceFor(entries[entries.length - 2].tensor), store, device);
  }

  /** The encoder's convolutions and head tensors, in the workspace the encoder stage uses on `device`. */
  static forEncoder(e: EncoderParams, store: ParamStore, device: StageDevice): DeviceParams {
    if (!e.convs.length || e.head.length !== 10) throw new Error('DeviceParams: the encoder needs its convolutions and its 10 head tensors');
    const L = e.convs.length;
    const entries = [
      ...e.convs.flatMap((c, index) => [{ tensor: c.weight, index, bias: false }, { tensor: c.bias, index, bias: true }]),
      ...e.head.map((tensor, j) => ({ tensor, index: L + j, bias: false })),
    ];
    // encoderStageParts' workspace: keyed by the first convolution's weight
    return DeviceParams.ownerOf(entries[0].tensor, device) ?? new DeviceParams('encoder', L, entries, workspaceFor(e.convs[0].weight, 'encoder'), store, device);
  }

  /**
   * A GRU's tensors in the device's order (DeviceParamsSpec): one cell's w_ih, w_hh, b_ih, b_hh, or
   * the DualGRU's 12 in the original's layout, in the workspace gruCell keys by the first.
   */
  static forGru(tensors: tf.Tensor[], store: ParamStore, device: StageDevice): DeviceParams {
    if (tensors.length !== 4 && tensors.length !== 12) throw new Error(`DeviceParams: a GRU has 4 tensors (a cell) or 12 (the DualGRU), not ${tensors.length}`);
    const layers = tensors.length === 4 ? 1 : 2;
    const entries = tensors.map((tensor, index) => ({ tensor, index, bias: index >= (layers === 1 ? 2 : 8) }));
    return DeviceParams.ownerOf(tensors[0], device) ?? new DeviceParams('gru', layers, entries, workspaceFor(tensors[0]), store, device);
  }

  /** The owner of a weight kept on a device, if any. */
  static of(t: tf.Tensor): DeviceParams | undefined {
    return ownerOf.get(t);
  }

  /** The owner that keeps `t` on `device` already (a second trainer of one model), if any. */
  private static ownerOf(t: tf.Tensor, device: StageDevice): DeviceParams | undefined {
    const owner = ownerOf.get(t);
    if (owner && owner.device !== device) throw new Error(`DeviceParams: the ${owner.stage}'s weights live on ${owner.device}, not ${device}`);
    return owner;
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
   * `backward(keep)` runs a backward call that leaves this stage's gradients on the device under
   * `keep` (the encoder's backward, the decoder's sums); they then wait for adamStep. A second pass
   * before the optimizer took (or discarded) the first's is refused.
   */
  keepGradients<R>(backward: (keep: DeviceParamsSpec) => R): R {
    if (this.pending) throw new Error(`DeviceParams: a second pass's gradients of the ${this.stage} before an optimizer step took (or discarded) the first's`);
    const r = backward(this.paramsSpec());
    this.pending = true;
    return r;
  }

  /**
   * `backward(first)` runs one of a pass's backward calls that each add their gradients of
   * this stage on the device (a GRU's: one per call of the cell; `first`, the pass's first, sets
   * them), as a tape sums a tensor's gradients in the order its backward visits the calls.
   */
  addGradients<R>(backward: (first: boolean) => R): R {
    const r = backward(!this.pending);
    this.pending = true;
    return r;
  }

  /**
   * A GRU call's weights as this stage's parameters (gruCell's `resident`) for its cell `cell`:
   * each parameter's tag, with its host data where the host copy is the current one.
   */
  residentWeights(cell: number): GruResidentSpec {
    if (this.stage !== 'gru') throw new Error(`DeviceParams: the ${this.stage}'s weights are not a GRU's`);
    return { ...this.paramsSpec(), stage: 'gru', cell, data: this.params.map((p) => (p.deviceTag === null ? f32(p.variable) : null)) };
  }

  /**
   * Sums the kept gradient sets of a pass's decoding stages (decoderParamGradSums' arguments): the
   * weights' sums stay on the device, the positional embedding's (buffer 0) is returned.
   */
  sumGradients(ids: number[], us: number[], sizes: number[]): Float32Array {
    return this.keepGradients((keep) => addonOps().decoderParamGradSums({ workspace: this.workspace, device: this.device, ids, us, sizes, keep })[0]!);
  }

  /** Whether a pass's gradients wait on the device. */
  get hasGradients(): boolean {
    return this.pending;
  }

  /** The L2 norm of each weight's waiting gradient (l2Norm's bits), by name; empty when none waits. */
  gradNorms(): Map<string, number> {
    if (!this.pending) return new Map();
    const norms = addonOps().deviceGradNorms(this.spec());
    return new Map(this.params.map((p, j) => [p.name, norms[j]]));
  }

  /** Adam on the device from the waiting gradients (none: nothing to do, as for a parameter without a gradient). */
  adamStep(s: AdamStepScalars): void {
    if (!this.pending) return;
    const newTags = this.params.map(() => freshTag());
    addonOps().deviceAdam({ ...this.spec(), ...s, newTags });
    this.pending = false;
    this.params.forEach((p, j) => {
      p.deviceTag = newTags[j];
      p.stale = true;
      setHostRefresh(p.variable, () => this.pull());
    });
  }

  /** The waiting gradients, end to end in `names`' order (for a reduction through the host). */
  readGradients(): Float32Array {
    this.checkPending('readGradients');
    return addonOps().deviceParamsRead({ ...this.spec(), part: 'grads' });
  }

  /** Replaces the waiting gradients (the ranks' sum of readGradients). */
  writeGradients(sum: Float32Array): void {
    this.checkPending('writeGradients');
    const n = this.params.reduce((k, p) => k + p.size, 0);
    if (sum.length !== n) throw new Error(`DeviceParams.writeGradients: the ${this.stage}'s gradients have ${n} values, not ${sum.length}`);
    addonOps().deviceParamsWrite({ ...this.spec(), part: 'grads', data: sum });
  }

  /** Sums the waiting gradients over the ranks of `comm` (an NcclComm on this CUDA device) where they lie. */
  allreduceGradients(comm: object): void {
    this.checkPending('allreduceGradients');
    addonOps().deviceGradAllreduce(this.spec(), comm);
  }

  private checkPending(what: string): void {
    if (!this.pending) throw new Error(`DeviceParams.${what}: no pass's gradients of the ${this.stage} wait on the device`);
  }

  /** Drops the waiting gradients (a skipped step). */
  discardGradients(): void {
    this.pending = false;
  }

  /** Brings every stale host copy up to date (one download). */
  pull(): void {
    const stale = this.params.filter((p) => p.stale);
    if (!stale.length) return;
    const data = addonOps().deviceParamsRead({ ...this.spec(stale), part: 'weights' });
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
    return { m: split(a.deviceParamsRead({ ...this.spec(), part: 'm' })), v: split(a.deviceParamsRead({ ...this.spec(), part: 'v' })) };
  }

  /** Puts Adam's moments (every weight's, by name) on the device. */
  writeMoments(m: Map<string, Float32Array>, v: Map<string, Float32Array>): void {
    const join = (which: string, moments: Map<string, Float32Array>): Float32Array => {
      const out = new Float32Array(this.params.reduce((n, p) => n + p.size, 0));
      let offset = 0;
      for (const p of this.params) {
        const d = moments.get(p.name);
        if (!d || d.length !== p.size) throw new Error(`DeviceParams: ${which} for '${p.name}' ${d ? `has ${d.length} values, not ${p.size}` : 'is missing'}`);
        out.set(d, offset);
        offset += p.size;
      }
      return out;
    };
    const mm = join('m', m), vv = join('v', v);
    const a = addonOps();
    a.deviceParamsWrite({ ...this.spec(), part: 'm', data: mm });
    a.deviceParamsWrite({ ...this.spec(), part: 'v', data: vv });
  }

  private paramsSpec(of: Param[] = this.params): DeviceParamsSpec {
    // the device holds each weight under its device tag, or (current on the host) under its content tag
    return { stage: this.stage, layers: this.layers, params: of.map((p) => ({ index: p.index, bias: p.bias, size: p.size, tag: p.deviceTag ?? contentTag(p.variable) })) };
  }

  private spec(of: Param[] = this.params): DeviceParamsCallSpec {
    return { workspace: this.workspace, device: this.device, ...this.paramsSpec(of) };
  }
}
