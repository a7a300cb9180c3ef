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

