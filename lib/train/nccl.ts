/**
 * NCCL for `emorl-train --gpus N`, through the addon's run-time loader (native/nccl.cc: dlopen of
 * libnccl.so.2, so neither building nor loading the addon needs NCCL).
 *
 * The gradients of the weights kept on the GPU (the decoder's, the encoder's and the GRUs': DeviceParams) are
 * summed where they lie, by ncclAllReduce on the device's memory; the rest (host-trained tensors,
 * the step's scalars) are host buffers staged through device memory.
 */
import { nativeStatus } from '../native';
import { concatBuffers, DistributedError, splitBuffer, type Communicator } from './distributed';
import type { DeviceParams } from '../ops/device-params';

export interface NcclStatus {
  available: boolean;
  /** The library that was (or would have been) loaded. */
  library: string;
  /** NCCL's version code (e.g. 22105 for 2.21.5) when it has ncclGetVersion. */
  version?: number;
  /** Why NCCL cannot be used. */
  error?: string;
}

interface NativeNcclComm {
  readonly rank: number;
  readonly size: number;
  readonly device: number;
  readonly destroyed: boolean;
  allreduceSum(data: Float32Array): Float32Array;
  destroy(): void;
}

interface NcclAddon {
  ncclStatus(library?: string): NcclStatus;
  ncclGetUniqueId(library?: string): Uint8Array;
  NcclComm: new (uniqueId: Uint8Array, nranks: number, rank: number, device: number, library?: string) => NativeNcclComm;
}

/** The addon's NCCL functions, or an error saying why they are not there. */
function addon(): NcclAddon {
  const s = nativeStatus();
  if (!s.available || !s.path) throw new DistributedError(`NCCL needs the native addon, which is unavailable: ${s.reason}`);
  // The same module object lib/native.ts loaded (require caches by path).
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const mod = require(s.path) as Partial<NcclAddon>;
  if (typeof mod.ncclStatus !== 'function' || typeof mod.NcclComm !== 'function') {
    throw new DistributedError(`the addon at ${s.path} predates the NCCL loader; run \`npm run build:native\``);
  }
  return mod as NcclAddon;
}

/** Whether NCCL can be loaded (`library`: a path or soname; default $EMORL_NCCL_LIBRARY or libnccl.so.2). */
export function ncclStatus(library?: string): NcclStatus {
  let a: NcclAddon;
  try {
    a = addon();
  } catch (err) {
    return { available: false, library: library ?? 'libnccl.so.2', error: (err as Error).message };
  }
  return a.ncclStatus(library);
}

/** A new ncclUniqueId (128 bytes), made by rank 0 and handed to the others. */
export function ncclUniqueId(library?: string): Uint8Array {
  return new Uint8Array(addon().ncclGetUniqueId(library));
}

/** GPUs the addon sees (0 without a CUDA build), with why not. */
export function cudaDevices(): { count: number; built: boolean; error?: string } {
  const s = nativeStatus();
  if (!s.available || !s.info) return { count: 0, built: false, error: s.reason };
  return { count: s.info.cudaDevices, built: s.info.cudaBuilt, error: s.info.cudaError };
}

/**
 * Checks that `--gpus N` can run here: the addon with CUDA, N devices, NCCL. Throws a
 * DistributedError saying what is missing.
 */
export function checkGpuTraining(worldSize: number): void {
  const c = cudaDevices();
  if (!c.built) {
    throw new DistributedError(
      `--gpus needs the addon built with CUDA (EMORL_CUDA=1 npm run build:native)${c.error ? `; the addon: ${c.error}` : ''}; for data-parallel training on CPU processes use --ranks N`,
    );
  }
  if (c.count < worldSize) {
    throw new DistributedError(`--gpus ${worldSize}: ${c.count} CUDA device${c.count === 1 ? '' : 's'} visible${c.error ? ` (${c.error})` : ''}`);
  }
  const n = ncclStatus();
  if (!n.available) throw new DistributedError(`--gpus needs NCCL: ${n.error}`);
}

/** A Communicator over an NCCL communicator (one GPU per rank). */
export class NcclCommunicator implements Communicator {
  private readonly comm: NativeNcclComm;

  /** Blocks until all `worldSize` ranks have joined with the same id. */
  constructor(uniqueId: Uint8Array, readonly rank: number, readonly worldSize: number, device = rank, library?: string) {
    this.comm = new (addon().NcclComm)(uniqueId, worldSize, rank, device, library);
  }

  async allreduceSum(buffers: Float32Array[]): Promise<Float32Array[]> {
    const sum = this.comm.allreduceSum(concatBuffers(buffers));
    return splitBuffer(sum, buffers.map((b) => b.length));
  }

  allreduceDeviceGradients(group: DeviceParams): void {
    const device = `cuda:${this.comm.device}`;
    if (group.device !== device) throw new DistributedError(`NCCL on ${device} cannot sum the ${group.stage}'s gradients, which lie on ${group.device}`);
    group.allreduceGradients(this.comm);
  }

  close(): void {
    if (!this.comm.destroyed) this.comm.destroy();
  }
}
