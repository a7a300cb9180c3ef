/**
 * The original's learning-rate schedule and refinement curriculum, step for step.
 *
 * With `use_scheduler`, the rate warms up linearly from 0 (step 0 updates with rate 0) to `lr`
 * at step `warmup`, then decays as lr·decay_rate^((step − warmup)/decay_steps). The original
 * wraps a LambdaLR in a GradualWarmupScheduler; on the first step past the warm-up that wrapper
 * still returns the undecayed rate (its inner scheduler has not been stepped yet), and decay
 * starts the step after. We reproduce that step exactly: the recorded trajectories show it.
 */
export interface LrScheduleConfig {
  lr: number;
  use_scheduler: boolean;
  warmup: number;
  decay_rate: number;
  decay_steps: number;
}

export function learningRate(step: number, c: LrScheduleConfig): number {
  if (!c.use_scheduler) return c.lr;
  if (c.warmup > 0 && step <= c.warmup) return c.lr * (step / c.warmup);
  if (step === c.warmup + 1) return c.lr;
  return c.lr * Math.pow(c.decay_rate, (step - c.warmup) / c.decay_steps);
}

/** [step, I] pairs: from `step` on (the last pair whose step ≤ the current one), use I refinement steps. */
export type RefinementCurriculum = Array<[number, number]>;

export function refinementItersAt(step: number, curriculum: RefinementCurriculum, fallback: number): number {
  for (let i = curriculum.length - 1; i >= 0; i--) {
    if (step >= curriculum[i][0]) return curriculum[i][1];
  }
  return fallback;
}
