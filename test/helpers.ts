import * as path from 'node:path';

/** The shared golden fixtures (read-only), overridable with EMORL_GOLDEN_DIR. */
export const FIXTURES_DIR = process.env.EMORL_GOLDEN_DIR ?? path.resolve(__dirname, '..', '..', 'shared', 'fixtures');

export function fixturePath(...parts: string[]): string {
  return path.join(FIXTURES_DIR, ...parts);
}

/** Throws unless max|actual − expected| <= tol · max|expected| (absolute when expected is all zeros). */
export function expectRelClose(actual: { shape: number[]; dataSync(): ArrayLike<number> }, expected: { shape: number[]; dataSync(): ArrayLike<number> }, tol: number, what: string): void {
  if (actual.shape.join() !== expected.shape.join()) throw new Error(`${what}: shape [${actual.shape}] vs [${expected.shape}]`);
  const a = actual.dataSync(), e = expected.dataSync();
  let maxE = 0, maxErr = 0;
  for (let i = 0; i < e.length; i++) {
    maxE = Math.max(maxE, Math.abs(e[i]));
    const d = Math.abs(a[i] - e[i]);
    if (!(d <= maxErr)) maxErr = d;
  }
  const rel = maxE > 0 ? maxErr / maxE : maxErr;
  if (!(rel <= tol)) throw new Error(`${what}: max error ${maxErr} is ${rel.toExponential(2)} of max |${maxE}| (tolerance ${tol})`);
}


/** Deterministic pseudo-random floats in [lo, hi) (self-contained: tests pass its source to child processes). */
export function uniform(n: number, seed: number, lo = -1, hi = 1): Float32Array {
  const a = new Float32Array(n);
  let s = seed >>> 0 || 1;
  for (let i = 0; i < n; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    a[i] = lo + ((hi - lo) * s) / 2 ** 32;
  }
  return a;
}

/** A flat array with a shape, as expectRelClose takes it. */
export const wrap = (a: ArrayLike<number>, shape: number[]) => ({ shape, dataSync: () => a });
