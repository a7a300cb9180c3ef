/**
 * GECO (Rezende & Viola 2018, "Taming VAEs"), as the original's lib/geco.py: the reconstruction
 * term becomes a constraint C - nll >= 0 with a Lagrange multiplier softplus(β).
 */

export interface GecoOptions {
  /** the constraint target C on the per-image nll (train.py: per-pixel-channel target × C·H·W) */
  target: number;
  /** EMA decay of C - nll (default 0.99) */
  alpha?: number;
  /** multiplies the β step once the EMA constraint is satisfied (C_ema > 0) (default 1) */
  stepSizeAcceleration?: number;
}

/** softplus(0.55) ≈ 1: β never drops below the point where the nll keeps weight ~1. */
export const GECO_BETA_FLOOR = 0.55;

export class Geco {
  readonly target: number;
  readonly alpha: number;
  readonly stepSizeAcceleration: number;

  constructor(opts: GecoOptions) {
    if (!Number.isFinite(opts.target)) throw new Error(`GECO: target must be finite, got ${opts.target}`);
    this.target = opts.target;
    this.alpha = opts.alpha ?? 0.99;
    this.stepSizeAcceleration = opts.stepSizeAcceleration ?? 1;
  }

  /**
   * The Lagrange multiplier softplus(β) as float32: F.softplus with its default threshold 20
   * (linear above it). The loss's constraint term is softplus(β)·(C_t + stop(C_ema − C_t)) with
   * C_t = C − nll: its value is softplus(β)·C_ema, its gradient softplus(β)·∂(C − nll) (stage-loss.ts).
   */
  multiplier(beta: number): number {
    return Math.fround(beta > 20 ? beta : Math.log1p(Math.exp(beta)));
  }

  /** At the warm-start step: C_ema = C − nll. */
  initEma(nll: number): number {
    return Math.fround(this.target - nll);
  }

  /** C_ema ← α C_ema + (1 − α)(C − nll). */
  updateEma(cEma: number, nll: number): number {
    return Math.fround(Math.fround(cEma * this.alpha) + Math.fround((this.target - nll) * (1 - this.alpha)));
  }

  /** β ← max(0.55, β − step·C_ema), the step multiplied by the acceleration once C_ema > 0. */
  stepBeta(cEma: number, beta: number, stepSize: number): number {
    const step = cEma > 0 ? stepSize * this.stepSizeAcceleration : stepSize;
    return Math.max(GECO_BETA_FLOOR, Math.fround(beta - step * cEma));
  }
}
