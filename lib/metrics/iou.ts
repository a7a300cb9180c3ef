/**
 * IoU between ground-truth object masks and predicted slot masks, and the optimal one-to-one
 * matching of objects to slots by IoU (maximised with `linearSumAssignment`), per image.
 *
 * Binarisation:
 * - predictions: 'argmax' (default; each pixel belongs to its first maximal slot, as for the
 *   ARI) or `{ threshold }` (slot k covers the pixels where its mask is > threshold; slots may
 *   then overlap);
 * - ground truth: 'labels' (default; entity o covers the pixels whose true label is o under the
 *   same rule as the ARI, see `TrueLabelOptions`) or `{ threshold }` (mask value > threshold).
 * IoU = |T ∩ P| / |T ∪ P|, and 0 where the union is empty.
 *
 * `matchByIou` follows the protocol of the original's `matching_iou` (used for its DCI
 * evaluation): the background (entity 0) is not matched, absent objects (`presence` 0) are
 * skipped, objects with fewer than `minTruePixels` pixels are skipped (the original: 50), the
 * assignment maximises the total IoU, and pairs with IoU below `minIou` are dropped (the
 * original: 0.1). The defaults (minTruePixels 1, minIou 0) only skip empty objects. Unlike the
 * original, skipped objects are left out of the assignment instead of entering it as rows of
 * -1e6 (the optimal IoU of the others is the same), and more objects than slots is allowed.
 */
import {
  MetricsError,
  argmaxLabelsInto,
  checkMaskPair,
  fmtShape,
  trueLabelsInto,
  type MaskDims,
  type MaskTensor,
  type TrueLabelOptions,
} from './ari';
import { linearSumAssignment } from './hungarian';

export type PredBinarize = 'argmax' | { threshold: number };
export type TrueBinarize = 'labels' | { threshold: number };

export interface IouOptions extends TrueLabelOptions {
  /** How slot masks become binary (default 'argmax'). */
  pred?: PredBinarize;
  /** How entity masks become binary (default 'labels'). */
  truth?: TrueBinarize;
}

export interface IouMatrices {
  /** `[B, O, K]` IoU of entity o and slot k in image b. */
  data: Float64Array;
  shape: [number, number, number];
  /** `[B, O]` pixel count of each binarised entity mask. */
  truePixels: Float64Array;
  /** `[B, K]` pixel count of each binarised slot mask. */
  predPixels: Float64Array;
}

function checkThreshold(x: { threshold: number }, what: string): number {
  if (typeof x !== 'object' || x === null || typeof x.threshold !== 'number' || Number.isNaN(x.threshold)) {
    throw new MetricsError(`${what}: expected 'argmax'/'labels' or { threshold: number }`);
  }
  return x.threshold;
}

/** Per-image IoU matrices between binarised entity masks and binarised slot masks. */
export function iouMatrix(trueMasks: MaskTensor, predMasks: MaskTensor, options: IouOptions = {}): IouMatrices {
  const { t, p } = checkMaskPair(trueMasks, predMasks, 'iouMatrix');
  return computeIou(trueMasks, predMasks, t, p, options, 'iouMatrix');
}

function computeIou(
  trueMasks: MaskTensor,
  predMasks: MaskTensor,
  t: MaskDims,
  p: MaskDims,
  options: IouOptions,
  fn: string,
): IouMatrices {
  const O = t.groups;
  const K = p.groups;
  const P = t.pixels;
  const B = t.batch;
  const predMode = options.pred ?? 'argmax';
  const trueMode = options.truth ?? 'labels';
  const predThr = predMode === 'argmax' ? 0 : checkThreshold(predMode, `${fn}: options.pred`);
  const trueThr = trueMode === 'labels' ? 0 : checkThreshold(trueMode, `${fn}: options.truth`);

  const data = new Float64Array(B * O * K);
  const truePixels = new Float64Array(B * O);
  const predPixels = new Float64Array(B * K);
  const inter = new Float64Array(O * K);
  const tl = new Int32Array(P);
  const pl = new Int32Array(P);
  // Binary masks, materialised only for the threshold modes.
  const tBin = trueMode === 'labels' ? null : new Uint8Array(O * P);
  const pBin = predMode === 'argmax' ? null : new Uint8Array(K * P);

  for (let b = 0; b < B; b++) {
    inter.fill(0);
    const tCount = truePixels.subarray(b * O, (b + 1) * O);
    const pCount = predPixels.subarray(b * K, (b + 1) * K);
    if (tBin === null) {
      trueLabelsInto(trueMasks.data, b, O, P, tl, options, `${fn}: true masks`);
      for (let i = 0; i < P; i++) tCount[tl[i]]++;
    } else {
      const base = b * O * P;
      const x = trueMasks.data;
      for (let q = 0; q < O * P; q++) {
        const on = x[base + q] > trueThr ? 1 : 0;
        tBin[q] = on;
        tCount[(q / P) | 0] += on;
      }
    }
    if (pBin === null) {
      argmaxLabelsInto(predMasks.data, b, K, P, pl);
      for (let i = 0; i < P; i++) pCount[pl[i]]++;
    } else {
      const base = b * K * P;
      const y = predMasks.data;
      for (let q = 0; q < K * P; q++) {
        const on = y[base + q] > predThr ? 1 : 0;
        pBin[q] = on;
        pCount[(q / P) | 0] += on;
      }
    }
    // Intersections.
    if (tBin === null && pBin === null) {
      for (let i = 0; i < P; i++) inter[tl[i] * K + pl[i]]++;
    } else if (tBin === null && pBin !== null) {
      for (let k = 0; k < K; k++) {
        const off = k * P;
        for (let i = 0; i < P; i++) if (pBin[off + i]) inter[tl[i] * K + k]++;
      }
    } else if (tBin !== null && pBin === null) {
      for (let o = 0; o < O; o++) {
        const off = o * P;
        for (let i = 0; i < P; i++) if (tBin[off + i]) inter[o * K + pl[i]]++;
      }
    } else if (tBin !== null && pBin !== null) {
      for (let o = 0; o < O; o++) {
        const to = o * P;
        for (let k = 0; k < K; k++) {
          const po = k * P;
          let s = 0;
          for (let i = 0; i < P; i++) s += tBin[to + i] & pBin[po + i];
          inter[o * K + k] = s;
        }
      }
    }
    const out = b * O * K;
    for (let o = 0; o < O; o++) {
      for (let k = 0; k < K; k++) {
        const n = inter[o * K + k];
        const union = tCount[o] + pCount[k] - n;
        data[out + o * K + k] = union > 0 ? n / union : 0;
      }
    }
  }
  return { data, shape: [B, O, K], truePixels, predPixels };
}

export interface MatchOptions extends IouOptions {
  /** Leave entity 0 (the background) out of the matching (default true). */
  excludeBackground?: boolean;
  /** `[B*O]` (row-major `[B,O]`): entities with 0 are absent and not matched (the original's visibility). */
  presence?: ArrayLike<number>;
  /** Entities with fewer binarised pixels are not matched (default 1; the original uses 50). */
  minTruePixels?: number;
  /** Matched pairs with a lower IoU are dropped (default 0; the original uses 0.1). */
  minIou?: number;
}

/** One image's matching: parallel arrays sorted by entity index. */
export interface ImageMatch {
  trueIndex: Int32Array;
  predIndex: Int32Array;
  iou: Float64Array;
}

/** The IoU matrices and, per image, the IoU-maximising matching of entities to slots. */
export function matchByIou(
  trueMasks: MaskTensor,
  predMasks: MaskTensor,
  options: MatchOptions = {},
): { matches: ImageMatch[]; iou: IouMatrices } {
  const fn = 'matchByIou';
  const { t, p } = checkMaskPair(trueMasks, predMasks, fn);
  const iou = computeIou(trueMasks, predMasks, t, p, options, fn);
  const O = t.groups;
  const K = p.groups;
  const excludeBg = options.excludeBackground ?? true;
  const minPixels = options.minTruePixels ?? 1;
  const minIou = options.minIou ?? 0;
  const presence = options.presence;
  if (presence !== undefined && presence.length !== t.batch * O) {
    throw new MetricsError(
      `${fn}: presence has ${presence.length} values, true masks shape ${fmtShape(trueMasks.shape)} needs ${t.batch * O}`,
    );
  }
  const matches: ImageMatch[] = [];
  for (let b = 0; b < t.batch; b++) {
    const rows: number[] = [];
    for (let o = excludeBg ? 1 : 0; o < O; o++) {
      if (presence !== undefined && presence[b * O + o] === 0) continue;
      if (iou.truePixels[b * O + o] < minPixels) continue;
      rows.push(o);
    }
    const sub = new Float64Array(rows.length * K);
    rows.forEach((o, r) => sub.set(iou.data.subarray((b * O + o) * K, (b * O + o + 1) * K), r * K));
    const a = linearSumAssignment({ data: sub, shape: [rows.length, K] }, { maximize: true });
    const ti: number[] = [];
    const pi: number[] = [];
    const vi: number[] = [];
    for (let m = 0; m < a.rowInd.length; m++) {
      const value = sub[a.rowInd[m] * K + a.colInd[m]];
      if (value < minIou) continue;
      ti.push(rows[a.rowInd[m]]);
      pi.push(a.colInd[m]);
      vi.push(value);
    }
    matches.push({ trueIndex: Int32Array.from(ti), predIndex: Int32Array.from(pi), iou: Float64Array.from(vi) });
  }
  return { matches, iou };
}
