/**
 * Same-shape float32 Add, Sub and Mul for tfjs' `cpu` backend. Its own kernels index both inputs
 * modulo their length through a per-element closure: ~37 ns per element, so the gradient
 * accumulation of a [32, 1225, 64] feature map (an add per extra use) took ~90 ms. These run a
 * plain loop (~1-2 ns per element) for that case and hand every other case (broadcasting, other
 * dtypes) to the original kernel: the results are bit-identical.
 */
import * as tf from '@tensorflow/tfjs-core';

type Binary = (x: number, y: number) => number;

interface CpuBackendData {
  readSync(dataId: object): unknown;
  makeTensorInfo(shape: number[], dtype: 'float32', values: Float32Array): tf.TensorInfo;
}

const LOOPS: Record<'Add' | 'Sub' | 'Mul', (a: Float32Array, b: Float32Array, out: Float32Array) => void> = {
  Add: (a, b, out) => {
    for (let i = 0; i < out.length; i++) out[i] = a[i] + b[i];
  },
  Sub: (a, b, out) => {
    for (let i = 0; i < out.length; i++) out[i] = a[i] - b[i];
  },
  Mul: (a, b, out) => {
    for (let i = 0; i < out.length; i++) out[i] = a[i] * b[i];
  },
};

function sameShape(a: number[], b: number[]): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

const installed = new WeakSet<object>();

/** Replaces the cpu backend's Add, Sub and Mul with the fast-path versions (once per process). */
export function installFastCpuKernels(): void {
  for (const name of Object.keys(LOOPS) as (keyof typeof LOOPS)[]) {
    const original = tf.getKernel(name, 'cpu');
    if (!original || installed.has(original)) continue;
    const loop = LOOPS[name];
    const fast: tf.KernelConfig = {
      kernelName: name,
      backendName: 'cpu',
      kernelFunc: (args) => {
        const { a, b } = args.inputs as { a: tf.TensorInfo; b: tf.TensorInfo };
        if (a.dtype !== 'float32' || b.dtype !== 'float32' || !sameShape(a.shape, b.shape)) return original.kernelFunc(args);
        const backend = args.backend as unknown as CpuBackendData;
        const av = backend.readSync(a.dataId), bv = backend.readSync(b.dataId);
        if (!(av instanceof Float32Array) || !(bv instanceof Float32Array)) return original.kernelFunc(args);
        const out = new Float32Array(av.length);
        loop(av, bv, out);
        return backend.makeTensorInfo(a.shape, 'float32', out);
      },
    };
    installed.add(fast);
    tf.unregisterKernel(name, 'cpu');
    tf.registerKernel(fast);
  }
}
