/**
 * lib/cpu-kernels.ts: the same-shape float32 Add / Sub / Mul that replace the tfjs cpu backend's
 * give exactly float32(a op b) per element, and every other case (broadcasting, int32) still
 * reaches tfjs' own kernel.
 */
import { tf, initBackend } from '../lib/tf';

beforeAll(async () => {
  await initBackend('cpu');
});

const ops: [string, (a: tf.Tensor, b: tf.Tensor) => tf.Tensor, (x: number, y: number) => number][] = [
  ['add', tf.add, (x, y) => x + y],
  ['sub', tf.sub, (x, y) => x - y],
  ['mul', tf.mul, (x, y) => x * y],
];

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

test.each(ops)('%s, broadcasting and int32: tfjs\' own kernel', (_, f, ref) => {
  tf.tidy(() => {
    const a = tf.tensor2d([1.5, -2, 3, 4.25, 5, -6], [2, 3]);
    const b = tf.tensor1d([0.5, 2, -1]);
    expect(Array.from(f(a, b).dataSync())).toEqual([1.5, -2, 3, 4.25, 5, -6].map((v, i) => Math.fround(ref(v, [0.5, 2, -1][i % 3]))));
    const i = f(tf.tensor1d([1, 2, 3], 'int32'), tf.tensor1d([4, 5, 6], 'int32'));
    expect(i.dtype).toBe('int32');
    expect(Array.from(i.dataSync())).toEqual([1, 2, 3].map((v, k) => ref(v, [4, 5, 6][k])));
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
