/**
 * 2-D convolution and transposed convolution on NHWC activations with PyTorch-layout weights,
 * written as im2col + GEMM with hand-written gradients (tf.customGrad).
 *
 * Why not tf.conv2d: on the tfjs `cpu` backend its filter gradient is ~50x slower than the same
 * product written as im2col + matmul (see shared/STACK.md). Weights stay in PyTorch's layout
 * (Conv2d [out,in,kh,kw], ConvTranspose2d [in,out,kh,kw]) so that gradients come out in the
 * layout of the original state_dict with no conversion.
 */
import { tf } from '../tf';
import { gemmNN, gemmTN, transpose2d } from './gemm';

/**
 * The geometry of a (forward) convolution from a big [n,h,w,c] map to a small [n,oh,ow,·] one.
 * im2col gathers patches of the big map; col2im is its adjoint (scatter-add back).
 */
export interface ConvGeom {
  n: number;
  h: number;
  w: number;
  c: number;
  kh: number;
  kw: number;
  stride: number;
  pad: number;
  oh: number;
  ow: number;
}

export function convGeom(n: number, h: number, w: number, c: number, kh: number, kw: number, stride: number, pad: number): ConvGeom {
  const oh = Math.floor((h + 2 * pad - kh) / stride) + 1;
  const ow = Math.floor((w + 2 * pad - kw) / stride) + 1;
  if (oh < 1 || ow < 1) {
    throw new Error(`conv: a ${kh}x${kw} kernel (padding ${pad}) does not fit a ${h}x${w} input`);
  }
  return { n, h, w, c, kh, kw, stride, pad, oh, ow };
}

/**
 * Reusable scratch space for the column matrices (tens of MB each): allocating them afresh per
 * call costs more in page faults than the copy itself. A column matrix is consumed by the GEMM
 * right after it is built, so two slots (one per operand of a product) suffice.
 */
const scratch: Float32Array[] = [new Float32Array(0), new Float32Array(0)];
function scratchBuffer(slot: 0 | 1, size: number): Float32Array {
  if (scratch[slot].length < size) scratch[slot] = new Float32Array(Math.ceil(size * 1.25));
  return scratch[slot].subarray(0, size);
}

/**
 * [n,h,w,c] -> [n*oh*ow, kh*kw*c], column index (ky*kw + kx)*c + ci; zero outside the map.
 * With `slot`, the result lives in a scratch buffer that the next im2col on that slot overwrites.
 */
export function im2col(x: Float32Array, g: ConvGeom, slot?: 0 | 1): Float32Array {
  const { n, h, w, c, kh, kw, stride, pad, oh, ow } = g;
  const P = kh * kw * c;
  const size = n * oh * ow * P;
  let cols: Float32Array;
  if (slot === undefined) cols = new Float32Array(size);
  else {
    cols = scratchBuffer(slot, size);
    if (pad > 0) cols.fill(0);
  }
  for (let b = 0; b < n; b++) {
    for (let oy = 0; oy < oh; oy++) {
      for (let ox = 0; ox < ow; ox++) {
        const row = ((b * oh + oy) * ow + ox) * P;
        for (let ky = 0; ky < kh; ky++) {
          const iy = oy * stride - pad + ky;
          if (iy < 0 || iy >= h) continue;
          for (let kx = 0; kx < kw; kx++) {
            const ix = ox * stride - pad + kx;
            if (ix < 0 || ix >= w) continue;
            const src = ((b * h + iy) * w + ix) * c;
            const dst = row + (ky * kw + kx) * c;
            for (let ci = 0; ci < c; ci++) cols[dst + ci] = x[src + ci];
          }
        }
      }
    }
  }
  return cols;
}

/** The adjoint of im2col: scatter-adds [n*oh*ow, kh*kw*c] columns into an [n,h,w,c] map. */
export function col2im(cols: Float32Array, g: ConvGeom): Float32Array {
  const { n, h, w, c, kh, kw, stride, pad, oh, ow } = g;
  const P = kh * kw * c;
  const x = new Float32Array(n * h * w * c);
  for (let b = 0; b < n; b++) {
    for (let oy = 0; oy < oh; oy++) {
      for (let ox = 0; ox < ow; ox++) {
        const row = ((b * oh + oy) * ow + ox) * P;
        for (let ky = 0; ky < kh; ky++) {
          const iy = oy * stride - pad + ky;
          if (iy < 0 || iy >= h) continue;
          for (let kx = 0; kx < kw; kx++) {
            const ix = ox * stride - pad + kx;
            if (ix < 0 || ix >= w) continue;
            const dst = ((b * h + iy) * w + ix) * c;
            const src = row + (ky * kw + kx) * c;
            for (let ci = 0; ci < c; ci++) x[dst + ci] += cols[src + ci];
          }
        }
      }
    }
  }
  return x;
}

/**
 * Whether the convolutions compute weight and bias gradients. The refinement network's input is
 * a gradient with respect to the posterior parameters only; computing the decoder's weight
 * gradients there too would double the cost of that backward pass for nothing.
 */
let paramGrads = true;

/** Whether parameter gradients are being computed (false inside withoutParamGrads). */
export function paramGradsEnabled(): boolean {
  return paramGrads;
}

/** Runs `fn` (forward and backward passes) with weight/bias gradients replaced by zeros. */
export function withoutParamGrads<T>(fn: () => T): T {
  const prev = paramGrads;
  paramGrads = false;
  try {
    return fn();
  } finally {
    paramGrads = prev;
  }
}

function addBias(y: Float32Array, bias: Float32Array, cout: number): void {
  for (let i = 0; i < y.length; i += cout) for (let j = 0; j < cout; j++) y[i + j] += bias[j];
}

function biasGrad(dy: Float32Array, cout: number): Float32Array {
  const db = new Float64Array(cout);
  for (let i = 0; i < dy.length; i += cout) for (let j = 0; j < cout; j++) db[j] += dy[i + j];
  return Float32Array.from(db);
}

/**
 * An activation fused into the convolution: the `cpu` backend runs tf.relu / tf.elu and their
 * gradients through a generic per-element closure path that costs more than the convolution's
 * bookkeeping; fused, they are one pass over the output in each direction.
 */
export type FusedActivation = 'linear' | 'relu' | 'elu';

export function activate(y: Float32Array, act: FusedActivation): void {
  if (act === 'relu') {
    for (let i = 0; i < y.length; i++) if (!(y[i] > 0)) y[i] = 0;
  } else if (act === 'elu') {
    for (let i = 0; i < y.length; i++) if (!(y[i] > 0)) y[i] = Math.expm1(y[i]);
  }
}

/** dy · act'(pre-activation), written from the activation's output y. */
export function activationGrad(dy: Float32Array, y: Float32Array, act: FusedActivation): Float32Array {
  if (act === 'linear') return dy;
  const g = new Float32Array(dy.length);
  if (act === 'relu') {
    for (let i = 0; i < g.length; i++) g[i] = y[i] > 0 ? dy[i] : 0;
  } else {
    // ELU(α=1): derivative 1 for x > 0, exp(x) = y + 1 otherwise
    for (let i = 0; i < g.length; i++) g[i] = y[i] > 0 ? dy[i] : dy[i] * (y[i] + 1);
  }
  return g;
}

export interface ConvOptions {
  stride?: number;
  pad?: number;
  activation?: FusedActivation;
}

/** One layer of a convolution stack (Ops.convStack). */
export interface ConvStackLayer {
  /** [cout, cin, kh, kw] */
  weight: tf.Tensor;
  /** [cout] */
  bias: tf.Tensor;
  stride?: number;
  pad?: number;
  activation?: FusedActivation;
}

/** The layers applied in turn with `conv` (the reference of Ops.convStack). */
export function convStackWith(conv: typeof conv2d, x: tf.Tensor4D, layers: ConvStackLayer[]): tf.Tensor4D {
  if (!layers.length) throw new Error('convStack: no layers');
  return layers.reduce((h, L) => conv(h, L.weight, L.bias, { stride: L.stride, pad: L.pad, activation: L.activation }), x);
}

/**
 * y = conv2d(x, w) + b. x [n,h,w,cin] (NHWC), w [cout,cin,kh,kw] (PyTorch), b [cout];
 * returns [n,oh,ow,cout].
 */
export function conv2d(x: tf.Tensor4D, weight: tf.Tensor, bias: tf.Tensor, opts: ConvOptions = {}): tf.Tensor4D {
  const [n, h, w, cin] = x.shape;
  const [cout, wcin, kh, kw] = weight.shape;
  if (wcin !== cin) throw new Error(`conv2d: input has ${cin} channels, weight [${weight.shape}] expects ${wcin}`);
  if (bias.shape[0] !== cout) throw new Error(`conv2d: bias [${bias.shape}] does not match weight [${weight.shape}]`);
  const g = convGeom(n, h, w, cin, kh, kw, opts.stride ?? 1, opts.pad ?? 0);
  const P = kh * kw * cin;
  const M = n * g.oh * g.ow;
  const act = opts.activation ?? 'linear';
  const op = tf.customGrad((xt, wt, bt, save) => {
    if (act === 'linear') (save as tf.GradSaveFunc)([xt as tf.Tensor, wt as tf.Tensor]);
    // [cout,cin,kh,kw] -> [kh,kw,cin,cout] flattened to [P, cout]
    const wmat = weightToMatrix((wt as tf.Tensor).dataSync() as Float32Array, cout, cin, kh, kw);
    const cols = im2col((xt as tf.Tensor).dataSync() as Float32Array, g, 0);
    const y = gemmNN(cols, wmat, M, P, cout);
    addBias(y, (bt as tf.Tensor).dataSync() as Float32Array, cout);
    activate(y, act);
    const value = tf.tensor4d(y, [n, g.oh, g.ow, cout]);
    if (act !== 'linear') (save as tf.GradSaveFunc)([xt as tf.Tensor, wt as tf.Tensor, value]);
    return {
      value,
      gradFunc: (dy: tf.Tensor, saved: tf.Tensor[]) => {
        const dyd = activationGrad(dy.dataSync() as Float32Array, act === 'linear' ? (dy.dataSync() as Float32Array) : (saved[2].dataSync() as Float32Array), act);
        const wd = saved[1].dataSync() as Float32Array;
        let dxd: Float32Array;
        if (g.stride === 1 && kh === kw && g.pad <= kh - 1) {
          // ∂x is the "full" correlation of dy with the flipped kernel, channels swapped: one
          // im2col + GEMM with a long inner dimension (kh·kw·cout), no scatter.
          const gT = convGeom(n, g.oh, g.ow, cout, kh, kw, 1, kh - 1 - g.pad);
          dxd = gemmNN(im2col(dyd, gT, 1), flippedWeightMatrix(wd, cout, cin, kh, kw), n * h * w, kh * kw * cout, cin);
        } else {
          const wm = weightToMatrix(wd, cout, cin, kh, kw);
          dxd = col2im(gemmNN(dyd, transpose2d(wm, P, cout), M, cout, P), g);
        }
        const dx = tf.tensor4d(dxd, [n, h, w, cin]);
        if (!paramGrads) return [dx, tf.zeros([cout, cin, kh, kw]), tf.zeros([cout])];
        const colsB = im2col(saved[0].dataSync() as Float32Array, g, 0);
        const dwm = gemmTN(colsB, dyd, M, P, cout);
        return [dx, tf.tensor4d(matrixToWeight(dwm, cout, cin, kh, kw), [cout, cin, kh, kw]), tf.tensor1d(biasGrad(dyd, cout))];
      },
    };
  });
  return op(x, weight, bias) as tf.Tensor4D;
}

/** [cout,cin,kh,kw] -> [(ky*kw+kx)*cout+co, ci] of the spatially flipped kernel. */
function flippedWeightMatrix(wd: Float32Array, cout: number, cin: number, kh: number, kw: number): Float32Array {
  const m = new Float32Array(wd.length);
  for (let co = 0; co < cout; co++)
    for (let ci = 0; ci < cin; ci++)
      for (let ky = 0; ky < kh; ky++)
        for (let kx = 0; kx < kw; kx++) m[(((kh - 1 - ky) * kw + (kw - 1 - kx)) * cout + co) * cin + ci] = wd[((co * cin + ci) * kh + ky) * kw + kx];
  return m;
}

/** [cout,cin,kh,kw] -> [(ky*kw+kx)*cin+ci, cout]. */
export function weightToMatrix(wd: Float32Array, cout: number, cin: number, kh: number, kw: number): Float32Array {
  const m = new Float32Array(wd.length);
  for (let co = 0; co < cout; co++)
    for (let ci = 0; ci < cin; ci++)
      for (let ky = 0; ky < kh; ky++)
        for (let kx = 0; kx < kw; kx++) m[((ky * kw + kx) * cin + ci) * cout + co] = wd[((co * cin + ci) * kh + ky) * kw + kx];
  return m;
}

export function matrixToWeight(m: Float32Array, cout: number, cin: number, kh: number, kw: number): Float32Array {
  const wd = new Float32Array(m.length);
  for (let co = 0; co < cout; co++)
    for (let ci = 0; ci < cin; ci++)
      for (let ky = 0; ky < kh; ky++)
        for (let kx = 0; kx < kw; kx++) wd[((co * cin + ci) * kh + ky) * kw + kx] = m[((ky * kw + kx) * cin + ci) * cout + co];
  return wd;
}

/** [cin,cout,kh,kw] (ConvTranspose2d) -> [ci, (ky*kw+kx)*cout+co]. */
function tWeightToMatrix(wd: Float32Array, cin: number, cout: number, kh: number, kw: number): Float32Array {
  const m = new Float32Array(wd.length);
  const Q = kh * kw * cout;
  for (let ci = 0; ci < cin; ci++)
    for (let co = 0; co < cout; co++)
      for (let ky = 0; ky < kh; ky++)
        for (let kx = 0; kx < kw; kx++) m[ci * Q + (ky * kw + kx) * cout + co] = wd[((ci * cout + co) * kh + ky) * kw + kx];
  return m;
}

function tMatrixToWeight(m: Float32Array, cin: number, cout: number, kh: number, kw: number): Float32Array {
  const wd = new Float32Array(m.length);
  const Q = kh * kw * cout;
  for (let ci = 0; ci < cin; ci++)
    for (let co = 0; co < cout; co++)
      for (let ky = 0; ky < kh; ky++)
        for (let kx = 0; kx < kw; kx++) wd[((ci * cout + co) * kh + ky) * kw + kx] = m[ci * Q + (ky * kw + kx) * cout + co];
  return wd;
}

export interface ConvTransposeOptions {
  stride?: number;
  pad?: number;
  outputPad?: number;
  activation?: FusedActivation;
}

/**
 * Checks a transposed convolution's shapes (x [n,h,w,cin], weight [cin,cout,kh,kw], bias [cout])
 * and derives its output size; `g` is the geometry of the forward convolution it transposes.
 * Shared by the TypeScript and the native implementation, so both refuse the same inputs.
 */
export function convTransposeShapes(xShape: number[], wShape: number[], bShape: number[], opts: ConvTransposeOptions) {
  const [n, h, w, cin] = xShape;
  const [wcin, cout, kh, kw] = wShape;
  if (wcin !== cin) throw new Error(`convTranspose2d: input has ${cin} channels, weight [${wShape}] expects ${wcin}`);
  if (bShape[0] !== cout) throw new Error(`convTranspose2d: bias [${bShape}] does not match weight [${wShape}]`);
  const stride = opts.stride ?? 1;
  const pad = opts.pad ?? 0;
  const outputPad = opts.outputPad ?? 0;
  if (outputPad < 0 || outputPad >= stride) throw new Error(`convTranspose2d: output padding ${outputPad} must be below the stride ${stride}`);
  const H = (h - 1) * stride - 2 * pad + kh + outputPad;
  const W = (w - 1) * stride - 2 * pad + kw + outputPad;
  const g = convGeom(n, H, W, cout, kh, kw, stride, pad);
  if (g.oh !== h || g.ow !== w) throw new Error(`convTranspose2d: inconsistent geometry for input ${h}x${w}`);
  return { n, h, w, cin, cout, kh, kw, stride, pad, outputPad, H, W, g };
}

/**
 * y = conv_transpose2d(x, w) + b as PyTorch's ConvTranspose2d: x [n,h,w,cin] (NHWC),
 * w [cin,cout,kh,kw], b [cout]; output side (h-1)*stride - 2*pad + k + outputPad.
 * It is the adjoint of a convolution from the output map back to x: columns x·W scattered with
 * col2im of that convolution's geometry.
 */
export function convTranspose2d(
  x: tf.Tensor4D,
  weight: tf.Tensor,
  bias: tf.Tensor,
  opts: ConvTransposeOptions = {},
): tf.Tensor4D {
  const { n, h, w, cin, cout, kh, kw, stride, pad, H, W, g } = convTransposeShapes(x.shape, weight.shape, bias.shape, opts);
  const Q = kh * kw * cout;
  const M = n * h * w;
  const act = opts.activation ?? 'linear';
  const op = tf.customGrad((xt, wt, bt, save) => {
    const wm = tWeightToMatrix((wt as tf.Tensor).dataSync() as Float32Array, cin, cout, kh, kw);
    const cols = gemmNN((xt as tf.Tensor).dataSync() as Float32Array, wm, M, cin, Q);
    const y = col2im(cols, g);
    addBias(y, (bt as tf.Tensor).dataSync() as Float32Array, cout);
    activate(y, act);
    const value = tf.tensor4d(y, [n, H, W, cout]);
    (save as tf.GradSaveFunc)(act === 'linear' ? [xt as tf.Tensor, wt as tf.Tensor] : [xt as tf.Tensor, wt as tf.Tensor, value]);
    return {
      value,
      gradFunc: (dy: tf.Tensor, saved: tf.Tensor[]) => {
        const dyd = activationGrad(dy.dataSync() as Float32Array, act === 'linear' ? (dy.dataSync() as Float32Array) : (saved[2].dataSync() as Float32Array), act);
        const dcols = im2col(dyd, g, 0); // [M, Q]
        const wm2 = tWeightToMatrix(saved[1].dataSync() as Float32Array, cin, cout, kh, kw);
        const dx = tf.tensor4d(gemmNN(dcols, transpose2d(wm2, cin, Q), M, Q, cin), [n, h, w, cin]);
        if (!paramGrads) return [dx, tf.zeros([cin, cout, kh, kw]), tf.zeros([cout])];
        const dwm = gemmTN(saved[0].dataSync() as Float32Array, dcols, M, cin, Q);
        return [dx, tf.tensor4d(tMatrixToWeight(dwm, cin, cout, kh, kw), [cin, cout, kh, kw]), tf.tensor1d(biasGrad(dyd, cout))];
      },
    };
  });
  return op(x, weight, bias) as tf.Tensor4D;
}
