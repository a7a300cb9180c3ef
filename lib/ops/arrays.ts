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
 * a and b [rows, cols] side by side as one [rows, 2·cols] array: how a custom op with two outputs
 * returns them (tfjs' customGrad takes one).
 */
export function sideBySide(a: Float32Array, b: Float32Array, rows: number, cols: number): Float32Array {
  const out = new Float32Array(rows * 2 * cols);
  for (let r = 0; r < rows; r++) {
    out.set(a.subarray(r * cols, (r + 1) * cols), r * 2 * cols);
    out.set(b.subarray(r * cols, (r + 1) * cols), r * 2 * cols + cols);
  }
  return out;
}

/** sideBySide's inverse: [rows, 2·cols] back to its two [rows, cols] halves (an output's gradient). */
export function splitSideBySide(g: Float32Array, rows: number, cols: number): [Float32Array, Float32Array] {
  const a = new Float32Array(rows * cols), b = new Float32Array(rows * cols);
  for (let r = 0; r < rows; r++) {
    a.set(g.subarray(r * 2 * cols, r * 2 * cols + cols), r * cols);
    b.set(g.subarray(r * 2 * cols + cols, (r + 1) * 2 * cols), r * cols);
  }
  return [a, b];
}
