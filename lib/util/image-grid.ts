/**
 * Tiles images into one picture for logs and reports: rows × columns of [C,H,W] float images in
 * [0,1] (C = 1 or 3), separated by a border, as an HWC uint8 RGB image.
 */
export interface GridImage {
  data: Uint8Array;
  height: number;
  width: number;
  channels: 3;
}

/**
 * `images` holds rows·cols images of [C,H,W] one after another (row-major over the grid); values
 * are clamped to [0,1]. Grey images are repeated over RGB.
 */
export function imageGrid(images: Float32Array, rows: number, cols: number, C: number, H: number, W: number, border = 1, borderValue = 255): GridImage {
  if (C !== 1 && C !== 3) throw new Error(`imageGrid: images must have 1 or 3 channels, got ${C}`);
  if (images.length !== rows * cols * C * H * W) {
    throw new Error(`imageGrid: ${images.length} values for ${rows}×${cols} images of [${C},${H},${W}]`);
  }
  const height = rows * H + (rows + 1) * border;
  const width = cols * W + (cols + 1) * border;
  const out = new Uint8Array(height * width * 3).fill(borderValue);
  for (let r = 0; r < rows; r++) {
    for (let c = 0; c < cols; c++) {
      const base = (r * cols + c) * C * H * W;
      const top = border + r * (H + border);
      const left = border + c * (W + border);
      for (let y = 0; y < H; y++) {
        for (let x = 0; x < W; x++) {
          const o = ((top + y) * width + left + x) * 3;
          for (let ch = 0; ch < 3; ch++) {
            const v = images[base + (C === 1 ? 0 : ch) * H * W + y * W + x];
            out[o + ch] = Math.round(Math.min(1, Math.max(0, Number.isFinite(v) ? v : 0)) * 255);
          }
        }
      }
    }
  }
  return { data: out, height, width, channels: 3 };
}
