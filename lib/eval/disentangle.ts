/**
 * The original eval.py's disentanglement evaluations on per-slot latents: for EfficientMORL
 * samples of the final posterior q(z; λ^(L,I)), for Slot Attention the slots (see eval-model.ts):
 *   disentanglement_preprocessing  per latent dimension, the min and max of the latents over
 *                                  the slots of 100 images → z_range.txt ("min,max" per line)
 *   activeness                     per image (100), a random slot: per dimension, the pixel variance
 *                                  (unbiased, over 6 values spanning z_range) of the decoded image,
 *                                  averaged over pixels → activeness.h5 / activeness.csv [N, z]
 *   disentanglement_viz            per image, slot test.disentangle_slot: each dimension swept over 8
 *                                  values → disentanglement.h5 and one PNG per image (row = dimension)
 * The sweep range of disentanglement_viz follows the original exactly, including its "midpoint"
 * (upper − lower)/2 and its square-root narrowing.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { H5ImageDataset } from '../data/dataset';
import { H5File } from '../io/h5';
import { tf } from '../tf';
import { imageGrid } from '../util/image-grid';
import { encodePng } from '../util/png';
import { Rng } from '../util/rng';
import type { EvalModel } from './eval-model';
import { encodeGif } from './gif';

export const DISENTANGLEMENT_IMAGES = 100;
export const ACTIVENESS_STEPS = 6;
export const VIZ_STEPS = 8;

export interface DisentangleContext {
  model: EvalModel;
  ds: H5ImageDataset;
  batchSize: number;
  /** images to process */
  n: number;
  seed: number;
  out: string;
  slot: number;
  onProgress?: (done: number) => void;
  log: (m: string) => void;
}

/** The model's per-slot latents z [B·K, z] (see EvalModel.latents) for images [start, start+B). */
async function slotLatents(ctx: DisentangleContext, start: number, B: number, rng: Rng): Promise<{ z: Float32Array; images01: Float32Array }> {
  const [C, H, W] = ctx.model.cfg.input_size;
  const batch = await ctx.ds.readBatch(Array.from({ length: B }, (_, i) => start + i));
  const x = tf.tensor4d(batch.images, [B, C, H, W]);
  try {
    return { z: ctx.model.latents(x, rng), images01: batch.images.map((v) => (v + 1) / 2) };
  } finally {
    x.dispose();
  }
}

/** The shortest decimal that reads back as the same float32 (numpy's float32 printing). */
export function float32String(v: number): string {
  const f = Math.fround(v);
  for (let p = 1; p <= 9; p++) {
    const s = Number(f.toPrecision(p));
    if (Math.fround(s) === f) return String(s);
  }
  return String(f);
}

export function readZRange(file: string, Z: number): { lower: number[]; upper: number[] } {
  if (!fs.existsSync(file)) throw new Error(`${file}: no such file (run --type disentanglement_preprocessing first)`);
  const lines = fs.readFileSync(file, 'utf8').trim().split('\n');
  if (lines.length < Z) throw new Error(`${file}: ${lines.length} lines for ${Z} latent dimensions`);
  const lower: number[] = [];
  const upper: number[] = [];
  lines.slice(0, Z).forEach((l, j) => {
    const [a, b] = l.split(',').map(Number);
    if (!Number.isFinite(a) || !Number.isFinite(b)) throw new Error(`${file}:${j + 1}: expected "min,max", got ${JSON.stringify(l)}`);
    lower.push(a);
    upper.push(b);
  });
  return { lower, upper };
}

/** torch.linspace(a, b, n) in float32. */
function linspace(a: number, b: number, n: number): number[] {
  return Array.from({ length: n }, (_, i) => Math.fround(n === 1 ? a : a + ((b - a) * i) / (n - 1)));
}

export async function preprocessing(ctx: DisentangleContext): Promise<string[]> {
  const { K, z_size: Z } = ctx.model.cfg;
  const rng = new Rng(ctx.seed);
  const n = Math.min(ctx.n, DISENTANGLEMENT_IMAGES);
  const mins = new Float32Array(Z).fill(Infinity);
  const maxs = new Float32Array(Z).fill(-Infinity);
  for (let start = 0; start < n; start += ctx.batchSize) {
    const B = Math.min(ctx.batchSize, n - start);
    const { z } = await slotLatents(ctx, start, B, rng);
    for (let r = 0; r < B * K; r++)
      for (let j = 0; j < Z; j++) {
        const v = z[r * Z + j];
        if (v < mins[j]) mins[j] = v;
        if (v > maxs[j]) maxs[j] = v;
      }
    ctx.onProgress?.(start + B);
  }
  const file = path.join(ctx.out, 'z_range.txt');
  fs.writeFileSync(file, Array.from(mins, (m, j) => `${float32String(m)},${float32String(maxs[j])}\n`).join(''));
  ctx.log(`z_range.txt: the range of ${Z} latent dimensions over the slots of ${n} images`);
  return [file];
}

async function ensureZRange(ctx: DisentangleContext): Promise<{ lower: number[]; upper: number[]; files: string[] }> {
  const file = path.join(ctx.out, 'z_range.txt');
  let files: string[] = [];
  if (!fs.existsSync(file)) {
    ctx.log(`${file} is missing: running disentanglement_preprocessing first`);
    files = await preprocessing({ ...ctx, onProgress: undefined });
  }
  return { ...readZRange(file, ctx.model.cfg.z_size), files };
}

export async function activeness(ctx: DisentangleContext): Promise<string[]> {
  const { K, z_size: Z } = ctx.model.cfg;
  const [C, H, W] = ctx.model.cfg.input_size;
  const P = C * H * W;
  const { lower, upper, files } = await ensureZRange(ctx);
  const rng = new Rng(ctx.seed);
  const slotRng = new Rng(ctx.seed + 1);
  const n = Math.min(ctx.n, DISENTANGLEMENT_IMAGES);
  const all = new Float32Array(n * Z);
  const slots: number[] = [];
  const S = ACTIVENESS_STEPS;
  for (let start = 0; start < n; start += ctx.batchSize) {
    const B = Math.min(ctx.batchSize, n - start);
    const { z } = await slotLatents(ctx, start, B, rng);
    for (let b = 0; b < B; b++) {
      const slot = slotRng.int(K);
      slots.push(slot);
      // every (dimension, step) variant of this image's slots, decoded in one pass per dimension
      for (let j = 0; j < Z; j++) {
        const vals = linspace(lower[j], upper[j], S);
        const zs = new Float32Array(S * K * Z);
        for (let s = 0; s < S; s++) {
          zs.set(z.subarray(b * K * Z, (b + 1) * K * Z), s * K * Z);
          zs[(s * K + slot) * Z + j] = vals[s];
        }
        const { images } = ctx.model.decodeScenes(zs, S);
        let acc = 0;
        for (let p = 0; p < P; p++) {
          let m = 0;
          for (let s = 0; s < S; s++) m += images[s * P + p];
          m /= S;
          let v = 0;
          for (let s = 0; s < S; s++) v += (images[s * P + p] - m) ** 2;
          acc += v / (S - 1);
        }
        all[(start + b) * Z + j] = acc / P;
      }
    }
    ctx.onProgress?.(start + B);
  }
  const h5file = path.join(ctx.out, 'activeness.h5');
  const h5 = await H5File.open(h5file, 'w');
  try {
    h5.write('activeness', all, [n, Z], 'float32');
    h5.write('slot', Int32Array.from(slots), [n], 'int32');
  } finally {
    h5.close();
  }
  const csv = path.join(ctx.out, 'activeness.csv');
  const rows: string[] = [];
  for (let i = 0; i < n; i++) rows.push(Array.from(all.subarray(i * Z, (i + 1) * Z), float32String).join(','));
  fs.writeFileSync(csv, rows.join('\n') + '\n');
  const mean = Array.from({ length: Z }, (_, j) => {
    let s = 0;
    for (let i = 0; i < n; i++) s += all[i * Z + j];
    return s / n;
  });
  const top = mean.map((v, j) => [v, j]).sort((a, b) => b[0] - a[0]).slice(0, 10).map(([, j]) => j);
  ctx.log(`activeness over ${n} images; most active latent dimensions: ${top.join(', ')}`);
  return [...files, h5file, csv];
}

export async function disentanglementViz(ctx: DisentangleContext): Promise<string[]> {
  const { K, z_size: Z } = ctx.model.cfg;
  const [C, H, W] = ctx.model.cfg.input_size;
  const P = C * H * W;
  const slot = ctx.slot;
  if (slot < 0 || slot >= K) throw new Error(`test.disentangle_slot ${slot} is not a slot (K = ${K})`);
  const { lower, upper, files } = await ensureZRange(ctx);
  const rng = new Rng(ctx.seed);
  const S = VIZ_STEPS;
  // the original's sweep: "midpoint" (upper − lower)/2, then ± the square root of the distances
  const sweeps = lower.map((lo, j) => {
    const mid = (upper[j] - lo) / 2;
    return linspace(mid - Math.sqrt(Math.abs(mid - lo)), mid + Math.sqrt(Math.abs(upper[j] - mid)), S);
  });
  const dir = path.join(ctx.out, 'disentanglement');
  fs.mkdirSync(dir, { recursive: true });
  const h5file = path.join(ctx.out, 'disentanglement.h5');
  const h5 = await H5File.open(h5file, 'w');
  const out = [...files, h5file];
  try {
    h5.createRowDataset('images', [Z, S, H, W, C], 'float32');
    h5.createRowDataset('ground_truth', [H, W, C], 'float32');
    h5.createRowDataset('masks', [K, H, W, 1], 'float32');
    h5.setAttr('', 'slot', slot);
    h5.setAttr('', 'sweeps', sweeps);
    const hwc = (src: Float32Array) => {
      const o = new Float32Array(P);
      for (let c = 0; c < C; c++) for (let p = 0; p < H * W; p++) o[p * C + c] = src[c * H * W + p];
      return o;
    };
    for (let start = 0; start < ctx.n; start += ctx.batchSize) {
      const B = Math.min(ctx.batchSize, ctx.n - start);
      const { z, images01 } = await slotLatents(ctx, start, B, rng);
      for (let b = 0; b < B; b++) {
        const grid = new Float32Array(Z * S * P);
        let lastMasks = new Float32Array(0);
        for (let j = 0; j < Z; j++) {
          const zs = new Float32Array(S * K * Z);
          for (let s = 0; s < S; s++) {
            zs.set(z.subarray(b * K * Z, (b + 1) * K * Z), s * K * Z);
            zs[(s * K + slot) * Z + j] = sweeps[j][s];
          }
          const { images, masks } = ctx.model.decodeScenes(zs, S);
          grid.set(images, j * S * P);
          lastMasks = masks.slice((S - 1) * K * H * W);
        }
        const idx = start + b;
        const rows = new Float32Array(Z * S * P);
        for (let i = 0; i < Z * S; i++) rows.set(hwc(grid.subarray(i * P, (i + 1) * P)), i * P);
        h5.appendRows('images', rows);
        h5.appendRows('ground_truth', hwc(images01.subarray(b * P, (b + 1) * P)));
        h5.appendRows('masks', lastMasks);
        const g = imageGrid(grid, Z, S, C, H, W, 2);
        const png = path.join(dir, `slot_${slot}_image_${String(idx).padStart(4, '0')}.png`);
        fs.writeFileSync(png, encodePng(g.data, g.height, g.width, g.channels));
        out.push(png);
      }
      ctx.onProgress?.(start + B);
    }
  } finally {
    h5.close();
  }
  ctx.log(`disentanglement_viz: slot ${slot}, ${Z} latent dimensions × ${S} values per image`);
  return out;
}

export const GIF_TOP_DIMS = 10;

/**
 * make_gifs: preprocessing and activeness over (at most) 100 images, then for the last processed
 * image and every slot, one looping GIF (8 frames, 4 per second) per most active latent dimension
 * (the top 10 by mean activeness), sweeping it as disentanglement_viz does: slot_S_row_R.gif, where
 * row R is the R-th most active dimension (gifs.json lists them).
 */
export async function makeGifs(ctx: DisentangleContext): Promise<string[]> {
  const { K, z_size: Z } = ctx.model.cfg;
  const [C, H, W] = ctx.model.cfg.input_size;
  const files = await preprocessing({ ...ctx, onProgress: undefined });
  files.push(...(await activeness({ ...ctx, onProgress: undefined })));
  const act = fs
    .readFileSync(path.join(ctx.out, 'activeness.csv'), 'utf8')
    .trim()
    .split('\n')
    .map((l) => l.split(',').map(Number));
  const mean = Array.from({ length: Z }, (_, j) => act.reduce((s, row) => s + row[j], 0) / act.length);
  const rows = mean
    .map((v, j) => [v, j])
    .sort((a, b) => b[0] - a[0] || b[1] - a[1])
    .slice(0, Math.min(GIF_TOP_DIMS, Z))
    .map(([, j]) => j);
  const { lower, upper } = readZRange(path.join(ctx.out, 'z_range.txt'), Z);
  const S = VIZ_STEPS;
  const sweeps = lower.map((lo, j) => {
    const mid = (upper[j] - lo) / 2;
    return linspace(mid - Math.sqrt(Math.abs(mid - lo)), mid + Math.sqrt(Math.abs(upper[j] - mid)), S);
  });
  const idx = ctx.n - 1;
  const { z } = await slotLatents(ctx, idx, 1, new Rng(ctx.seed + 2));
  const dir = path.join(ctx.out, 'gifs');
  fs.mkdirSync(dir, { recursive: true });
  for (let slot = 0; slot < K; slot++) {
    rows.forEach((j, r) => {
      const zs = new Float32Array(S * K * Z);
      for (let s = 0; s < S; s++) {
        zs.set(z, s * K * Z);
        zs[(s * K + slot) * Z + j] = sweeps[j][s];
      }
      const { images } = ctx.model.decodeScenes(zs, S);
      const frames = Array.from({ length: S }, (_, s) => {
        const f = new Uint8Array(H * W * 3);
        for (let p = 0; p < H * W; p++)
          for (let c = 0; c < 3; c++) f[p * 3 + c] = Math.round(Math.min(1, Math.max(0, images[(s * C + (C === 1 ? 0 : c)) * H * W + p])) * 255);
        return f;
      });
      const file = path.join(dir, `slot_${slot}_row_${r}.gif`);
      fs.writeFileSync(file, encodeGif(frames, H, W, 25));
      files.push(file);
    });
    ctx.onProgress?.(slot + 1);
  }
  const meta = path.join(ctx.out, 'gifs.json');
  fs.writeFileSync(meta, JSON.stringify({ image: idx, top_dims: rows, mean_activeness: mean, sweeps }, null, 2));
  files.push(meta);
  ctx.log(`make_gifs: ${K} slots × ${rows.length} most active dimensions (${rows.join(', ')}) of image ${idx}`);
  return files;
}
