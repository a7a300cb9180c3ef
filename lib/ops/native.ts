/**
 * The `Ops` of the model on the native addon: NHWC conv2d / convTranspose2d (implicit GEMM or
 * Winograd, bias and ReLU/ELU fused forward and backward), the linear layers on the addon's GEMM
 * (bias and ReLU/ELU fused), the decoders' broadcast first layer, whole decoding stages, the
 * encoder, layerNorm, the slot competition and the GRU cells. The rest (a separate ELU,
 * spatialBroadcast) is tfjsOps' implementation.
 * nativeOpsOn(device) moves the decoding stages, the encoder, the attention and the GRU cells to a GPU.
 *
 * Same signatures and results as tfjsOps (up to float rounding: the TypeScript GEMMs accumulate
 * in doubles, the addon in float32 with FMA). Inside `withoutParamGrads` the weight and bias
 * gradients are not computed (zeros are returned), as in the TypeScript convolutions.
 */
import { tf } from '../tf';
import { colSums, f32 } from './arrays';
import { multiOutputOp } from './multi-output';
import { nativeStatus } from '../native';
import { ADDON_ACT, addonOps as nhwc, contentTag, nativeOpsAvailable, workspaceFor, type ConvPrecision, type ConvStackSpec, type DeviceParamsSpec, type EncoderHeadGrads, type EncoderStageSpec, type StageDevice } from './addon';
import { decoderNll, shareDecoderWeights } from './native-decoder';
import { DeviceParams, layerTensors } from './device-params';
import { attnOf, slotCompetition } from './native-attention';
import { dualGruCell, gruCell } from './native-gru';
import { tfjsOps, type Ops } from './index';
import { ENCODER_LN_EPS, type EncoderArgs, type EncoderOutput } from './encoder-stage';
import { CpuKeysValues, DeviceKeysValues, keptKvOp, releaseArrays, reusedArrays } from './kept-kv';
import { ATTN_EPS, type SlotCompetition } from './attention';
import { addTapSumsGrad, broadcastConvShapes, broadcastTapSums } from './broadcast';
import { convStackWith, convTransposeShapes, paramGradsEnabled, type ConvOptions, type ConvStackLayer, type ConvTransposeOptions, type FusedActivation } from './conv';

/**
 * conv2d as tfjsOps.conv2d: x [n,h,w,cin] NHWC, weight [cout,cin,kh,kw], bias [cout]. On `device`
 * ('cuda:N', 'simt') the GPU kernels run it, with its buffers kept per weight tensor; on the CPU,
 * its products in `precision`.
 */
export function conv2d(x: tf.Tensor4D, weight: tf.Tensor, bias: tf.Tensor, opts: ConvOptions = {}, device: StageDevice = 'cpu',
  precision: ConvPrecision = 'fp32'): tf.Tensor4D {
  const [n, h, w, cin] = x.shape;
  const [cout, wcin, kh, kw] = weight.shape;
  if (wcin !== cin) throw new Error(`conv2d: input has ${cin} channels, weight [${weight.shape}] expects ${wcin}`);
  if (bias.shape[0] !== cout) throw new Error(`conv2d: bias [${bias.shape}] does not match weight [${weight.shape}]`);
  const stride = opts.stride ?? 1;
  const pad = opts.pad ?? 0;
  const oh = Math.floor((h + 2 * pad - kh) / stride) + 1;
  const ow = Math.floor((w + 2 * pad - kw) / stride) + 1;
  if (oh < 1 || ow < 1) throw new Error(`conv: a ${kh}x${kw} kernel (padding ${pad}) does not fit a ${h}x${w} input`);
  const act = opts.activation ?? 'linear';
  const xShape = [n, h, w, cin];
  const wShape = [cout, cin, kh, kw];
  const s = [stride, stride], p = [pad, pad], a = [ADDON_ACT[act]];
  const k = nhwc();
  const dev: [StageDevice?, (object | null)?, ConvPrecision?] =
    device !== 'cpu' ? [device, workspaceFor(weight)] : precision !== 'fp32' ? [device, null, precision] : [];
  const op = tf.customGrad((xt, wt, bt) => {
    // the backward reads the arrays themselves (tfjs' save() would clone each tensor: an op apiece)
    const xd = f32(xt as tf.Tensor), wd = f32(wt as tf.Tensor);
    const y = k.nhwcConv2d(xd, xShape, wd, wShape, f32(bt as tf.Tensor), s, p, a, ...dev);
    return {
      value: tf.tensor4d(y, [n, oh, ow, cout]),
      gradFunc: (dy: tf.Tensor) => {
        const withParams = paramGradsEnabled();
        const r = k.nhwcConv2dBackward(xd, xShape, wd, wShape, act === 'linear' ? null : y, f32(dy), s, p, a, true, withParams, ...dev);
        const dx = tf.tensor4d(r.dx!, [n, h, w, cin]);
        if (!withParams) return [dx, tf.zeros([cout, cin, kh, kw]), tf.zeros([cout])];
        return [dx, tf.tensor4d(r.dw!, [cout, cin, kh, kw]), tf.tensor1d(r.db!)];
      },
    };
  });
  return op(x, weight, bias) as tf.Tensor4D;
}

/**
 * convStack on a GPU device: one addon call each way (native/gpu/conv_gpu.cu), the intermediate
 * maps kept in the device workspace of the first layer's weight from the forward call to its
 * backward call (a stamp says whether they are still this forward's; if not, they are recomputed).
 */
export function convStackOnDevice(x: tf.Tensor4D, layers: ConvStackLayer[], device: StageDevice): tf.Tensor4D {
  if (!layers.length) throw new Error('convStack: no layers');
  const k = nhwc();
  const workspace = workspaceFor(layers[0].weight, 'convStack');
  const xShape = [...x.shape];
  const n = layers.length;
  const op = tf.customGrad((...args) => {
    const save = args.pop() as tf.GradSaveFunc;
    const t = args as tf.Tensor[];
    const s: ConvStackSpec = { x: f32(t[0]), xShape, device, workspace, layers: stackLayerSpecs(layers, t.slice(1), workspace, device) };
    const { y, yShape, stamp } = k.convStack(s);
    save(t);
    return {
      value: tf.tensor4d(y, yShape as [number, number, number, number]),
      gradFunc: (dy: tf.Tensor) => {
        const needParams = paramGradsEnabled();
        const g = k.convStackBackward({ ...s, dy: f32(dy), stamp, needDx: true, needParams });
        const dx = tf.tensor4d(g.dx!, x.shape);
        return needParams ? [dx, ...stackLayerGrads(layers, g.dw!, g.db!)] : [dx, ...t.slice(1).map((p) => tf.zeros(p.shape))];
      },
    };
  });
  return op(x, ...layers.flatMap((L) => [L.weight, L.bias])) as tf.Tensor4D;
}

/**
 * The addon's layer specs of a conv stack from its weights and biases (wb: w0, b0, w1, b1, …), for
 * a call in `workspace` on `device` (layerTensors: the device's own when an optimizer there owns them).
 */
function stackLayerSpecs(layers: ConvStackLayer[], wb: tf.Tensor[], workspace: object | undefined, device: StageDevice): ConvStackSpec['layers'] {
  return layers.map((L, i) => ({
    wShape: [...L.weight.shape], stride: L.stride ?? 1, pad: L.pad ?? 0, act: ADDON_ACT[L.activation ?? 'linear'],
    ...layerTensors(wb[2 * i], wb[2 * i + 1], workspace, device),
  }));
}

/** The addon's dw, db of a conv stack as tensors, w and b per layer. */
function stackLayerGrads(layers: ConvStackLayer[], dw: Float32Array[], db: Float32Array[]): tf.Tensor[] {
  return layers.flatMap((L, i) => [tf.tensor(dw[i], L.weight.shape), tf.tensor(db[i], L.bias.shape)]);
}

/**
 * The encoder (encoder-stage.ts) on a GPU device: one addon call each way (native/gpu/conv_gpu.cu),
 * every activation kept in the device workspace of the first convolution's weight from the
 * forward call to its backward call (recomputed if another forward ran since). With
 * attentionOnly, k and v stay there too: nothing but a token leaves the device, and the backward
 * call takes the dk and dv the attention rounds summed there. The images and the positional grid
 * are constants here: no gradient flows to them.
 */
export function encoderOnDevice(a: EncoderArgs, device: StageDevice): EncoderOutput {
  const { k, B, H, W, inputs, specOf, paramGrads } = encoderStageParts(a, device, 'fp32');
  if (a.attentionOnly) {
    return keptKvOp(inputs, () => {
      const spec = specOf();
      const r = k.encoderStage({ ...spec, keep: true });
      const kept = new DeviceKeysValues(device, [B, H * W, r.Z], spec, r.stamp);
      return {
        kept,
        // without parameter gradients there is nothing to compute (the sums go with the next forward)
        grads: (needParams) => paramGrads(needParams ? (keep) => k.encoderStageBackward({ ...spec, sumId: kept.sumId, stamp: kept.stamp, needParams, ...(keep && { keep }) }) : null),
      };
    });
  }
  return kvOp(inputs, B, H * W, () => {
    const spec = specOf();
    const r = k.encoderStage(spec);
    return {
      ...r,
      grads: (dk, dv, needParams) => paramGrads(needParams ? (keep) => k.encoderStageBackward({ ...spec, dk, dv, stamp: r.stamp, needParams, ...(keep && { keep }) }) : null),
    };
  });
}

/**
 * What the encoder as one addon stage needs on either side: its inputs (the parameters: the images
 * and the positional grid are constants), the addon's spec from them, and their gradients from the
 * backward call's result (null: zeros). The workspace is the first convolution's weight's.
 */
function encoderStageParts(a: EncoderArgs, device: StageDevice, precision: ConvPrecision) {
  if (!a.convs.length) throw new Error('encoder: no convolutions');
  const k = nhwc();
  const workspace = workspaceFor(a.convs[0].weight, 'encoder');
  const [B, H, W] = a.x.shape;
  const xShape = [...a.x.shape];
  const xd = f32(a.x);
  const nc = a.convs.length;
  const head = headTensors(a);
  // weights an optimizer on the device updated: known there by their device tags; their anchor makes
  // a tape that differentiates it run this op's backward (which leaves their gradients there)
  const owner = device !== 'cpu' ? DeviceParams.of(a.convs[0].weight) : undefined;
  const weights = [...a.convs.flatMap((L) => [L.weight, L.bias]), ...head];
  // the weights a device keeps are not the op's inputs (their gradients stay there); their anchor is
  const inputs = owner ? [owner.anchor] : weights;
  const tagOf = (x: tf.Tensor): number | null => owner?.deviceTag(x, workspace, device) ?? null;
  // the op runs on its inputs themselves (customGrad hands them over as given): the weights' tensors
  const specOf = (): EncoderStageSpec => {
    const hp = weights.slice(2 * nc);
    const headTags = hp.map(tagOf);
    return {
      x: xd, xShape, device, workspace,
      layers: stackLayerSpecs(a.convs, weights.slice(0, 2 * nc), workspace, device),
      head: headTags.every((g) => g !== null)
        ? { pos: f32(a.pos), eps: ENCODER_LN_EPS, resident: true, Z: hp[8].shape[0], tags: [contentTag(a.pos), ...(headTags as number[])] }
        : { ...headSpec(a, hp), ...(device !== 'cpu' && { tags: [contentTag(a.pos), ...hp.map((x, i) => headTags[i] ?? contentTag(x))] }) },
      ...(precision !== 'fp32' && { precision }),
    };
  };
  /** The inputs' gradients from a backward call (`backward(keep)`; null: zeros); with an owner on the device they stay there. */
  const paramGrads = (backward: ((keep?: DeviceParamsSpec) => ReturnType<typeof k.encoderStageBackward>) | null): tf.Tensor[] => {
    if (owner) {
      if (backward) owner.keepGradients(backward);
      return [tf.scalar(0)]; // the anchor's
    }
    const b = backward?.();
    return b ? [...stackLayerGrads(a.convs, b.dw!, b.db!), ...headGrads(b.head!, head)] : inputs.map((x) => tf.zeros(x.shape));
  };
  return { k, B, H, W, inputs, specOf, paramGrads };
}

/**
 * slotCompetition on a GPU device: against keys and values its encoder kept there, one addon call
 * each way (native/gpu/attention.cuh), dk and dv summed on the device for the encoder's backward
 * pass; host keys and values go to the CPU kernels' version.
 */
export function slotCompetitionOnDevice(q: tf.Tensor3D, kv: EncoderOutput, keepAttn: boolean, device: StageDevice): SlotCompetition {
  if (!kv.resident) return slotCompetition(q, kv, keepAttn);
  const r = kv.resident;
  if (!(r instanceof DeviceKeysValues) || r.device !== device) {
    throw new Error(`slotCompetition on ${device}: the keys and values are kept on ${r.device} by other ops`);
  }
  const [B, K, Z] = q.shape;
  const [kb, N, kz] = r.shape;
  if (B !== kb || Z !== kz) throw new Error(`slotCompetition: queries [${q.shape}] do not fit the keys [${r.shape}]`);
  const m = nhwc();
  let p: Float32Array | null = null;
  const op = tf.customGrad((qt, token, save) => {
    const spec = { ...r.spec, q: f32(qt as tf.Tensor), B, K, eps: ATTN_EPS };
    const f = m.encoderAttention({ ...spec, stamp: r.stamp, wantP: keepAttn });
    r.stamp = f.stamp;
    p = f.p;
    (save as tf.GradSaveFunc)([]);
    return {
      value: tf.tensor3d(f.updates, [B, K, Z]),
      gradFunc: (dy: tf.Tensor) => {
        const b = m.encoderAttentionBackward({ ...spec, stamp: r.stamp, sumId: r.sumId, dU: f32(dy) });
        r.stamp = b.stamp;
        return [tf.tensor3d(b.dq, [B, K, Z]), tf.zeros((token as tf.Tensor).shape)];
      },
    };
  });
  const updates = op(q, r.token) as tf.Tensor3D;
  return { attn: keepAttn ? attnOf(p!, [B, K, N]) : undefined, updates };
}

/** The head's parameters of an encoder, in the addon's order. */
function headTensors(a: EncoderArgs): tf.Tensor[] {
  return [a.posWeight, a.posBias, a.lnWeight, a.lnBias, a.w1, a.b1, a.w2, a.b2, a.wk, a.wv];
}

/** The addon's head spec from those tensors (hp, in headTensors' order). */
function headSpec(a: EncoderArgs, hp: tf.Tensor[]): EncoderStageSpec['head'] {
  return {
    pos: f32(a.pos), posW: f32(hp[0]), posB: f32(hp[1]), lnW: f32(hp[2]), lnB: f32(hp[3]), eps: ENCODER_LN_EPS,
    w1: f32(hp[4]), b1: f32(hp[5]), w2: f32(hp[6]), b2: f32(hp[7]), wk: f32(hp[8]), wv: f32(hp[9]),
  };
}

/** The addon's head gradients as tensors shaped like `head` (headTensors' order). */
function headGrads(g: EncoderHeadGrads, head: tf.Tensor[]): tf.Tensor[] {
  return [g.posW, g.posB, g.lnW, g.lnB, g.w1, g.b1, g.w2, g.b2, g.wk, g.wv].map((d, i) => tf.tensor(d, head[i].shape));
}

/**
 * A custom op over `inputs` whose outputs are the keys and values [B, HW, Z]; `run` computes them
 * (from the inputs themselves) and gives the inputs' gradients from dk, dv.
 */
function kvOp(inputs: tf.Tensor[], B: number, HW: number, run: () => {
  k: Float32Array; v: Float32Array; rows: number; Z: number;
  grads: (dk: Float32Array, dv: Float32Array, needParams: boolean) => tf.Tensor[];
}): EncoderOutput {
  const [k, v] = multiOutputOp('encoder', inputs, () => {
    const r = run();
    if (r.rows !== B * HW) throw new Error(`encoder: ${r.rows} rows of keys for a batch of ${B} × ${HW} pixels`);
    return {
      values: [tf.tensor3d(r.k, [B, HW, r.Z]), tf.tensor3d(r.v, [B, HW, r.Z])],
      gradFunc: ([dk, dv]) => r.grads(f32(dk), f32(dv), paramGradsEnabled()),
    };
  });
  return { k, v } as EncoderOutput;
}

/**
 * The encoder on the CPU kernels as one addon call each way (native/encoder_stage.h): the
 * convolutions and the head (positional add, LayerNorm, MLP, k and v), every activation in the
 * workspace of the first convolution's weight from the forward call to its backward call
 * (recomputed if another forward ran since), so a step makes none of them afresh. With
 * attentionOnly, k and v stay in the arrays the forward call returned (CpuKeysValues) and the
 * backward call takes the dk and dv the attention rounds summed there.
 */
export function encoderOnCpu(a: EncoderArgs, precision: ConvPrecision = 'fp32'): EncoderOutput {
  const { k, B, H, W, inputs, specOf, paramGrads } = encoderStageParts(a, 'cpu', precision);
  const backward = (spec: EncoderStageSpec, stamp: number, dk: Float32Array, dv: Float32Array, needParams: boolean) =>
    // without parameter gradients there is nothing to compute: the images take none
    paramGrads(needParams ? () => k.encoderStageBackward({ ...spec, dk, dv, stamp, needParams }) : null);
  if (a.attentionOnly) {
    return keptKvOp(inputs, () => {
      const spec = specOf();
      // k and v into arrays an earlier pass released (fresh pages had cost ~3 ms per 5 MB array)
      const into = reusedArrays(B * H * W * a.wk.shape[0], 2);
      const r = k.encoderStage(into ? { ...spec, kInto: into[0], vInto: into[1] } : spec);
      const kept = new CpuKeysValues([B, H * W, r.Z], r.k, r.v);
      return {
        kept,
        grads: (needParams) => {
          const sums = kept.takeSums();
          const g = backward(spec, r.stamp, sums.dk, sums.dv, needParams);
          // the addon read the sums, and the attention rounds' backward passes (before this one) k and v
          releaseArrays(sums.dk, sums.dv, kept.k, kept.v);
          return g;
        },
      };
    });
  }
  return kvOp(inputs, B, H * W, () => {
    const spec = specOf();
    const r = k.encoderStage(spec);
    return { ...r, grads: (dk, dv, needParams) => backward(spec, r.stamp, dk, dv, needParams) };
  });
}

/** convTranspose2d as tfjsOps.convTranspose2d: x [n,h,w,cin], weight [cin,cout,kh,kw], bias [cout]. */
export function convTranspose2d(x: tf.Tensor4D, weight: tf.Tensor, bias: tf.Tensor, opts: ConvTransposeOptions = {}): tf.Tensor4D {
  const { n, h, w, cin, cout, kh, kw, stride, pad, outputPad, H, W } = convTransposeShapes(x.shape, weight.shape, bias.shape, opts);
  const act = opts.activation ?? 'linear';
  const xShape = [n, h, w, cin];
  const wShape = [cin, cout, kh, kw];
  const s = [stride, stride], p = [pad, pad], op2 = [outputPad, outputPad], a = [ADDON_ACT[act]];
  const k = nhwc();
  const op = tf.customGrad((xt, wt, bt, save) => {
    const y = k.nhwcConvTranspose2d(f32(xt as tf.Tensor), xShape, f32(wt as tf.Tensor), wShape, f32(bt as tf.Tensor), s, p, op2, a);
    const value = tf.tensor4d(y, [n, H, W, cout]);
    (save as tf.GradSaveFunc)(act === 'linear' ? [xt as tf.Tensor, wt as tf.Tensor] : [xt as tf.Tensor, wt as tf.Tensor, value]);
    return {
      value,
      gradFunc: (dy: tf.Tensor, saved: tf.Tensor[]) => {
        const withParams = paramGradsEnabled();
        const r = k.nhwcConvTranspose2dBackward(f32(saved[0]), xShape, f32(saved[1]), wShape,
          act === 'linear' ? null : f32(saved[2]), f32(dy), s, p, op2, a, true, withParams);
        const dx = tf.tensor4d(r.dx!, [n, h, w, cin]);
        if (!withParams) return [dx, tf.zeros([cin, cout, kh, kw]), tf.zeros([cout])];
        return [dx, tf.tensor4d(r.dw!, [cin, cout, kh, kw]), tf.tensor1d(r.db!)];
      },
    };
  });
  return op(x, weight, bias) as tf.Tensor4D;
}

/** linear as tfjsOps.linear (y = act(x Wᵀ + b) over the last axis, W [out,in]) on the addon's GEMM, bias and activation fused. */
export function linear(x: tf.Tensor, weight: tf.Tensor, bias?: tf.Tensor, activation: 'linear' | 'relu' | 'elu' = 'linear'): tf.Tensor {
  const inDim = x.shape[x.rank - 1];
  if (weight.shape[1] !== inDim) {
    throw new Error(`linear: input has ${inDim} features, weight [${weight.shape}] expects ${weight.shape[1]}`);
  }
  const outDim = weight.shape[0];
  const rows = x.size / Math.max(1, inDim);
  // Every size runs on the addon: even a [32,32]·[32,32]ᵀ layer with its gradients takes a fifth
  // of tfjs' time there (tfjs' BatchMatMul was ~1 ms of a [128,32]·[32,32]ᵀ layer's 1.1).
  if (rows * inDim * outDim === 0 || x.dtype !== 'float32' || weight.rank !== 2 ||
    (bias && (bias.rank !== 1 || bias.shape[0] !== outDim))) {
    return tfjsOps.linear(x, weight, bias, activation);
  }
  const k = nhwc();
  const lead = x.shape.slice(0, -1);
  const outShape = [...lead, outDim];
  const body = (xt: tf.Tensor, wt: tf.Tensor, bd: Float32Array | null) => {
    // bias and the activation fused into the product; its derivative comes from the output (ReLU:
    // its sign; ELU: y + 1 below 0, as tfjs' EluGrad). The backward reads x's and W's arrays
    // themselves (tfjs' save() would clone each: an op apiece).
    const xd = f32(xt), wd = f32(wt);
    const y = k.matmul(xd, [rows, inDim], wd, [outDim, inDim], false, true, null, bd, ADDON_ACT[activation]);
    return {
      value: tf.tensor(y, outShape),
      grads: (dy: tf.Tensor): [tf.Tensor, tf.Tensor, Float32Array | null] => {
        let g = f32(dy);
        if (activation !== 'linear') {
          const m = new Float32Array(g.length);
          if (activation === 'relu') for (let i = 0; i < g.length; i++) m[i] = y[i] > 0 ? g[i] : 0;
          else for (let i = 0; i < g.length; i++) m[i] = y[i] >= 0 ? g[i] : g[i] * (y[i] + 1);
          g = m;
        }
        const dx = tf.tensor(k.matmul(g, [rows, outDim], wd, [outDim, inDim], false, false), x.shape);
        if (!paramGradsEnabled()) return [dx, tf.zeros([outDim, inDim]), bd ? new Float32Array(outDim) : null];
        const dw = tf.tensor2d(k.matmul(g, [rows, outDim], xd, [rows, inDim], true, false), [outDim, inDim]);
        return [dx, dw, bd ? colSums(g, rows, outDim) : null];
      },
    };
  };
  if (bias) {
    const op = tf.customGrad((xt, wt, bt) => {
      const r = body(xt as tf.Tensor, wt as tf.Tensor, f32(bt as tf.Tensor));
      return {
        value: r.value,
        gradFunc: (dy: tf.Tensor) => {
          const [dx, dw, db] = r.grads(dy);
          return [dx, dw, tf.tensor(db!, bias.shape)];
        },
      };
    });
    return op(x, weight, bias);
  }
  const op = tf.customGrad((xt, wt) => {
    const r = body(xt as tf.Tensor, wt as tf.Tensor, null);
    return { value: r.value, gradFunc: (dy: tf.Tensor) => r.grads(dy).slice(0, 2) as tf.Tensor[] };
  });
  return op(x, weight);
}

/**
 * broadcastConv2d as tfjsOps.broadcastConv2d (see lib/ops/broadcast.ts for the derivation):
 * conv(pos) on the addon's NHWC conv, the per-slot part z·S and its gradients on the addon's GEMM.
 */
export function broadcastConv2d(
  z: tf.Tensor2D,
  pos: tf.Tensor3D,
  weight: tf.Tensor,
  bias: tf.Tensor,
  opts: { pad?: number; activation?: FusedActivation } = {},
): tf.Tensor4D {
  const { n, c, gh, gw, cout, cin, kh, kw, pad, act, g, tapGeom } = broadcastConvShapes(z.shape, pos.shape, weight.shape, opts);
  const { oh, ow } = g;
  const Q = oh * ow;
  const QC = Q * cout;
  const tapSums = (wd: Float32Array): Float32Array => broadcastTapSums(wd, tapGeom);
  const k = nhwc();
  const posShape = [1, gh, gw, c];
  const wShape = [cout, cin, kh, kw];
  const one = [1, 1], pp = [pad, pad], lin = [0];
  const op = tf.customGrad((zt, pt, wt, bt, save) => {
    const zd = f32(zt as tf.Tensor);
    const wd = f32(wt as tf.Tensor);
    const bd = f32(bt as tf.Tensor);
    const convP = k.nhwcConv2d(f32(pt as tf.Tensor), posShape, wd, wShape, bd, one, pp, lin); // [Q*cout], bias included
    const y = k.matmul(zd, [n, c], tapSums(wd), [c, QC], false, false); // [n, Q*cout]
    for (let i = 0, o = 0; i < n; i++, o += QC) for (let j = 0; j < QC; j++) y[o + j] += convP[j];
    if (act === 'relu') {
      for (let i = 0; i < y.length; i++) if (!(y[i] > 0)) y[i] = 0;
    } else if (act === 'elu') {
      for (let i = 0; i < y.length; i++) if (!(y[i] > 0)) y[i] = Math.expm1(y[i]);
    }
    const value = tf.tensor4d(y, [n, oh, ow, cout]);
    (save as tf.GradSaveFunc)(act === 'linear' ? [zt as tf.Tensor, pt as tf.Tensor, wt as tf.Tensor] : [zt as tf.Tensor, pt as tf.Tensor, wt as tf.Tensor, value]);
    return {
      value,
      gradFunc: (dy: tf.Tensor, saved: tf.Tensor[]) => {
        const dyRaw = f32(dy);
        let gd = dyRaw;
        if (act !== 'linear') {
          const yv = f32(saved[3]);
          gd = new Float32Array(dyRaw.length);
          if (act === 'relu') for (let i = 0; i < gd.length; i++) gd[i] = yv[i] > 0 ? dyRaw[i] : 0;
          else for (let i = 0; i < gd.length; i++) gd[i] = yv[i] > 0 ? dyRaw[i] : dyRaw[i] * (yv[i] + 1);
        }
        const zd2 = f32(saved[0]);
        const wd2 = f32(saved[2]);
        const S = tapSums(wd2);
        const dzT = tf.tensor2d(k.matmul(gd, [n, QC], S, [c, QC], false, true), [n, c]); // g · Sᵀ
        if (!paramGradsEnabled()) return [dzT, tf.zeros([gh, gw, c]), tf.zeros([cout, cin, kh, kw]), tf.zeros([cout])];
        // the shared part (conv of pos, bias) sees the gradient summed over slots
        const gSum = new Float32Array(QC);
        for (let i = 0, o = 0; i < n; i++, o += QC) for (let j = 0; j < QC; j++) gSum[j] += gd[o + j];
        const shared = k.nhwcConv2dBackward(f32(saved[1]), posShape, wd2, wShape, null, gSum, one, pp, lin, true, true);
        const dW = shared.dw!;
        // dS = zᵀ · g, then spread back over the taps each cell summed
        const dS = k.matmul(zd2, [n, c], gd, [n, QC], true, false); // [c, Q*cout]
        addTapSumsGrad(dS, dW, tapGeom);
        return [dzT, tf.tensor3d(shared.dx!, [gh, gw, c]), tf.tensor4d(dW, [cout, cin, kh, kw]), tf.tensor1d(shared.db!)];
      },
    };
  });
  return op(z, pos, weight, bias) as tf.Tensor4D;
}

/**
 * layerNorm as tfjsOps.layerNorm (over the last axis, biased variance, optional affine map),
 * one native pass each way (native/layernorm.h, statistics in double) instead of tfjs'
 * broadcasting ops and their gradients.
 */
export function layerNorm(x: tf.Tensor, weight?: tf.Tensor, bias?: tf.Tensor, eps = 1e-5): tf.Tensor {
  const D = x.shape[x.rank - 1];
  if (x.dtype !== 'float32' || D === 0 || (weight && (weight.rank !== 1 || weight.shape[0] !== D)) ||
    (bias && (bias.rank !== 1 || bias.shape[0] !== D)) || (bias && !weight)) {
    return tfjsOps.layerNorm(x, weight, bias, eps);
  }
  const rows = x.size / D;
  const k = nhwc();
  const forward = (xd: Float32Array, wd: Float32Array | null, bd: Float32Array | null) =>
    k.layerNorm({ x: xd, rows, D, weight: wd, bias: bd, eps });
  const backward = (g: Float32Array, xd: Float32Array, wd: Float32Array | null, mean: Float64Array, rstd: Float64Array, withParams: boolean) =>
    k.layerNormBackward({ g, x: xd, rows, D, weight: wd, mean, rstd, withParams: withParams && wd !== null });
  if (!weight) {
    const op = tf.customGrad((xt) => {
      // the backward reads the array itself (tfjs' save() would clone the tensor: an op)
      const xd = f32(xt as tf.Tensor);
      const f = forward(xd, null, null);
      return {
        value: tf.tensor(f.y, x.shape),
        gradFunc: (dy: tf.Tensor) => tf.tensor(backward(f32(dy), xd, null, f.mean, f.rstd, false).dx, x.shape),
      };
    });
    return op(x);
  }
  const run = (xt: tf.Tensor, wt: tf.Tensor, bd: Float32Array | null) => {
    // the backward reads the arrays themselves (tfjs' save() would clone each tensor: an op apiece)
    const xd = f32(xt), wd = f32(wt);
    const f = forward(xd, wd, bd);
    return {
      value: tf.tensor(f.y, x.shape),
      grads: (dy: tf.Tensor) => {
        const withParams = paramGradsEnabled();
        const b = backward(f32(dy), xd, wd, f.mean, f.rstd, withParams);
        return {
          dx: tf.tensor(b.dx, x.shape),
          dw: b.dw ? tf.tensor1d(Float32Array.from(b.dw)) : tf.zeros([D]),
          db: b.db ? tf.tensor1d(Float32Array.from(b.db)) : tf.zeros([D]),
        };
      },
    };
  };
  if (bias) {
    const op = tf.customGrad((xt, wt, bt) => {
      const r = run(xt as tf.Tensor, wt as tf.Tensor, f32(bt as tf.Tensor));
      return {
        value: r.value,
        gradFunc: (dy: tf.Tensor) => {
          const g = r.grads(dy);
          return [g.dx, g.dw, g.db];
        },
      };
    });
    return op(x, weight, bias);
  }
  const op = tf.customGrad((xt, wt) => {
    const r = run(xt as tf.Tensor, wt as tf.Tensor, null);
    return {
      value: r.value,
      gradFunc: (dy: tf.Tensor) => {
        const g = r.grads(dy);
        g.db.dispose();
        return [g.dx, g.dw];
      },
    };
  });
  return op(x, weight);
}

/**
 * tfjsOps with the convolutions, the big linear layers, layerNorm, the attention, the GRU cells and
 * whole decoding stages on the native addon / fused loops.
 */
export const nativeOps: Ops = {
  ...tfjsOps, conv2d, convStack: (x, layers) => convStackWith(conv2d, x, layers), convTranspose2d, broadcastConv2d, linear, layerNorm, decoderNll,
  shareDecoderWeights, slotCompetition, gruCell, dualGruCell, encoder: (args) => encoderOnCpu(args),
  get gaussian() {
    return nhwc();
  },
};

export { nativeOpsAvailable };

/** nativeOps when the addon (with its NHWC kernels) is available, else tfjsOps. */
export function defaultOps(): Ops {
  return nativeStatus().available && nativeOpsAvailable() ? nativeOps : tfjsOps;
}

export type ComputeBackend = 'native' | 'js' | 'auto';

/** Checks a device name ('cpu', 'cuda:N', 'simt'); returns it typed, or throws saying what is allowed. */
export function parseStageDevice(name: string): StageDevice {
  if (name === 'cpu' || name === 'simt' || /^cuda:\d{1,4}$/.test(name)) return name as StageDevice;
  throw new Error(`unknown device ${JSON.stringify(name)} (use cpu or cuda:N)`);
}

/** Checks a precision name; returns it typed, or throws saying what is allowed. */
export function parseConvPrecision(name: string): ConvPrecision {
  if (name === 'fp32' || name === 'bf16') return name;
  throw new Error(`unknown precision ${JSON.stringify(name)} (use fp32 or bf16)`);
}

const opsOnDevice = new Map<string, Ops>();

/**
 * nativeOps with the decoding stage (the decoder and the likelihood, forward and backward: most
 * of a step's arithmetic), the encoder and its convolutions, the slot attention on the keys and
 * values the encoder keeps there, and the GRU cells (the inference's and the refinement's) on
 * `device`; everything else stays on the CPU kernels. A clear error when the addon has no CUDA or
 * no such device.
 * `precision` 'bf16' (CPU only) computes those convolutions' products in mixed precision
 * (ConvPrecision).
 */
export function nativeOpsOn(device: StageDevice, precision: ConvPrecision = 'fp32'): Ops {
  if (device === 'cpu' && precision === 'fp32') return nativeOps;
  const key = `${device}/${precision}`;
  const cached = opsOnDevice.get(key);
  if (cached) return cached;
  const st = nativeStatus();
  const what = device === 'cpu' ? `precision ${precision}` : `device ${device}`;
  if (!st.available || !nativeOpsAvailable()) throw new Error(`${what}: the native addon is not available (${st.reason ?? 'too old'}); build it with \`npm run build:native\``);
  const info = st.info!;
  if (precision !== 'fp32') {
    if (device !== 'cpu') throw new Error(`precision ${precision} is for the CPU kernels; on ${device} the kernels compute in fp32`);
    if (!info.bf16) throw new Error(`precision ${precision}: the addon at ${st.path} predates it; rebuild it with \`npm run build:native\``);
  } else if (device === 'simt') {
    if (!info.simtEmulator) throw new Error(`device simt: the addon at ${st.path} predates the SIMT emulator; rebuild it with \`npm run build:native\``);
  } else {
    const index = Number(device.slice(5));
    if (!info.cudaBuilt) throw new Error(`device ${device}: the addon was built without CUDA; rebuild it with \`EMORL_CUDA=1 npm run build:native\` (needs nvcc)`);
    if (index >= info.cudaDevices) {
      throw new Error(`device ${device}: ${info.cudaDevices} CUDA device${info.cudaDevices === 1 ? '' : 's'} visible${info.cudaError ? ` (${info.cudaError})` : ''}`);
    }
  }
  const ops: Ops = {
    ...nativeOps,
    decoderNll: (a) => decoderNll(a, device, precision),
    conv2d: (x, w, b, opts) => conv2d(x, w, b, opts, device, precision),
    convStack: (x, layers) => (device === 'cpu' ? convStackWith(ops.conv2d, x, layers) : convStackOnDevice(x, layers, device)),
    encoder: (args) => (device === 'cpu' ? encoderOnCpu(args, precision) : encoderOnDevice(args, device)),
    ...(device !== 'cpu' && {
      gruCell: (x, h, p) => gruCell(x, h, p, device),
      dualGruCell: (x, h1, h2, p) => dualGruCell(x, h1, h2, p, device),
      slotCompetition: (q, kv, keepAttn = true) => slotCompetitionOnDevice(q, kv, keepAttn, device),
      paramsDevice: device,
    }),
  };
  opsOnDevice.set(key, ops);
  return ops;
}

/**
 * The ops of a backend by name: 'native' (the addon; an error saying why when it is not
 * available), 'js' (the pure TypeScript reference) or 'auto' (native when built, else js), with
 * the decoding stage on `device` ('cpu' unless asked: a GPU is never picked behind the user's back)
 * and the CPU convolutions' products in `precision` (ConvPrecision; native only).
 */
export function opsForBackend(name: string, device: string = 'cpu', precision: string = 'fp32'): Ops {
  if (name !== 'native' && name !== 'js' && name !== 'auto') throw new Error(`unknown backend ${JSON.stringify(name)} (use native, js or auto)`);
  const dev = parseStageDevice(device);
  const prec = parseConvPrecision(precision);
  if (dev !== 'cpu' || prec !== 'fp32') {
    if (name === 'js') throw new Error(`${dev !== 'cpu' ? `device ${dev}` : `precision ${prec}`} needs the native backend (--backend native), not js`);
    return nativeOpsOn(dev, prec);
  }
  if (name === 'auto') return defaultOps();
  if (name === 'js') return tfjsOps;
  const st = nativeStatus();
  if (!st.available) throw new Error(`backend 'native': the addon is not available (${st.reason}); build it with \`npm run build:native\` or use --backend js`);
  if (!nativeOpsAvailable()) throw new Error(`backend 'native': the addon at ${st.path} is older than this package; rebuild it with \`npm run build:native\``);
  return nativeOps;
}

