/** Small typed-array helpers shared by the native ops. */
import type { tf } from '../tf';
import { hostCurrent } from './resident';

/** A float32 tensor's values (the backend's own array: read-only by convention), current on the host. */
export function f32(t: tf.Tensor): Float32Array {
  return hostCurrent(t).dataSync() as Float32Array;
}

/** Column sums of a row-major [rows, cols] matrix, accumulated in double. */
export function colSums(g: Float32Array, rows: number, cols: number): Float32Array {
  const s = new Float64Array(cols);
  for (let r = 0, o = 0; r < rows; r++, o += cols) for (let j = 0; j < cols; j++) s[j] += g[o + j];
  return Float32Array.from(s);
}

/**
 * Row-major [rows, w_k] arrays side by side, one [rows, Σ w_k] array: tf.concat on the last axis.
 * (Plain loops: at these widths, copying runs with subarray + set costs more than the copy.)
 */
export function joinColumns(parts: Float32Array[], widths: number[], rows: number): Float32Array {
  const D = widths.reduce((a, b) => a + b, 0);
  const out = new Float32Array(rows * D);
  let c0 = 0;
  parts.forEach((v, k) => {
    const w = widths[k];
    for (let i = 0, src = 0, dst = c0; i < rows; i++, dst += D) for (let j = 0; j < w; j++) out[dst + j] = v[src++];
    c0 += w;
  });
  return out;
}

/** joinColumns' inverse: a row-major [rows, Σ w_k] array cut into its [rows, w_k] parts. */
export function cutColumns(whole: Float32Array, widths: number[], rows: number): Float32Array[] {
  const D = widths.reduce((a, b) => a + b, 0);
  let c0 = 0;
  return widths.map((w) => {
    const part = new Float32Array(rows * w);
    for (let i = 0, dst = 0, src = c0; i < rows; i++, src += D) for (let j = 0; j < w; j++) part[dst++] = whole[src + j];
    c0 += w;
    return part;
  });
}
