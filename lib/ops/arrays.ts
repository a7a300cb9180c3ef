/** Small typed-array helpers shared by the native ops. */
import type { tf } from '../tf';

/** A float32 tensor's values (the backend's own array: read-only by convention). */
export function f32(t: tf.Tensor): Float32Array {
  return t.dataSync() as Float32Array;
}

/** Column sums of a row-major [rows, cols] matrix, accumulated in double. */
export function colSums(g: Float32Array, rows: number, cols: number): Float32Array {
  const s = new Float64Array(cols);
  for (let r = 0, o = 0; r < rows; r++, o += cols) for (let j = 0; j < cols; j++) s[j] += g[o + j];
  return Float32Array.from(s);
}
