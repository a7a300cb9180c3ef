/**
 * The iterative amortized refinement (RefinementNetwork in the original). One step reads the
 * current posterior parameters λ and the gradient of the previous stage's loss with respect to
 * them, and proposes an additive update:
 *
 *   x  = MLP([λ, LN(∂L/∂μ), LN(∂L/∂s)])     the gradient halves layer-normed (no affine) and
 *                                             detached: only first-order gradients are needed
 *   h  = GRU(x, h)
 *   Δλ = [Linear_loc(h), Linear_softplus(h)]
 */
import { tf } from '../tf';
import type { Ops } from '../ops';
import type { ParamStore } from '../params/store';
import { concatColumns, splitColumns } from '../ops/nn';

export interface RefinementStep {
  /** [N, 2z] */
  delta: tf.Tensor2D;
  /** the GRU state [N, z] */
  hidden: tf.Tensor2D;
}

/** dLambda must already be detached (a constant of the graph). */
export function refinementStep(p: ParamStore, ops: Ops, lambda: tf.Tensor2D, dLambda: tf.Tensor2D, hidden: tf.Tensor2D): RefinementStep {
  const r = 'refinenet';
  const [dLoc, dSp] = splitColumns(dLambda);
  const input = concatColumns([lambda, ops.layerNorm(dLoc) as tf.Tensor2D, ops.layerNorm(dSp) as tf.Tensor2D]);
  const x = ops.linear(
    ops.linear(input, p.get(`${r}.encoding.0.weight`), p.get(`${r}.encoding.0.bias`), 'elu'),
    p.get(`${r}.encoding.2.weight`),
    p.get(`${r}.encoding.2.bias`),
  ) as tf.Tensor2D;
  const h = ops.gruCell(x, hidden, {
    weightIh: p.get(`${r}.recurrence.weight_ih_l0`),
    weightHh: p.get(`${r}.recurrence.weight_hh_l0`),
    biasIh: p.get(`${r}.recurrence.bias_ih_l0`),
    biasHh: p.get(`${r}.recurrence.bias_hh_l0`),
  });
  const delta = concatColumns([
    ops.linear(h, p.get(`${r}.loc.weight`), p.get(`${r}.loc.bias`)) as tf.Tensor2D,
    ops.linear(h, p.get(`${r}.softplus.weight`), p.get(`${r}.softplus.bias`)) as tf.Tensor2D,
  ]);
  return { delta, hidden: h };
}
