/**
 * Keys and values the native ops keep where they made them (EncoderArgs.attentionOnly): the
 * encoder's output is then a one-element token on the gradient tape, the attention rounds read k
 * and v where they are and sum dk and dv there, and the encoder's backward pass takes those sums.
 * On the CPU they are the addon's arrays; on a GPU device, buffers of the encoder's workspace.
 */
import { tf } from '../tf';
import type { EncoderStageSpec, StageDevice } from './addon';
import { paramGradsEnabled } from './conv';
import type { EncoderOutput, ResidentKeysValues } from './encoder-stage';

export abstract class KeptKeysValues implements ResidentKeysValues {
  token!: tf.Tensor;
  constructor(readonly device: string, readonly shape: readonly [number, number, number]) {}
}

/**
 * Arrays the encoder's backward pass is done with (k, v and the rounds' dk, dv sums), by length,
 * for the next pass: a fresh one of 5 MB (a Tetrominoes batch) costs a page fault per 4 KiB and
 * V8 collections, ~3 ms each step; a warm one is zeroed in a tenth of that. Only arrays no one
 * reads any more come here.
 */
const released = new Map<number, Float32Array[]>();
const KEEP_RELEASED = 4;

/** `count` released arrays of length n, their contents whatever they were (undefined: fewer are there). */
export function reusedArrays(n: number, count: number): Float32Array[] | undefined {
  const list = released.get(n);
  return list && list.length >= count ? list.splice(list.length - count, count) : undefined;
}

/** n zeros: a released array of that length, zeroed, or a new one. */
function zeroedArray(n: number): Float32Array {
  const a = reusedArrays(n, 1)?.[0];
  return a ? a.fill(0) : new Float32Array(n);
}

/** Hands arrays back once nothing reads them (CpuKeysValues' k, v and sums after the backward call). */
export function releaseArrays(...arrays: Float32Array[]): void {
  for (const a of arrays) {
    let list = released.get(a.length);
    if (!list) released.set(a.length, (list = []));
    if (list.length < KEEP_RELEASED && !list.includes(a)) list.push(a);
  }
}

/** k and v [B, H·W, Z] as the CPU kernels made them, and the attention rounds' dk, dv sums. */
export class CpuKeysValues extends KeptKeysValues {
  private dk: Float32Array | null = null;
  private dv: Float32Array | null = null;
  constructor(shape: readonly [number, number, number], readonly k: Float32Array, readonly v: Float32Array) {
    super('cpu', shape);
  }
  /** the arrays the attention rounds add dk and dv onto (zero at first) */
  sums(): { dk: Float32Array; dv: Float32Array } {
    this.dk ??= zeroedArray(this.k.length);
    this.dv ??= zeroedArray(this.v.length);
    return { dk: this.dk, dv: this.dv };
  }
  /**
   * the sums, handed to the encoder's backward pass once (zero when no round ran backward); give
   * them to releaseArrays when it is done with them
   */
  takeSums(): { dk: Float32Array; dv: Float32Array } {
    const s = this.sums();
    this.dk = this.dv = null;
    return s;
  }
}

/**
 * k and v in a GPU device's encoder workspace: the encoder's spec (to find them there, or
 * recompute them when another forward ran on that workspace since), the stamp of the activation
 * set holding them now, and the id under which the attention rounds sum dk and dv there.
 */
export class DeviceKeysValues extends KeptKeysValues {
  readonly sumId: number;
  constructor(device: StageDevice, shape: readonly [number, number, number], readonly spec: EncoderStageSpec, public stamp: number) {
    super(device, shape);
    this.sumId = stamp;
  }
}

/**
 * The encoder's custom op over `inputs` when it keeps k and v: `run` makes them from the inputs
 * (themselves: customGrad hands them over as given) and gives the inputs' gradients from the
 * attention rounds' sums; the op's output is the token.
 */
export function keptKvOp<R extends KeptKeysValues>(inputs: tf.Tensor[], run: () => {
  kept: R;
  grads: (needParams: boolean) => tf.Tensor[];
}): EncoderOutput {
  let kept: R | null = null;
  const op = tf.customGrad((...args) => {
    const save = args.pop() as tf.GradSaveFunc;
    const r = run();
    kept = r.kept;
    save([]);
    return { value: tf.zeros([1]), gradFunc: () => r.grads(paramGradsEnabled()) };
  });
  const token = op(...inputs);
  const resident = kept! as R;
  resident.token = token;
  return { resident };
}
