/**
 * Faster float32 kernels for tfjs' `cpu` backend, with bit-identical results:
 * - Add, Sub, Multiply, RealDiv: its own kernels index both inputs modulo their length through a
 *   per-element closure (~37 ns per element; a [32, 1225, 64] gradient accumulation took ~90 ms),
 *   and when the shapes differ they convert every output index to coordinates and back (worse
 *   still). These run plain loops over the broadcast shape with per-axis strides.
 * - Slice and SplitV: its own copy a strided slice element by element through index
 *   conversions (the model splits GRU gates and posterior parameters along the last axis); these
 *   copy contiguous runs.
 * - Transpose: its own converts every index to coordinates and back (the images' NCHW -> NHWC
 *   took ~8 ms per Tetrominoes batch); this walks the output in order with the input's strides.
 * - Sum: its own moves the reduced axes innermost with that slow transpose first (a [1681, 32]
 *   column sum took ~1.8 ms, a [128, 32] one ~0.24 ms); this adds each element onto its output in
 *   the input's memory order, which for every output is the same additions in the same order.
 * Each result is float32(a op b) per element (a JS double op rounded once, as tfjs' own), or an
 * exact copy. Other dtypes go to the original kernel.
 */
import * as tf from '@tensorflow/tfjs-core';

type BinaryName = 'Add' | 'Sub' | 'Multiply' | 'RealDiv';

interface CpuBackendData {
  readSync(dataId: object): unknown;
  makeTensorInfo(shape: number[], dtype: 'float32', values: Float32Array): tf.TensorInfo;
}

/** out[o + i] = a[ai + i·sa] op b[bi + i·sb] for i < n: one loop per op, so each stays monomorphic. */
const RUNS: Record<BinaryName, (a: Float32Array, ai: number, sa: number, b: Float32Array, bi: number, sb: number, out: Float32Array, o: number, n: number) => void> = {
  Add: (a, ai, sa, b, bi, sb, out, o, n) => {
    for (let i = 0; i < n; i++) out[o + i] = a[ai + i * sa] + b[bi + i * sb];
  },
  Sub: (a, ai, sa, b, bi, sb, out, o, n) => {
    for (let i = 0; i < n; i++) out[o + i] = a[ai + i * sa] - b[bi + i * sb];
  },
  Multiply: (a, ai, sa, b, bi, sb, out, o, n) => {
    for (let i = 0; i < n; i++) out[o + i] = a[ai + i * sa] * b[bi + i * sb];
  },
  RealDiv: (a, ai, sa, b, bi, sb, out, o, n) => {
    for (let i = 0; i < n; i++) out[o + i] = a[ai + i * sa] / b[bi + i * sb];
  },
};

/**
 * The broadcast of a [aShape] and b [bShape] as a few axes: adjacent axes merge when each input
 * either spans both or is broadcast along both. Returns the merged output dims and per-input
 * strides (0 where broadcast), or null when the shapes do not broadcast.
 */
export function broadcastAxes(aShape: readonly number[], bShape: readonly number[]): { dims: number[]; sa: number[]; sb: number[]; shape: number[] } | null {
  const r = Math.max(aShape.length, bShape.length);
  const ad = Array.from({ length: r }, (_, i) => aShape[i - (r - aShape.length)] ?? 1);
  const bd = Array.from({ length: r }, (_, i) => bShape[i - (r - bShape.length)] ?? 1);
  const shape: number[] = [];
  for (let i = 0; i < r; i++) {
    if (ad[i] !== bd[i] && ad[i] !== 1 && bd[i] !== 1) return null;
    shape.push(ad[i] === 1 ? bd[i] : ad[i]);
  }
  const dims: number[] = [], aFull: boolean[] = [], bFull: boolean[] = [];
  for (let i = 0; i < r; i++) {
    if (shape[i] === 1) continue; // a unit axis changes no index
    const af = ad[i] !== 1, bf = bd[i] !== 1;
    const last = dims.length - 1;
    if (last >= 0 && aFull[last] === af && bFull[last] === bf) dims[last] *= shape[i];
    else {
      dims.push(shape[i]);
      aFull.push(af);
      bFull.push(bf);
    }
  }
  const sa: number[] = new Array(dims.length), sb: number[] = new Array(dims.length);
  let ta = 1, tb = 1;
  for (let i = dims.length - 1; i >= 0; i--) {
    sa[i] = aFull[i] ? ta : 0;
    sb[i] = bFull[i] ? tb : 0;
    if (aFull[i]) ta *= dims[i];
    if (bFull[i]) tb *= dims[i];
  }
  return { dims, sa, sb, shape };
}

/** a op b over the broadcast shape, as float32. */
export function broadcastBinary(name: BinaryName, a: Float32Array, aShape: readonly number[], b: Float32Array, bShape: readonly number[]): { values: Float32Array; shape: number[] } | null {
  const ax = broadcastAxes(aShape, bShape);
  if (!ax) return null;
  const { dims, sa, sb, shape } = ax;
  const out = new Float32Array(tf.util.sizeFromShape(shape));
  const run = RUNS[name];
  const r = dims.length;
  if (r === 0) {
    run(a, 0, 0, b, 0, 0, out, 0, out.length);
    return { values: out, shape };
  }
  const n = dims[r - 1];
  const idx = new Array<number>(r - 1).fill(0);
  let ai = 0, bi = 0;
  for (let o = 0; o < out.length; o += n) {
    run(a, ai, sa[r - 1], b, bi, sb[r - 1], out, o, n);
    // next position of the outer axes (odometer), keeping the inputs' offsets in step
    for (let d = r - 2; d >= 0; d--) {
      ai += sa[d];
      bi += sb[d];
      if (++idx[d] < dims[d]) break;
      ai -= sa[d] * dims[d];
      bi -= sb[d] * dims[d];
      idx[d] = 0;
    }
  }
  return { values: out, shape };
}

/** Row-major strides of `shape`. */
function stridesOf(shape: readonly number[]): number[] {
  const strides = new Array<number>(shape.length);
  for (let i = shape.length - 1, s = 1; i >= 0; i--) {
    strides[i] = s;
    s *= shape[i];
  }
  return strides;
}

/**
 * Fills `out` in order with runs of `run` elements of x, each stepping by `step`: run k starts at
 * src + Σ_a idx_a · stride[a], the outer axes' indices idx counting through `extent` row-major.
 */
function copyRuns(x: Float32Array, src: number, extent: readonly number[], stride: readonly number[], run: number, step: number,
  out: Float32Array): void {
  const idx = new Array<number>(extent.length).fill(0);
  for (let o = 0; o < out.length; o += run) {
    if (step === 1 && run >= 64) out.set(x.subarray(src, src + run), o);
    else for (let i = 0; i < run; i++) out[o + i] = x[src + i * step];
    for (let a = extent.length - 1; a >= 0; a--) {
      src += stride[a];
      if (++idx[a] < extent[a]) break;
      src -= stride[a] * extent[a];
      idx[a] = 0;
    }
  }
}

/** x [shape] sliced at begin with extent `extent`, copied in contiguous runs. */
export function sliceCopy(x: Float32Array, shape: readonly number[], begin: readonly number[], extent: readonly number[]): Float32Array {
  const r = shape.length;
  const out = new Float32Array(tf.util.sizeFromShape(extent as number[]));
  if (out.length === 0) return out;
  // the trailing axes taken whole form one run with the first partial axis before them
  let d = r - 1, inner = 1;
  while (d >= 0 && begin[d] === 0 && extent[d] === shape[d]) inner *= shape[d--];
  if (d < 0) {
    out.set(x);
    return out;
  }
  const strides = stridesOf(shape);
  let src = 0;
  for (let i = 0; i <= d; i++) src += begin[i] * strides[i];
  copyRuns(x, src, extent.slice(0, d), strides.slice(0, d), inner * extent[d], 1, out);
  return out;
}

/** x [shape] with its axes permuted (out axis i is x's axis perm[i]), copied in output order. */
export function transposeCopy(x: Float32Array, shape: readonly number[], perm: readonly number[]): Float32Array {
  const r = shape.length;
  const out = new Float32Array(x.length);
  if (!x.length) return out;
  if (r === 0) {
    out[0] = x[0];
    return out;
  }
  const strides = stridesOf(shape);
  const extent = perm.map((p) => shape[p]), stride = perm.map((p) => strides[p]);
  copyRuns(x, 0, extent.slice(0, r - 1), stride.slice(0, r - 1), extent[r - 1], stride[r - 1], out);
  return out;
}

/**
 * x [shape] summed over `axes` (distinct, in range), as tfjs' cpu Sum computes it: every output
 * accumulated in double from 0, its elements in row-major order of the reduced axes, then rounded
 * to float32 once. Walking x in memory order adds each output's elements in exactly that order.
 */
export function sumAxes(x: Float32Array, shape: readonly number[], axes: readonly number[]): Float32Array {
  // merge adjacent axes of one kind (kept / reduced); unit axes change no index
  const extent: number[] = [], reduced: boolean[] = [];
  let outSize = 1;
  shape.forEach((n, d) => {
    const red = axes.includes(d);
    if (!red) outSize *= n;
    if (n === 1) return;
    const last = extent.length - 1;
    if (last >= 0 && reduced[last] === red) extent[last] *= n;
    else {
      extent.push(n);
      reduced.push(red);
    }
  });
  const acc = new Float64Array(outSize);
  if (x.length === 0 || extent.length === 0) {
    if (x.length) acc[0] = x[0];
    return new Float32Array(acc);
  }
  // output strides per merged axis (0 along reduced ones)
  const outStride = new Array<number>(extent.length);
  for (let d = extent.length - 1, s = 1; d >= 0; d--) {
    outStride[d] = reduced[d] ? 0 : s;
    if (!reduced[d]) s *= extent[d];
  }
  const r = extent.length - 1, run = extent[r], innerReduced = reduced[r];
  const idx = new Array<number>(r).fill(0);
  for (let i = 0, o = 0; i < x.length; i += run) {
    if (innerReduced) {
      let s = acc[o];
      for (let j = 0; j < run; j++) s += x[i + j];
      acc[o] = s;
    } else {
      for (let j = 0; j < run; j++) acc[o + j] += x[i + j];
    }
    for (let a = r - 1; a >= 0; a--) {
      o += outStride[a];
      if (++idx[a] < extent[a]) break;
      o -= outStride[a] * extent[a];
      idx[a] = 0;
    }
  }
  return new Float32Array(acc);
}

function float32Values(backend: CpuBackendData, t: tf.TensorInfo): Float32Array | null {
  if (t.dtype !== 'float32') return null;
  const v = backend.readSync(t.dataId);
  return v instanceof Float32Array ? v : null;
}

function fastBinary(name: BinaryName, original: tf.KernelConfig): tf.KernelConfig {
  return {
    kernelName: name,
    backendName: 'cpu',
    kernelFunc: (args) => {
      const { a, b } = args.inputs as { a: tf.TensorInfo; b: tf.TensorInfo };
      const backend = args.backend as unknown as CpuBackendData;
      const av = float32Values(backend, a), bv = float32Values(backend, b);
      const r = av && bv ? broadcastBinary(name, av, a.shape, bv, b.shape) : null;
      if (!r) return original.kernelFunc(args);
      return backend.makeTensorInfo(r.shape, 'float32', r.values);
    },
  };
}

type KernelResult = tf.TensorInfo | tf.TensorInfo[];

/** A kernel on one float32 input x (any other dtype, or when run calls `original`: the original kernel). */
function fastOnFloat32(name: string, original: tf.KernelConfig,
  run: (x: tf.TensorInfo, xv: Float32Array, attrs: unknown, backend: CpuBackendData, original: () => KernelResult) => KernelResult): tf.KernelConfig {
  return {
    kernelName: name,
    backendName: 'cpu',
    kernelFunc: (args) => {
      const x = (args.inputs as { x: tf.TensorInfo }).x;
      const backend = args.backend as unknown as CpuBackendData;
      const xv = float32Values(backend, x);
      return xv ? run(x, xv, args.attrs, backend, () => original.kernelFunc(args)) : original.kernelFunc(args);
    },
  };
}

const fastSlice = (original: tf.KernelConfig) =>
  fastOnFloat32(tf.Slice, original, (x, xv, attrs, backend) => {
    const { begin, size: sz } = attrs as { begin: number | number[]; size?: number | number[] };
    const [b, s] = tf.slice_util.parseSliceParams(x, begin, sz);
    tf.slice_util.assertParamsValid(x, b, s);
    return backend.makeTensorInfo(s, 'float32', sliceCopy(xv, x.shape, b, s));
  });

const fastSplitV = (original: tf.KernelConfig) =>
  fastOnFloat32(tf.SplitV, original, (x, xv, attrs, backend) => {
    const { numOrSizeSplits, axis } = attrs as { numOrSizeSplits: number | number[]; axis: number | number[] };
    const ax = tf.util.parseAxisParam(axis, x.shape)[0];
    const sizes = tf.backend_util.prepareSplitSize(x as tf.Tensor, numOrSizeSplits, ax);
    const begin = new Array<number>(x.shape.length).fill(0);
    return sizes.map((s) => {
      const extent = x.shape.slice();
      extent[ax] = s;
      const t = backend.makeTensorInfo(extent, 'float32', sliceCopy(xv, x.shape, begin, extent));
      begin[ax] += s;
      return t;
    });
  });

const fastTranspose = (original: tf.KernelConfig) =>
  fastOnFloat32(tf.Transpose, original, (x, xv, attrs, backend) => {
    const { perm } = attrs as { perm: number[] };
    return backend.makeTensorInfo(perm.map((p) => x.shape[p]), 'float32', transposeCopy(xv, x.shape, perm));
  });

const fastSum = (original: tf.KernelConfig) =>
  fastOnFloat32(tf.Sum, original, (x, xv, attrs, backend, own) => {
    const { axis, keepDims } = attrs as { axis: number | number[]; keepDims: boolean };
    const axes = tf.util.parseAxisParam(axis, x.shape);
    // tfjs sums the reduced axes in the order given: ours (memory order) matches when ascending
    if (axes.some((a, i) => i > 0 && a <= axes[i - 1])) return own();
    const [outShape] = tf.backend_util.computeOutAndReduceShapes(x.shape, axes);
    const shape = keepDims ? tf.backend_util.expandShapeToKeepDim(outShape, axes) : outShape;
    return backend.makeTensorInfo(shape, 'float32', sumAxes(xv, x.shape, axes));
  });

// keyed by tfjs' kernel names (tf.Multiply is 'Multiply', not 'Mul')
const FAST: Record<string, (original: tf.KernelConfig) => tf.KernelConfig> = {
  [tf.Add]: (o) => fastBinary('Add', o),
  [tf.Sub]: (o) => fastBinary('Sub', o),
  [tf.Multiply]: (o) => fastBinary('Multiply', o),
  [tf.RealDiv]: (o) => fastBinary('RealDiv', o),
  [tf.Slice]: fastSlice,
  [tf.SplitV]: fastSplitV,
  [tf.Transpose]: fastTranspose,
  [tf.Sum]: fastSum,
};

const installed = new WeakSet<object>();

/** Replaces the cpu backend's kernels above with the fast-path versions (once per process). */
export function installFastCpuKernels(): void {
  for (const [name, make] of Object.entries(FAST)) {
    const original = tf.getKernel(name, 'cpu');
    if (!original) throw new Error(`installFastCpuKernels: the cpu backend has no kernel ${name} (is @tensorflow/tfjs-backend-cpu registered?)`);
    if (installed.has(original)) continue;
    const fast = make(original);
    installed.add(fast);
    tf.unregisterKernel(name, 'cpu');
    tf.registerKernel(fast);
  }
}

/** Whether the cpu backend's kernel `name` is this module's replacement (for tests). */
export function isFastCpuKernel(name: string): boolean {
  const k = tf.getKernel(name, 'cpu');
  return k !== undefined && installed.has(k);
}
