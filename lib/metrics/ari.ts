/**
 * Adjusted Rand index (ARI) of predicted slot masks against ground-truth entity masks, batched,
 * over flat typed arrays. It reproduces `adjusted_rand_index` in the original EfficientMORL
 * `lib/metrics.py` (as called by `eval.py`):
 *
 * - Predicted partition: per pixel, the argmax over the K slot masks (the first maximal slot on a
 *   tie, as torch.argmax / numpy.argmax; a NaN counts as maximal, the first NaN wins).
 * - Ground-truth partition: the original does not take an argmax. It replaces every value 255 of
 *   entity i's mask with i and takes the max over entities, so a pixel's label is the largest
 *   entity index whose mask is "on" (255), and 0 (the background) where none is. That is
 *   `trueLabels: 'original'` (the default). On the one-hot 0/255 masks of the datasets this is
 *   the argmax; where masks overlap the original picks the last entity, an argmax the first.
 *   A value that is neither 0 nor the "on" value would become a bogus label in the original;
 *   here it is an error, and soft masks should use `trueLabels: 'argmax'` (first maximal entity).
 * - Foreground ARI (`excludeBackground: true`) drops the pixels whose true label is 0 (the
 *   original zeroes the background column of the one-hot ground truth).
 * - From the contingency table n_ij (true label i, slot j), in float64:
 *     R = sum n_ij (n_ij - 1), A = sum_i a_i (a_i - 1), B = sum_j b_j (b_j - 1), n = sum n_ij,
 *     E = A B / (n (n - 1)),  ARI = (R - E) / ((A + B) / 2 - E).
 *   (the pair counts are doubled throughout, which cancels).
 *
 * Degenerate cases, exactly as the original handles them (`ari[ari != ari] = 0`, then
 * `ari = 1` wherever the contingency table has exactly one non-zero cell):
 * - one cluster on both sides (one non-zero cell; also any image with a single counted pixel): 1.
 * - an empty foreground (every pixel is background, foreground ARI): the table is all zeros,
 *   0/0 is NaN, replaced by 0, and there is no single non-zero cell: 0 (not NaN, not 1).
 * - every counted pixel its own cluster on both sides (A = B = 0): 0/0, so 0.
 * - H*W <= O and H*W <= K (one cluster per pixel is possible) is an error, as in the original.
 *
 * Masks are `[B, N, H, W]`, or with a singleton channel `[B, N, H, W, 1]` or `[B, N, 1, H, W]`:
 * in all three each (image, entity or slot) is one contiguous block of H*W pixels.
 */
import type { NumericArray } from '../io/h5';

/** Any numeric typed array (uint8 0/255 masks, float32 probabilities, ...). */
export type MaskData = NumericArray;

/** A flat batch of masks with its shape: `[B,N,H,W]`, `[B,N,H,W,1]` or `[B,N,1,H,W]`. */
export interface MaskTensor {
  data: MaskData;
  shape: readonly number[];
}

/** The dimensions of a mask batch. */
export interface MaskDims {
  batch: number;
  /** Entities (ground truth, O) or slots (prediction, K). */
  groups: number;
  height: number;
  width: number;
  /** height * width */
  pixels: number;
  /** For `[B,N,1,X,1]`, whose spatial size reads either as 1 x X or X x 1: the other reading. */
  altSize?: [number, number];
}

/** How ground-truth entity masks become one label per pixel. See the module comment. */
export type TrueLabelRule = 'original' | 'argmax';

export interface TrueLabelOptions {
  /** 'original' (default): the largest entity whose mask equals `trueOnValue`, else 0. 'argmax': first maximal entity. */
  trueLabels?: TrueLabelRule;
  /** The value that marks an entity's pixels under the 'original' rule (default 255, as in the datasets). */
  trueOnValue?: number;
}

export interface AriOptions extends TrueLabelOptions {
  /** Foreground ARI: leave out the pixels whose true entity is the background (entity 0). */
  excludeBackground: boolean;
}

export class MetricsError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'MetricsError';
  }
}

export function fmtShape(shape: readonly number[]): string {
  return `[${shape.join(',')}]`;
}

/** Reads and validates the shape of a mask batch; `what` names it in errors. */
export function maskDims(t: MaskTensor, what: string): MaskDims {
  const s = t.shape;
  if (!s || typeof s.length !== 'number') throw new MetricsError(`${what}: missing shape`);
  for (const d of s) {
    if (!Number.isInteger(d) || d < 0) {
      throw new MetricsError(`${what}: shape ${fmtShape(s)} has a dimension that is not a non-negative integer`);
    }
  }
  let height: number;
  let width: number;
  let altSize: [number, number] | undefined;
  if (s.length === 4) {
    height = s[2];
    width = s[3];
  } else if (s.length === 5) {
    if (s[4] === 1) {
      height = s[2];
      width = s[3];
      if (s[2] === 1) altSize = [s[3], s[4]];
    } else if (s[2] === 1) {
      height = s[3];
      width = s[4];
    } else {
      throw new MetricsError(
        `${what}: shape ${fmtShape(s)} is 5-d without a singleton channel; expected [B,N,H,W], [B,N,H,W,1] or [B,N,1,H,W]`,
      );
    }
  } else {
    throw new MetricsError(
      `${what}: shape ${fmtShape(s)} has rank ${s.length}; expected [B,N,H,W], [B,N,H,W,1] or [B,N,1,H,W]`,
    );
  }
  const batch = s[0];
  const groups = s[1];
  if (groups < 1) throw new MetricsError(`${what}: shape ${fmtShape(s)} has no entities/slots`);
  if (height < 1 || width < 1) throw new MetricsError(`${what}: shape ${fmtShape(s)} has an empty image`);
  if (!ArrayBuffer.isView(t.data)) throw new MetricsError(`${what}: data is not a typed array`);
  const n = batch * groups * height * width;
  if (t.data.length !== n) {
    throw new MetricsError(`${what}: data has ${t.data.length} values, shape ${fmtShape(s)} needs ${n}`);
  }
  return { batch, groups, height, width, pixels: height * width, altSize };
}

function sameSize(a: MaskDims, b: MaskDims): boolean {
  const as: [number, number][] = [[a.height, a.width]];
  if (a.altSize) as.push(a.altSize);
  const bs: [number, number][] = [[b.height, b.width]];
  if (b.altSize) bs.push(b.altSize);
  return as.some(([h, w]) => bs.some(([h2, w2]) => h === h2 && w === w2));
}

/** Validates a (true, predicted) pair of mask batches: same batch size and image size. */
export function checkMaskPair(
  trueMasks: MaskTensor,
  predMasks: MaskTensor,
  fn: string,
): { t: MaskDims; p: MaskDims } {
  const t = maskDims(trueMasks, `${fn}: true masks`);
  const p = maskDims(predMasks, `${fn}: predicted masks`);
  if (t.batch !== p.batch) {
    throw new MetricsError(
      `${fn}: true masks shape ${fmtShape(trueMasks.shape)} and predicted masks shape ${fmtShape(predMasks.shape)} ` +
        `have different batch sizes (${t.batch} vs ${p.batch})`,
    );
  }
  if (!sameSize(t, p)) {
    throw new MetricsError(
      `${fn}: true masks shape ${fmtShape(trueMasks.shape)} and predicted masks shape ${fmtShape(predMasks.shape)} ` +
        `have different image sizes (${t.height}x${t.width} vs ${p.height}x${p.width})`,
    );
  }
  return { t, p };
}

/**
 * Per pixel of image `b`, the index of the first maximal mask among `groups` (NaN counts as
 * maximal). Writes `pixels` labels into `out`.
 */
export function argmaxLabelsInto(
  data: MaskData,
  b: number,
  groups: number,
  pixels: number,
  out: Int32Array,
): void {
  const base = b * groups * pixels;
  for (let p = 0; p < pixels; p++) {
    let best = data[base + p];
    let idx = 0;
    for (let k = 1, q = base + pixels + p; k < groups; k++, q += pixels) {
      const v = data[q];
      // v > best, or v is the first NaN (NaN beats every number and keeps its place).
      if (v > best || (v !== v && best === best)) {
        best = v;
        idx = k;
      }
    }
    out[p] = idx;
  }
}

/** Ground-truth labels of image `b` under `rule` (see TrueLabelOptions), into `out`. */
export function trueLabelsInto(
  data: MaskData,
  b: number,
  groups: number,
  pixels: number,
  out: Int32Array,
  options: TrueLabelOptions,
  what: string,
): void {
  const rule = options.trueLabels ?? 'original';
  if (rule === 'argmax') {
    argmaxLabelsInto(data, b, groups, pixels, out);
    return;
  }
  if (rule !== 'original') throw new MetricsError(`${what}: unknown trueLabels rule '${String(rule)}'`);
  const on = options.trueOnValue ?? 255;
  const base = b * groups * pixels;
  out.fill(0, 0, pixels);
  for (let o = 0; o < groups; o++) {
    const off = base + o * pixels;
    for (let p = 0; p < pixels; p++) {
      const v = data[off + p];
      if (v === on) out[p] = o;
      else if (v !== 0) {
        throw new MetricsError(
          `${what}: value ${v} (image ${b}, entity ${o}, pixel ${p}) is neither 0 nor ${on}; the original ` +
            `ground-truth rule needs binary masks (set trueOnValue, or use trueLabels: 'argmax' for soft masks)`,
        );
      }
    }
  }
}

/**
 * Contingency tables: `[B, O, K]` float64 counts of pixels with true label o and predicted
 * slot k (all pixels, background row included).
 */
export function contingencyTables(
  trueMasks: MaskTensor,
  predMasks: MaskTensor,
  options: TrueLabelOptions = {},
): { data: Float64Array; shape: [number, number, number] } {
  const { t, p } = checkMaskPair(trueMasks, predMasks, 'contingencyTables');
  return { data: buildTables(trueMasks, predMasks, t, p, options, 'contingencyTables'), shape: [t.batch, t.groups, p.groups] };
}

function buildTables(
  trueMasks: MaskTensor,
  predMasks: MaskTensor,
  t: MaskDims,
  p: MaskDims,
  options: TrueLabelOptions,
  fn: string,
): Float64Array {
  const O = t.groups;
  const K = p.groups;
  const P = t.pixels;
  const tables = new Float64Array(t.batch * O * K);
  const tl = new Int32Array(P);
  const pl = new Int32Array(P);
  const counts = new Int32Array(O * K);
  for (let b = 0; b < t.batch; b++) {
    trueLabelsInto(trueMasks.data, b, O, P, tl, options, `${fn}: true masks`);
    argmaxLabelsInto(predMasks.data, b, K, P, pl);
    counts.fill(0);
    for (let i = 0; i < P; i++) counts[tl[i] * K + pl[i]]++;
    tables.set(counts, b * O * K);
  }
  return tables;
}

/**
 * ARI from one O x K contingency table stored row-major at `table[offset ...]`; with
 * `excludeFirstRow` the first row (the background) is left out. Degenerate cases as in the
 * module comment. `colScratch` (length >= cols) avoids an allocation per call.
 */
export function ariFromContingency(
  table: ArrayLike<number>,
  rows: number,
  cols: number,
  excludeFirstRow = false,
  offset = 0,
  colScratch?: Float64Array,
): number {
  const colSums = colScratch ?? new Float64Array(cols);
  colSums.fill(0, 0, cols);
  let n = 0;
  let rIndex = 0;
  let aIndex = 0;
  let nonZero = 0;
  for (let o = excludeFirstRow ? 1 : 0; o < rows; o++) {
    let rowSum = 0;
    const off = offset + o * cols;
    for (let k = 0; k < cols; k++) {
      const c = table[off + k];
      if (c !== 0) {
        rIndex += c * (c - 1);
        rowSum += c;
        colSums[k] += c;
        nonZero++;
      }
    }
    aIndex += rowSum * (rowSum - 1);
    n += rowSum;
  }
  // The original: exactly one non-zero cell (one cluster on both sides) gives 1.
  if (nonZero === 1) return 1;
  let bIndex = 0;
  for (let k = 0; k < cols; k++) bIndex += colSums[k] * (colSums[k] - 1);
  const expected = (aIndex * bIndex) / (n * (n - 1));
  const maxIndex = (aIndex + bIndex) / 2;
  const ari = (rIndex - expected) / (maxIndex - expected);
  // The original replaces NaN (0/0: empty table, or all singletons) with 0.
  return ari !== ari ? 0 : ari;
}

function checkEnoughPixels(t: MaskDims, p: MaskDims, fn: string): void {
  if (t.pixels <= t.groups && t.pixels <= p.groups) {
    throw new MetricsError(
      `${fn}: ${t.pixels} pixels per image with ${t.groups} entities and ${p.groups} slots; the ARI needs more ` +
        `pixels than groups (one cluster per pixel is not handled, as in the original)`,
    );
  }
}

/**
 * Per-image ARI `[B]` (float64) of the argmax partition of `predMasks` `[B,K,H,W]` against the
 * ground truth of `trueMasks` `[B,O,H,W]` (entity 0 = background); singleton channels allowed.
 */
export function adjustedRandIndex(trueMasks: MaskTensor, predMasks: MaskTensor, options: AriOptions): Float64Array {
  if (!options || typeof options.excludeBackground !== 'boolean') {
    throw new MetricsError('adjustedRandIndex: options.excludeBackground (boolean) is required');
  }
  const r = computeAri(trueMasks, predMasks, options, 'adjustedRandIndex');
  return options.excludeBackground ? r.foreground : r.withBackground;
}

/** Both ARIs at once (one pass over the masks): foreground (background excluded) and with background. */
export function adjustedRandIndices(
  trueMasks: MaskTensor,
  predMasks: MaskTensor,
  options: TrueLabelOptions = {},
): { foreground: Float64Array; withBackground: Float64Array } {
  return computeAri(trueMasks, predMasks, options, 'adjustedRandIndices');
}

function computeAri(
  trueMasks: MaskTensor,
  predMasks: MaskTensor,
  options: TrueLabelOptions,
  fn: string,
): { foreground: Float64Array; withBackground: Float64Array } {
  const { t, p } = checkMaskPair(trueMasks, predMasks, fn);
  checkEnoughPixels(t, p, fn);
  const tables = buildTables(trueMasks, predMasks, t, p, options, fn);
  const O = t.groups;
  const K = p.groups;
  const foreground = new Float64Array(t.batch);
  const withBackground = new Float64Array(t.batch);
  const scratch = new Float64Array(K);
  for (let b = 0; b < t.batch; b++) {
    foreground[b] = ariFromContingency(tables, O, K, true, b * O * K, scratch);
    withBackground[b] = ariFromContingency(tables, O, K, false, b * O * K, scratch);
  }
  return { foreground, withBackground };
}

/**
 * ARI of two label maps `[B, P]` (integers in [0, numTrue) and [0, numPred)), for callers that
 * already hold partitions. `excludeBackground` drops the pixels whose true label is 0.
 */
export function adjustedRandIndexFromLabels(
  trueLabels: ArrayLike<number>,
  predLabels: ArrayLike<number>,
  batch: number,
  numTrue: number,
  numPred: number,
  excludeBackground: boolean,
): Float64Array {
  const fn = 'adjustedRandIndexFromLabels';
  if (!Number.isInteger(batch) || batch < 0 || !Number.isInteger(numTrue) || numTrue < 1 || !Number.isInteger(numPred) || numPred < 1) {
    throw new MetricsError(`${fn}: bad sizes batch=${batch}, numTrue=${numTrue}, numPred=${numPred}`);
  }
  if (trueLabels.length !== predLabels.length || (batch > 0 && trueLabels.length % batch !== 0)) {
    throw new MetricsError(
      `${fn}: ${trueLabels.length} true and ${predLabels.length} predicted labels for a batch of ${batch}`,
    );
  }
  const P = batch > 0 ? trueLabels.length / batch : 0;
  const out = new Float64Array(batch);
  const table = new Float64Array(numTrue * numPred);
  const scratch = new Float64Array(numPred);
  for (let b = 0; b < batch; b++) {
    table.fill(0);
    for (let i = b * P; i < (b + 1) * P; i++) {
      const a = trueLabels[i];
      const c = predLabels[i];
      if (!(Number.isInteger(a) && a >= 0 && a < numTrue && Number.isInteger(c) && c >= 0 && c < numPred)) {
        throw new MetricsError(`${fn}: label pair (${a}, ${c}) at ${i} is out of range [0,${numTrue}) x [0,${numPred})`);
      }
      table[a * numPred + c]++;
    }
    out[b] = ariFromContingency(table, numTrue, numPred, excludeBackground, 0, scratch);
  }
  return out;
}
