/**
 * lib/cpu-kernels.ts: the float32 Add / Sub / Mul / RealDiv that replace the tfjs cpu backend's
 * give exactly float32(a op b) per element, same shape or broadcast (against a plain reference
 * over output coordinates), int32 still reaches tfjs' own kernel; Slice and SplitV copy exactly
 * what tfjs' own copy (checked against a reference over coordinates); Sum gives float32 of each
 * output's double sum in row-major order of the reduced axes, as tfjs' own.
 */
import { tf, initBackend } from '../lib/tf';
import { broadcastAxes, isFastCpuKernel } from '../lib/cpu-kernels';

beforeAll(async () => {
  await initBackend('cpu');
});

const ops: [string, (a: tf.Tensor, b: tf.Tensor) => tf.Tensor, (x: number, y: number) => number][] = [
  ['add', tf.add, (x, y) => x + y],
  ['sub', tf.sub, (x, y) => x - y],
  ['mul', tf.mul, (x, y) => x * y],
  ['div', tf.div, (x, y) => x / y],
];

/** Row-major coordinates of flat index i in `shape`. */
function coords(i: number, shape: number[]): number[] {
  const c = new Array<number>(shape.length);
  for (let d = shape.length - 1; d >= 0; d--) {
    c[d] = i % shape[d];
    i = Math.floor(i / shape[d]);
  }
  return c;
}
/** Flat index in `shape` of coordinates c (right-aligned; size-1 axes broadcast). */
function flatBroadcast(c: number[], shape: number[]): number {
  let i = 0;
  const off = c.length - shape.length;
  for (let d = 0; d < shape.length; d++) i = i * shape[d] + (shape[d] === 1 ? 0 : c[d + off]);
  return i;
}

test.each(ops)('%s, same shape: float32 of the exact result, element by element', (_, f, ref) => {
  tf.tidy(() => {
    const a = tf.randomUniform([3, 5, 7], -3, 3, 'float32', 1);
    const b = tf.randomUniform([3, 5, 7], -3, 3, 'float32', 2);
    const y = f(a, b);
    expect(y.dtype).toBe('float32');
    expect(y.shape).toEqual([3, 5, 7]);
    const av = a.dataSync(), bv = b.dataSync(), yv = y.dataSync();
    for (let i = 0; i < yv.length; i++) expect(yv[i]).toBe(Math.fround(ref(av[i], bv[i])));
  });
});

const broadcastCases: [number[], number[]][] = [
  [[2, 3], [3]],
  [[2, 1, 4], [3, 1]],
  [[], [5]],
  [[4, 1], [1, 5]],
  [[3, 1, 2, 1], [1, 4, 1, 6]],
  [[1, 1], [2, 3]],
  [[6, 5], [1]],
];

test.each(ops)('%s, broadcasting: float32 of the exact result at every output coordinate', (_, f, ref) => {
  tf.tidy(() => {
    for (const [as, bs] of broadcastCases) {
      for (const [sa, sb] of [[as, bs], [bs, as]]) {
        const a = tf.randomUniform(sa, -3, 3, 'float32', 3), b = tf.randomUniform(sb, 0.5, 3, 'float32', 4);
        const y = f(a, b);
        const shape = tf.broadcast_util.assertAndGetBroadcastShape(sa, sb);
        expect(y.shape).toEqual(shape);
        const av = a.dataSync(), bv = b.dataSync(), yv = y.dataSync();
        for (let i = 0; i < yv.length; i++) {
          const c = coords(i, shape);
          expect(yv[i]).toBe(Math.fround(ref(av[flatBroadcast(c, sa)], bv[flatBroadcast(c, sb)])));
        }
      }
    }
  });
});

test('initBackend installs them in place of tfjs\' own', () => {
  for (const name of ['Add', 'Sub', 'Multiply', 'RealDiv', 'Slice', 'SplitV', 'Transpose', 'Sum']) expect([name, isFastCpuKernel(name)]).toEqual([name, true]);
  expect(isFastCpuKernel('Maximum')).toBe(false);
});

test('broadcastAxes merges axes each input spans or skips alike', () => {
  expect(broadcastAxes([32, 1225, 64], [64])).toEqual({ dims: [39200, 64], sa: [64, 1], sb: [0, 1], shape: [32, 1225, 64] });
  expect(broadcastAxes([4, 1], [1, 5])).toEqual({ dims: [4, 5], sa: [1, 0], sb: [0, 1], shape: [4, 5] });
  expect(broadcastAxes([2, 3], [4])).toBeNull();
});

test.each(ops)('%s, int32: tfjs\' own kernel', (_, f, ref) => {
  tf.tidy(() => {
    const i = f(tf.tensor1d([1, 2, 3], 'int32'), tf.tensor1d([4, 5, 6], 'int32'));
    expect(i.dtype).toBe('int32');
    if (ref(1, 4) === Math.trunc(ref(1, 4))) expect(Array.from(i.dataSync())).toEqual([1, 2, 3].map((v, k) => ref(v, [4, 5, 6][k])));
  });
});

test('transpose puts every element at its permuted coordinates (and int32 reaches tfjs\' own)', () => {
  tf.tidy(() => {
    for (const [shape, perm] of [[[4, 3, 5, 6], [0, 2, 3, 1]], [[2, 3, 4], [2, 0, 1]], [[7, 1, 3], [1, 2, 0]], [[5, 4], [1, 0]], [[6], [0]],
      [[2, 3, 2, 2, 3], [4, 1, 3, 0, 2]], [[3, 0, 2], [2, 1, 0]]] as [number[], number[]][]) {
      const x = tf.randomUniform(shape, -1, 1, 'float32', 9);
      const y = tf.transpose(x, perm);
      expect(y.shape).toEqual(perm.map((p) => shape[p]));
      const xv = x.dataSync(), yv = y.dataSync();
      for (let i = 0; i < yv.length; i++) {
        const c = coords(i, y.shape);
        const src = new Array<number>(shape.length);
        perm.forEach((p, k) => (src[p] = c[k]));
        expect([i, yv[i]]).toEqual([i, xv[flatBroadcast(src, shape)]]);
      }
    }
    expect(Array.from(tf.transpose(tf.tensor2d([1, 2, 3, 4, 5, 6], [2, 3], 'int32')).dataSync())).toEqual([1, 4, 2, 5, 3, 6]);
  });
});

test('slice and split copy exactly the elements at their coordinates', () => {
  tf.tidy(() => {
    const shape = [3, 4, 5, 70];
    const x = tf.randomUniform(shape, -1, 1, 'float32', 5);
    const xv = x.dataSync();
    const at = (c: number[]) => xv[((c[0] * shape[1] + c[1]) * shape[2] + c[2]) * shape[3] + c[3]];
    const check = (y: tf.Tensor, begin: number[]) => {
      const yv = y.dataSync();
      for (let i = 0; i < yv.length; i++) {
        const c = coords(i, y.shape);
        expect(yv[i]).toBe(at(c.map((v, d) => v + begin[d])));
      }
    };
    for (const [begin, size] of [[[0, 0, 0, 0], [3, 4, 5, 70]], [[1, 0, 0, 0], [2, 4, 5, 70]], [[0, 1, 2, 3], [3, 2, 3, 60]], [[2, 3, 4, 69], [1, 1, 1, 1]], [[0, 0, 1, 0], [3, 4, 3, 70]]]) {
      check(tf.slice(x, begin, size), begin);
    }
    const parts = tf.split(x, [30, 40], 3);
    check(parts[0], [0, 0, 0, 0]);
    check(parts[1], [0, 0, 0, 30]);
    const rows = tf.split(x, 2, 2 - 1);
    check(rows[1], [0, 2, 0, 0]);
    // int32 still works (tfjs' own kernels)
    expect(Array.from(tf.split(tf.tensor1d([1, 2, 3, 4], 'int32'), 2)[1].dataSync())).toEqual([3, 4]);
  });
});

test('gradients through them are unchanged (tf.grads of a product of sums)', () => {
  tf.tidy(() => {
    const a = tf.tensor1d([1, 2, 3]), b = tf.tensor1d([4, 5, 6]);
    const [ga, gb] = tf.grads((x: tf.Tensor, y: tf.Tensor) => tf.sum(tf.mul(tf.add(x, y), tf.sub(x, y))) as tf.Scalar)([a, b]);
    // d/dx (x+y)(x−y) = 2x, d/dy = −2y
    expect(Array.from(ga.dataSync())).toEqual([2, 4, 6]);
    expect(Array.from(gb.dataSync())).toEqual([-8, -10, -12]);
  });
});

test('Sum: each output the float32 of its double sum in row-major order of the reduced axes, as tfjs\' own', () => {
  tf.tidy(() => {
    const cases: [number[], number | number[] | undefined, boolean][] = [
      [[128, 32], 0, false],
      [[128, 32], 1, false],
      [[128, 32], undefined, false],
      [[4, 1, 6, 5], [0, 2], true],
      [[4, 3, 6, 5], [1, 3], false],
      [[4, 3, 6, 5], [3, 1], false],
      [[4, 3, 6, 5], -1, true],
      [[2, 1, 3], 1, false],
      [[1, 1], [0, 1], false],
      [[], undefined, false],
      [[3, 0, 2], 1, false],
      [[3, 0, 2], 0, true],
    ];
    for (const [shape, axis, keepDims] of cases) {
      const axes = tf.util.parseAxisParam(axis ?? shape.map((_, d) => d), shape);
      const [outShape] = tf.backend_util.computeOutAndReduceShapes(shape, axes);
      const kept = shape.map((_, d) => d).filter((d) => !axes.includes(d));
      // tfjs moves the reduced axes innermost in the order given (ours runs only when that is
      // ascending; [3, 1] checks this reference against tfjs' own kernel)
      const reducedShape = axes.map((d) => shape[d]);
      const reducedSize = reducedShape.reduce((a, b) => a * b, 1);
      const outSize = kept.reduce((a, d) => a * shape[d], 1);
      /** x's flat index of output i's j-th reduced element (row-major over the reduced axes) */
      const at = (i: number, j: number): number => {
        const oc = coords(i, kept.map((d) => shape[d])), rc = coords(j, reducedShape);
        return shape.reduce((a, n, d) => a * n + (axes.includes(d) ? rc[axes.indexOf(d)] : oc[kept.indexOf(d)]), 0);
      };
      // Each output's first two elements are +1e30 and −1e30, the rest in [−1, 1]: in that
      // order the rest survive, in any other they vanish into the big ones.
      const xv = tf.randomUniform(shape, -1, 1, 'float32', 5).dataSync() as Float32Array;
      if (reducedSize >= 3) {
        for (let i = 0; i < outSize; i++) {
          xv[at(i, 0)] = 1e30;
          xv[at(i, 1)] = -1e30;
        }
      }
      const y = tf.sum(tf.tensor(xv, shape), axis, keepDims);
      expect(y.shape).toEqual(keepDims ? tf.backend_util.expandShapeToKeepDim(outShape, axes) : outShape);
      const yv = y.dataSync();
      for (let i = 0; i < outSize; i++) {
        let sum = 0;
        for (let j = 0; j < reducedSize; j++) sum += xv[at(i, j)];
        expect(yv[i]).toBe(Math.fround(sum));
      }
    }
    // int32 and bool still reach tfjs' own kernel
    expect(Array.from(tf.sum(tf.tensor2d([1, 2, 3, 4], [2, 2], 'int32'), 0).dataSync())).toEqual([4, 6]);
    expect(tf.sum(tf.tensor1d([true, false, true], 'bool')).dataSync()[0]).toBe(2);
  });
});
