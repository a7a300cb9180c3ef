/**
 * The small dense ops: linear layers with PyTorch-layout weights, LayerNorm, GRU cells.
 * Plain tfjs ops (their autodiff is fast enough at these sizes); kept behind these functions so
 * that a native implementation can replace them without touching the model.
 */
import { tf } from '../tf';
import { cutColumns, f32, joinColumns } from './arrays';
import { multiOutputOp } from './multi-output';

/** y = act(x Wᵀ + b) over the last axis, W [out,in] as nn.Linear stores it; act ReLU or ELU (alpha 1) when asked. */
export function linear(x: tf.Tensor, weight: tf.Tensor, bias?: tf.Tensor, activation: 'linear' | 'relu' | 'elu' = 'linear'): tf.Tensor {
  const inDim = x.shape[x.rank - 1];
  if (weight.shape[1] !== inDim) {
    throw new Error(`linear: input has ${inDim} features, weight [${weight.shape}] expects ${weight.shape[1]}`);
  }
  const lead = x.shape.slice(0, -1);
  const x2 = x.rank === 2 ? (x as tf.Tensor2D) : x.reshape([-1, inDim]) as tf.Tensor2D;
  let y: tf.Tensor = tf.matMul(x2, weight, false, true);
  if (bias) y = tf.add(y, bias);
  if (activation === 'relu') y = tf.relu(y);
  else if (activation === 'elu') y = tf.elu(y);
  return x.rank === 2 ? y : y.reshape([...lead, weight.shape[0]]);
}

/** LayerNorm over the last axis (biased variance, as PyTorch), optionally with an affine map. */
export function layerNorm(x: tf.Tensor, weight?: tf.Tensor, bias?: tf.Tensor, eps = 1e-5): tf.Tensor {
  const mean = tf.mean(x, -1, true);
  const xc = tf.sub(x, mean);
  const variance = tf.mean(tf.square(xc), -1, true);
  let y: tf.Tensor = tf.mul(xc, tf.rsqrt(tf.add(variance, eps)));
  if (weight) y = tf.mul(y, weight);
  if (bias) y = tf.add(y, bias);
  return y;
}

/** ELU with alpha 1 (nn.ELU's default). */
export function elu(x: tf.Tensor): tf.Tensor {
  return tf.elu(x);
}

export interface GruWeights {
  /** [3H, in], gate rows (reset, update, new) as nn.GRU's weight_ih_l0 */
  weightIh: tf.Tensor2D;
  /** [3H, H] */
  weightHh: tf.Tensor2D;
  biasIh: tf.Tensor1D;
  biasHh: tf.Tensor1D;
}

/**
 * One step of nn.GRU: r = σ(W_ir x + b_ir + W_hr h + b_hr), u = σ(… update rows …),
 * n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn)), h' = (1 - u) ⊙ n + u ⊙ h.
 */
export function gruCell(x: tf.Tensor2D, h: tf.Tensor2D, p: GruWeights): tf.Tensor2D {
  const H = h.shape[1];
  const gi = linear(x, p.weightIh, p.biasIh) as tf.Tensor2D; // [N,3H]
  const gh = linear(h, p.weightHh, p.biasHh) as tf.Tensor2D;
  const [ir, iu, inew] = tf.split(gi, [H, H, H], 1);
  const [hr, hu, hnew] = tf.split(gh, [H, H, H], 1);
  const r = tf.sigmoid(tf.add(ir, hr));
  const u = tf.sigmoid(tf.add(iu, hu));
  const n = tf.tanh(tf.add(inew, tf.mul(r, hnew)));
  return tf.add(tf.mul(tf.sub(1, u), n), tf.mul(u, h)) as tf.Tensor2D;
}

/**
 * The original DualGRU cell's weights, as its state_dict stores them: two GRUs of hidden size H
 * sharing one input, one for the posterior means (…_1) and one for the softplus parameters
 * (…_2). weight_ih_k [2H,in] holds the (reset, update) rows, weight_in_k [H,in] the new-gate
 * rows; bias_ih/bias_hh [4H] are ordered (reset1, update1, reset2, update2) and
 * bias_in/bias_hn [2H] (new1, new2).
 */
export interface DualGruWeights {
  weightIh1: tf.Tensor2D;
  weightHh1: tf.Tensor2D;
  weightIh2: tf.Tensor2D;
  weightHh2: tf.Tensor2D;
  weightIn1: tf.Tensor2D;
  weightHn1: tf.Tensor2D;
  weightIn2: tf.Tensor2D;
  weightHn2: tf.Tensor2D;
  biasIh: tf.Tensor1D;
  biasHh: tf.Tensor1D;
  biasIn: tf.Tensor1D;
  biasHn: tf.Tensor1D;
}

/**
 * One DualGRU step: both GRUs read the same update x; GRU 1 carries h1 (means), GRU 2 carries
 * h2 (softplus parameters). Equal to the original's block-diagonal formulation, without
 * multiplying by its zero blocks.
 */
export function dualGruCell(x: tf.Tensor2D, h1: tf.Tensor2D, h2: tf.Tensor2D, p: DualGruWeights): [tf.Tensor2D, tf.Tensor2D] {
  const H = h1.shape[1];
  const [bir1, biu1, bir2, biu2] = tf.split(p.biasIh, 4);
  const [bhr1, bhu1, bhr2, bhu2] = tf.split(p.biasHh, 4);
  const [bin1, bin2] = tf.split(p.biasIn, 2);
  const [bhn1, bhn2] = tf.split(p.biasHn, 2);
  const one = (
    h: tf.Tensor2D,
    wih: tf.Tensor2D,
    whh: tf.Tensor2D,
    win: tf.Tensor2D,
    whn: tf.Tensor2D,
    bir: tf.Tensor,
    biu: tf.Tensor,
    bhr: tf.Tensor,
    bhu: tf.Tensor,
    bin: tf.Tensor,
    bhn: tf.Tensor,
  ): tf.Tensor2D => {
    const gi = tf.matMul(x, wih, false, true);
    const gh = tf.matMul(h, whh, false, true);
    const [ir, iu] = tf.split(gi, [H, H], 1);
    const [hr, hu] = tf.split(gh, [H, H], 1);
    const r = tf.sigmoid(tf.add(tf.add(tf.add(ir, bir), hr), bhr));
    const u = tf.sigmoid(tf.add(tf.add(tf.add(iu, biu), hu), bhu));
    const nIn = tf.add(tf.matMul(x, win, false, true), bin);
    const nH = tf.add(tf.matMul(h, whn, false, true), bhn);
    const n = tf.tanh(tf.add(nIn, tf.mul(r, nH)));
    return tf.add(tf.mul(tf.sub(1, u), n), tf.mul(u, h)) as tf.Tensor2D;
  };
  const y1 = one(h1, p.weightIh1, p.weightHh1, p.weightIn1, p.weightHn1, bir1, biu1, bhr1, bhu1, bin1, bhn1);
  const y2 = one(h2, p.weightIh2, p.weightHh2, p.weightIn2, p.weightHn2, bir2, biu2, bhr2, bhu2, bin2, bhn2);
  return [y1, y2];
}

/**
 * x [1, D] repeated as n rows, [n, D]: tf.tile(x, [n, 1]), whose gradient tfjs takes as a slice
 * and an add per row (256 ops for 128 slots). Here it is one loop that adds the rows in the same
 * order with the same float32 roundings (0 + row 0, then + row 1, …): the same bits.
 */
export function repeatRows(x: tf.Tensor2D, n: number): tf.Tensor2D {
  const [one, D] = x.shape;
  if (one !== 1) throw new Error(`repeatRows: x must be [1, D], got [${x.shape}]`);
  if (!Number.isInteger(n) || n < 1) throw new Error(`repeatRows: n must be an integer >= 1, got ${n}`);
  if (x.dtype !== 'float32') return tf.tile(x, [n, 1]);
  const op = tf.customGrad((xt) => {
    const xv = f32(xt as tf.Tensor);
    const y = new Float32Array(n * D);
    for (let i = 0; i < n; i++) y.set(xv, i * D);
    return {
      value: tf.tensor2d(y, [n, D]),
      gradFunc: (dy: tf.Tensor) => {
        const g = f32(dy);
        const dx = new Float32Array(D);
        for (let i = 0; i < n; i++) for (let j = 0; j < D; j++) dx[j] = dx[j] + g[i * D + j];
        return tf.tensor2d(dx, [1, D]);
      },
    };
  });
  return op(x) as tf.Tensor2D;
}

/**
 * [n, D_0 + D_1 + …] from 2-D tensors side by side: tf.concat(xs, 1) as one op that saves
 * nothing. tf.concat clones every input for its gradient (an Identity kernel and a tape node
 * apiece) and takes the gradient back with a split; here both ways are copies of runs.
 */
export function concatColumns(xs: tf.Tensor2D[]): tf.Tensor2D {
  if (xs.length === 0) throw new Error('concatColumns: no tensors');
  const n = xs[0].shape[0];
  for (const x of xs) {
    if (x.rank !== 2 || x.shape[0] !== n) throw new Error(`concatColumns: every tensor must be [${n}, D], got [${x.shape}]`);
  }
  if (xs.some((x) => x.dtype !== 'float32')) return tf.concat(xs, 1) as tf.Tensor2D;
  const widths = xs.map((x) => x.shape[1]);
  const D = widths.reduce((a, b) => a + b, 0);
  const op = tf.customGrad((...args: unknown[]) => ({
    value: tf.tensor2d(joinColumns(xs.map((_, k) => f32(args[k] as tf.Tensor)), widths, n), [n, D]),
    gradFunc: (dy: tf.Tensor) => cutColumns(f32(dy), widths, n).map((g, k) => tf.tensor2d(g, [n, widths[k]])),
  }));
  return (op as (...t: tf.Tensor[]) => tf.Tensor2D)(...xs);
}

/**
 * x [n, Σ widths] cut into [n, widths_k] column blocks: tf.split(x, widths, 1) as one op each way
 * (tf.split is a SplitV kernel forward and a Concat kernel backward). Equal halves without widths.
 */
export function splitColumns(x: tf.Tensor2D, widths?: number[]): tf.Tensor2D[] {
  if (x.rank !== 2) throw new Error(`splitColumns: x must be [n, D], got [${x.shape}]`);
  const [n, D] = x.shape;
  if (!widths) {
    if (D % 2 !== 0) throw new Error(`splitColumns: x [${x.shape}] has an odd number of columns to halve`);
    widths = [D / 2, D / 2];
  }
  const ws = widths;
  if (ws.length === 0 || ws.some((w) => !Number.isInteger(w) || w < 1) || ws.reduce((a, b) => a + b, 0) !== D) {
    throw new Error(`splitColumns: widths [${ws}] must be positive integers summing to x's ${D} columns`);
  }
  if (x.dtype !== 'float32') return tf.split(x, ws, 1) as tf.Tensor2D[];
  return multiOutputOp('splitColumns', [x], (xt) => ({
    values: cutColumns(f32(xt), ws, n).map((v, k) => tf.tensor2d(v, [n, ws[k]])),
    gradFunc: (dys) => [tf.tensor2d(joinColumns(dys.map(f32), ws, n), [n, D])],
  })) as tf.Tensor2D[];
}

/**
 * x + y for two float32 tensors of one shape: tf.add as one op that saves nothing (tf.add clones
 * both inputs for its gradient and reshapes the gradient back to each); the same bits both ways.
 */
export function addSameShape<T extends tf.Tensor>(x: T, y: T): T {
  if (x.dtype !== 'float32' || y.dtype !== 'float32' || !tf.util.arraysEqual(x.shape, y.shape)) return tf.add(x, y) as T;
  const shape = x.shape;
  const op = tf.customGrad((xt, yt) => {
    const a = f32(xt as tf.Tensor), b = f32(yt as tf.Tensor);
    const s = new Float32Array(a.length);
    for (let i = 0; i < s.length; i++) s[i] = a[i] + b[i];
    return {
      value: tf.tensor(s, shape),
      gradFunc: (dy: tf.Tensor) => {
        const g = f32(dy);
        return [tf.tensor(Float32Array.from(g), shape), tf.tensor(Float32Array.from(g), shape)];
      },
    };
  });
  return op(x, y) as T;
}

/**
 * x·s for a float32 tensor and a constant: tf.mul(x, s) as one op that saves nothing (tf.mul
 * clones both inputs, and its gradient casts); float32(x·float32(s)) both ways, as tf.mul.
 */
export function scaleBy<T extends tf.Tensor>(x: T, s: number): T {
  if (x.dtype !== 'float32') return tf.mul(x, s) as T;
  const shape = x.shape;
  const k = Math.fround(s);
  const scale = (v: Float32Array) => {
    const out = new Float32Array(v.length);
    for (let i = 0; i < v.length; i++) out[i] = v[i] * k;
    return out;
  };
  const op = tf.customGrad((xt) => ({
    value: tf.tensor(scale(f32(xt as tf.Tensor)), shape),
    gradFunc: (dy: tf.Tensor) => tf.tensor(scale(f32(dy)), shape),
  }));
  return op(x) as T;
}

/** [B, C, P] ↔ [B, P, C] for row-major arrays: an image batch's channels moved last (or first, back). */
function swapChannels(src: Float32Array, B: number, C: number, P: number, toLast: boolean): Float32Array {
  const out = new Float32Array(src.length);
  for (let b = 0; b < B; b++) {
    for (let c = 0; c < C; c++) {
      const planar = (b * C + c) * P, packed = b * P * C + c;
      if (toLast) for (let p = 0; p < P; p++) out[packed + p * C] = src[planar + p];
      else for (let p = 0; p < P; p++) out[planar + p] = src[packed + p * C];
    }
  }
  return out;
}

/** Images [B, C, H, W] as [B, H, W, C]: tf.transpose(x, [0, 2, 3, 1]) as a loop each way (tfjs' Transpose is ~5× slower here). */
export function channelsLast(x: tf.Tensor4D): tf.Tensor4D {
  if (x.dtype !== 'float32') return tf.transpose(x, [0, 2, 3, 1]);
  const [B, C, H, W] = x.shape;
  const op = tf.customGrad((xt) => ({
    value: tf.tensor4d(swapChannels(f32(xt as tf.Tensor), B, C, H * W, true), [B, H, W, C]),
    gradFunc: (dy: tf.Tensor) => tf.tensor4d(swapChannels(f32(dy), B, C, H * W, false), [B, C, H, W]),
  }));
  return op(x) as tf.Tensor4D;
}
