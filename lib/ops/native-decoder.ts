/**
 * decoderNll on the addon (native/decoder.h): one call runs the stage's decoder forward, the fused
 * likelihood and, when gradients were asked for, the whole decoder backward for a unit upstream
 * gradient of every image's nll. The stage's activations never leave the call.
 *
 * The backward can run that early because every caller's loss is a batch mean: the upstream
 * gradient of nll_b is the same number u for every image b, so the gradients are u times the
 * precomputed ones. The gradient function checks that; d/dz scales per image, so the refinement's
 * inner gradient (no parameter gradients) is exact for any upstream. A stage that is
 * differentiated twice (refinement stages: the inner gradient w.r.t. λ, then the training
 * gradient) reuses the one backward.
 *
 * The stages of one pass share their weights and positional embedding through shareDecoderWeights:
 * each stage adds u times its gradients of them onto the pass's sums (on a GPU device, sums of sets
 * the stages left there), and one op hands the sums to the tape, instead of every stage's gradients
 * as tensors that the tape then adds up (and, on a GPU, every stage downloading them). When a
 * device optimizer owns the weights (device-params.ts), their sums stay on the device for it and
 * the stages take the weights from their workspace under the tags it gave them.
 */
import { tf } from '../tf';
import { f32 } from './arrays';
import { ADDON_ACT, addonOps, contentTag, workspaceFor, type ConvPrecision, type DecoderStageLayer, type StageDevice } from './addon';
import { paramGradsEnabled } from './conv';
import { checkDecoderNllArgs, type DecoderLayerSpec, type DecoderNllArgs, type DecoderNllResult, type DecoderSpec } from './decoder-stage';
import { DeviceParams, layerTensors } from './device-params';

/** The one value of a per-image upstream gradient, or null when the images' values differ. */
function uniformValue(dy: Float32Array): number | null {
  const u = dy[0];
  for (let i = 1; i < dy.length; i++) {
    if (Math.abs(dy[i] - u) > 1e-6 * Math.max(Math.abs(u), Math.abs(dy[i]))) return null;
  }
  return u;
}

function scaled(src: Float32Array, u: number): Float32Array {
  const out = new Float32Array(src.length);
  for (let i = 0; i < src.length; i++) out[i] = src[i] * u;
  return out;
}

type WeightedLayer = Exclude<DecoderLayerSpec, { kind: 'spatialBroadcast' }>;
const weightedLayers = (spec: DecoderSpec): WeightedLayer[] => spec.layers.filter((L): L is WeightedLayer => L.kind !== 'spatialBroadcast');

/**
 * The weights of a layer stack and the positional embedding behind one op for all the decoding
 * stages of a pass: the stages take its output (`token`, a scalar no stage reads) in their place
 * and add u·d/dpos, u·dW, u·db onto `sums` as the tape reaches them; the tape reaches the op
 * itself after every stage (it was recorded before them), and the op gives the sums as the
 * gradients of the embedding and the weights.
 */
interface SharedWeights {
  token: tf.Scalar;
  pos: tf.Tensor3D;
  /** Σ over the stages so far, in the tape's order (null: none yet): d/dpos, then per weighted layer dW and db */
  sums: (Float32Array | null)[];
  /**
   * On a GPU device the stages leave their gradients there (decoderStage's keepParamGrads) and
   * these say which sets to sum, with which u, in the tape's order: one download per pass.
   */
  kept: { ids: number[]; us: number[]; workspace: object; device: StageDevice } | null;
}
/** ids of kept gradient sets: unique in the process, so in any workspace */
let nextKeptId = 1;
const sharedOf = new WeakMap<DecoderSpec, SharedWeights>();

/** sum ← sum + u·g with the roundings of the tape's Add of scaled(g, u) onto it (null: scaled(g, u)) */
function addScaled(sum: Float32Array | null, g: Float32Array, u: number): Float32Array {
  if (!sum) return scaled(g, u);
  for (let i = 0; i < g.length; i++) sum[i] += Math.fround(g[i] * u);
  return sum;
}

/**
 * `spec` for the decoding stages of one pass on the embedding `pos` (see SharedWeights): the
 * gradients are the bits the tape's own sum of the stages' gradients gives. A pass without a tape
 * leaves the op unused.
 */
export function shareDecoderWeights(spec: DecoderSpec, pos: tf.Tensor3D): DecoderSpec {
  // the embedding and the weights: the sums' order
  const shared = [pos, ...weightedLayers(spec).flatMap((L) => [L.weight, L.bias])];
  const out: DecoderSpec = { layers: spec.layers };
  const s: SharedWeights = { token: null as unknown as tf.Scalar, pos, sums: shared.map(() => null), kept: null };
  // weights a device keeps (with their optimizer) are not the op's inputs (their gradients stay there); their anchor is
  const owner = shared.length > 1 ? DeviceParams.of(shared[1]) : undefined;
  const inputs = owner ? [pos, owner.anchor] : shared;
  const op = tf.customGrad(() => ({
    value: tf.scalar(0),
    gradFunc: () => {
      if (s.kept && s.kept.ids.length) {
        const k = s.kept;
        const sizes = shared.map((t) => t.size);
        if (owner) {
          if (owner.workspace !== k.workspace || owner.device !== k.device) throw new Error(`decoder: its weights are kept on ${owner.device}, but its stages ran elsewhere (${k.device})`);
          // the weights' sums stay on the device for its optimizer; the tape gets the embedding's
          const dpos = owner.sumGradients(k.ids, k.us, sizes);
          k.ids = [];
          k.us = [];
          return [tf.tensor(dpos, pos.shape), tf.scalar(0)];
        }
        const sums = addonOps().decoderParamGradSums({ workspace: k.workspace, device: k.device, ids: k.ids, us: k.us, sizes });
        k.ids = [];
        k.us = [];
        return sums.map((g, i) => tf.tensor(g!, shared[i].shape));
      }
      if (owner && s.sums.slice(1).some((g) => g)) throw new Error(`decoder: its weights are kept on ${owner.device}, but its stages ran on the CPU`);
      const grads = inputs.map((t, i) => (s.sums[i] ? tf.tensor(s.sums[i]!, t.shape) : tf.zeros(t.shape)));
      s.sums.fill(null);
      return grads;
    },
  }));
  s.token = (op as (...t: tf.Tensor[]) => tf.Scalar)(...inputs);
  sharedOf.set(out, s);
  return out;
}

export function decoderNll(a: DecoderNllArgs, device: StageDevice = 'cpu', precision: ConvPrecision = 'fp32'): DecoderNllResult {
  const B = checkDecoderNllArgs(a);
  const [n, c] = a.z.shape;
  const [gh, gw] = a.pos.shape;
  const [, H, W, C] = a.target.shape;
  const K = a.K;
  const weighted = weightedLayers(a.spec);
  const shared = sharedOf.get(a.spec);
  if (shared && shared.pos !== a.pos) throw new Error('decoderNll: a shared layer stack (shareDecoderWeights) goes with the positional embedding it was shared with');
  // the embedding and the weights themselves, or the token of the pass's shared ones
  const inputs: tf.Tensor[] = shared ? [a.z, shared.token] : [a.z, a.pos, ...weighted.flatMap((L) => [L.weight, L.bias])];
  const needDz = a.grads !== 'none';
  const needParams = a.grads === 'all';
  let extra: { means: Float32Array | null; logMasks: Float32Array | null } | null = null;

  const op = tf.customGrad((...args: unknown[]) => {
    const vals = args.slice(0, inputs.length) as tf.Tensor[];
    const zd = f32(vals[0]);
    // the layers' weight tensors: the op's inputs (their own tensors), or the spec's (shared)
    const posTensor = shared ? a.pos : vals[1];
    const weightTensors = shared ? weighted.flatMap((L) => [L.weight, L.bias]) : vals.slice(2);
    const workspace = weighted.length ? workspaceFor(weighted[weighted.length - 1].weight) : undefined;
    let w = 0;
    const layers: DecoderStageLayer[] = a.spec.layers.map((L) => {
      if (L.kind === 'spatialBroadcast') return { kind: 1 };
      const wt = weightTensors[w++];
      const bt = weightTensors[w++];
      const base = { wShape: wt.shape, pad: L.pad, act: ADDON_ACT[L.activation], ...(device === 'cpu' ? { w: f32(wt), b: f32(bt) } : layerTensors(wt, bt, workspace, device)) };
      if (L.kind === 'broadcastConv') return { ...base, kind: 0 };
      if (L.kind === 'conv') return { ...base, kind: 2 };
      return { ...base, kind: 3, stride: L.stride, outputPad: L.outputPad };
    });
    // on a GPU, a shared stack's parameter gradients stay there until the pass sums them
    const keepId = shared && device !== 'cpu' && needParams && workspace ? nextKeptId++ : 0;
    const r = addonOps().decoderStage({
      z: zd, n, c, pos: f32(posTensor), gh, gw, layers,
      target: f32(a.target), B, K, H, W, C,
      ...(device !== 'cpu' ? { targetTag: contentTag(a.target), posTag: contentTag(posTensor) } : {}),
      logVar: a.logVar, gmm: a.likelihood === 'GMM',
      needDz, needParams, needOutputs: a.outputs,
      // the decoder's last weight tensor keys its buffers (fresh pages had cost ~25% of a stage)
      workspace,
      device,
      ...(keepId ? { keepParamGrads: keepId } : {}),
      ...(precision !== 'fp32' ? { precision } : {}),
    });
    extra = { means: r.means, logMasks: r.logMasks };
    return {
      value: tf.tensor1d(r.nll),
      gradFunc: (dy: tf.Tensor) => {
        if (!r.dz) throw new Error("decoderNll: differentiated, but run with grads 'none'");
        const g = f32(dy);
        // d/dz per image: rows b·K … b·K+K−1 belong to image b
        const dz = new Float32Array(n * c);
        for (let b = 0; b < B; b++) for (let i = b * K * c; i < (b + 1) * K * c; i++) dz[i] = r.dz[i] * g[b];
        const grads: tf.Tensor[] = [tf.tensor2d(dz, [n, c])];
        if (!paramGradsEnabled()) {
          for (let i = 1; i < inputs.length; i++) grads.push(tf.zeros(inputs[i].shape));
          return grads;
        }
        if (!needParams) throw new Error("decoderNll: parameter gradients asked for, but the stage ran with grads 'input'");
        const u = uniformValue(g);
        if (u === null) throw new Error('decoderNll: the upstream gradient differs between images; parameter gradients need one value for all (a batch-mean loss)');
        if (shared && keepId) {
          shared.kept ??= { ids: [], us: [], workspace: workspace!, device };
          shared.kept.ids.push(keepId);
          shared.kept.us.push(u);
          grads.push(tf.zeros(shared.token.shape));
          return grads;
        }
        // d/dpos, then dW and db per weighted layer (SharedWeights.sums' order)
        const paramGrads = [r.dpos!, ...r.dw.flatMap((dw, i) => (a.spec.layers[i].kind === 'spatialBroadcast' ? [] : [dw!, r.db[i]!]))];
        if (shared) {
          paramGrads.forEach((d, i) => (shared.sums[i] = addScaled(shared.sums[i], d, u)));
          grads.push(tf.zeros(shared.token.shape));
          return grads;
        }
        paramGrads.forEach((d, i) => grads.push(tf.tensor(scaled(d, u), inputs[i + 1].shape)));
        return grads;
      },
    };
  });
  const nll = (op as (...t: tf.Tensor[]) => tf.Tensor)(...inputs) as tf.Tensor1D;
  if (!a.outputs) return { nll };
  const e = extra as { means: Float32Array | null; logMasks: Float32Array | null } | null;
  if (!e?.means || !e.logMasks) throw new Error('decoderNll: the addon returned no outputs');
  return { nll, means: tf.tensor5d(e.means, [B, K, H, W, C]), logMasks: tf.tensor5d(e.logMasks, [B, K, H, W, 1]) };
}
