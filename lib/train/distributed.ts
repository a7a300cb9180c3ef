/**
 * Data-parallel training: the one collective the trainer needs, an element-wise sum over ranks.
 *
 *   every rank: the same global batch sequence, its contiguous slice of each batch, its rows of
 *   the globally-shaped noise, a loss normalised by the GLOBAL batch size;
 *   allreduceSum(gradients ++ scalars) → the single-rank run's gradients (to float rounding);
 *   (gradients kept on a GPU device are summed there: allreduceDeviceGradients, or through the host);
 *   then clipping, Adam and GECO run identically everywhere, so parameters stay identical.
 *
 * Implementations: `LocalGroup` (ranks in one process, for tests and the library), the launcher's
 * CPU allreduce over its IPC channel (`ProcessCommunicator`, launcher.ts) and NCCL on GPUs
 * (nccl.ts). Every implementation gives all ranks the same bits: the sum is taken in one place
 * in a fixed rank order (CPU) or by NCCL's own deterministic reduction.
 */
import { crc32 } from '../util/crc32';
import type { DeviceParams } from '../ops/device-params';

export interface Communicator {
  readonly rank: number;
  readonly worldSize: number;
  /**
   * Element-wise sum over the ranks of each buffer (all ranks pass buffers of the same lengths,
   * in the same order, and call collectives in the same order). Resolves to new buffers.
   */
  allreduceSum(buffers: Float32Array[]): Promise<Float32Array[]>;
  /**
   * Sums the gradients a pass left on a GPU device (a DeviceParams group's) over the ranks where
   * they lie, in place (NCCL on the group's CUDA device). Absent: the trainer adds them to its
   * allreduceSum through the host (downloaded, then the sums written back).
   */
  allreduceDeviceGradients?(group: DeviceParams): void;
  /** Releases the communicator (idempotent). */
  close?(): void;
}

export class DistributedError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'DistributedError';
  }
}

export function checkWorld(rank: number, worldSize: number): void {
  if (!Number.isInteger(worldSize) || worldSize < 1) throw new DistributedError(`world size must be a positive integer, got ${worldSize}`);
  if (!Number.isInteger(rank) || rank < 0 || rank >= worldSize) throw new DistributedError(`rank must be an integer in [0, ${worldSize}), got ${rank}`);
}

/** Concatenates buffers into one (for transports that move a single array). */
export function concatBuffers(buffers: Float32Array[]): Float32Array {
  let n = 0;
  for (const b of buffers) n += b.length;
  const out = new Float32Array(n);
  let at = 0;
  for (const b of buffers) {
    out.set(b, at);
    at += b.length;
  }
  return out;
}

/** Splits a concatenation back into buffers of the given lengths. */
export function splitBuffer(flat: Float32Array, lengths: number[]): Float32Array[] {
  const total = lengths.reduce((a, b) => a + b, 0);
  if (flat.length !== total) throw new DistributedError(`allreduce returned ${flat.length} values, expected ${total}`);
  const out: Float32Array[] = [];
  let at = 0;
  for (const n of lengths) {
    out.push(flat.slice(at, at + n));
    at += n;
  }
  return out;
}

/**
 * The reduction every CPU implementation uses: per element, the ranks' values summed in rank
 * order in double precision and rounded once to float32. Deterministic, and the same result
 * goes to every rank.
 */
export function sumInRankOrder(contributions: Float32Array[]): Float32Array {
  const n = contributions[0].length;
  for (let r = 1; r < contributions.length; r++) {
    if (contributions[r].length !== n) {
      throw new DistributedError(`allreduce: rank ${r} contributed ${contributions[r].length} values, rank 0 ${n} (the ranks run different code paths)`);
    }
  }
  const acc = new Float64Array(n);
  for (const c of contributions) for (let i = 0; i < n; i++) acc[i] += c[i];
  return Float32Array.from(acc);
}

/**
 * Ranks of one process sharing a reduction: `LocalGroup.create(n)` gives n communicators; a
 * collective resolves once every rank has called it. Used to run N ranks as concurrent async
 * tasks (tests, the library); one rank alone reduces to the identity.
 */
export class LocalGroup {
  private pending: Array<{ data: Float32Array; lengths: number[]; resolve: (r: Float32Array[]) => void; reject: (e: Error) => void } | undefined>;
  private failed: Error | undefined;

  private constructor(readonly worldSize: number) {
    this.pending = new Array(worldSize).fill(undefined);
  }

  static create(worldSize: number): Communicator[] {
    checkWorld(0, worldSize);
    const g = new LocalGroup(worldSize);
    return Array.from({ length: worldSize }, (_, rank) => g.member(rank));
  }

  /** Fails every waiting and future collective (a rank gave up: nobody may wait forever). */
  abort(err: Error): void {
    if (this.failed) return;
    this.failed = err;
    for (const p of this.pending) p?.reject(err);
    this.pending.fill(undefined);
  }

  private member(rank: number): Communicator {
    return {
      rank,
      worldSize: this.worldSize,
      allreduceSum: (buffers) => this.contribute(rank, buffers),
      close: () => this.abort(new DistributedError(`rank ${rank} left the group`)),
    };
  }

  private contribute(rank: number, buffers: Float32Array[]): Promise<Float32Array[]> {
    if (this.failed) return Promise.reject(this.failed);
    if (this.pending[rank]) return Promise.reject(new DistributedError(`rank ${rank} started a collective before its previous one finished`));
    return new Promise((resolve, reject) => {
      this.pending[rank] = { data: concatBuffers(buffers), lengths: buffers.map((b) => b.length), resolve, reject };
      if (this.pending.every((p) => p !== undefined)) {
        const all = this.pending as Array<NonNullable<(typeof this.pending)[number]>>;
        this.pending = new Array(this.worldSize).fill(undefined);
        let sum: Float32Array;
        try {
          sum = sumInRankOrder(all.map((p) => p.data));
        } catch (err) {
          this.abort(err as Error);
          for (const p of all) p.reject(err as Error);
          return;
        }
        // Each rank its own copy, split as it asked.
        for (const p of all) p.resolve(splitBuffer(Float32Array.from(sum), p.lengths));
      }
    });
  }
}

/** A CRC-32 of float arrays' bytes, in the given order. */
export function checksumArrays(arrays: Float32Array[]): number {
  let c = 0;
  for (const a of arrays) c = crc32(new Uint8Array(a.buffer, a.byteOffset, a.byteLength), c);
  return c >>> 0;
}

/**
 * Every rank's 32-bit value, through the sum allreduce (which is all NCCL offers): rank r puts
 * its value, split into two 16-bit halves that float32 holds exactly, at slots 2r and 2r+1.
 */
export async function allgatherUint32(comm: Communicator, value: number): Promise<number[]> {
  const buf = new Float32Array(2 * comm.worldSize);
  buf[2 * comm.rank] = value >>> 16;
  buf[2 * comm.rank + 1] = value & 0xffff;
  const [sum] = await comm.allreduceSum([buf]);
  return Array.from({ length: comm.worldSize }, (_, r) => ((sum[2 * r] << 16) | sum[2 * r + 1]) >>> 0);
}

/** Waits until every rank gets here. */
export async function barrier(comm: Communicator): Promise<void> {
  if (comm.worldSize > 1) await comm.allreduceSum([new Float32Array(1)]);
}

/** This rank's rows [rank·B/N, (rank+1)·B/N) of a global batch of B (B must divide by N). */
export function shardRange(globalBatch: number, rank: number, worldSize: number): [number, number] {
  checkWorld(rank, worldSize);
  if (!Number.isInteger(globalBatch) || globalBatch % worldSize !== 0) {
    throw new DistributedError(`training.batch_size ${globalBatch} is not divisible by the ${worldSize} ranks (each rank takes an equal share of every batch)`);
  }
  const per = globalBatch / worldSize;
  return [rank * per, (rank + 1) * per];
}
