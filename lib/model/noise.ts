/**
 * Where the model's standard-normal draws come from. Every random draw of a forward pass goes
 * through one `NoiseSource`, in a fixed order (see efficient-morl.ts), so that a pass can be
 * replayed exactly from recorded draws (the golden fixtures record the original's).
 */
import { tf } from '../tf';
import { Rng } from '../util/rng';

export interface NoiseSource {
  /** A tensor of independent standard-normal draws of the given shape. */
  normal(shape: number[]): tf.Tensor;
}

function sizeOf(shape: number[]): number {
  return shape.reduce((a, b) => a * b, 1);
}

/** Draws from the seeded RNG (xoshiro128** + Box-Muller). */
export class SeededNoise implements NoiseSource {
  readonly rng: Rng;

  constructor(seedOrRng: number | Rng) {
    this.rng = typeof seedOrRng === 'number' ? new Rng(seedOrRng) : seedOrRng;
  }

  normal(shape: number[]): tf.Tensor {
    return tf.tensor(this.rng.normals(sizeOf(shape)), shape, 'float32');
  }
}

/** One recorded draw. */
export interface RecordedDraw {
  data: Float32Array;
  shape: number[];
}

/**
 * Returns recorded arrays in order. A draw of another shape than the next recorded one, or a
 * draw after the last, is an error (a replay that silently diverged would be worthless).
 */
export class ReplayNoise implements NoiseSource {
  private next = 0;

  constructor(private readonly draws: RecordedDraw[]) {}

  normal(shape: number[]): tf.Tensor {
    if (this.next >= this.draws.length) {
      throw new Error(`ReplayNoise: draw ${this.next} of shape [${shape}] requested, but only ${this.draws.length} were recorded`);
    }
    const d = this.draws[this.next];
    const same = d.shape.length === shape.length && d.shape.every((s, i) => s === shape[i]);
    if (!same) {
      throw new Error(`ReplayNoise: draw ${this.next} requested with shape [${shape}], but the recorded one has shape [${d.shape}]`);
    }
    if (d.data.length !== sizeOf(shape)) throw new Error(`ReplayNoise: draw ${this.next} holds ${d.data.length} values, not ${sizeOf(shape)}`);
    this.next++;
    return tf.tensor(Float32Array.from(d.data), shape, 'float32');
  }

  /** How many recorded draws have not been used yet. */
  remaining(): number {
    return this.draws.length - this.next;
  }

  used(): number {
    return this.next;
  }
}

/** Records every draw of another source (to build replay fixtures of our own). */
export class RecordingNoise implements NoiseSource {
  readonly draws: RecordedDraw[] = [];

  constructor(private readonly inner: NoiseSource) {}

  normal(shape: number[]): tf.Tensor {
    const t = this.inner.normal(shape);
    this.draws.push({ data: Float32Array.from(t.dataSync() as Float32Array), shape: [...shape] });
    return t;
  }
}
