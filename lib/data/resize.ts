/**
 * Bicubic resize of 8-bit images, reproducing Pillow's `Image.resize(size)` default (BICUBIC since
 * Pillow 7, the version the original preprocessing ran with): a separable, antialiased filter
 * (Keys cubic, a = -0.5, support widened by the downscale factor), horizontal pass then vertical
 * pass, each in 22-bit fixed point with the intermediate image rounded and clipped to uint8.
 * Following the same integer arithmetic makes the output equal to Pillow's, not just close.
 */

/** Fixed-point precision of Pillow's 8-bit resampling (32 bits − 8 bits of data − 2 of headroom). */
const PRECISION_BITS = 32 - 8 - 2;
const BICUBIC_SUPPORT = 2;
const BICUBIC_A = -0.5;

function bicubic(x: number): number {
  const ax = Math.abs(x);
  if (ax < 1) return ((BICUBIC_A + 2) * ax - (BICUBIC_A + 3)) * ax * ax + 1;
  if (ax < 2) return (((ax - 5) * ax + 8) * ax - 4) * BICUBIC_A;
  return 0;
}

interface Coefficients {
  /** Taps per output sample. */
  ksize: number;
  /** First input index of each output sample. */
  start: Int32Array;
  /** Number of taps used by each output sample. */
  count: Int32Array;
  /** Fixed-point weights, ksize per output sample. */
  weights: Int32Array;
  /** The same weights in double precision (for the float reference). */
  weightsF: Float64Array;
}

/** Filter taps for resampling [in0, in1) of an axis of length inSize onto outSize samples. */
function coefficients(inSize: number, in0: number, in1: number, outSize: number): Coefficients {
  const scale = (in1 - in0) / outSize;
  const filterScale = Math.max(scale, 1);
  const support = BICUBIC_SUPPORT * filterScale;
  const ksize = Math.ceil(support) * 2 + 1;
  const start = new Int32Array(outSize);
  const count = new Int32Array(outSize);
  const weights = new Int32Array(outSize * ksize);
  const weightsF = new Float64Array(outSize * ksize);
  const invFilterScale = 1 / filterScale;
  for (let xx = 0; xx < outSize; xx++) {
    const center = in0 + (xx + 0.5) * scale;
    // Pillow truncates toward zero with a C cast; both operands are >= -0.5 here only after clamping.
    let xmin = Math.trunc(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    let xmax = Math.trunc(center + support + 0.5);
    if (xmax > inSize) xmax = inSize;
    xmax -= xmin;
    let sum = 0;
    const k = weightsF.subarray(xx * ksize, (xx + 1) * ksize);
    for (let x = 0; x < xmax; x++) {
      const w = bicubic((x + xmin - center + 0.5) * invFilterScale);
      k[x] = w;
      sum += w;
    }
    for (let x = 0; x < xmax; x++) if (sum !== 0) k[x] /= sum;
    for (let x = 0; x < ksize; x++) {
      const w = k[x];
      weights[xx * ksize + x] =
        w < 0 ? Math.trunc(-0.5 + w * (1 << PRECISION_BITS)) : Math.trunc(0.5 + w * (1 << PRECISION_BITS));
    }
    start[xx] = xmin;
    count[xx] = xmax;
  }
  return { ksize, start, count, weights, weightsF };
}

function clip8(acc: number): number {
  // acc fits in a double exactly (|acc| < 2^53), so floor division matches C's arithmetic shift.
  const v = Math.floor(acc / (1 << PRECISION_BITS));
  return v < 0 ? 0 : v > 255 ? 255 : v;
}

/** An 8-bit image stored row-major as [height, width, channels]. */
export interface ImageU8 {
  data: Uint8Array;
  height: number;
  width: number;
  channels: number;
}

/** Resizes an 8-bit HWC image to outHeight × outWidth exactly as Pillow's bicubic resize does. */
export function resizeBicubicU8(img: ImageU8, outHeight: number, outWidth: number): ImageU8 {
  const { data, height, width, channels: c } = img;
  if (data.length !== height * width * c) {
    throw new Error(`resizeBicubicU8: data has ${data.length} values, expected ${height}×${width}×${c}`);
  }
  if (!(outHeight > 0 && outWidth > 0 && Number.isInteger(outHeight) && Number.isInteger(outWidth))) {
    throw new Error(`resizeBicubicU8: bad output size ${outHeight}×${outWidth}`);
  }
  const half = 1 << (PRECISION_BITS - 1);
  let current = data;
  let curWidth = width;
  if (outWidth !== width) {
    const h = coefficients(width, 0, width, outWidth);
    const tmp = new Uint8Array(height * outWidth * c);
    for (let y = 0; y < height; y++) {
      const row = y * width * c;
      for (let xx = 0; xx < outWidth; xx++) {
        const base = xx * h.ksize;
        const xmin = h.start[xx];
        const n = h.count[xx];
        for (let ch = 0; ch < c; ch++) {
          let acc = half;
          for (let x = 0; x < n; x++) acc += data[row + (x + xmin) * c + ch] * h.weights[base + x];
          tmp[(y * outWidth + xx) * c + ch] = clip8(acc);
        }
      }
    }
    current = tmp;
    curWidth = outWidth;
  }
  if (outHeight !== height) {
    const v = coefficients(height, 0, height, outHeight);
    const out = new Uint8Array(outHeight * curWidth * c);
    const rowLen = curWidth * c;
    for (let yy = 0; yy < outHeight; yy++) {
      const base = yy * v.ksize;
      const ymin = v.start[yy];
      const n = v.count[yy];
      for (let i = 0; i < rowLen; i++) {
        let acc = half;
        for (let y = 0; y < n; y++) acc += current[(y + ymin) * rowLen + i] * v.weights[base + y];
        out[yy * rowLen + i] = clip8(acc);
      }
    }
    current = out;
  }
  return { data: current === data ? data.slice() : current, height: outHeight, width: outWidth, channels: c };
}

/**
 * The same separable antialiased bicubic filter in double precision with no intermediate
 * rounding: the mathematical reference the 8-bit path is measured against.
 */
export function resizeBicubicFloat(img: ImageU8, outHeight: number, outWidth: number): Float64Array {
  const { data, height, width, channels: c } = img;
  const h = coefficients(width, 0, width, outWidth);
  const v = coefficients(height, 0, height, outHeight);
  const tmp = new Float64Array(height * outWidth * c);
  for (let y = 0; y < height; y++) {
    for (let xx = 0; xx < outWidth; xx++) {
      for (let ch = 0; ch < c; ch++) {
        let acc = 0;
        for (let x = 0; x < h.count[xx]; x++) {
          acc += data[(y * width + x + h.start[xx]) * c + ch] * h.weightsF[xx * h.ksize + x];
        }
        tmp[(y * outWidth + xx) * c + ch] = acc;
      }
    }
  }
  const out = new Float64Array(outHeight * outWidth * c);
  const rowLen = outWidth * c;
  for (let yy = 0; yy < outHeight; yy++) {
    for (let i = 0; i < rowLen; i++) {
      let acc = 0;
      for (let y = 0; y < v.count[yy]; y++) acc += tmp[(y + v.start[yy]) * rowLen + i] * v.weightsF[yy * v.ksize + y];
      out[yy * rowLen + i] = acc;
    }
  }
  return out;
}
