/**
 * An endless batch iterator over one split: seeded shuffling reshuffled every epoch, drop-last,
 * sharding by (rank, worldSize) as PyTorch's DistributedSampler does, and prefetch from a reader
 * thread. Its position (epoch, batch) is all a checkpoint needs to resume it exactly.
 */
import { H5File } from '../io/h5';
import { mixSeeds, Rng } from '../util/rng';
import {
  assembleBatch,
  Batch,
  DatasetError,
  DatasetInfo,
  DatasetOptions,
  describeSplit,
  readRawBatch,
  readRunsFrom,
  RowReader,
} from './dataset';
import { ReaderThread } from './reader-thread';

export interface SamplerOptions {
  seed: number;
  /** Reshuffle every epoch (default true); false keeps file order. */
  shuffle?: boolean;
  rank?: number;
  worldSize?: number;
}

export interface IteratorOptions extends SamplerOptions {
  batchSize: number;
  /** Drop the last incomplete batch of each epoch (default true, as the original trains). */
  dropLast?: boolean;
  /** Batches read ahead in a reader thread; 0 reads in this thread on demand (default 2). */
  prefetch?: number;
}

/** The next batch to deliver. */
export interface IteratorPosition {
  epoch: number;
  batch: number;
}

export interface EpochBatch extends Batch {
  epoch: number;
  batchInEpoch: number;
}

function checkShard(rank: number, worldSize: number): void {
  if (!Number.isInteger(worldSize) || worldSize < 1) throw new DatasetError(`worldSize must be a positive integer, got ${worldSize}`);
  if (!Number.isInteger(rank) || rank < 0 || rank >= worldSize) {
    throw new DatasetError(`rank must be an integer in [0, ${worldSize}), got ${rank}`);
  }
}

/**
 * This rank's example order for one epoch: a permutation of 0..n−1 drawn from (seed, epoch),
 * padded by wrapping around to a multiple of worldSize, every worldSize-th from `rank`.
 */
export function epochIndices(n: number, epoch: number, options: SamplerOptions): Int32Array {
  const { rank = 0, worldSize = 1, shuffle = true } = options;
  checkShard(rank, worldSize);
  if (n < 1) throw new DatasetError('cannot sample from an empty dataset');
  const order = new Int32Array(n);
  for (let i = 0; i < n; i++) order[i] = i;
  if (shuffle) new Rng(mixSeeds(options.seed, epoch)).shuffle(order);
  const perRank = Math.ceil(n / worldSize);
  const out = new Int32Array(perRank);
  for (let i = 0; i < perRank; i++) out[i] = order[(rank + i * worldSize) % n];
  return out;
}

export function batchesPerEpoch(n: number, options: IteratorOptions): number {
  const perRank = Math.ceil(n / (options.worldSize ?? 1));
  return options.dropLast ?? true ? Math.floor(perRank / options.batchSize) : Math.ceil(perRank / options.batchSize);
}

/** Validates batch size, sharding and start position against a split; returns batches per epoch. */
function checkIteration(info: DatasetInfo, options: IteratorOptions, start: IteratorPosition): number {
  if (!Number.isInteger(options.batchSize) || options.batchSize < 1) {
    throw new DatasetError(`batch size must be a positive integer, got ${options.batchSize}`);
  }
  checkShard(options.rank ?? 0, options.worldSize ?? 1);
  const perEpoch = batchesPerEpoch(info.length, options);
  if (perEpoch < 1) {
    throw new DatasetError(
      `${info.file}: '${info.split}' has ${info.length} examples, too few for one batch of ${options.batchSize}` +
        `${(options.worldSize ?? 1) > 1 ? ` on each of ${options.worldSize} ranks` : ''}`,
    );
  }
  if (!Number.isInteger(start.epoch) || start.epoch < 0 || !Number.isInteger(start.batch) || start.batch < 0 || start.batch >= perEpoch) {
    throw new DatasetError(`bad iterator position ${JSON.stringify(start)} (${perEpoch} batches per epoch)`);
  }
  return perEpoch;
}

export class BatchIterator {
  private epoch: number;
  private batch: number;
  private order: Int32Array;
  private orderEpoch: number;
  private readonly queue: Array<{ position: IteratorPosition; batch: Promise<EpochBatch> }> = [];
  private readonly perEpoch: number;

  private constructor(
    readonly info: DatasetInfo,
    private readonly reader: RowReader,
    private readonly release: () => Promise<void>,
    private readonly options: IteratorOptions,
    start: IteratorPosition,
  ) {
    this.perEpoch = checkIteration(info, options, start);
    this.epoch = start.epoch;
    this.batch = start.batch;
    this.orderEpoch = start.epoch;
    this.order = epochIndices(info.length, start.epoch, options);
  }

  static async open(
    filePath: string,
    dataset: DatasetOptions,
    options: IteratorOptions,
    start: IteratorPosition = { epoch: 0, batch: 0 },
  ): Promise<BatchIterator> {
    const file = await H5File.open(filePath, 'r');
    let info: DatasetInfo;
    try {
      info = describeSplit(file, dataset);
      checkIteration(info, options, start);
    } catch (err) {
      file.close();
      throw err;
    }
    const prefetch = options.prefetch ?? 2;
    if (prefetch > 0) {
      file.close();
      const thread = new ReaderThread(filePath);
      return new BatchIterator(info, thread, () => thread.close(), options, start);
    }
    const inThread: RowReader = { readRuns: async (requests) => readRunsFrom(file, requests) };
    return new BatchIterator(info, inThread, async () => file.close(), options, start);
  }

  get batchesPerEpoch(): number {
    return this.perEpoch;
  }

  /** Position of the next batch `next()` returns (batches read ahead do not count). */
  position(): IteratorPosition {
    const head = this.queue[0];
    return head ? { ...head.position } : { epoch: this.epoch, batch: this.batch };
  }

  private indicesAt(position: IteratorPosition): Int32Array {
    if (position.epoch !== this.orderEpoch) {
      this.order = epochIndices(this.info.length, position.epoch, this.options);
      this.orderEpoch = position.epoch;
    }
    const B = this.options.batchSize;
    return this.order.slice(position.batch * B, Math.min((position.batch + 1) * B, this.order.length));
  }

  private request(): void {
    const position = { epoch: this.epoch, batch: this.batch };
    const indices = this.indicesAt(position);
    const batch = readRawBatch(this.reader, this.info, indices).then((raw) => ({
      ...assembleBatch(this.info, raw),
      epoch: position.epoch,
      batchInEpoch: position.batch,
    }));
    // A rejected read ahead must not surface as an unhandled rejection before it is awaited.
    batch.catch(() => undefined);
    this.queue.push({ position, batch });
    this.batch++;
    if (this.batch === this.perEpoch) {
      this.batch = 0;
      this.epoch++;
    }
  }

  async next(): Promise<EpochBatch> {
    if (this.queue.length === 0) this.request();
    const head = this.queue.shift() as (typeof this.queue)[number];
    while (this.queue.length < (this.options.prefetch ?? 2)) this.request();
    return head.batch;
  }

  async close(): Promise<void> {
    this.queue.length = 0;
    await this.release();
  }
}
