/**
 * The spatial broadcast of the decoders: every slot's z tiled over the grid, plus the projected
 * positional embedding. As plain tfjs ops this is a broadcasting add whose gradient reduces over
 * the grid and over the batch, and the `cpu` backend does both through its generic per-element
 * index path (tens of seconds per training step); these loops do it in milliseconds.
 */
import { tf } from '../tf';
import { activate, activationGrad, col2im, convGeom, im2col, matrixToWeight, paramGradsEnabled, weightToMatrix, type FusedActivation } from './conv';
import { gemmNN, gemmTN, transpose2d } from './gemm';

/** out[i, y, x, :] = z[i, :] + pos[y, x, :]. z [n, c], pos [gh, gw, c] -> [n, gh, gw, c]. */
export function spatialBroadcast(z: tf.Tensor2D, pos: tf.Tensor3D): tf.Tensor4D {
  const [n, c] = z.shape;
  const [gh, gw, pc] = pos.shape;
  if (pc !== c) throw new Error(`spatialBroadcast: z has ${c} channels, the positional embedding ${pc}`);
  const cells = gh * gw;
  const op = tf.customGrad((zt, pt) => {
    const zd = (zt as tf.Tensor).dataSync() as Float32Array;
    const pd = (pt as tf.Tensor).dataSync() as Float32Array;
    const out = new Float32Array(n * cells * c);
    for (let i = 0; i < n; i++) {
      const zo = i * c;
      for (let q = 0; q < cells; q++) {
        const o = (i * cells + q) * c;
        const po = q * c;
        for (let j = 0; j < c; j++) out[o + j] = zd[zo + j] + pd[po + j];
      }
    }
    return {
      value: tf.tensor4d(out, [n, gh, gw, c]),
      gradFunc: (dy: tf.Tensor) => {
        const g = dy.dataSync() as Float32Array;
        const dz = new Float64Array(n * c);
        const dp = new Float64Array(cells * c);
        for (let i = 0; i < n; i++) {
          const zo = i * c;
          for (let q = 0; q < cells; q++) {
            const o = (i * cells + q) * c;
            const po = q * c;
            for (let j = 0; j < c; j++) {
              const v = g[o + j];
              dz[zo + j] += v;
              dp[po + j] += v;
            }
          }
        }
        return [tf.tensor2d(Float32Array.from(dz), [n, c]), tf.tensor3d(Float32Array.from(dp), [gh, gw, c])];
      },
    };
  });
  return op(z, pos) as tf.Tensor4D;
}

/**
 * x + y with y [d1, …] broadcast over x's leading axis (x [n, d1, …]), e.g. a positional map added
 * to every image. As a tfjs add its gradient for y is a sum over the batch that the cpu backend
 * runs through a transpose; these loops do both directions in one pass.
 */
export function addToEach(x: tf.Tensor, y: tf.Tensor): tf.Tensor {
  const inner = y.size;
  if (x.rank !== y.rank + 1 || x.shape.slice(1).join() !== y.shape.join()) throw new Error(`addToEach: [${y.shape}] does not fit each entry of [${x.shape}]`);
  const n = x.shape[0];
  const op = tf.customGrad((xt, yt) => {
    const xd = (xt as tf.Tensor).dataSync() as Float32Array;
    const yd = (yt as tf.Tensor).dataSync() as Float32Array;
    const out = new Float32Array(xd.length);
    for (let i = 0, o = 0; i < n; i++, o += inner) for (let j = 0; j < inner; j++) out[o + j] = xd[o + j] + yd[j];
    return {
      value: tf.tensor(out, x.shape),
      gradFunc: (dy: tf.Tensor) => {
        const g = dy.dataSync() as Float32Array;
        const dyd = new Float64Array(inner);
        for (let i = 0, o = 0; i < n; i++, o += inner) for (let j = 0; j < inner; j++) dyd[j] += g[o + j];
        return [dy.clone(), tf.tensor(Float32Array.from(dyd), y.shape)];
      },
    };
  });
  return op(x, y) as tf.Tensor;
}

const tapSumCache = new WeakMap<Float32Array, { key: string; S: Float32Array }>();

/** The geometry of a broadcast first layer: channels in (c) and out, kernel, grid, padding. */
export interface TapGeometry {
  c: number;
  cout: number;
  kh: number;
  kw: number;
  gh: number;
  gw: number;
  pad: number;
}

/** Output size and, per output row / column, the range of kernel taps that fall inside the grid. */
export function tapRanges(g: TapGeometry): { oh: number; ow: number; rowLo: Int32Array; rowHi: Int32Array; colLo: Int32Array; colHi: Int32Array } {
  const { kh, kw, gh, gw, pad } = g;
  const oh = gh + 2 * pad - kh + 1;
  const ow = gw + 2 * pad - kw + 1;
  const rowLo = new Int32Array(oh);
  const rowHi = new Int32Array(oh);
  for (let oy = 0; oy < oh; oy++) {
    rowLo[oy] = Math.max(0, pad - oy);
    rowHi[oy] = Math.min(kh, gh + pad - oy);
  }
  const colLo = new Int32Array(ow);
  const colHi = new Int32Array(ow);
  for (let ox = 0; ox < ow; ox++) {
    colLo[ox] = Math.max(0, pad - ox);
    colHi[ox] = Math.min(kw, gw + pad - ox);
  }
  return { oh, ow, rowLo, rowHi, colLo, colHi };
}

/**
 * S laid out [ci, cell, co] from W [co, ci, ky, kx]: at each output cell, the sum of the kernel
 * taps that fall inside the grid. It depends on the weights only, and one training pass runs the
 * layer forward and backward a dozen times with the same weights, so it is cached per weight
 * array (the backend's storage, replaced whenever the weights change). Shared by the TypeScript
 * and the native broadcastConv2d.
 */
export function broadcastTapSums(wd: Float32Array, g: TapGeometry): Float32Array {
  const { c, cout, kh, kw, gh, gw, pad } = g;
  const key = `${gh}x${gw}/${pad}/${c}/${cout}/${kh}x${kw}`;
  const cached = tapSumCache.get(wd);
  if (cached && cached.key === key) return cached.S;
  const { oh, ow, rowLo, rowHi, colLo, colHi } = tapRanges(g);
  const Q = oh * ow;
  const cc = c * cout;
  // T[oy, kx, (ci, co)] = Σ_{valid ky} W[co, ci, ky, kx]
  const T = new Float32Array(oh * kw * cc);
  for (let oy = 0; oy < oh; oy++)
    for (let kx = 0; kx < kw; kx++)
      for (let ci = 0; ci < c; ci++)
        for (let co = 0; co < cout; co++) {
          let sum = 0;
          for (let ky = rowLo[oy]; ky < rowHi[oy]; ky++) sum += wd[((co * c + ci) * kh + ky) * kw + kx];
          T[(oy * kw + kx) * cc + ci * cout + co] = sum;
        }
  const S = new Float32Array(c * Q * cout);
  const acc = new Float64Array(cc);
  for (let oy = 0; oy < oh; oy++)
    for (let ox = 0; ox < ow; ox++) {
      const q = oy * ow + ox;
      acc.fill(0);
      for (let kx = colLo[ox]; kx < colHi[ox]; kx++) {
        const t0 = (oy * kw + kx) * cc;
        for (let j = 0; j < cc; j++) acc[j] += T[t0 + j];
      }
      for (let ci = 0; ci < c; ci++) {
        const dst = (ci * Q + q) * cout;
        const src = ci * cout;
        for (let co = 0; co < cout; co++) S[dst + co] = acc[src + co];
      }
    }
  tapSumCache.set(wd, { key, S });
  return S;
}

/**
 * The gradient of broadcastTapSums, added into dW [co, ci, ky, kx]: each dS[ci, cell, co] goes
 * back to every kernel tap that cell summed.
 */
export function addTapSumsGrad(dS: ArrayLike<number>, dW: Float32Array, g: TapGeometry): void {
  const { c, cout, kh, kw } = g;
  const { oh, ow, rowLo, rowHi, colLo, colHi } = tapRanges(g);
  const Q = oh * ow;
  const dT = new Float64Array(oh * kw * c * cout);
  for (let oy = 0; oy < oh; oy++)
    for (let ox = 0; ox < ow; ox++) {
      const q = oy * ow + ox;
      for (let kx = colLo[ox]; kx < colHi[ox]; kx++)
        for (let ci = 0; ci < c; ci++) {
          const src = (ci * Q + q) * cout;
          const dst = ((oy * kw + kx) * c + ci) * cout;
          for (let co = 0; co < cout; co++) dT[dst + co] += dS[src + co];
        }
    }
  for (let oy = 0; oy < oh; oy++)
    for (let kx = 0; kx < kw; kx++)
      for (let ci = 0; ci < c; ci++)
        for (let co = 0; co < cout; co++) {
          const v = dT[((oy * kw + kx) * c + ci) * cout + co];
          for (let ky = rowLo[oy]; ky < rowHi[oy]; ky++) dW[((co * c + ci) * kh + ky) * kw + kx] += v;
        }
}

/**
 * Checks a broadcast first layer's shapes (z [n,c], pos [gh,gw,c], weight [cout,c,kh,kw]) and
 * derives its geometry. Shared by the TypeScript and the native implementation.
 */
export function broadcastConvShapes(zShape: number[], posShape: number[], wShape: number[], opts: { pad?: number; activation?: FusedActivation }) {
  const [n, c] = zShape;
  const [gh, gw, pc] = posShape;
  const [cout, cin, kh, kw] = wShape;
  if (pc !== c || cin !== c) throw new Error(`broadcastConv2d: z has ${c} channels, positional embedding ${pc}, weight [${wShape}] expects ${cin}`);
  const pad = opts.pad ?? 0;
  const act = opts.activation ?? 'linear';
  const g = convGeom(1, gh, gw, c, kh, kw, 1, pad);
  const tapGeom: TapGeometry = { c, cout, kh, kw, gh, gw, pad };
  return { n, c, gh, gw, cout, cin, kh, kw, pad, act, g, tapGeom };
}

/**
 * conv2d(spatialBroadcast(z, pos), W) + b, activation fused, computed without ever forming the
 * broadcast map. By linearity the convolution splits into conv(pos) — one image, shared by every
 * slot — and the convolution of a map that is constant per slot, which at each output cell is
 * z · S[cell], S[cell] = Σ of the kernel taps that fall inside the grid there. For the decoders'
 * first layer this replaces an im2col GEMM over every slot's whole grid by two small products.
 * W is [cout, cin, kh, kw] (PyTorch), stride 1.
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
  const tapSums = (wd: Float32Array): Float32Array => broadcastTapSums(wd, tapGeom);

  const op = tf.customGrad((zt, pt, wt, bt, save) => {
    const zd = (zt as tf.Tensor).dataSync() as Float32Array;
    const wd = (wt as tf.Tensor).dataSync() as Float32Array;
    const bd = (bt as tf.Tensor).dataSync() as Float32Array;
    const wmat = weightToMatrix(wd, cout, cin, kh, kw);
    const convP = gemmNN(im2col((pt as tf.Tensor).dataSync() as Float32Array, g), wmat, Q, kh * kw * c, cout); // [Q, cout]
    const y = gemmNN(zd, tapSums(wd), n, c, Q * cout); // [n, Q*cout]
    for (let i = 0; i < n; i++) {
      const o = i * Q * cout;
      for (let q = 0; q < Q; q++) for (let co = 0; co < cout; co++) y[o + q * cout + co] += convP[q * cout + co] + bd[co];
    }
    activate(y, act);
    const value = tf.tensor4d(y, [n, oh, ow, cout]);
    (save as tf.GradSaveFunc)(act === 'linear' ? [zt as tf.Tensor, pt as tf.Tensor, wt as tf.Tensor] : [zt as tf.Tensor, pt as tf.Tensor, wt as tf.Tensor, value]);
    return {
      value,
      gradFunc: (dy: tf.Tensor, saved: tf.Tensor[]) => {
        const dyRaw = dy.dataSync() as Float32Array;
        const gd = activationGrad(dyRaw, act === 'linear' ? dyRaw : (saved[3].dataSync() as Float32Array), act); // [n, Q*cout]
        const zd2 = saved[0].dataSync() as Float32Array;
        const wd2 = saved[2].dataSync() as Float32Array;
        const S = tapSums(wd2); // [c, Q*cout]
        // dz = g · Sᵀ
        const dz = gemmNN(gd, transpose2d(S, c, Q * cout), n, Q * cout, c);
        const dzT = tf.tensor2d(dz, [n, c]);
        if (!paramGradsEnabled()) return [dzT, tf.zeros([gh, gw, c]), tf.zeros([cout, cin, kh, kw]), tf.zeros([cout])];
        // the shared part sees the gradient summed over slots
        const gSum = new Float32Array(Q * cout);
        for (let i = 0; i < n; i++) {
          const o = i * Q * cout;
          for (let j = 0; j < Q * cout; j++) gSum[j] += gd[o + j];
        }
        const db = new Float64Array(cout);
        for (let j = 0; j < Q * cout; j++) db[j % cout] += gSum[j];
        const wmat2 = weightToMatrix(wd2, cout, cin, kh, kw);
        const P = kh * kw * c;
        const dPos = col2im(gemmNN(gSum, transpose2d(wmat2, P, cout), Q, cout, P), g);
        const dwP = gemmTN(im2col(saved[1].dataSync() as Float32Array, g), gSum, Q, P, cout); // [P, cout]
        const dW = matrixToWeight(dwP, cout, cin, kh, kw);
        // dS = zᵀ · g, then spread back over the taps each cell summed
        const dS = gemmTN(zd2, gd, n, c, Q * cout); // [c, Q*cout]
        addTapSumsGrad(dS, dW, tapGeom);
        return [dzT, tf.tensor3d(dPos, [gh, gw, c]), tf.tensor4d(dW, [cout, cin, kh, kw]), tf.tensor1d(Float32Array.from(db))];
      },
    };
  });
  return op(z, pos, weight, bias) as tf.Tensor4D;
}
