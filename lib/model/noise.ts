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

/**
 * One rank's share of another source's draws in data-parallel training: each draw is taken at
 * the GLOBAL shape (the leading dimension times `worldSize`) and this rank keeps its contiguous
 * block of rows [rank·n, (rank+1)·n). The model's draws are [B·K, z], image-major, so with every
 * rank walking the same seeded source, rank r receives exactly the rows that a single-rank run
 * over the whole global batch would have given its images r·B/N … (r+1)·B/N − 1.
 */
export class ShardedNoise implements NoiseSource {
  constructor(
    readonly inner: NoiseSource,
    readonly rank: number,
    readonly worldSize: number,
  ) {
    if (!Number.isInteger(worldSize) || worldSize < 1) throw new Error(`ShardedNoise: worldSize must be a positive integer, got ${worldSize}`);
    if (!Number.isInteger(rank) || rank < 0 || rank >= worldSize) throw new Error(`ShardedNoise: rank must be an integer in [0, ${worldSize}), got ${rank}`);
  }

  normal(shape: number[]): tf.Tensor {
    if (this.worldSize === 1) return this.inner.normal(shape);
    if (shape.length === 0) throw new Error('ShardedNoise: a scalar draw cannot be split across ranks');
    const [n, ...rest] = shape;
    const global = this.inner.normal([n * this.worldSize, ...rest]);
    const row = sizeOf(rest);
    const all = global.dataSync() as Float32Array;
    const mine = all.slice(this.rank * n * row, (this.rank + 1) * n * row);
    global.dispose();
    return tf.tensor(mine, shape, 'float32');
  }
}
