/**
 * The original's processed HDF5 datasets: groups train/val/test, each with
 *   imgs    uint8 [N,H,W,C]
 *   masks   uint8 [N,O,H,W,1]   (optional; 255 where entity o is, entity 0 the background)
 *   factors       [N,O,F]       (optional)
 * Batches are read by index, never the whole file (the real files are up to ~30 GB), and become
 * float32 NCHW images in [-1,1] (x/255·2−1, as the original loader does) and masks [B,O,1,H,W].
 */
import { H5File, dtypeKind, NumericArray } from '../io/h5';
import { CLEVR_CROP, PreprocessStyle, PREPROCESS_STYLES, clevrOutputSize, cropHWC, preprocessImage } from './clevr';

export type Split = 'train' | 'val' | 'test';

export interface DatasetOptions {
  split?: Split;
  /** Read masks (required: an error if the file has none). */
  masks?: boolean;
  /** Read factors (required: an error if the file has none). */
  factors?: boolean;
  preprocess?: PreprocessStyle;
}

/** Shapes of what a batch holds, per example. */
export interface DatasetInfo {
  file: string;
  split: Split;
  length: number;
  /** Stored image size. */
  storedHeight: number;
  storedWidth: number;
  /** Image size after preprocessing (what the model sees). */
  channels: number;
  height: number;
  width: number;
  /** Entities per mask (O), or 0 without masks. */
  numEntities: number;
  /** Mask size (the 192×192 crop for CLEVR styles, else the image size). */
  maskHeight: number;
  maskWidth: number;
  /** Factors per entity (F), or 0 without factors. */
  numFactors: number;
  /** Entities the factors describe (O of [N,O,F]), or 0 without factors. */
  factorEntities: number;
  preprocess: PreprocessStyle;
}

export interface Batch {
  /** Dataset indices of the examples, in batch order. */
  indices: Int32Array;
  size: number;
  /** [B,C,H,W] float32 in [-1,1]. */
  images: Float32Array;
  /** [B,O,1,Hm,Wm] uint8, 0 or 255. */
  masks?: Uint8Array;
  /** [B,O,F] float32. */
  factors?: Float32Array;
}

/** The raw rows of one batch as stored (what a reader thread hands over). */
export interface RawBatch {
  indices: Int32Array;
  imgs: Uint8Array;
  masks?: Uint8Array;
  factors?: Float32Array;
}

export class DatasetError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'DatasetError';
  }
}

/** Validates the layout of a split and derives the batch shapes. Shared by both readers. */
export function describeSplit(file: H5File, options: DatasetOptions = {}): DatasetInfo {
  const split = options.split ?? 'train';
  const preprocess = options.preprocess ?? '';
  const where = file.filePath;
  if (!PREPROCESS_STYLES.includes(preprocess)) {
    throw new DatasetError(`unknown preprocessing style '${preprocess}' (known: ${PREPROCESS_STYLES.map((s) => `'${s}'`).join(', ')})`);
  }
  if (!file.isGroup(split)) {
    const groups = file.keys().filter((k) => file.isGroup(k));
    throw new DatasetError(`${where}: no group '${split}' (groups: ${groups.join(', ') || 'none'})`);
  }
  const imgsKey = `${split}/imgs`;
  if (!file.has(imgsKey)) throw new DatasetError(`${where}: no dataset '${imgsKey}'`);
  const imgs = file.info(imgsKey);
  if (imgs.shape.length !== 4) {
    throw new DatasetError(`${where}: '${imgsKey}' has shape [${imgs.shape}], expected [N,H,W,C]`);
  }
  if (dtypeKind(imgs.dtype) !== 'uint8') {
    throw new DatasetError(`${where}: '${imgsKey}' has dtype ${imgs.dtype}, expected uint8`);
  }
  const [n, storedHeight, storedWidth, channels] = imgs.shape;
  if (channels < 1 || channels > 4) {
    throw new DatasetError(`${where}: '${imgsKey}' has ${channels} channels in shape [${imgs.shape}], expected 1-4`);
  }
  const out = clevrOutputSize(preprocess);
  if (out !== undefined) {
    const { top, left, size } = CLEVR_CROP;
    if (storedHeight < top + size || storedWidth < left + size) {
      throw new DatasetError(
        `${where}: '${imgsKey}' images are ${storedHeight}×${storedWidth}; '${preprocess}' crops rows ${top}:${top + size} and columns ${left}:${left + size}`,
      );
    }
  }
  const info: DatasetInfo = {
    file: where,
    split,
    length: n,
    storedHeight,
    storedWidth,
    channels,
    height: out ?? storedHeight,
    width: out ?? storedWidth,
    numEntities: 0,
    maskHeight: out !== undefined ? CLEVR_CROP.size : storedHeight,
    maskWidth: out !== undefined ? CLEVR_CROP.size : storedWidth,
    numFactors: 0,
    factorEntities: 0,
    preprocess,
  };
  if (options.masks) {
    const key = `${split}/masks`;
    if (!file.has(key)) throw new DatasetError(`${where}: no dataset '${key}' (masks were requested)`);
    const m = file.info(key);
    if (m.shape.length !== 5 || m.shape[4] !== 1) {
      throw new DatasetError(`${where}: '${key}' has shape [${m.shape}], expected [N,O,H,W,1]`);
    }
    if (dtypeKind(m.dtype) !== 'uint8') {
      throw new DatasetError(`${where}: '${key}' has dtype ${m.dtype}, expected uint8`);
    }
    if (m.shape[0] !== n || m.shape[2] !== storedHeight || m.shape[3] !== storedWidth) {
      throw new DatasetError(
        `${where}: '${key}' has shape [${m.shape}], which does not match '${imgsKey}' [${imgs.shape}] (N, H and W must agree)`,
      );
    }
    info.numEntities = m.shape[1];
  }
  if (options.factors) {
    const key = `${split}/factors`;
    if (!file.has(key)) throw new DatasetError(`${where}: no dataset '${key}' (factors were requested)`);
    const f = file.info(key);
    if (f.shape.length !== 3 || f.shape[0] !== n) {
      throw new DatasetError(`${where}: '${key}' has shape [${f.shape}], expected [${n},O,F]`);
    }
    if (dtypeKind(f.dtype) === 'other') {
      throw new DatasetError(`${where}: '${key}' has unsupported dtype ${f.dtype}`);
    }
    if (info.numEntities && f.shape[1] !== info.numEntities) {
      throw new DatasetError(`${where}: '${key}' has ${f.shape[1]} entities, '${split}/masks' has ${info.numEntities}`);
    }
    info.numFactors = f.shape[2];
    info.factorEntities = f.shape[1];
  }
  return info;
}

/** Consecutive runs of sorted indices, so that a batch is read with few slice calls. */
export function contiguousRuns(sorted: ArrayLike<number>): Array<[number, number]> {
  const runs: Array<[number, number]> = [];
  for (let i = 0; i < sorted.length; ) {
    let j = i + 1;
    while (j < sorted.length && sorted[j] === sorted[j - 1] + 1) j++;
    runs.push([sorted[i], sorted[j - 1] + 1]);
    i = j;
  }
  return runs;
}

export function checkIndices(info: DatasetInfo, indices: ArrayLike<number>): Int32Array {
  const out = new Int32Array(indices.length);
  for (let i = 0; i < indices.length; i++) {
    const k = indices[i];
    if (!Number.isInteger(k) || k < 0 || k >= info.length) {
      throw new DatasetError(`${info.file}: index ${k} out of range for '${info.split}/imgs' with ${info.length} examples`);
    }
    out[i] = k;
  }
  return out;
}

/** A request for the rows [start, end) of each run, concatenated, from one dataset. */
export interface RowRequest {
  key: string;
  runs: Array<[number, number]>;
}

/** Reads concatenated row runs; in this thread (`H5File`) or in a reader thread. */
export interface RowReader {
  readRuns(requests: RowRequest[]): Promise<NumericArray[]>;
}

export function readRunsFrom(file: H5File, requests: RowRequest[]): NumericArray[] {
  return requests.map(({ key, runs }) => {
    const parts = runs.map(([start, end]) => file.readRows(key, start, end));
    if (parts.length === 1) return parts[0];
    const total = parts.reduce((a, p) => a + p.length, 0);
    const out = new (parts[0].constructor as new (n: number) => NumericArray)(total);
    let at = 0;
    for (const p of parts) {
      out.set(p as never, at);
      at += p.length;
    }
    return out;
  });
}

/**
 * Reads the stored rows for `indices` (any order, repeats allowed), in batch order. Sorted and
 * merged into contiguous runs first: one h5wasm slice per run instead of per example.
 */
export async function readRawBatch(reader: RowReader, info: DatasetInfo, indices: Int32Array): Promise<RawBatch> {
  const unique = Array.from(new Set(indices)).sort((a, b) => a - b);
  const runs = contiguousRuns(unique);
  const rowOf = new Map<number, number>();
  unique.forEach((k, i) => rowOf.set(k, i));

  const pixels = info.storedHeight * info.storedWidth;
  const wanted: Array<{ key: string; rowSize: number; float: boolean }> = [
    { key: `${info.split}/imgs`, rowSize: pixels * info.channels, float: false },
  ];
  if (info.numEntities) wanted.push({ key: `${info.split}/masks`, rowSize: info.numEntities * pixels, float: false });
  if (info.numFactors) wanted.push({ key: `${info.split}/factors`, rowSize: info.factorEntities * info.numFactors, float: true });
  const sortedRows = await reader.readRuns(wanted.map(({ key }) => ({ key, runs })));

  const inBatchOrder = ({ rowSize, float }: (typeof wanted)[number], rows: NumericArray): Uint8Array | Float32Array => {
    const src = float ? (rows instanceof Float32Array ? rows : Float32Array.from(rows)) : rows instanceof Uint8Array ? rows : Uint8Array.from(rows);
    if (src.length !== unique.length * rowSize) {
      throw new DatasetError(`${info.file}: read ${src.length} values, expected ${unique.length} rows of ${rowSize}`);
    }
    const out = float ? new Float32Array(indices.length * rowSize) : new Uint8Array(indices.length * rowSize);
    for (let b = 0; b < indices.length; b++) {
      const r = rowOf.get(indices[b]) as number;
      out.set(src.subarray(r * rowSize, (r + 1) * rowSize) as never, b * rowSize);
    }
    return out;
  };
  const raw: RawBatch = { indices, imgs: inBatchOrder(wanted[0], sortedRows[0]) as Uint8Array };
  wanted.forEach((w, i) => {
    if (i === 0) return;
    if (w.key.endsWith('/masks')) raw.masks = inBatchOrder(w, sortedRows[i]) as Uint8Array;
    else raw.factors = inBatchOrder(w, sortedRows[i]) as Float32Array;
  });
  return raw;
}

/** Turns stored rows into model inputs: preprocessing, NHWC → NCHW, [0,255] → [-1,1]. */
export function assembleBatch(info: DatasetInfo, raw: RawBatch): Batch {
  const B = raw.indices.length;
  const { channels: C, height: H, width: W, storedHeight: SH, storedWidth: SW } = info;
  const images = new Float32Array(B * C * H * W);
  for (let b = 0; b < B; b++) {
    const stored = raw.imgs.subarray(b * SH * SW * C, (b + 1) * SH * SW * C);
    const img = preprocessImage({ data: stored, height: SH, width: SW, channels: C }, info.preprocess).data;
    const base = b * C * H * W;
    for (let p = 0; p < H * W; p++) {
      for (let c = 0; c < C; c++) images[base + c * H * W + p] = (img[p * C + c] / 255) * 2 - 1;
    }
  }
  const batch: Batch = { indices: raw.indices, size: B, images };
  if (raw.masks) {
    const O = info.numEntities;
    if (info.preprocess === '') {
      batch.masks = raw.masks; // [B,O,H,W,1] and [B,O,1,H,W] share one memory layout
    } else {
      const { top, left, size } = CLEVR_CROP;
      const masks = new Uint8Array(B * O * size * size);
      for (let i = 0; i < B * O; i++) {
        const plane = raw.masks.subarray(i * SH * SW, (i + 1) * SH * SW);
        masks.set(cropHWC(plane, SH, SW, 1, top, left, size, size), i * size * size);
      }
      batch.masks = masks;
    }
  }
  if (raw.factors) batch.factors = raw.factors;
  return batch;
}

/** Random access to one split of a processed .h5 file, read in the calling thread. */
export class H5ImageDataset {
  private constructor(
    private readonly file: H5File,
    readonly info: DatasetInfo,
  ) {}

  static async open(filePath: string, options: DatasetOptions = {}): Promise<H5ImageDataset> {
    const file = await H5File.open(filePath, 'r');
    try {
      return new H5ImageDataset(file, describeSplit(file, options));
    } catch (err) {
      file.close();
      throw err;
    }
  }

  get length(): number {
    return this.info.length;
  }

  readRaw(indices: ArrayLike<number>): Promise<RawBatch> {
    const file = this.file;
    return readRawBatch({ readRuns: async (requests) => readRunsFrom(file, requests) }, this.info, checkIndices(this.info, indices));
  }

  async readBatch(indices: ArrayLike<number>): Promise<Batch> {
    return assembleBatch(this.info, await this.readRaw(indices));
  }

  close(): void {
    this.file.close();
  }
}
