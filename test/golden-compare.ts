/**
 * Comparisons shared by the golden tests: elementwise closeness (outputs, losses) and closeness
 * relative to a tensor's own largest magnitude (gradients), recording the worst error seen per
 * category for the summary each test prints.
 */
export interface GoldenTolerances {
  /** relative tolerance of elementwise comparisons */
  rel: number;
  /** absolute tolerance near zero */
  abs: number;
  /** gradients: max error over the tensor's max magnitude */
  gradTol: number;
}

export function maxAbs(a: ArrayLike<number>): number {
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]));
  return m;
}

export function goldenComparer(tol: GoldenTolerances) {
  const worst: Record<string, { err: number; where: string }> = {};
  const note = (cat: string, err: number, where: string): void => {
    if (!worst[cat] || err > worst[cat].err) worst[cat] = { err, where };
  };

  /** Elementwise |a-b| <= abs + rel|b|; notes the worst relative error (over |b| > 1e-3). */
  const compareClose = (actual: ArrayLike<number>, expected: ArrayLike<number>, what: string, cat: string): void => {
    expect(actual.length).toBe(expected.length);
    let worstRatio = 0;
    let worstIdx = -1;
    let worstRel = 0;
    for (let i = 0; i < expected.length; i++) {
      const e = expected[i];
      const err = Math.abs(actual[i] - e);
      const ratio = err / (tol.abs + tol.rel * Math.abs(e));
      if (!(ratio <= worstRatio)) {
        worstRatio = ratio;
        worstIdx = i;
      }
      if (Math.abs(e) > 1e-3) worstRel = Math.max(worstRel, err / Math.abs(e));
    }
    note(cat, worstRel, what);
    if (!(worstRatio <= 1)) {
      throw new Error(`${what}: element ${worstIdx} is ${actual[worstIdx]}, expected ${expected[worstIdx]} (error ${worstRatio.toFixed(2)}x the tolerance)`);
    }
  };

  /** max|a-b| <= gradTol · max|b| (the tensor's own scale). */
  const compareScaled = (actual: ArrayLike<number>, expected: ArrayLike<number>, what: string, cat: string, gradTol = tol.gradTol): void => {
    expect(actual.length).toBe(expected.length);
    let maxE = 0;
    let maxErr = 0;
    let idx = -1;
    for (let i = 0; i < expected.length; i++) {
      maxE = Math.max(maxE, Math.abs(expected[i]));
      const err = Math.abs(actual[i] - expected[i]);
      if (!(err <= maxErr)) {
        maxErr = err;
        idx = i;
      }
    }
    const rel = maxE > 0 ? maxErr / maxE : maxErr;
    note(cat, rel, what);
    if (!(rel <= gradTol)) {
      throw new Error(`${what}: element ${idx} is ${actual[idx]}, expected ${expected[idx]}; error ${maxErr} is ${rel.toExponential(2)} of the tensor's max |${maxE}|`);
    }
  };

  /** The worst errors per category, one line each. */
  const summary = (): string =>
    Object.entries(worst)
      .map(([k, v]) => `  ${k.padEnd(34)} ${v.err.toExponential(2)}  (${v.where})`)
      .join('\n');

  return { note, compareClose, compareScaled, summary, worst };
}
