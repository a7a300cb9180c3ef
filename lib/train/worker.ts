/**
 * One rank of a data-parallel run, started by the launcher (launcher.ts) with an IPC channel:
 * it says 'ready', receives its rank and job, trains (loop.ts with a communicator) and reports
 * 'done' with rank 0's summary, or 'error'. It exits as soon as the channel closes (the
 * launcher died or gave up), so no worker outlives its job.
 */
import { readPth } from '../params/pth';
import type { ParamRecord } from '../params/store';
import { initBackend } from '../tf';
import { concatBuffers, DistributedError, splitBuffer, type Communicator } from './distributed';
import type { DistributedBackend, LauncherMessage, WorkerJob, WorkerMessage } from './launcher';
import { train, type TrainSummary } from './loop';
import { NcclCommunicator, ncclUniqueId } from './nccl';

if (!process.send) {
  process.stderr.write('emorl worker: this script is started by `emorl-train --ranks N` / `--gpus N`, not directly\n');
  process.exit(2);
}

let rank = -1;

function post(msg: WorkerMessage): Promise<void> {
  return new Promise((resolve, reject) => {
    if (!process.connected || !process.send) {
      reject(new DistributedError('the launcher is gone'));
      return;
    }
    process.send(msg, undefined, {}, (err) => (err ? reject(err) : resolve()));
  });
}

const onDisconnect = () => {
  process.stderr.write(`emorl-train: rank ${rank < 0 ? '?' : rank}: the launcher is gone (IPC channel closed); exiting\n`);
  process.exit(1);
};
process.on('disconnect', onDisconnect);

/** The CPU allreduce: contributions go to the launcher, which sums and answers every rank. */
class ProcessCommunicator implements Communicator {
  private seq = 0;
  private readonly waiting = new Map<number, { lengths: number[]; resolve: (r: Float32Array[]) => void; reject: (e: Error) => void }>();

  constructor(
    readonly rank: number,
    readonly worldSize: number,
  ) {}

  allreduceSum(buffers: Float32Array[]): Promise<Float32Array[]> {
    const seq = this.seq++;
    return new Promise((resolve, reject) => {
      this.waiting.set(seq, { lengths: buffers.map((b) => b.length), resolve, reject });
      post({ type: 'allreduce', seq, data: concatBuffers(buffers) }).catch((err: Error) => {
        this.waiting.delete(seq);
        reject(err);
      });
    });
  }

  deliver(seq: number, data: Float32Array): void {
    const w = this.waiting.get(seq);
    if (!w) throw new DistributedError(`rank ${this.rank}: an allreduce result nobody waits for (collective ${seq})`);
    this.waiting.delete(seq);
    try {
      w.resolve(splitBuffer(data, w.lengths));
    } catch (err) {
      w.reject(err as Error);
    }
  }
}

let processComm: ProcessCommunicator | undefined;
let ncclId: ((id: Uint8Array) => void) | undefined;
const ncclIdPromise = new Promise<Uint8Array>((resolve) => (ncclId = resolve));

// r: the global rank; local: this node's index of the rank (its GPU with --gpus)
async function run(r: number, local: number, worldSize: number, backend: DistributedBackend, job: WorkerJob): Promise<TrainSummary> {
  await initBackend('cpu');
  let comm: Communicator;
  if (backend === 'nccl') {
    if (r === 0) await post({ type: 'nccl-id', id: ncclUniqueId() });
    const id = await ncclIdPromise;
    comm = new NcclCommunicator(id, r, worldSize, local);
  } else {
    comm = processComm = new ProcessCommunicator(r, worldSize);
  }
  const initialParams: ParamRecord | undefined = job.initFrom ? Object.fromEntries(readPth(job.initFrom).params) : undefined;
  try {
    return await train({
      config: job.config,
      dataFile: job.dataFile,
      outDir: job.outDir,
      steps: job.steps,
      resume: job.resume,
      initialParams,
      progress: r === 0 && job.progress,
      prefetch: job.prefetch,
      distributed: { comm, checksumEvery: job.checksumEvery },
      backend: job.backend,
      device: backend === 'nccl' ? `cuda:${local}` : job.device,
      precision: job.precision,
      callbacks: r === 0 ? { onStep: (res) => void post({ type: 'step', step: res.step }).catch(() => undefined) } : undefined,
    });
  } finally {
    comm.close?.();
  }
}

process.on('message', (raw) => {
  const msg = raw as LauncherMessage;
  switch (msg.type) {
    case 'start':
      rank = msg.rank;
      run(msg.rank, msg.localRank, msg.worldSize, msg.backend, msg.job).then(
        async (summary) => {
          // Only what the launcher needs: no tensors, no closures.
          const { last, ...rest } = summary;
          const plain: TrainSummary = { ...rest };
          if (last) {
            const { outputs: _o, release: _r, ...values } = last as typeof last & { outputs?: unknown; release?: unknown };
            plain.last = values;
          }
          await post({ type: 'done', summary: plain }).catch(() => undefined);
          process.off('disconnect', onDisconnect);
          process.exit(0);
        },
        async (err: Error & { allRanks?: boolean }) => {
          await post({ type: 'error', message: err?.message ?? String(err), allRanks: Boolean(err?.allRanks) }).catch(() => undefined);
          process.off('disconnect', onDisconnect);
          process.exit(1);
        },
      );
      return;
    case 'allreduce':
      try {
        if (!processComm) throw new DistributedError(`rank ${rank}: an allreduce result before training started`);
        processComm.deliver(msg.seq, msg.data);
      } catch (err) {
        process.stderr.write(`emorl-train: ${(err as Error).message}\n`);
        process.exit(1);
      }
      return;
    case 'nccl-id':
      ncclId?.(msg.id);
      return;
  }
});

void post({ type: 'ready' }).catch(() => process.exit(1));
