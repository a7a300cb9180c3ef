/**
 * The addon's entry points as nativeOps uses them (native/binding.cc checks every argument), and
 * its lazy loading: the same module lib/native.ts found, or an error saying why not.
 */
import type { tf } from '../tf';
import { nativeStatus } from '../native';
import type { FusedActivation } from './conv';
import { hostCurrent } from './resident';

/** The addon's activation codes (native/nhwc.h Act). */
export const ADDON_ACT: Record<FusedActivation, number> = { linear: 0, relu: 1, elu: 2 };

/** The addon's NHWC entry points (native/binding.cc; argument checks there). */
export interface NhwcGrads {
  dx: Float32Array | null;
  dw: Float32Array | null;
  db: Float32Array | null;
}
/** Two diagonal Gaussians' parameters, [rows, D] each (p: both or neither) */
export interface KlDiagSpec {
  qLoc: Float32Array;
  qStd: Float32Array;
  pLoc?: Float32Array;
  pStd?: Float32Array;
  rows: number;
  D: number;
}

export interface NativeAddon {
  /**
   * device 'cuda:N' / 'simt': the GPU kernels (symmetric padding and stride), buffers in `workspace`;
   * precision (CPU): see ConvPrecision
   */
  nhwcConv2d(x: Float32Array, xShape: number[], w: Float32Array, wShape: number[], bias: Float32Array | null,
    stride: number[], pad: number[], act: number[], device?: StageDevice, workspace?: object | null, precision?: ConvPrecision): Float32Array;
  nhwcConv2dBackward(x: Float32Array, xShape: number[], w: Float32Array, wShape: number[], y: Float32Array | null,
    dy: Float32Array, stride: number[], pad: number[], act: number[], needDx: boolean, needParams: boolean,
    device?: StageDevice, workspace?: object | null, precision?: ConvPrecision): NhwcGrads;
  nhwcConvTranspose2d(x: Float32Array, xShape: number[], w: Float32Array, wShape: number[], bias: Float32Array | null,
    stride: number[], pad: number[], outputPad: number[], act: number[]): Float32Array;
  nhwcConvTranspose2dBackward(x: Float32Array, xShape: number[], w: Float32Array, wShape: number[],
    y: Float32Array | null, dy: Float32Array, stride: number[], pad: number[], outputPad: number[], act: number[],
    needDx: boolean, needParams: boolean): NhwcGrads;
  /** op(a)·op(b), then (the linear layers' epilogue) + bias per row and the activation (true: ReLU; or ADDON_ACT's code) */
  matmul(a: Float32Array, aShape: number[], b: Float32Array, bShape: number[], transA: boolean, transB: boolean,
    out?: Float32Array | null, bias?: Float32Array | null, act?: boolean | number): Float32Array;
  /** buffers decoderStage and the GPU ops keep between calls (owned by the JS object) */
  DecoderWorkspace: new () => AddonWorkspace;
  /** one decoder stage (native/decoder.h); the spec is checked there */
  decoderStage(spec: DecoderStageSpec): DecoderStageResult;
  /**
   * per buffer b (sizes[b] floats) of the kept sets `ids` (decoderStage's keepParamGrads): Σ over the
   * sets, in that order, of us[k]·set_k[b], each product and sum rounded to float as a tape's sum of
   * scaled gradients is; the sets are freed. With `keep`, buffers 1 onwards (the layers' dw, db) are
   * summed into those device-resident parameters' gradients on the device instead, and come back null.
   */
  decoderParamGradSums(spec: { workspace: object; device: StageDevice; ids: number[]; us: number[]; sizes: number[]; keep?: DeviceParamsSpec }): (Float32Array | null)[];
  /** per device-resident parameter, the L2 norm of its summed gradient (l2Norm's bits) */
  deviceGradNorms(spec: DeviceParamsCallSpec): Float32Array;
  /**
   * adamUpdate of every device-resident parameter on the device, from its summed gradient (the same
   * bits); the moments are made at zero on the first step; each parameter then lies in the
   * workspace under its new tag
   */
  deviceAdam(spec: DeviceParamsCallSpec & AdamStepScalars & { newTags: number[] }): void;
  /** one part of every device-resident parameter, end to end */
  deviceParamsRead(spec: DeviceParamsCallSpec & { part: 'weights' | 'grads' | 'm' | 'v' }): Float32Array;
  /**
   * one part of every device-resident parameter, end to end, onto the device: the moments of a
   * restored optimizer state, or the ranks' sum of the gradients a pass left there
   */
  deviceParamsWrite(spec: DeviceParamsCallSpec & { part: 'grads' | 'm' | 'v'; data: Float32Array }): void;
  /**
   * the gradients a pass left on a CUDA device summed over the ranks of `comm` (an NcclComm on that
   * device) in place, with no copy through the host
   */
  deviceGradAllreduce(spec: DeviceParamsCallSpec, comm: object): void;
  /**
   * one Adam step of one parameter (native/optimizer.h): the next parameter values; m and v are
   * updated in place. The scalars are float32 values; the same bits as lib/optim/adam.ts' loop.
   */
  adamUpdate(spec: { p: Float32Array; g: Float32Array; m: Float32Array; v: Float32Array } & AdamStepScalars): Float32Array;
  /** tf.norm of a float32 array, with its roundings (native/optimizer.h) */
  l2Norm(x: Float32Array): number;
  /**
   * sets (null: removes) an EMORL_* variable in the process environment, where the kernels read
   * their settings (EMORL_GPU_GEMM, EMORL_SIMT_SCHEDULE). For tests: Jest hands each test file a
   * copy of process.env that native code never sees.
   */
  setEnvironment(name: string, value: string | null): void;
  /** the FMA throughput of all threads over about `seconds` (GFLOP/s; for benchmarks) */
  peakGflops(seconds?: number): number;
  /** the FP32 FMA throughput of CUDA device `device` (GFLOP/s; addon built with CUDA) */
  gpuPeakGflops(device: number, seconds?: number): number;
  /** the slot competition, fused (native/attention.h): the updates [B,K,C], the softmax over slots p [B,K,N] and s = Σ_pixels (p + ε) [B,K] */
  slotAttention(spec: SlotAttentionSpec): { updates: Float32Array; p: Float32Array; s: Float64Array };
  /** its backward from dU [B,K,C] and the forward pass's results */
  slotAttentionBackward(spec: SlotAttentionSpec & { p: Float32Array; s: Float64Array; updates: Float32Array; dU: Float32Array;
    /** add dk, dv onto these (then returned as null) */
    dkInto?: Float32Array; dvInto?: Float32Array }): { dq: Float32Array; dk: Float32Array | null; dv: Float32Array | null };
  /** LayerNorm over the last axis (native/layernorm.h); statistics in double */
  layerNorm(spec: { x: Float32Array; rows: number; D: number; weight?: Float32Array | null; bias?: Float32Array | null; eps: number }): { y: Float32Array; mean: Float64Array; rstd: Float64Array };
  layerNormBackward(spec: { g: Float32Array; x: Float32Array; rows: number; D: number; weight?: Float32Array | null; mean: Float64Array; rstd: Float64Array; withParams: boolean }):
    { dx: Float32Array; dw: Float64Array | null; db: Float64Array | null };
  /** σ = sqrt(softplus(min(s, 80)) + 1e-5) per element (native/gaussian.h; the reference's bits) */
  softplusStd(spec: { s: Float32Array }): Float32Array;
  /** ds from g = dL/dσ */
  softplusStdBackward(spec: { g: Float32Array; s: Float32Array; std: Float32Array }): Float32Array;
  /** KL(q ‖ p) per row of [rows, D] diagonal Gaussians; p absent: the standard normal (native/gaussian.h) */
  klDiag(spec: KlDiagSpec): Float32Array;
  /** its backward from g = dL/dkl [rows]: dpLoc and dpStd are null without p */
  klDiagBackward(spec: KlDiagSpec & { g: Float32Array }): { dqLoc: Float32Array; dqStd: Float32Array; dpLoc: Float32Array | null; dpStd: Float32Array | null };
  /**
   * one GRU step for N rows (native/gru.h): y = h' and the gate planes (r, u, n, c_n) [4,N,H] that
   * gruCellBackward needs; device 'cuda:N' / 'simt': the GPU kernels, buffers in `workspace`, and
   * x, h and the gates kept there under the id `kept` for the backward call (`keep`: the gates are
   * not downloaded)
   */
  gruCell(spec: GruCellSpec): { y: Float32Array; gates: Float32Array | null; kept: number };
  /** its backward from dy = d/dh'; the parameter gradients only with needParams (else null) */
  gruCellBackward(spec: GruCellBackwardSpec): GruCellGrads;
  /**
   * a stack of convolutions as one GPU stage (native/gpu/gpu.h ConvStack): the last map, and a stamp
   * under which the intermediate maps stay in `workspace` for convStackBackward
   */
  convStack(spec: ConvStackSpec): { y: Float32Array; yShape: number[]; stamp: number };
  /** its backward from dy of the last map; with another stamp than the workspace's latest, the forward runs again first */
  convStackBackward(spec: ConvStackSpec & { dy: Float32Array; stamp: number; needDx: boolean; needParams: boolean }):
    { dx: Float32Array | null; dw: Float32Array[] | null; db: Float32Array[] | null };
  /**
   * the whole encoder as one GPU stage (native/gpu/gpu.h EncoderHead): k and v [rows, Z], and a stamp
   * as convStack's; `keep`: k and v stay on the device only (null here), for encoderAttention;
   * kInto, vInto: arrays of rows·Z floats that k and v are written into (and returned as)
   */
  encoderStage<Keep extends boolean = false>(spec: EncoderStageSpec & { keep?: Keep; kInto?: Float32Array; vInto?: Float32Array }):
    { k: Keep extends true ? null : Float32Array; v: Keep extends true ? null : Float32Array; rows: number; Z: number; stamp: number };
  /** its backward from dk, dv, or (without them) from the sums encoderAttentionBackward made on the device under sumId */
  encoderStageBackward(spec: EncoderStageSpec & { dk?: Float32Array; dv?: Float32Array; sumId?: number; stamp: number; needParams: boolean; keep?: DeviceParamsSpec }): {
    dw: Float32Array[] | null; db: Float32Array[] | null;
    head: EncoderHeadGrads | null;
  };
  /**
   * the slot competition (lib/ops/attention.ts) of queries q [B, K, Z] against the keys and values an
   * encoderStage({keep: true}) left on the device under `stamp` (recomputed there when another
   * forward ran since: hand on the returned stamp); p [B, K, H·W] is the softmax, with wantP
   */
  encoderAttention(spec: EncoderAttentionSpec & { wantP?: boolean }): { updates: Float32Array; p: Float32Array | null; stamp: number };
  /** its backward: dq from dU [B, K, Z]; dk and dv summed on the device under sumId (a stamp of encoderStage) */
  encoderAttentionBackward(spec: EncoderAttentionSpec & { dU: Float32Array; sumId: number }): { dq: Float32Array; stamp: number };
  /** the encoder after its convolutions on the CPU (native/encoder_head.h): k, v and what the backward needs */
  encoderHead(spec: EncoderHeadSpec): { k: Float32Array; v: Float32Array; f1: Float32Array; f2: Float32Array; f3: Float32Array; mean: Float64Array; rstd: Float64Array };
  encoderHeadBackward(spec: EncoderHeadSpec & { f1: Float32Array; f2: Float32Array; f3: Float32Array; mean: Float64Array; rstd: Float64Array; dk: Float32Array; dv: Float32Array; needParams: boolean }):
    { dh: Float32Array; head: EncoderHeadGrads | null };
  /** the fused likelihood alone (native/likelihood.h) */
  imageNll(spec: { raw: Float32Array; target: Float32Array; B: number; K: number; H: number; W: number; C: number; logVar: number; gmm: boolean; needGrad: boolean }): { nll: Float32Array; draw: Float32Array | null };
}

export interface ConvStackSpec {
  x: Float32Array;
  /** [N, H, W, C] */
  xShape: number[];
  /** each: w [Co, Ci, kh, kw], b [Co]; act 0 linear, 1 relu, 2 elu */
  layers: ({ wShape: number[]; stride?: number; pad?: number; act?: number; wTag?: number; bTag?: number } & ({ w: Float32Array; b: Float32Array } | { resident: true; wTag: number; bTag: number }))[];
  device: StageDevice;
  workspace?: object;
}

export type EncoderHeadGrads = Record<'posW' | 'posB' | 'lnW' | 'lnB' | 'w1' | 'b1' | 'w2' | 'b2' | 'wk' | 'wv', Float32Array>;

/** The head's tensors (EncoderStageSpec.head) and the conv stack's last map h [rows, D] (rows = images · hw). */
export interface EncoderHeadSpec {
  h: Float32Array;
  rows: number;
  hw: number;
  D: number;
  head: EncoderStageSpec['head'];
}

export interface EncoderStageSpec extends ConvStackSpec {
  /** the CPU convolutions' precision (device 'cpu') */
  precision?: ConvPrecision;
  head: EncoderHeadTensors;
}

/** The encoder head's tensors: given, or (GPU devices, `resident`) in the workspace under their tags only. */
export type EncoderHeadTensors = {
  /** [H·W, pc] of the last map */
  pos: Float32Array;
  eps: number;
  /** contentTags of pos, posW, posB, lnW, lnB, w1, b1, w2, b2, wk, wv */
  tags?: number[];
} & (
  | { posW: Float32Array; posB: Float32Array; lnW: Float32Array; lnB: Float32Array; w1: Float32Array; b1: Float32Array; w2: Float32Array; b2: Float32Array; wk: Float32Array; wv: Float32Array }
  | { resident: true; Z: number; tags: number[] }
);

/** q [B,K,d] (already scaled), k [B,N,d], v [B,N,C]; eps added to the softmax before the renormalisation over pixels */
export interface SlotAttentionSpec {
  q: Float32Array; k: Float32Array; v: Float32Array;
  B: number; K: number; N: number; d: number; C: number;
  eps: number;
}

export interface EncoderAttentionSpec extends EncoderStageSpec {
  stamp: number;
  /** [B, K, Z], already scaled */
  q: Float32Array;
  B: number;
  K: number;
  /** added to the softmax before the renormalisation over pixels */
  eps: number;
}

/**
 * A GRU call's weights as a GRU stage's device-resident parameters (every one, DeviceParams 'gru'):
 * cell `cell` (the DualGRU's 0 or 1) is assembled from them on the device; data[j] is parameter
 * j's host data where its host copy is current (uploaded under its tag), else null. A backward
 * call with keepGrads puts its parameter gradients into the device's gradient state (set when
 * `first`, the pass's first call; added otherwise).
 */
export interface GruResidentSpec extends DeviceParamsSpec {
  stage: 'gru';
  data: (Float32Array | null)[];
  cell: number;
  keepGrads?: boolean;
  first?: boolean;
}
/** The weights of a GRU call: host arrays (nn.GRU's layout), or `resident` on a GPU device. */
type GruWeightsSpec =
  | { wIh: Float32Array; wHh: Float32Array; bIh: Float32Array; bHh: Float32Array; resident?: undefined }
  | { resident: GruResidentSpec; wIh?: undefined; wHh?: undefined; bIh?: undefined; bHh?: undefined };
export type GruCellSpec = GruWeightsSpec & {
  x: Float32Array;
  h: Float32Array;
  N: number;
  I: number;
  H: number;
  /** GPU devices: the gates stay on the device only (gruCell's gates are null) */
  keep?: boolean;
  device?: StageDevice;
  workspace?: object;
  /** GPU devices: contentTag of each weight and bias */
  wIhTag?: number;
  wHhTag?: number;
  bIhTag?: number;
  bHhTag?: number;
};
export type GruCellBackwardSpec = (
  | { wIh: Float32Array; wHh: Float32Array; bIh?: Float32Array; bHh?: Float32Array; resident?: undefined }
  | { resident: GruResidentSpec; wIh?: undefined; wHh?: undefined; bIh?: undefined; bHh?: undefined }
) & {
  x: Float32Array;
  h: Float32Array;
  /** required on the CPU; on a GPU, with `kept`, only if the biases are not given */
  gates?: Float32Array;
  dy: Float32Array;
  N: number;
  I: number;
  H: number;
  needParams: boolean;
  device?: StageDevice;
  workspace?: object;
  wIhTag?: number;
  wHhTag?: number;
  /** GPU devices: gruCell's id of the activations it kept on the device */
  kept?: number;
  /** GPU devices without gates: the biases (bIh, bHh), to recompute them when the kept ones are gone */
  bIhTag?: number;
  bHhTag?: number;
};
export interface GruCellGrads {
  dx: Float32Array;
  dh: Float32Array;
  dwIh: Float32Array | null;
  dwHh: Float32Array | null;
  dbIh: Float32Array | null;
  dbHh: Float32Array | null;
}

/** What crossed the bus (host <-> GPU copies) through one or more workspaces. */
export interface DeviceTraffic {
  upBytes: number;
  downBytes: number;
  uploads: number;
  downloads: number;
}

export interface AddonWorkspace {
  /** host bytes held */
  bytes(): number;
  /** host <-> device copies through it so far (zero on the CPU) */
  traffic(): DeviceTraffic;
}

/** Adam's float32 scalars of one step (native/optimizer.h AdamScalars); scale: the clipping factor */
export interface AdamStepScalars {
  first: boolean;
  scale: number;
  b1: number;
  c1: number;
  b2: number;
  c2: number;
  eps: number;
  bc2Sqrt: number;
  stepSize: number;
}

/**
 * A stage's weights where its calls keep them on a GPU device (native/gpu/gpu.h DeviceParams): per
 * parameter, its place, its size and the content tag under which the workspace holds it.
 */
export interface DeviceParamsSpec {
  stage: 'decoder' | 'encoder' | 'gru';
  /** the decoder's stack, or the encoder's conv stack: its length; a GRU: 1 (a cell), 2 (the DualGRU) */
  layers: number;
  /**
   * index: the decoder's layer; the encoder's conv layer (< layers) or head tensor (layers + 0 … 9:
   * posW … wv); a GRU cell's w_ih, w_hh, b_ih, b_hh (0 … 3), or the DualGRU's tensors in the
   * original's layout (0 … 11: weight_ih_1, weight_in_1, weight_hh_1, weight_hn_1, the same of cell
   * 2, bias_ih, bias_hh, bias_in, bias_hn)
   */
  params: { index: number; bias: boolean; size: number; tag: number }[];
}
export type DeviceParamsCallSpec = DeviceParamsSpec & { workspace: object; device: StageDevice };

export interface DecoderStageLayer {
  /** 0 broadcast conv, 1 spatial broadcast, 2 conv, 3 transposed conv */
  kind: 0 | 1 | 2 | 3;
  w?: Float32Array;
  wShape?: number[];
  b?: Float32Array;
  /** GPU devices: contentTag of w and b (the workspace keeps tagged weights on the device) */
  wTag?: number;
  bTag?: number;
  /** GPU devices: w and b live in the workspace only, under wTag and bTag (no w, b given) */
  resident?: boolean;
  stride?: number;
  pad?: number;
  outputPad?: number;
  /** 0 linear, 1 relu, 2 elu */
  act?: number;
}

export interface DecoderStageSpec {
  z: Float32Array;
  n: number;
  c: number;
  pos: Float32Array;
  gh: number;
  gw: number;
  layers: DecoderStageLayer[];
  target: Float32Array;
  /** GPU devices: contentTag of target and pos (the stages of a step share them) */
  targetTag?: number;
  posTag?: number;
  B: number;
  K: number;
  H: number;
  W: number;
  C: number;
  logVar: number;
  gmm: boolean;
  needDz: boolean;
  needParams: boolean;
  needOutputs: boolean;
  /** a DecoderWorkspace to keep the stage's buffers in between calls */
  workspace?: object;
  /** where the stage runs (default 'cpu'); see StageDevice */
  device?: StageDevice;
  /** GPU devices: time each phase (synchronising around it) into the result's `profile` */
  profile?: boolean;
  /** of the conv layers' products (CPU); see ConvPrecision */
  precision?: ConvPrecision;
  /**
   * GPU devices, with needParams and a workspace: an id (integer >= 1) under which the parameter
   * gradients (dpos, then dw and db of each weighted layer) stay on the device for
   * decoderParamGradSums; the result's dpos, dw and db are then null
   */
  keepParamGrads?: number;
}

/**
 * Where a decoding stage runs: the CPU kernels, CUDA device N (an addon built with EMORL_CUDA=1),
 * or 'simt': the CUDA kernels run by the addon's SIMT emulator on the CPU (slow; for tests).
 */
export type StageDevice = 'cpu' | 'simt' | `cuda:${number}`;

/**
 * The arithmetic of the convolutions' products on the CPU (native/nhwc.h, native/bf16.h):
 * 'fp32', or 'bf16': operands rounded to bfloat16, products accumulated in fp32 (mixed precision;
 * about twice the fp32 rate on CPUs with AVX512_BF16, emulated with the same results elsewhere).
 * Covers the decoders' and the encoder's convolutions (forward, stride-1 input gradients, filter
 * gradients); weights, activations, every other op and the optimizer stay fp32.
 */
export type ConvPrecision = 'fp32' | 'bf16';

export interface DecoderStageResult {
  nll: Float32Array;
  dz: Float32Array | null;
  dpos: Float32Array | null;
  dw: (Float32Array | null)[];
  db: (Float32Array | null)[];
  means: Float32Array | null;
  logMasks: Float32Array | null;
  /** milliseconds per phase, when asked for with `profile` on a GPU device */
  profile?: Record<string, number>;
}

/**
 * The addon's buffers for the calls of one layer or decoder, kept between calls so that repeated
 * calls reuse their memory (fresh pages cost a fault each; device memory an allocation). Keyed by
 * a weight tensor that lives as long as the model; released with it.
 */
const workspaces = new WeakMap<object, Map<string, AddonWorkspace>>();
/** every workspace made here, for deviceTraffic (weakly: they go with their keys) */
const made = new Set<WeakRef<AddonWorkspace>>();

/** `role` separates the workspaces of different uses of one key (a conv stack's resident maps from its first layer's). */
export function workspaceFor(key: object, role = 'layer'): AddonWorkspace {
  let byRole = workspaces.get(key);
  if (!byRole) workspaces.set(key, (byRole = new Map()));
  let w = byRole.get(role);
  if (!w) {
    w = new (addonOps().DecoderWorkspace)();
    byRole.set(role, w);
    made.add(new WeakRef(w));
  }
  return w;
}

/**
 * The host <-> GPU copies made so far through the workspaces of workspaceFor (every GPU call of
 * the ops goes through one), summed; those of collected workspaces are no longer counted, so
 * take differences over spans in which the model lives (e.g. per training step).
 */
export function deviceTraffic(): DeviceTraffic {
  const t: DeviceTraffic = { upBytes: 0, downBytes: 0, uploads: 0, downloads: 0 };
  for (const ref of made) {
    const w = ref.deref();
    if (!w) {
      made.delete(ref);
      continue;
    }
    const x = w.traffic();
    t.upBytes += x.upBytes;
    t.downBytes += x.downBytes;
    t.uploads += x.uploads;
    t.downloads += x.downloads;
  }
  return t;
}

const tagsByData = new WeakMap<object, Map<string, number>>();
let lastTag = 0;

/**
 * A number that names a tensor's contents for the GPU ops' weight caches: the same for the same
 * data and shape (tfjs data never changes in place; a tf.Variable's assign, e.g. an optimizer
 * step, gives it new data and so a new tag). A device workspace that holds a weight under its tag
 * does not upload (or repack) it again.
 */
export function contentTag(t: tf.Tensor): number {
  // a device-resident weight's host copy is made current first: the tag must name what the host holds
  const data = (hostCurrent(t) as unknown as { dataId: object }).dataId;
  let byShape = tagsByData.get(data);
  if (!byShape) tagsByData.set(data, (byShape = new Map()));
  const shape = t.shape.join(',');
  let tag = byShape.get(shape);
  if (tag === undefined) byShape.set(shape, (tag = ++lastTag));
  return tag;
}

/** A tag no contents had before: what a device-resident weight's new values are known by on the device. */
export function freshTag(): number {
  return ++lastTag;
}

const derivedByData = new WeakMap<object, Map<string, number>>();

/**
 * A tag for a tensor made afresh on every call from `parts` by the same recipe (`recipe`: e.g. a
 * concatenation of slices), for the GPU ops' weight caches: the same parts' contents and recipe
 * give the same tag, as contentTag does for one tensor. Kept while parts[0]'s data lives.
 */
export function derivedTag(parts: tf.Tensor[], recipe: string): number {
  const first = (parts[0] as unknown as { dataId: object }).dataId;
  let byKey = derivedByData.get(first);
  if (!byKey) derivedByData.set(first, (byKey = new Map()));
  const key = `${recipe}:${parts.map(contentTag).join(',')}`;
  let tag = byKey.get(key);
  if (tag === undefined) byKey.set(key, (tag = ++lastTag));
  return tag;
}

let addon: NativeAddon | undefined;

/** The loaded addon (the same module lib/native.ts loaded); throws with the reason if absent or too old. */
export function addonOps(): NativeAddon {
  if (addon) return addon;
  const st = nativeStatus();
  if (!st.available || !st.path) throw new Error(`emorl native addon unavailable: ${st.reason ?? 'unknown reason'}`);
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const mod = require(st.path) as Partial<NativeAddon>;
  if (typeof mod.nhwcConv2d !== 'function' || typeof mod.decoderStage !== 'function' || typeof mod.slotAttention !== 'function' || typeof mod.layerNorm !== 'function' || typeof mod.gruCell !== 'function' || typeof mod.encoderHead !== 'function' || typeof mod.adamUpdate !== 'function' || typeof mod.klDiag !== 'function') {
    throw new Error(`the addon at ${st.path} is older than this package (no NHWC, decoder-stage, attention, layer-norm, GRU, encoder, optimizer or Gaussian kernels); rebuild it with \`npm run build:native\``);
  }
  return (addon = mod as NativeAddon);
}

/** Whether the loaded addon has the kernels nativeOps needs. */
export function nativeOpsAvailable(): boolean {
  try {
    addonOps();
    return true;
  } catch {
    return false;
  }
}
