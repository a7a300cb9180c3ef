/**
 * The ARI_MSE_KL aggregation: per-image foreground ARI (and ARI with the background), MSE and
 * their mean and standard deviation (numpy's np.std: population, ddof 0), as the original eval.py.
 * Predicted masks smaller than the true ones (CLEVR: 96×96 or 128×128 against the 192×192 crop)
 * are upsampled as the original does, with PIL `Image.fromarray(mask, mode="F").resize((192,192))`:
 * Pillow 7.2's default filter, BICUBIC, in float32.
 */
import { adjustedRandIndices } from '../metrics/ari';
import { pixelMse } from '../metrics/mse';

export interface MeanStd {
  mean: number;
  std: number;
  n: number;
}

export function meanStd(values: ArrayLike<number>): MeanStd {
  const n = values.length;
  if (n === 0) return { mean: NaN, std: NaN, n: 0 };
  let s = 0;
  for (let i = 0; i < n; i++) s += values[i];
  const mean = s / n;
  let v = 0;
  for (let i = 0; i < n; i++) v += (values[i] - mean) ** 2;
  return { mean, std: Math.sqrt(v / n), n };
}

function bicubic(x: number): number {
  const a = -0.5;
  const ax = Math.abs(x);
  if (ax < 1) return ((a + 2) * ax - (a + 3)) * ax * ax + 1;
  if (ax < 2) return (((ax - 5) * ax + 8) * ax - 4) * a;
  return 0;
}

interface Taps {
  ksize: number;
  start: Int32Array;
  count: Int32Array;
  k: Float64Array;
}

/** Pillow's precompute_coeffs for the bicubic filter, in double precision (its float path). */
function taps(inSize: number, outSize: number): Taps {
  const scale = inSize / outSize;
  const filterScale = Math.max(scale, 1);
  const support = 2 * filterScale;
  const ksize = Math.ceil(support) * 2 + 1;
  const start = new Int32Array(outSize);
  const count = new Int32Array(outSize);
  const k = new Float64Array(outSize * ksize);
  for (let xx = 0; xx < outSize; xx++) {
    const center = (xx + 0.5) * scale;
    const xmin = Math.max(0, Math.trunc(center - support + 0.5));
    const xmax = Math.min(inSize, Math.trunc(center + support + 0.5)) - xmin;
    let sum = 0;
    for (let x = 0; x < xmax; x++) {
      const w = bicubic((x + xmin - center + 0.5) / filterScale);
      k[xx * ksize + x] = w;
      sum += w;
    }
    if (sum !== 0) for (let x = 0; x < xmax; x++) k[xx * ksize + x] /= sum;
    start[xx] = xmin;
    count[xx] = xmax;
  }
  return { ksize, start, count, k };
}

/**
 * Resizes float32 planes [N,H,W] to [N,outH,outW] as Pillow resizes a mode "F" image with
 * BICUBIC: horizontal pass, then vertical, accumulating in double and storing float32.
 */
export function resizeBicubicF32(planes: Float32Array, n: number, H: number, W: number, outH: number, outW: number): Float32Array {
  if (planes.length !== n * H * W) throw new Error(`resizeBicubicF32: ${planes.length} values for ${n} planes of ${H}×${W}`);
  const h = taps(W, outW);
  const v = taps(H, outH);
  const tmp = new Float32Array(H * outW);
  const out = new Float32Array(n * outH * outW);
  for (let p = 0; p < n; p++) {
    const src = p * H * W;
    for (let y = 0; y < H; y++) {
      for (let xx = 0; xx < outW; xx++) {
        let acc = 0;
        const base = xx * h.ksize;
        for (let x = 0; x < h.count[xx]; x++) acc += planes[src + y * W + h.start[xx] + x] * h.k[base + x];
        tmp[y * outW + xx] = acc;
      }
    }
    const dst = p * outH * outW;
    for (let yy = 0; yy < outH; yy++) {
      const base = yy * v.ksize;
      for (let xx = 0; xx < outW; xx++) {
        let acc = 0;
        for (let y = 0; y < v.count[yy]; y++) acc += tmp[(v.start[yy] + y) * outW + xx] * v.k[base + y];
        out[dst + yy * outW + xx] = acc;
      }
    }
  }
  return out;
}

export interface AriMseInput {
  /** true masks [B,O,1,Hm,Wm] (uint8, 255 where entity o is) */
  trueMasks: Uint8Array | Float32Array;
  numEntities: number;
  maskHeight: number;
  maskWidth: number;
  /** predicted mask probabilities [B,K,1,H,W] */
  predMasks: Float32Array;
  K: number;
  /** images [B,C,H,W] in [0,1] */
  images: Float32Array;
  /** reconstructions [B,C,H,W] in [0,1] */
  recons: Float32Array;
  batch: number;
  channels: number;
  height: number;
  width: number;
}

export interface AriMseValues {
  /** foreground ARI per image */
  fgAri: Float64Array;
  /** ARI with the background, per image */
  ari: Float64Array;
  mse: Float64Array;
}

/** Per-image ARIs and MSE of one batch (masks upsampled to the true masks' size when smaller). */
export function ariMse(x: AriMseInput): AriMseValues {
  const { batch: B, K, height: H, width: W } = x;
  let pred = x.predMasks;
  let ph = H;
  let pw = W;
  if (x.maskHeight !== H || x.maskWidth !== W) {
    pred = resizeBicubicF32(x.predMasks, B * K, H, W, x.maskHeight, x.maskWidth);
    ph = x.maskHeight;
    pw = x.maskWidth;
  }
  const { foreground, withBackground } = adjustedRandIndices(
    { data: x.trueMasks, shape: [B, x.numEntities, 1, x.maskHeight, x.maskWidth] },
    { data: pred, shape: [B, K, 1, ph, pw] },
  );
  const mse = pixelMse(
    { data: x.images, shape: [B, x.channels, H, W], layout: 'NCHW' },
    { data: x.recons, shape: [B, x.channels, H, W], layout: 'NCHW' },
  );
  return { fgAri: foreground, ari: withBackground, mse };
}
