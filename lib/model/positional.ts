/**
 * The positional embedding of the original (SlotAttention.create_positional_embedding): four
 * channels of linear ramps over an h×w grid. Channel 0 falls from 1 to 0 down the rows, channel 1
 * rises down the rows, channels 2 and 3 rise and fall along the columns.
 *
 * The original builds it as a [w, h, 4] tensor and adds it to [h, w] maps, which only works for
 * square images; for non-square ones we keep the same meaning per axis (rows get the first two
 * channels, with h points; columns the last two, with w points).
 */

/** torch.linspace(start, end, n) in float32 (symmetric evaluation, as PyTorch's CPU kernel). */
export function linspace(start: number, end: number, n: number): Float32Array {
  const out = new Float32Array(n);
  if (n === 1) {
    out[0] = start;
    return out;
  }
  const step = Math.fround((end - start) / (n - 1));
  const half = Math.floor(n / 2);
  for (let i = 0; i < n; i++) out[i] = i < half ? start + i * step : end - (n - 1 - i) * step;
  return out;
}

/** [h, w, 4] row-major. */
export function positionalEmbedding(h: number, w: number): Float32Array {
  const rowsDown = linspace(1, 0, h);
  const rowsUp = linspace(0, 1, h);
  const colsUp = linspace(0, 1, w);
  const colsDown = linspace(1, 0, w);
  const out = new Float32Array(h * w * 4);
  for (let r = 0; r < h; r++) {
    for (let c = 0; c < w; c++) {
      const o = (r * w + c) * 4;
      out[o] = rowsDown[r];
      out[o + 1] = rowsUp[r];
      out[o + 2] = colsUp[c];
      out[o + 3] = colsDown[c];
    }
  }
  return out;
}
