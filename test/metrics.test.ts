import { withH5File } from '../lib/io/h5';
import {
  MetricsError,
  adjustedRandIndex,
  adjustedRandIndexFromLabels,
  adjustedRandIndices,
  ariFromContingency,
  contingencyTables,
  iouMatrix,
  linearSumAssignment,
  matchByIou,
  pixelMse,
  type MaskTensor,
} from '../lib/metrics';
import { fixturePath } from './helpers';

/** One-hot masks [B,N,H,W] (value `on`) from label maps [B][H*W]. */
function oneHot(labels: number[][], groups: number, on = 255, h?: number): MaskTensor {
  const B = labels.length;
  const P = labels[0].length;
  const H = h ?? P;
  const data = new Uint8Array(B * groups * P);
  labels.forEach((img, b) => img.forEach((l, p) => (data[(b * groups + l) * P + p] = on)));
  return { data, shape: [B, groups, H, P / H] };
}

/** Soft predicted masks [B,K,H,W] whose argmax is `labels` (float32, softmax-like). */
function softPred(labels: number[][], K: number, h?: number): MaskTensor {
  const B = labels.length;
  const P = labels[0].length;
  const H = h ?? P;
  const data = new Float32Array(B * K * P).fill(0.1 / (K - 1 || 1));
  labels.forEach((img, b) => img.forEach((l, p) => (data[(b * K + l) * P + p] = 0.9)));
  return { data, shape: [B, K, H, P / H] };
}

/** Brute-force optimum of a rows x cols assignment (min(rows, cols) pairs). */
function bruteForce(m: number[][], maximize: boolean): number {
  const rows = m.length;
  const cols = m[0].length;
  const n = Math.min(rows, cols);
  let best = maximize ? -Infinity : Infinity;
  const usedR = new Array(rows).fill(false);
  const usedC = new Array(cols).fill(false);
  // choose n rows in increasing order (when rows > cols), each to a distinct column
  const rec = (r: number, placed: number, acc: number): void => {
    if (placed === n) {
      best = maximize ? Math.max(best, acc) : Math.min(best, acc);
      return;
    }
    if (r >= rows || rows - r < n - placed) return;
    if (rows > cols) rec(r + 1, placed, acc); // skip row r
    usedR[r] = true;
    for (let c = 0; c < cols; c++) {
      if (usedC[c]) continue;
      usedC[c] = true;
      rec(r + 1, placed + 1, acc + m[r][c]);
      usedC[c] = false;
    }
    usedR[r] = false;
  };
  rec(0, 0, 0);
  return best;
}

function lcg(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    return s / 4294967296;
  };
}

describe('adjustedRandIndex against the original code (tetrominoes-real-10 fixture)', () => {
  let trueMasks: MaskTensor;
  let predStages: MaskTensor[];
  let fgRef: Float64Array;
  let bgRef: Float64Array;
  let mseRef: Float64Array;
  let imgs: Uint8Array;
  let reconStages: Float32Array[];

  beforeAll(async () => {
    await withH5File(fixturePath('tetrominoes-real-10.h5'), 'r', (f) => {
      expect(f.info('test/masks').shape).toEqual([10, 4, 35, 35, 1]);
      expect(f.info('reference/pred_mask').shape).toEqual([10, 6, 4, 35, 35, 1]);
      expect(f.info('reference/recons').shape).toEqual([10, 6, 35, 35, 3]);
      trueMasks = { data: f.read('test/masks') as Uint8Array, shape: [10, 4, 35, 35, 1] };
      const pred = f.readFloat32('reference/pred_mask');
      const block = 4 * 35 * 35;
      predStages = [];
      for (let s = 0; s < 6; s++) {
        const d = new Float32Array(10 * block);
        for (let b = 0; b < 10; b++) d.set(pred.subarray((b * 6 + s) * block, (b * 6 + s + 1) * block), b * block);
        predStages.push({ data: d, shape: [10, 4, 35, 35, 1] });
      }
      const recons = f.readFloat32('reference/recons');
      const rblock = 35 * 35 * 3;
      reconStages = [];
      for (let s = 0; s < 6; s++) {
        const d = new Float32Array(10 * rblock);
        for (let b = 0; b < 10; b++) d.set(recons.subarray((b * 6 + s) * rblock, (b * 6 + s + 1) * rblock), b * rblock);
        reconStages.push(d);
      }
      imgs = f.read('test/imgs') as Uint8Array;
      fgRef = Float64Array.from(f.read('reference/fg_ari'));
      bgRef = Float64Array.from(f.read('reference/ari_with_bg'));
      mseRef = Float64Array.from(f.read('reference/mse'));
    });
  });

  test('foreground ARI and ARI with background equal the reference for every image and stage (1e-6)', () => {
    let maxErr = 0;
    for (let s = 0; s < 6; s++) {
      const fg = adjustedRandIndex(trueMasks, predStages[s], { excludeBackground: true });
      const bg = adjustedRandIndex(trueMasks, predStages[s], { excludeBackground: false });
      const both = adjustedRandIndices(trueMasks, predStages[s]);
      const viaArgmax = adjustedRandIndices(trueMasks, predStages[s], { trueLabels: 'argmax' });
      expect(fg).toBeInstanceOf(Float64Array);
      expect(fg.length).toBe(10);
      for (let b = 0; b < 10; b++) {
        expect(Math.abs(fg[b] - fgRef[b * 6 + s])).toBeLessThan(1e-6);
        expect(Math.abs(bg[b] - bgRef[b * 6 + s])).toBeLessThan(1e-6);
        maxErr = Math.max(maxErr, Math.abs(fg[b] - fgRef[b * 6 + s]), Math.abs(bg[b] - bgRef[b * 6 + s]));
        expect(both.foreground[b]).toBe(fg[b]);
        expect(both.withBackground[b]).toBe(bg[b]);
        // the masks are one-hot 0/255, so the original's rule and an argmax agree
        expect(viaArgmax.foreground[b]).toBe(fg[b]);
        expect(viaArgmax.withBackground[b]).toBe(bg[b]);
      }
    }
    // the reference was computed in float32: agreement is at float32 rounding
    expect(maxErr).toBeLessThan(1e-6);
  });

  test('the final stage has FG-ARI 1 on all ten images', () => {
    const fg = adjustedRandIndex(trueMasks, predStages[5], { excludeBackground: true });
    expect(Array.from(fg)).toEqual(new Array(10).fill(1));
  });

  test('the channel-first layout [B,N,1,H,W] gives the same values', () => {
    const t = { data: trueMasks.data, shape: [10, 4, 1, 35, 35] };
    const p = { data: predStages[1].data, shape: [10, 4, 35, 35] };
    expect(adjustedRandIndex(t, p, { excludeBackground: true })).toEqual(
      adjustedRandIndex(trueMasks, predStages[1], { excludeBackground: true }),
    );
  });

  test('pixel MSE of the reconstructions equals the reference (relative 1e-6)', () => {
    let maxRel = 0;
    for (let s = 0; s < 6; s++) {
      const mse = pixelMse(
        { data: imgs, shape: [10, 35, 35, 3], layout: 'NHWC', divisor: 255 },
        { data: reconStages[s], shape: [10, 35, 35, 3], layout: 'NHWC' },
      );
      for (let b = 0; b < 10; b++) {
        const rel = Math.abs(mse[b] - mseRef[b * 6 + s]) / mseRef[b * 6 + s];
        maxRel = Math.max(maxRel, rel);
        expect(rel).toBeLessThan(1e-6);
      }
    }
    expect(maxRel).toBeLessThan(1e-6);
  });

  test('pixel MSE is the same with the reconstructions in NCHW', () => {
    const nhwc = reconStages[2];
    const nchw = new Float32Array(nhwc.length);
    const P = 35 * 35;
    for (let b = 0; b < 10; b++) for (let p = 0; p < P; p++) for (let c = 0; c < 3; c++) nchw[(b * 3 + c) * P + p] = nhwc[(b * P + p) * 3 + c];
    const a = pixelMse(
      { data: imgs, shape: [10, 35, 35, 3], layout: 'NHWC', divisor: 255 },
      { data: nhwc, shape: [10, 35, 35, 3], layout: 'NHWC' },
    );
    const b = pixelMse(
      { data: imgs, shape: [10, 35, 35, 3], layout: 'NHWC', divisor: 255 },
      { data: nchw, shape: [10, 3, 35, 35], layout: 'NCHW' },
    );
    for (let i = 0; i < 10; i++) expect(b[i]).toBeCloseTo(a[i], 15);
  });
});

describe('adjustedRandIndex: hand-made cases', () => {
  // The example in the original lib/metrics.py's __main__ (3x3 image).
  const trueLabels = [[1, 1, 1, 0, 2, 2, 0, 0, 0]];
  const predLabels = [[1, 1, 0, 0, 2, 2, 0, 0, 0]];

  test('a hand-computed value: foreground 6/11, with background 14/23', () => {
    // Foreground: n_ij = {(1,1):2, (1,0):1, (2,2):2}, n = 5: R = 4, A = 8, B = 4, E = 1.6,
    // ARI = (4 - 1.6) / (6 - 1.6) = 6/11. All pixels: R = 16, A = 20, B = 24, E = 20/3 -> 14/23.
    const t = oneHot(trueLabels, 3, 255, 3);
    const p = softPred(predLabels, 3, 3);
    expect(adjustedRandIndex(t, p, { excludeBackground: true })[0]).toBeCloseTo(6 / 11, 14);
    expect(adjustedRandIndex(t, p, { excludeBackground: false })[0]).toBeCloseTo(14 / 23, 14);
    expect(adjustedRandIndexFromLabels(trueLabels[0], predLabels[0], 1, 3, 3, true)[0]).toBeCloseTo(6 / 11, 14);
    expect(ariFromContingency([4, 1, 0, 0, 2, 0, 0, 0, 2], 3, 3, false)).toBeCloseTo(14 / 23, 14);
    const tab = contingencyTables(t, p);
    expect(tab.shape).toEqual([1, 3, 3]);
    expect(Array.from(tab.data)).toEqual([4, 0, 0, 1, 2, 0, 0, 0, 2]);
  });

  test('identical partitions give 1 and permuted slot labels give 1', () => {
    const labels = [
      [0, 0, 1, 1, 2, 2, 3, 3, 0, 1, 2, 3],
      [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2],
    ];
    const t = oneHot(labels, 4, 255, 3);
    expect(Array.from(adjustedRandIndex(t, softPred(labels, 4, 3), { excludeBackground: false }))).toEqual([1, 1]);
    expect(Array.from(adjustedRandIndex(t, softPred(labels, 4, 3), { excludeBackground: true }))).toEqual([1, 1]);
    const perm = [5, 2, 0, 6];
    const permuted = labels.map((img) => img.map((l) => perm[l]));
    const r = adjustedRandIndices(t, softPred(permuted, 7, 3));
    for (const v of [...r.foreground, ...r.withBackground]) expect(v).toBeCloseTo(1, 14);
  });

  test('a single cluster on both sides gives 1; one side single gives 0', () => {
    const t = oneHot([[1, 1, 1, 1]], 2, 255, 2);
    expect(adjustedRandIndex(t, softPred([[3, 3, 3, 3]], 4, 2), { excludeBackground: true })[0]).toBe(1);
    expect(adjustedRandIndex(t, softPred([[3, 3, 3, 3]], 4, 2), { excludeBackground: false })[0]).toBe(1);
    // truth one cluster, prediction split: R = E, ARI = 0
    expect(adjustedRandIndex(t, softPred([[0, 0, 1, 1]], 4, 2), { excludeBackground: true })[0]).toBe(0);
    // a single foreground pixel: one non-zero cell, 1
    const one = oneHot([[0, 0, 0, 2]], 3, 255, 2);
    expect(adjustedRandIndex(one, softPred([[0, 1, 2, 3]], 4, 2), { excludeBackground: true })[0]).toBe(1);
  });

  test('an empty foreground gives 0 (the original turns the NaN into 0), with background still defined', () => {
    const t = oneHot([[0, 0, 0, 0, 0, 0]], 3, 255, 2);
    const p = softPred([[0, 1, 1, 2, 2, 2]], 3, 2);
    expect(adjustedRandIndex(t, p, { excludeBackground: true })[0]).toBe(0);
    expect(adjustedRandIndex(t, p, { excludeBackground: false })[0]).toBe(0);
    // all background, all in one slot: one non-zero cell
    expect(adjustedRandIndex(t, softPred([[1, 1, 1, 1, 1, 1]], 3, 2), { excludeBackground: false })[0]).toBe(1);
    // every pixel its own cluster on both sides: 0/0 -> 0
    expect(ariFromContingency([1, 0, 0, 0, 1, 0, 0, 0, 1], 3, 3)).toBe(0);
    expect(ariFromContingency([0, 0, 0, 0], 2, 2)).toBe(0);
  });

  test('argmax ties go to the first maximal slot, NaN counts as maximal', () => {
    // 2x2 image, K = 3; pixel 0: all equal -> slot 0; pixel 1: slots 1,2 tie -> 1;
    // pixel 2: NaN in slot 2 -> 2; pixel 3: NaN in slots 1 and 2 -> 1
    const K = 3;
    const P = 4;
    const d = new Float32Array(K * P);
    const set = (k: number, p: number, v: number): void => void (d[k * P + p] = v);
    [0.3, 0.3, 0.3].forEach((v, k) => set(k, 0, v));
    [0.2, 0.4, 0.4].forEach((v, k) => set(k, 1, v));
    [0.9, 0.1, NaN].forEach((v, k) => set(k, 2, v));
    [0.9, NaN, NaN].forEach((v, k) => set(k, 3, v));
    const pred = { data: d, shape: [1, K, 2, 2] };
    const t = oneHot([[0, 1, 2, 1]], 3, 255, 2);
    expect(Array.from(contingencyTables(t, pred).data)).toEqual([1, 0, 0, 0, 2, 0, 0, 0, 1]);
  });

  test("the original's ground-truth rule: overlapping entities take the last one; non-binary values are errors", () => {
    // pixel 0: entities 1 and 2 both on -> original 2, argmax 1
    const data = new Uint8Array([0, 255, 255, 255, 255, 0, 0, 0, 255, 0, 0, 0]); // [1,3,2,2]
    const t = { data, shape: [1, 3, 2, 2] };
    const p = softPred([[0, 0, 0, 0]], 2, 2);
    expect(Array.from(contingencyTables(t, p).data)).toEqual([3, 0, 0, 0, 1, 0]);
    expect(Array.from(contingencyTables(t, p, { trueLabels: 'argmax' }).data)).toEqual([3, 0, 1, 0, 0, 0]);
    const soft = { data: new Float32Array([1, 0.5, 0, 0, 0, 0.5, 1, 1]), shape: [1, 2, 2, 2] };
    expect(() => adjustedRandIndex(soft, p, { excludeBackground: true })).toThrow(/neither 0 nor 255.*trueLabels: 'argmax'/);
    expect(() => adjustedRandIndex(soft, p, { excludeBackground: true, trueLabels: 'argmax' })).not.toThrow();
    const unit = { data: new Float32Array([1, 1, 0, 0, 0, 0, 1, 1]), shape: [1, 2, 2, 2] };
    expect(adjustedRandIndex(unit, softPred([[1, 1, 0, 0]], 2, 2), { excludeBackground: false, trueOnValue: 1 })[0]).toBe(1);
  });

  test('shape errors name the shapes', () => {
    const t = { data: new Uint8Array(2 * 3 * 4 * 4), shape: [2, 3, 4, 4, 1] };
    const p = { data: new Float32Array(2 * 5 * 4 * 5), shape: [2, 5, 4, 5, 1] };
    expect(() => adjustedRandIndex(t, p, { excludeBackground: true })).toThrow(MetricsError);
    expect(() => adjustedRandIndex(t, p, { excludeBackground: true })).toThrow(
      /true masks shape \[2,3,4,4,1\] and predicted masks shape \[2,5,4,5,1\] have different image sizes \(4x4 vs 4x5\)/,
    );
    const p3 = { data: new Float32Array(3 * 5 * 16), shape: [3, 5, 4, 4] };
    expect(() => adjustedRandIndex(t, p3, { excludeBackground: true })).toThrow(/different batch sizes \(2 vs 3\)/);
    const bad = { data: new Float32Array(2 * 5 * 16), shape: [2, 5, 2, 4, 2] };
    expect(() => adjustedRandIndex(t, bad, { excludeBackground: true })).toThrow(/\[2,5,2,4,2\] is 5-d without a singleton channel/);
    const short = { data: new Float32Array(10), shape: [2, 5, 4, 4] };
    expect(() => adjustedRandIndex(t, short, { excludeBackground: true })).toThrow(/data has 10 values, shape \[2,5,4,4\] needs 160/);
    expect(() => adjustedRandIndex(t, { data: new Float32Array(6), shape: [2, 3, 1] }, { excludeBackground: true })).toThrow(
      /has rank 3/,
    );
    const tiny = oneHot([[0, 1]], 2, 255, 1);
    expect(() => adjustedRandIndex(tiny, softPred([[0, 1]], 2, 1), { excludeBackground: true })).toThrow(/more pixels than groups/);
    expect(() => adjustedRandIndex(t, t, {} as never)).toThrow(/excludeBackground/);
  });
});

describe('pixelMse', () => {
  test('hand values, divisor and layout errors', () => {
    const a = { data: new Float32Array([0, 0, 0, 0, 1, 1, 1, 1]), shape: [2, 1, 2, 2], layout: 'NCHW' as const };
    const b = { data: new Float32Array([0.5, 0, 0, 0, 1, 1, 1, 0]), shape: [2, 2, 2, 1], layout: 'NHWC' as const };
    expect(Array.from(pixelMse(a, b))).toEqual([0.0625, 0.25]);
    const u8 = { data: new Uint8Array([0, 255, 51, 102]), shape: [1, 2, 2, 1], layout: 'NHWC' as const, divisor: 255 };
    const f = { data: new Float64Array([0, 1, 0.2, 0.4]), shape: [1, 2, 2, 1], layout: 'NHWC' as const };
    expect(pixelMse(u8, f)[0]).toBeCloseTo(0, 15);
    expect(() => pixelMse(a, { ...b, shape: [2, 2, 1, 1] })).toThrow(/data has 8 values, shape \[2,2,1,1\] needs 4/);
    expect(() => pixelMse(a, { ...a, layout: 'NHWC' })).toThrow(
      /images shape \[2,1,2,2\] \(NCHW\) and reconstructions shape \[2,1,2,2\] \(NHWC\) disagree/,
    );
  });
});

describe('linearSumAssignment', () => {
  test('matches brute force on random square and rectangular matrices (minimise and maximise)', () => {
    const rnd = lcg(12345);
    for (let t = 0; t < 400; t++) {
      const rows = 1 + Math.floor(rnd() * 6);
      const cols = 1 + Math.floor(rnd() * 6);
      const ints = t % 2 === 0;
      const m = Array.from({ length: rows }, () =>
        Array.from({ length: cols }, () => (ints ? Math.floor(rnd() * 4) : rnd() * 10 - 5)),
      );
      for (const maximize of [false, true]) {
        const a = linearSumAssignment(m, { maximize });
        const n = Math.min(rows, cols);
        expect(a.rowInd.length).toBe(n);
        expect(a.colInd.length).toBe(n);
        expect(new Set(a.rowInd).size).toBe(n);
        expect(new Set(a.colInd).size).toBe(n);
        for (let k = 1; k < n; k++) expect(a.rowInd[k]).toBeGreaterThan(a.rowInd[k - 1]);
        let s = 0;
        for (let k = 0; k < n; k++) s += m[a.rowInd[k]][a.colInd[k]];
        expect(a.cost).toBeCloseTo(s, 12);
        expect(a.cost).toBeCloseTo(bruteForce(m, maximize), 9);
      }
    }
  });

  test("resolves ties as scipy does (outputs recorded from scipy 1.17's linear_sum_assignment)", () => {
    const cases: [number[][], boolean, number[], number[]][] = [
      [[[1, 1, 1], [1, 1, 1], [1, 1, 1]], false, [0, 1, 2], [0, 1, 2]],
      [[[0, 0, 0, 0], [0, 0, 0, 0]], true, [0, 1], [0, 1]],
      [[[0, 0], [0, 0], [0, 0], [0, 0]], false, [0, 1], [0, 1]],
      [[[1, 2, 2, 1], [2, 1, 1, 2], [1, 1, 2, 2]], false, [0, 1, 2], [0, 2, 1]],
      [[[1, 2, 2, 1], [2, 1, 1, 2], [1, 1, 2, 2]], true, [0, 1, 2], [1, 0, 2]],
      [[[1, 2, 1], [2, 1, 1], [2, 1, 2], [1, 2, 2]], false, [0, 1, 2], [0, 2, 1]],
      [[[1, 2, 1], [2, 1, 1], [2, 1, 2], [1, 2, 2]], true, [0, 1, 2], [1, 0, 2]],
      [
        [[2, 1, 1, 0, 0], [0, 0, 0, 0, 2], [1, 2, 1, 1, 2], [2, 1, 1, 1, 2], [0, 2, 2, 0, 1]],
        false,
        [0, 1, 2, 3, 4],
        [4, 0, 2, 1, 3],
      ],
      [[[2, 1, 0, 2, 2, 2], [0, 0, 2, 0, 1, 0], [0, 1, 1, 1, 0, 0]], false, [0, 1, 2], [2, 0, 4]],
      [[[0, 0, 2], [1, 1, 0], [1, 2, 1], [1, 2, 2], [2, 1, 2], [2, 1, 2]], false, [0, 1, 4], [0, 2, 1]],
      [[[Infinity, 1, 2], [3, Infinity, 1], [1, 2, Infinity]], false, [0, 1, 2], [1, 2, 0]],
    ];
    for (const [m, maximize, r, c] of cases) {
      const a = linearSumAssignment(m, { maximize });
      expect([Array.from(a.rowInd), Array.from(a.colInd)]).toEqual([r, c]);
    }
  });

  test('flat input, empty input and scipy errors', () => {
    const a = linearSumAssignment({ data: new Float64Array([4, 1, 3, 2, 0, 5, 3, 2, 2]), shape: [3, 3] });
    expect(Array.from(a.colInd)).toEqual([1, 0, 2]);
    expect(a.cost).toBe(5);
    expect(linearSumAssignment({ data: [], shape: [0, 3] }).rowInd.length).toBe(0);
    expect(() => linearSumAssignment([[Infinity, Infinity], [1, 2]])).toThrow('cost matrix is infeasible');
    expect(() => linearSumAssignment([[NaN, 1], [1, 2]])).toThrow('matrix contains invalid numeric entries');
    expect(() => linearSumAssignment([[Infinity, 1], [1, 2]], { maximize: true })).toThrow('invalid numeric entries');
    expect(() => linearSumAssignment([[1, 2], [3]])).toThrow(/ragged/);
  });
});

describe('IoU matching', () => {
  // 3x4 image. Truth: background 0, object 1 (top-left 2x2), object 2 (right column), object 3 (1 pixel).
  //   1 1 0 2
  //   1 1 0 2
  //   0 0 3 2
  const truth = [[1, 1, 0, 2, 1, 1, 0, 2, 0, 0, 3, 2]];
  // Prediction (K = 4): slot 2 covers object 1 plus one background pixel, slot 0 the rest of the
  // background and object 3, slot 3 the top of object 2, slot 1 its bottom pixel.
  //   2 2 2 3
  //   2 2 0 3
  //   0 0 0 1
  const pred = [[2, 2, 2, 3, 2, 2, 0, 3, 0, 0, 0, 1]];
  const t = oneHot(truth, 4, 255, 3);
  const p = softPred(pred, 4, 3);

  test('IoU matrix (argmax / labels)', () => {
    const m = iouMatrix(t, p);
    expect(m.shape).toEqual([1, 4, 4]);
    const at = (o: number, k: number): number => m.data[o * 4 + k];
    expect(at(1, 2)).toBeCloseTo(4 / 5, 15); // 4 shared, union 5
    expect(at(2, 3)).toBeCloseTo(2 / 3, 15);
    expect(at(2, 1)).toBeCloseTo(1 / 3, 15);
    expect(at(3, 0)).toBeCloseTo(1 / 4, 15);
    expect(at(0, 0)).toBeCloseTo(3 / 5, 15); // background: 3 shared, union 4 + 4 - 3
    expect(at(1, 0)).toBe(0);
    expect(Array.from(m.truePixels)).toEqual([4, 4, 3, 1]);
    expect(Array.from(m.predPixels)).toEqual([4, 1, 5, 2]);
  });

  test('optimal matching by IoU, with the original protocol options', () => {
    const { matches } = matchByIou(t, p);
    expect(matches.length).toBe(1);
    expect(Array.from(matches[0].trueIndex)).toEqual([1, 2, 3]);
    expect(Array.from(matches[0].predIndex)).toEqual([2, 3, 0]);
    expect(matches[0].iou[0]).toBeCloseTo(0.8, 15);
    expect(matches[0].iou[1]).toBeCloseTo(2 / 3, 15);
    expect(matches[0].iou[2]).toBeCloseTo(0.25, 15);
    // drop small objects and weak matches as the original's matching_iou does (thresholds scaled down)
    const strict = matchByIou(t, p, { minTruePixels: 2, minIou: 0.7 }).matches[0];
    expect(Array.from(strict.trueIndex)).toEqual([1]);
    expect(Array.from(strict.predIndex)).toEqual([2]);
    // presence: object 2 absent
    const pres = matchByIou(t, p, { presence: [1, 1, 0, 1] }).matches[0];
    expect(Array.from(pres.trueIndex)).toEqual([1, 3]);
    expect(() => matchByIou(t, p, { presence: [1, 1] })).toThrow(/presence has 2 values/);
  });

  test('thresholded masks', () => {
    // Slot masks that overlap after thresholding: slot 0 = 0.6 everywhere, slot 1 = 0.6 on object 1.
    const P = 12;
    const d = new Float32Array(2 * P).fill(0.6);
    for (let i = 0; i < P; i++) if (truth[0][i] !== 1) d[P + i] = 0.1;
    const m = iouMatrix(t, { data: d, shape: [1, 2, 3, 4] }, { pred: { threshold: 0.5 }, truth: { threshold: 127 } });
    expect(m.data[1 * 2 + 0]).toBeCloseTo(4 / 12, 15);
    expect(m.data[1 * 2 + 1]).toBe(1);
    expect(Array.from(m.predPixels)).toEqual([12, 4]);
    const { matches } = matchByIou(t, { data: d, shape: [1, 2, 3, 4] }, { pred: { threshold: 0.5 } });
    expect(Array.from(matches[0].trueIndex)).toEqual([1, 2]);
    expect(Array.from(matches[0].predIndex)).toEqual([1, 0]);
  });
});
