/**
 * Plain-TypeScript matrix products on row-major Float32Arrays.
 *
 * tfjs' `cpu` backend runs tf.matMul at ~1 GFLOP/s here. These use a 4×4 register tile over
 * packed panels of A (4 rows, k-major) and B (4 columns, k-major), so each step of the k loop
 * loads 8 numbers for 16 multiply-adds, and accumulate in JavaScript doubles (rounded to float32
 * once per tile): ~4.5 GFLOP/s on the convolution shapes. They are the kernels a native addon
 * replaces first.
 */

/** Packs B [K,N] (row-major) into ceil(N/4) panels of [K][4], zero-padded. */
function packB(b: Float32Array, K: number, N: number): Float32Array {
  const nb = (N + 3) >> 2;
  const bp = new Float32Array(nb * K * 4);
  for (let jb = 0; jb < nb; jb++) {
    const j0 = jb * 4;
    const w = Math.min(4, N - j0);
    const base = jb * K * 4;
    for (let k = 0; k < K; k++) {
      const src = k * N + j0;
      const dst = base + k * 4;
      for (let t = 0; t < w; t++) bp[dst + t] = b[src + t];
    }
  }
  return bp;
}

/**
 * C[M,N] (+)= A · B where A's element (i,k) is a[i*rs + k*cs] (so both A and Aᵀ storage work)
 * and B is row-major [K,N].
 */
function gemmStrided(
  a: Float32Array,
  rs: number,
  cs: number,
  b: Float32Array,
  M: number,
  K: number,
  N: number,
  c: Float32Array,
  accumulate: boolean,
): void {
  const nb = (N + 3) >> 2;
  const bp = packB(b, K, N);
  const ap = new Float32Array(K * 4);
  for (let i = 0; i < M; i += 4) {
    const h = Math.min(4, M - i);
    // pack 4 rows of A, k-major, zero-padded past M
    if (h === 4) {
      const r0 = i * rs;
      const r1 = r0 + rs;
      const r2 = r1 + rs;
      const r3 = r2 + rs;
      for (let k = 0, o = 0, ko = 0; k < K; k++, o += 4, ko += cs) {
        ap[o] = a[r0 + ko];
        ap[o + 1] = a[r1 + ko];
        ap[o + 2] = a[r2 + ko];
        ap[o + 3] = a[r3 + ko];
      }
    } else {
      ap.fill(0);
      for (let t = 0; t < h; t++) for (let k = 0; k < K; k++) ap[k * 4 + t] = a[(i + t) * rs + k * cs];
    }
    for (let jb = 0; jb < nb; jb++) {
      let c00 = 0, c01 = 0, c02 = 0, c03 = 0;
      let c10 = 0, c11 = 0, c12 = 0, c13 = 0;
      let c20 = 0, c21 = 0, c22 = 0, c23 = 0;
      let c30 = 0, c31 = 0, c32 = 0, c33 = 0;
      let bo = jb * K * 4;
      for (let k = 0, ao = 0; k < K; k++, ao += 4, bo += 4) {
        const a0 = ap[ao];
        const a1 = ap[ao + 1];
        const a2 = ap[ao + 2];
        const a3 = ap[ao + 3];
        const b0 = bp[bo];
        const b1 = bp[bo + 1];
        const b2 = bp[bo + 2];
        const b3 = bp[bo + 3];
        c00 += a0 * b0; c01 += a0 * b1; c02 += a0 * b2; c03 += a0 * b3;
        c10 += a1 * b0; c11 += a1 * b1; c12 += a1 * b2; c13 += a1 * b3;
        c20 += a2 * b0; c21 += a2 * b1; c22 += a2 * b2; c23 += a2 * b3;
        c30 += a3 * b0; c31 += a3 * b1; c32 += a3 * b2; c33 += a3 * b3;
      }
      const j0 = jb * 4;
      const w = Math.min(4, N - j0);
      const o = i * N + j0;
      if (h === 4 && w === 4 && !accumulate) {
        c[o] = c00; c[o + 1] = c01; c[o + 2] = c02; c[o + 3] = c03;
        const o1 = o + N;
        c[o1] = c10; c[o1 + 1] = c11; c[o1 + 2] = c12; c[o1 + 3] = c13;
        const o2 = o1 + N;
        c[o2] = c20; c[o2 + 1] = c21; c[o2 + 2] = c22; c[o2 + 3] = c23;
        const o3 = o2 + N;
        c[o3] = c30; c[o3 + 1] = c31; c[o3 + 2] = c32; c[o3 + 3] = c33;
      } else {
        const tile = [c00, c01, c02, c03, c10, c11, c12, c13, c20, c21, c22, c23, c30, c31, c32, c33];
        for (let t = 0; t < h; t++) {
          for (let u = 0; u < w; u++) {
            const idx = o + t * N + u;
            c[idx] = accumulate ? c[idx] + tile[t * 4 + u] : tile[t * 4 + u];
          }
        }
      }
    }
  }
}

/** C[M,N] = A[M,K] · B[K,N]. */
export function gemmNN(a: Float32Array, b: Float32Array, M: number, K: number, N: number): Float32Array {
  const c = new Float32Array(M * N);
  gemmStrided(a, K, 1, b, M, K, N, c, false);
  return c;
}

/**
 * C[M,N] = A[R,M]ᵀ · B[R,N]: the weight-gradient product (a sum over the R rows). Done in
 * chunks of rows so that the packed B panels stay in cache.
 */
export function gemmTN(a: Float32Array, b: Float32Array, R: number, M: number, N: number): Float32Array {
  const c = new Float32Array(M * N);
  const CHUNK = 512;
  for (let r0 = 0; r0 < R; r0 += CHUNK) {
    const rc = Math.min(CHUNK, R - r0);
    // A chunk rows r0..r0+rc as the k axis: element (i=p, k=r) = a[(r0+r)*M + p]
    gemmStrided(a.subarray(r0 * M, (r0 + rc) * M), 1, M, b.subarray(r0 * N, (r0 + rc) * N), M, rc, N, c, r0 > 0);
  }
  return c;
}

/** Aᵀ of a row-major [R,C] matrix. */
export function transpose2d(a: Float32Array, R: number, C: number): Float32Array {
  const t = new Float32Array(R * C);
  for (let r = 0; r < R; r++) {
    const ro = r * C;
    for (let c = 0; c < C; c++) t[c * R + r] = a[ro + c];
  }
  return t;
}
