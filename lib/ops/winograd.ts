/**
 * Winograd convolution, the plain TypeScript side of the addon's (native/nhwc.cc, GemmKernel::
 * wino_input / wino_output in native/gemm_kernel.h): which convolutions take it, and a readable
 * float64 reference of the same algorithm that the tests hold against a direct sum and the addon.
 *
 * F(m×m, r×r) with α = m + r − 1 = 8: each m×m block of outputs comes from one α×α input tile d as
 *   Y = Aᵀ [ (G g Gᵀ) ⊙ (Bᵀ d B) ] A
 * summed over the input channels inside the brackets, so a layer becomes α² products of
 * (tiles × C) by (C × Co) matrices: α²/m² multiplies per output and channel pair instead of r².
 * The interpolation points are 0, ±1, ±2, ±1/2 and ∞; m = 4 for 5×5 kernels (6.25x fewer
 * multiplies), m = 6 for 3×3 (5x). Bᵀ is the same for both; its rows are scaled to small integers
 * and G's rows carry the inverse scales.
 */

export const WINOGRAD_ALPHA = 8;

const POINTS = [0, 1, -1, 2, -2, 0.5, -0.5];
const G_SCALE = [1 / 4, 1 / 18, 1 / 18, 1 / 360, 1 / 360, 16 / 45, 16 / 45];

/** Bᵀ [α, α]: the input transform (the same for every m). */
export const WINOGRAD_BT: readonly (readonly number[])[] = [
  [4, 0, -21, 0, 21, 0, -4, 0],
  [0, -4, -4, 17, 17, -4, -4, 0],
  [0, 4, -4, -17, 17, 4, -4, 0],
  [0, 2, 1, -10, -5, 8, 4, 0],
  [0, -2, 1, 10, -5, -8, 4, 0],
  [0, 4, 8, -5, -10, 1, 2, 0],
  [0, -4, 8, 5, -10, -1, 2, 0],
  [0, -4, 0, 21, 0, -21, 0, 4],
];

/** Aᵀ [m, α]: row a holds the points' a-th powers; the ∞ point enters only the last row. */
export function winogradAT(m: number): number[][] {
  return Array.from({ length: m }, (_, a) => [...POINTS.map((p) => p ** a), a === m - 1 ? 1 : 0]);
}

/** G [α, r]: row i is G_SCALE[i]·(1, p, p², …) for the finite point p; the ∞ row is the last tap / 4. */
export function winogradG(r: number): number[][] {
  const rows = POINTS.map((p, i) => Array.from({ length: r }, (_, k) => G_SCALE[i] * p ** k));
  rows.push(Array.from({ length: r }, (_, k) => (k === r - 1 ? 0.25 : 0)));
  return rows;
}

/** Output tile side m for an r×r kernel, or null when Winograd does not take that kernel size. */
export function winogradTile(kernel: number): number | null {
  return kernel === 5 ? 4 : kernel === 3 ? 6 : null;
}

/**
 * Whether the addon runs the forward convolution cin → cout (and, with cin and cout swapped, a
 * stride-1 input gradient) by Winograd: stride 1, a 3×3 or 5×5 kernel, both channel counts whole
 * vectors of `vectorWidth` floats (16 on AVX-512, 8 on AVX2, 4 otherwise), more than 4 outputs.
 */
export function winogradTakes(cin: number, cout: number, kernel: number, stride: number, vectorWidth: number): boolean {
  return stride === 1 && winogradTile(kernel) !== null && cin % vectorWidth === 0 && cout % vectorWidth === 0 && cout > 4;
}

/** The floats per vector register of the addon's GEMM variant (`info().gemmIsa`). */
export function gemmVectorWidth(isa: string): number {
  return isa === 'avx512' ? 16 : isa === 'avx2' ? 8 : 4;
}

const matmul = (a: readonly (readonly number[])[], b: readonly (readonly number[])[]): number[][] =>
  a.map((row) => b[0].map((_, j) => row.reduce((s, v, k) => s + v * b[k][j], 0)));
const transpose = (a: readonly (readonly number[])[]): number[][] => a[0].map((_, j) => a.map((row) => row[j]));

/**
 * The Winograd convolution in float64, tile by tile as the addon runs it: x NHWC [n, h, w, cin],
 * weight [cout, cin, r, r] (PyTorch layout), stride 1, zero padding `pad` on every side; returns
 * y [n, ho, wo, cout] (no bias).
 */
export function winogradConv2dReference(x: ArrayLike<number>, xShape: readonly number[], weight: ArrayLike<number>,
  wShape: readonly number[], pad: number): { y: Float64Array; shape: [number, number, number, number] } {
  const [n, h, w, cin] = xShape;
  const [cout, wcin, r, rw] = wShape;
  const m = winogradTile(r);
  if (m === null || rw !== r || wcin !== cin) throw new Error(`winogradConv2dReference: weight [${wShape}] is not a 3x3 or 5x5 kernel over ${cin} channels`);
  const A = WINOGRAD_ALPHA;
  const ho = h + 2 * pad - r + 1, wo = w + 2 * pad - r + 1;
  const AT = winogradAT(m), G = winogradG(r), BT = WINOGRAD_BT;
  const Gt = transpose(G), B = transpose(BT), At = transpose(AT);
  // U[co][ci] = G g Gᵀ
  const U = Array.from({ length: cout }, (_, co) => Array.from({ length: cin }, (_, ci) => {
    const g = Array.from({ length: r }, (_, ky) => Array.from({ length: r }, (_, kx) => weight[((co * cin + ci) * r + ky) * r + kx]));
    return matmul(matmul(G, g), Gt);
  }));
  const y = new Float64Array(n * ho * wo * cout);
  const at = (b: number, iy: number, ix: number, c: number) =>
    (iy < 0 || iy >= h || ix < 0 || ix >= w ? 0 : x[((b * h + iy) * w + ix) * cin + c]);
  for (let b = 0; b < n; b++)
    for (let ty = 0; ty < ho; ty += m)
      for (let tx = 0; tx < wo; tx += m) {
        // V[ci] = Bᵀ d B for the tile whose outputs start at (ty, tx)
        const V = Array.from({ length: cin }, (_, c) => {
          const d = Array.from({ length: A }, (_, i) => Array.from({ length: A }, (_, j) => at(b, ty + i - pad, tx + j - pad, c)));
          return matmul(matmul(BT, d), B);
        });
        for (let co = 0; co < cout; co++) {
          const M = Array.from({ length: A }, (_, i) => Array.from({ length: A }, (_, j) => V.reduce((s, v, ci) => s + U[co][ci][i][j] * v[i][j], 0)));
          const Y = matmul(matmul(AT, M), At);
          for (let a = 0; a < m && ty + a < ho; a++)
            for (let e = 0; e < m && tx + e < wo; e++) y[((b * ho + ty + a) * wo + tx + e) * cout + co] = Y[a][e];
        }
      }
  return { y, shape: [n, ho, wo, cout] };
}
