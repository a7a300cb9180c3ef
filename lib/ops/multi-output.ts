/**
 * Custom ops with several outputs. tf.customGrad takes one output, so an op that yields two
 * tensors (μ and σ, a DualGRU's two states) returned them side by side for tf.split to cut: a
 * SplitV kernel forward and a Concat kernel backward, each with its tape node (and, on a tape
 * that records a nested backward, the clones of its inputs). The engine's kernel runner does take
 * several outputs for a custom op (registered multi-output kernels such as SplitV run that way);
 * `multiOutputOp` reaches it, the same way tf.customGrad does.
 */
import { tf } from '../tf';

export interface MultiOutputResult {
  /** the op's outputs */
  values: tf.Tensor[];
  /** one gradient per input, given one upstream gradient per output (zeros for an unused output) */
  gradFunc(dys: tf.Tensor[]): tf.Tensor[];
}

type GradMap = Record<string, () => tf.Tensor>;
interface KernelRunner {
  runKernelFunc?(params: {
    forwardFunc: () => tf.Tensor[];
    backwardsFunc: (dy: tf.Tensor | tf.Tensor[]) => GradMap;
    inputs: Record<string, tf.Tensor>;
  }): tf.Tensor | tf.Tensor[];
}

/**
 * Runs `f` on `inputs` as one op: one tape node, whose backward is `gradFunc`. Like a
 * tf.customGrad function, `f` reads its inputs' values and closes over what its gradient needs
 * (it saves nothing through the tape).
 */
export function multiOutputOp(name: string, inputs: tf.Tensor[], f: (...inputs: tf.Tensor[]) => MultiOutputResult): tf.Tensor[] {
  const engine = tf.engine() as unknown as KernelRunner;
  if (typeof engine.runKernelFunc !== 'function') {
    throw new Error(`${name}: this @tensorflow/tfjs-core has no Engine.runKernelFunc (multiOutputOp is written against 4.22.0)`);
  }
  const inputMap: Record<string, tf.Tensor> = {};
  inputs.forEach((t, i) => (inputMap[i] = t));
  let result: MultiOutputResult | null = null;
  const out = engine.runKernelFunc({
    forwardFunc: () => {
      result = f(...inputs);
      if (result.values.length === 0 || !result.values.every((v) => v instanceof tf.Tensor)) throw new Error(`${name}: the op must return one or more tensors`);
      return result.values;
    },
    backwardsFunc: (dy) => {
      const grads = result!.gradFunc(Array.isArray(dy) ? dy : [dy]);
      if (grads.length !== inputs.length) throw new Error(`${name}: the gradient gave ${grads.length} tensors for ${inputs.length} inputs`);
      const map: GradMap = {};
      grads.forEach((g, i) => (map[i] = () => g));
      return map;
    },
    inputs: inputMap,
  });
  return Array.isArray(out) ? out : [out];
}
