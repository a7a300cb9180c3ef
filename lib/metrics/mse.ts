/**
 * Pixel mean squared error of reconstructions against images, per image, accumulated in float64.
 * The original `eval.py` computes `torch.mean((imgs - pred_img) ** 2)` with images mapped to
 * [0,1] and `pred_img = sum_k mask_k * mean_k`; with its batch size of 1 that is the per-image
 * mean over C*H*W values, which is what `pixelMse` returns for each image of the batch.
 */
import { MetricsError, fmtShape, type MaskData } from './ari';

export type ImageLayout = 'NHWC' | 'NCHW';

export interface ImageTensor {
  data: MaskData;
  /** `[B,H,W,C]` for NHWC, `[B,C,H,W]` for NCHW. */
  shape: readonly number[];
  layout: ImageLayout;
  /** Values are divided by this before comparing (e.g. 255 for uint8 images); default 1. */
  divisor?: number;
}

interface ImageDims {
  batch: number;
  channels: number;
  height: number;
  width: number;
}

function imageDims(t: ImageTensor, what: string): ImageDims {
  const s = t.shape;
  if (t.layout !== 'NHWC' && t.layout !== 'NCHW') {
    throw new MetricsError(`${what}: layout must be 'NHWC' or 'NCHW', got '${String(t.layout)}'`);
  }
  if (!s || s.length !== 4 || s.some((d) => !Number.isInteger(d) || d < 0)) {
    throw new MetricsError(`${what}: shape ${fmtShape(s ?? [])} is not a 4-d ${t.layout} shape`);
  }
  if (!ArrayBuffer.isView(t.data)) throw new MetricsError(`${what}: data is not a typed array`);
  const n = s[0] * s[1] * s[2] * s[3];
  if (t.data.length !== n) {
    throw new MetricsError(`${what}: data has ${t.data.length} values, shape ${fmtShape(s)} needs ${n}`);
  }
  if (t.divisor !== undefined && !(Number.isFinite(t.divisor) && t.divisor !== 0)) {
    throw new MetricsError(`${what}: divisor must be a finite non-zero number, got ${t.divisor}`);
  }
  return t.layout === 'NHWC'
    ? { batch: s[0], height: s[1], width: s[2], channels: s[3] }
    : { batch: s[0], channels: s[1], height: s[2], width: s[3] };
}

/** Per-image MSE `[B]` (float64) between `images` and `recons` (each in its own layout). */
export function pixelMse(images: ImageTensor, recons: ImageTensor): Float64Array {
  const fn = 'pixelMse';
  const a = imageDims(images, `${fn}: images`);
  const r = imageDims(recons, `${fn}: reconstructions`);
  if (a.batch !== r.batch || a.channels !== r.channels || a.height !== r.height || a.width !== r.width) {
    throw new MetricsError(
      `${fn}: images shape ${fmtShape(images.shape)} (${images.layout}) and reconstructions shape ` +
        `${fmtShape(recons.shape)} (${recons.layout}) disagree (B,C,H,W = ${a.batch},${a.channels},${a.height},${a.width} ` +
        `vs ${r.batch},${r.channels},${r.height},${r.width})`,
    );
  }
  const { batch: B, channels: C, height: H, width: W } = a;
  const n = C * H * W;
  const out = new Float64Array(B);
  if (n === 0) return out.fill(NaN);
  const x = images.data;
  const y = recons.data;
  const dx = images.divisor ?? 1;
  const dy = recons.divisor ?? 1;
  if (images.layout === recons.layout) {
    for (let b = 0; b < B; b++) {
      let s = 0;
      const end = (b + 1) * n;
      if (dx === 1 && dy === 1) {
        for (let i = b * n; i < end; i++) {
          const d = x[i] - y[i];
          s += d * d;
        }
      } else {
        for (let i = b * n; i < end; i++) {
          const d = x[i] / dx - y[i] / dy;
          s += d * d;
        }
      }
      out[b] = s / n;
    }
    return out;
  }
  // Different layouts: walk the images in their own order, index the reconstructions.
  const HW = H * W;
  for (let b = 0; b < B; b++) {
    let s = 0;
    const base = b * n;
    if (images.layout === 'NHWC') {
      // images [B,H,W,C], recons [B,C,H,W]
      for (let p = 0; p < HW; p++) {
        for (let c = 0; c < C; c++) {
          const d = x[base + p * C + c] / dx - y[base + c * HW + p] / dy;
          s += d * d;
        }
      }
    } else {
      // images [B,C,H,W], recons [B,H,W,C]
      for (let c = 0; c < C; c++) {
        for (let p = 0; p < HW; p++) {
          const d = x[base + c * HW + p] / dx - y[base + p * C + c] / dy;
          s += d * d;
        }
      }
    }
    out[b] = s / n;
  }
  return out;
}
