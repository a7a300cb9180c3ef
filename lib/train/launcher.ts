/**
 * The data-parallel launcher: `emorl-train --ranks N` (CPU) and `--gpus N` (NCCL) start N worker
 * processes (worker.ts), one per rank, and stay as their hub:
 *
 *   - it hands each worker its job and rank over the IPC channel;
 *   - CPU backend: it is the allreduce — each collective waits for all N contributions, sums
 *     them in rank order (float64, rounded once) and sends the same result to every rank;
 *   - NCCL backend: it relays rank 0's ncclUniqueId to the others (the reduction is NCCL's);
 *   - a worker that dies (non-zero exit, signal, error) makes it SIGKILL the others and fail
 *     with a message naming the rank; nothing waits forever, and it returns only once every
 *     worker has exited. Workers exit by themselves when the channel closes (launcher gone).
 *   - SIGINT/SIGTERM are forwarded; the ranks agree to stop after the same step, rank 0 writes a
 *     checkpoint, and the run resolves with stoppedBy 'signal'. A second signal kills the workers.
 *
 * Multi-node rendezvous (EMORL_MASTER_ADDR/PORT) is not implemented: all ranks run on this host.
 */
import { fork, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { ExperimentConfig } from '../config/experiment';
import { latestCheckpoint } from './checkpoint';
import { checkWorld, DistributedError, sumInRankOrder } from './distributed';
import { TrainingError, type TrainSummary } from './loop';

export type DistributedBackend = 'cpu' | 'nccl';

/** What every worker trains: the serialisable part of TrainOptions. */
export interface WorkerJob {
  config: ExperimentConfig;
  dataFile: string;
  outDir: string;
  steps?: number;
  /** A checkpoint file (the launcher resolves `true` to the newest one before starting). */
  resume?: string;
  /** Initial weights from a PyTorch .pth file (each rank reads it). */
  initFrom?: string;
  progress?: boolean;
  prefetch?: number;
  checksumEvery?: number;
  /** compute backend of every rank (see TrainOptions.backend) */
  backend?: string;
  /** device of the decoding stage on CPU ranks (GPU ranks use cuda:<rank>) */
  device?: string;
}

export interface LaunchOptions {
  worldSize: number;
  backend?: DistributedBackend;
  job: WorkerJob;
  /** Forward SIGINT/SIGTERM to the workers (default true). */
  handleSignals?: boolean;
  /** The worker script (default: worker.js next to this module). */
  entry?: string;
  /** Node options of the workers (default: this process's). */
  execArgv?: string[];
  /** Extra environment of the workers. */
  env?: NodeJS.ProcessEnv;
  /** Called as each worker starts (tests use the pids). */
  onWorker?: (rank: number, pid: number) => void;
  /** Called after every step rank 0 finishes. */
  onStep?: (step: number) => void;
}

/** Messages from a worker. */
export type WorkerMessage =
  | { type: 'ready' }
  | { type: 'allreduce'; seq: number; data: Float32Array }
  | { type: 'nccl-id'; id: Uint8Array }
  | { type: 'step'; step: number }
  | { type: 'done'; summary: TrainSummary }
  | { type: 'error'; message: string; allRanks: boolean };

/** Messages to a worker. */
export type LauncherMessage =
  | { type: 'start'; rank: number; worldSize: number; backend: DistributedBackend; job: WorkerJob }
  | { type: 'allreduce'; seq: number; data: Float32Array }
  | { type: 'nccl-id'; id: Uint8Array };

/** The worker script: compiled worker.js next to this module, else (sources) worker.ts. */
export function workerEntry(): string {
  const js = path.join(__dirname, 'worker.js');
  if (fs.existsSync(js)) return js;
  const ts = path.join(__dirname, 'worker.ts');
  if (fs.existsSync(ts)) return ts;
  throw new DistributedError(`no worker script next to ${__filename} (worker.js or worker.ts)`);
}

/** How long a non-root rank that stopped with an all-ranks error may wait for rank 0's report. */
const ALL_RANKS_GRACE_MS = 30_000;

/** Runs the job on N worker processes; resolves with rank 0's summary once all have exited. */
export function launchRanks(opts: LaunchOptions): Promise<TrainSummary> {
  const N = opts.worldSize;
  checkWorld(0, N);
  const backend = opts.backend ?? 'cpu';
  const entry = opts.entry ?? workerEntry();
  if (entry.endsWith('.ts') && !opts.execArgv) {
    throw new DistributedError(`${entry}: the workers run the TypeScript sources; pass execArgv with a TypeScript loader, or build (npm run build) and use dist/`);
  }
  const handleSignals = opts.handleSignals ?? true;

  return new Promise<TrainSummary>((resolve, reject) => {
    const children: ChildProcess[] = [];
    const exited = new Array<boolean>(N).fill(false);
    const errors = new Array<{ message: string; allRanks: boolean } | undefined>(N).fill(undefined);
    let summary: TrainSummary | undefined;
    let failure: Error | undefined;
    let settled = false;
    let signals = 0;
    let graceTimer: NodeJS.Timeout | undefined;
    const timers: NodeJS.Timeout[] = [];
    // Collectives in flight: seq → contributions by rank.
    const rounds = new Map<number, Array<Float32Array | undefined>>();

    const killAll = () => {
      children.forEach((c, r) => {
        if (!exited[r]) c.kill('SIGKILL');
      });
    };
    const resumeHint = () => {
      const last = latestCheckpoint(path.join(path.resolve(opts.job.outDir), 'checkpoints'));
      return last ? `; resume with --resume (the last checkpoint is ${last})` : '; no checkpoint was written yet';
    };
    const fail = (message: string) => {
      if (failure) return;
      failure = new TrainingError(`${message}; stopped the other ranks${resumeHint()}`);
      killAll();
      finishIfDone();
    };
    const onExitHook = () => killAll();
    const onSignal = (sig: NodeJS.Signals) => {
      signals++;
      if (signals > 1) {
        fail(`${sig} received twice: killed the workers`);
        return;
      }
      children.forEach((c, r) => {
        if (!exited[r]) c.kill(sig);
      });
    };
    const cleanup = () => {
      if (graceTimer) clearTimeout(graceTimer);
      for (const t of timers) clearTimeout(t);
      process.off('exit', onExitHook);
      if (handleSignals) {
        process.off('SIGINT', onSignal);
        process.off('SIGTERM', onSignal);
      }
    };
    function finishIfDone() {
      if (settled || !exited.every(Boolean)) return;
      settled = true;
      cleanup();
      if (failure) reject(failure);
      else if (!summary) reject(new TrainingError('the workers exited without a summary from rank 0'));
      else resolve(summary);
    }

    const send = (r: number, msg: LauncherMessage) => {
      const c = children[r];
      if (exited[r] || !c.connected) return;
      c.send(msg, (err) => {
        if (!err || exited[r]) return;
        // Mostly a worker that is dying: its exit (reported with its cause) follows at once.
        const t = setTimeout(() => {
          if (!exited[r]) fail(`rank ${r}: sending to the worker failed (${err.message})`);
        }, 2000);
        timers.push(t);
      });
    };

    const onMessage = (r: number, msg: WorkerMessage) => {
      if (failure) return;
      switch (msg.type) {
        case 'ready':
          send(r, { type: 'start', rank: r, worldSize: N, backend, job: r === 0 ? opts.job : { ...opts.job, progress: false } });
          return;
        case 'allreduce': {
          // A collective some rank can never join: fail now rather than wait.
          const gone = exited.findIndex((e, i) => e && i !== r);
          if (gone >= 0) {
            fail(`rank ${gone} ${errors[gone] ? `failed: ${errors[gone]!.message}` : 'exited'} while rank ${r} waits in a collective`);
            return;
          }
          let round = rounds.get(msg.seq);
          if (!round) rounds.set(msg.seq, (round = new Array(N).fill(undefined)));
          if (round[r]) {
            fail(`rank ${r} sent collective ${msg.seq} twice`);
            return;
          }
          round[r] = msg.data;
          if (round.every((x) => x !== undefined)) {
            rounds.delete(msg.seq);
            let sum: Float32Array;
            try {
              sum = sumInRankOrder(round as Float32Array[]);
            } catch (err) {
              fail((err as Error).message);
              return;
            }
            for (let i = 0; i < N; i++) send(i, { type: 'allreduce', seq: msg.seq, data: sum });
          }
          return;
        }
        case 'nccl-id':
          if (r !== 0) fail(`rank ${r} sent an NCCL id (only rank 0 makes it)`);
          else for (let i = 0; i < N; i++) send(i, { type: 'nccl-id', id: msg.id });
          return;
        case 'step':
          opts.onStep?.(msg.step);
          return;
        case 'done':
          if (r === 0) summary = msg.summary;
          return;
        case 'error':
          errors[r] = { message: msg.message, allRanks: msg.allRanks };
          return;
      }
    };

    const onExit = (r: number, code: number | null, signal: NodeJS.Signals | null) => {
      exited[r] = true;
      const ok = code === 0 && !errors[r];
      if (!ok && !failure) {
        const e = errors[r];
        if (e && e.allRanks && r !== 0 && !exited[0]) {
          // Every rank stops with this error; rank 0's report (it may be writing a checkpoint) wins.
          graceTimer ??= setTimeout(() => fail(`rank ${r} failed: ${e.message}`), ALL_RANKS_GRACE_MS);
          if (rounds.size > 0) fail(`rank ${r} failed: ${e.message}`);
        } else if (e) {
          fail(`rank ${r} failed: ${e.message}`);
        } else if (signal) {
          fail(`rank ${r} (pid ${children[r].pid}) was killed by signal ${signal}`);
        } else if (code === 0) {
          fail(`rank ${r} exited before finishing`);
        } else {
          fail(`rank ${r} (pid ${children[r].pid}) exited with code ${code}`);
        }
      } else if (ok && r === 0 && !summary && !failure) {
        fail('rank 0 exited without a summary');
      }
      finishIfDone();
    };

    process.on('exit', onExitHook);
    if (handleSignals) {
      process.on('SIGINT', onSignal);
      process.on('SIGTERM', onSignal);
    }
    for (let r = 0; r < N; r++) {
      let child: ChildProcess;
      try {
        child = fork(entry, [], {
          execArgv: opts.execArgv,
          env: { ...process.env, ...opts.env },
          stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
          serialization: 'advanced',
        });
      } catch (err) {
        // Ranks already started are killed; the promise settles when they have exited.
        for (let i = r; i < N; i++) exited[i] = true;
        fail(`starting rank ${r} failed: ${(err as Error).message}`);
        finishIfDone();
        return;
      }
      children.push(child);
      child.on('message', (m) => onMessage(r, m as WorkerMessage));
      child.on('error', (err) => {
        // A worker that could not start never emits 'exit'.
        if (child.pid === undefined) exited[r] = true;
        fail(`rank ${r}: ${err.message}`);
        finishIfDone();
      });
      // A worker is over once it has exited AND its channel has closed: the channel is read to
      // its end first, so that a last message ('done', 'error') is never lost to the 'exit' event.
      let status: [number | null, NodeJS.Signals | null] | undefined;
      let channelClosed = false;
      const over = () => {
        if (status && channelClosed && !exited[r]) onExit(r, ...status);
      };
      child.on('exit', (code, signal) => {
        status = [code, signal];
        over();
      });
      child.on('disconnect', () => {
        channelClosed = true;
        over();
      });
      if (child.pid !== undefined) opts.onWorker?.(r, child.pid);
    }
  });
}
