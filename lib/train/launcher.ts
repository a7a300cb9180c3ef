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
 * Several nodes (`cluster`, rendezvous.ts): each node's launcher runs its own workers (global
 * ranks firstRank … firstRank + localRanks − 1); the master's (rank 0's) is the hub of the whole
 * job and the others relay their workers' messages to it over TCP. A node that fails or loses
 * its connection stops every node.
 */
import { fork, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import type { ExperimentConfig } from '../config/experiment';
import { latestCheckpoint } from './checkpoint';
import { checkWorld, DistributedError, sumInRankOrder } from './distributed';
import { TrainingError, type TrainSummary } from './loop';
import { checkJoin, connectToMaster, floatsOf, FrameSocket, missingRanks, type ClusterOptions, type FrameHeader } from './rendezvous';

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
  /** device of the decoding stage on CPU ranks (GPU ranks use cuda:<local rank>) */
  device?: string;
  /** the CPU convolutions' products on every rank ('fp32' | 'bf16') */
  precision?: string;
}

export interface LaunchOptions {
  /** All ranks of the job (on every node). */
  worldSize: number;
  /** The workers of this node (default: worldSize without `cluster`, else 1). */
  localRanks?: number;
  /** Several nodes: where this node's ranks start and where the master listens. */
  cluster?: ClusterOptions;
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
  | { type: 'start'; rank: number; localRank: number; worldSize: number; backend: DistributedBackend; job: WorkerJob }
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

/** A node (not the master) as the master sees it. */
interface PeerNode {
  first: number;
  count: number;
  conn: FrameSocket;
  finished: boolean;
}

/**
 * Runs the job on this node's worker processes; resolves with rank 0's summary once they have all
 * exited (and, on the master, every other node has finished).
 */
export function launchRanks(opts: LaunchOptions): Promise<TrainSummary> {
  const N = opts.worldSize;
  checkWorld(0, N);
  const cluster = opts.cluster;
  const first = cluster?.firstRank ?? 0;
  const L = opts.localRanks ?? (cluster ? 1 : N);
  if (!cluster && L !== N) throw new DistributedError(`${L} local ranks of a world of ${N}: more than one node needs the cluster options`);
  if (!Number.isInteger(L) || L < 1 || !Number.isInteger(first) || first < 0 || first + L > N) {
    throw new DistributedError(`this node's ranks ${first}..${first + L - 1} do not fit a world of ${N}`);
  }
  const isMaster = first === 0;
  const backend = opts.backend ?? 'cpu';
  const entry = opts.entry ?? workerEntry();
  if (entry.endsWith('.ts') && !opts.execArgv) {
    throw new DistributedError(`${entry}: the workers run the TypeScript sources; pass execArgv with a TypeScript loader, or build (npm run build) and use dist/`);
  }
  const handleSignals = opts.handleSignals ?? true;
  const joinTimeoutMs = cluster?.joinTimeoutMs ?? 300_000;

  return new Promise<TrainSummary>((resolve, reject) => {
    const children: ChildProcess[] = [];
    const exited = new Array<boolean>(L).fill(false);
    const errors = new Array<{ message: string; allRanks: boolean } | undefined>(L).fill(undefined);
    let summary: TrainSummary | undefined;
    let failure: Error | undefined;
    let settled = false;
    let signals = 0;
    let graceTimer: NodeJS.Timeout | undefined;
    const timers: NodeJS.Timeout[] = [];
    // The master: collectives in flight (seq → contributions by global rank), the other nodes.
    const rounds = new Map<number, Array<Float32Array | undefined>>();
    const peers: PeerNode[] = [];
    let ncclId: Uint8Array | undefined;
    let server: net.Server | undefined;
    // A node: its connection to the master, and what its workers said before it was up.
    let master: FrameSocket | undefined;
    const pending: [FrameHeader, Float32Array | undefined][] = [];
    const toMaster = (h: FrameHeader, payload?: Float32Array) => {
      if (master) master.send(h, payload);
      else pending.push([h, payload]);
    };
    let finishedSent = false;

    const killAll = () => {
      children.forEach((c, r) => {
        if (!exited[r]) c.kill('SIGKILL');
      });
    };
    const resumeHint = () => {
      const last = latestCheckpoint(path.join(path.resolve(opts.job.outDir), 'checkpoints'));
      return last ? `; resume with --resume (the last checkpoint is ${last})` : '; no checkpoint was written yet';
    };
    // `composed`: a message from the master, already final.
    const fail = (message: string, composed = false) => {
      if (failure) return;
      if (!isMaster && !composed) {
        toMaster({ type: 'fail', message });
        failure = new TrainingError(`${message}; stopped this node's ranks (${first}..${first + L - 1}) and told the master`);
      } else {
        failure = new TrainingError(composed ? message : `${message}; stopped the other ranks${resumeHint()}`);
      }
      if (isMaster) for (const p of peers) p.conn.send({ type: 'abort', message: failure.message });
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
      for (const p of peers) p.conn.close();
      server?.close();
      master?.close();
    };
    function finishIfDone() {
      if (settled || !exited.every(Boolean)) return;
      if (!failure) {
        if (isMaster && peers.some((p) => !p.finished)) return; // the other nodes are still training
        if (!isMaster) {
          if (!finishedSent) {
            finishedSent = true;
            toMaster({ type: 'finished' });
          }
          if (!summary) return; // rank 0's summary comes from the master
        }
      }
      settled = true;
      cleanup();
      if (failure) reject(failure);
      else if (!summary) reject(new TrainingError('the workers exited without a summary from rank 0'));
      else resolve(summary);
    }

    const send = (r: number, msg: LauncherMessage) => {
      const c = children[r];
      if (!c || exited[r] || !c.connected) return;
      c.send(msg, (err) => {
        if (!err || exited[r]) return;
        // Mostly a worker that is dying: its exit (reported with its cause) follows at once.
        const t = setTimeout(() => {
          if (!exited[r]) fail(`rank ${first + r}: sending to the worker failed (${err.message})`);
        }, 2000);
        timers.push(t);
      });
    };
    const toLocals = (msg: LauncherMessage) => {
      for (let i = 0; i < L; i++) send(i, msg);
    };

    // The master's share of a collective: global rank g's contribution.
    const contribute = (g: number, seq: number, data: Float32Array) => {
      let round = rounds.get(seq);
      if (!round) rounds.set(seq, (round = new Array(N).fill(undefined)));
      if (round[g]) {
        fail(`rank ${g} sent collective ${seq} twice`);
        return;
      }
      round[g] = data;
      if (!round.every((x) => x !== undefined)) return;
      rounds.delete(seq);
      let sum: Float32Array;
      try {
        sum = sumInRankOrder(round as Float32Array[]);
      } catch (err) {
        fail((err as Error).message);
        return;
      }
      toLocals({ type: 'allreduce', seq, data: sum });
      for (const p of peers) p.conn.send({ type: 'allreduce', seq }, sum);
    };

    const onMessage = (r: number, msg: WorkerMessage) => {
      if (failure) return;
      const g = first + r;
      switch (msg.type) {
        case 'ready':
          send(r, { type: 'start', rank: g, localRank: r, worldSize: N, backend, job: g === 0 ? opts.job : { ...opts.job, progress: false } });
          return;
        case 'allreduce': {
          // A collective some local rank can never join: fail now rather than wait.
          const gone = exited.findIndex((e, i) => e && i !== r);
          if (gone >= 0) {
            fail(`rank ${first + gone} ${errors[gone] ? `failed: ${errors[gone]!.message}` : 'exited'} while rank ${g} waits in a collective`);
            return;
          }
          if (isMaster) contribute(g, msg.seq, msg.data);
          else toMaster({ type: 'allreduce', rank: g, seq: msg.seq }, msg.data);
          return;
        }
        case 'nccl-id':
          if (g !== 0) {
            fail(`rank ${g} sent an NCCL id (only rank 0 makes it)`);
            return;
          }
          ncclId = msg.id; // for nodes that join later
          toLocals({ type: 'nccl-id', id: msg.id });
          for (const p of peers) p.conn.send({ type: 'nccl-id' }, msg.id);
          return;
        case 'step':
          opts.onStep?.(msg.step);
          return;
        case 'done':
          if (g === 0) {
            summary = msg.summary;
            for (const p of peers) p.conn.send({ type: 'done', summary });
          }
          return;
        case 'error':
          errors[r] = { message: msg.message, allRanks: msg.allRanks };
          return;
      }
    };

    const onExit = (r: number, code: number | null, signal: NodeJS.Signals | null) => {
      exited[r] = true;
      const g = first + r;
      const ok = code === 0 && !errors[r];
      if (!ok && !failure) {
        const e = errors[r];
        if (e && e.allRanks && g !== 0 && !(isMaster && exited[0])) {
          // Every rank stops with this error; rank 0's report (it may be writing a checkpoint) wins.
          graceTimer ??= setTimeout(() => fail(`rank ${g} failed: ${e.message}`), ALL_RANKS_GRACE_MS);
          if (rounds.size > 0) fail(`rank ${g} failed: ${e.message}`);
        } else if (e) {
          fail(`rank ${g} failed: ${e.message}`);
        } else if (signal) {
          fail(`rank ${g} (pid ${children[r].pid}) was killed by signal ${signal}`);
        } else if (code === 0) {
          fail(`rank ${g} exited before finishing`);
        } else {
          fail(`rank ${g} (pid ${children[r].pid}) exited with code ${code}`);
        }
      } else if (ok && g === 0 && !summary && !failure) {
        fail('rank 0 exited without a summary');
      }
      finishIfDone();
    };

    // ---- the other nodes --------------------------------------------------------------------
    const onPeerFrame = (peer: PeerNode, h: FrameHeader, payload: Buffer) => {
      if (failure) return;
      switch (h.type) {
        case 'allreduce': {
          const g = Number(h.rank);
          if (!(g >= peer.first && g < peer.first + peer.count)) {
            fail(`the node with ranks ${peer.first}..${peer.first + peer.count - 1} sent a contribution for rank ${g}`);
            return;
          }
          contribute(g, Number(h.seq), floatsOf(payload));
          return;
        }
        case 'fail':
          fail(`the node with ranks ${peer.first}..${peer.first + peer.count - 1}: ${String(h.message)}`);
          return;
        case 'finished':
          peer.finished = true;
          finishIfDone();
          return;
        default:
          fail(`the node with ranks ${peer.first}..${peer.first + peer.count - 1} sent an unknown message '${h.type}'`);
      }
    };
    const startMaster = () => {
      server = net.createServer((socket) => {
        let peer: PeerNode | undefined;
        const conn: FrameSocket = new FrameSocket(
          socket,
          (h, payload) => {
            if (peer) return onPeerFrame(peer, h, payload);
            if (h.type !== 'join') {
              socket.destroy();
              return;
            }
            const incoming = { first: Number(h.firstRank), count: Number(h.count), worldSize: Number(h.worldSize) };
            const problem = checkJoin([{ first: 0, count: L }, ...peers], N, incoming);
            if (problem) {
              conn.send({ type: 'abort', message: `the master refused this node: ${problem}` });
              fail(problem);
              return;
            }
            peer = { ...incoming, conn, finished: false };
            peers.push(peer);
            conn.send({ type: 'welcome' });
            // a node that joins late still gets the NCCL id rank 0 already made
            if (ncclId) conn.send({ type: 'nccl-id' }, ncclId);
          },
          (err) => {
            if (peer && !peer.finished && !settled) fail(`the node with ranks ${peer.first}..${peer.first + peer.count - 1} lost its connection${err ? ` (${err.message})` : ''}`);
          },
        );
      });
      server.on('error', (err) => fail(`the master could not listen on port ${cluster!.masterPort}: ${err.message}`));
      server.listen(cluster!.masterPort);
      const t = setTimeout(() => {
        const missing = missingRanks([{ first: 0, count: L }, ...peers], N);
        if (missing && !failure) fail(`ranks ${missing} never joined: no node brought them to port ${cluster!.masterPort} within ${Math.round(joinTimeoutMs / 1000)} s`);
      }, joinTimeoutMs);
      timers.push(t);
    };
    const startNode = async (): Promise<void> => {
      let socket: net.Socket;
      try {
        socket = await connectToMaster(cluster!.masterAddr, cluster!.masterPort, joinTimeoutMs);
      } catch (err) {
        fail((err as Error).message);
        return;
      }
      if (failure) {
        socket.destroy();
        return;
      }
      master = new FrameSocket(
        socket,
        (h, payload) => {
          switch (h.type) {
            case 'welcome':
              return;
            case 'allreduce':
              if (!failure) toLocals({ type: 'allreduce', seq: Number(h.seq), data: floatsOf(payload) });
              return;
            case 'nccl-id':
              if (!failure) toLocals({ type: 'nccl-id', id: new Uint8Array(payload) });
              return;
            case 'done':
              summary = h.summary as TrainSummary;
              finishIfDone();
              return;
            case 'abort':
              fail(String(h.message), true);
              return;
          }
        },
        (err) => {
          if (!settled && !failure) fail(`lost the connection to the master at ${cluster!.masterAddr}:${cluster!.masterPort}${err ? ` (${err.message})` : ''}`);
        },
      );
      master.send({ type: 'join', firstRank: first, count: L, worldSize: N });
      for (const [h, payload] of pending.splice(0)) master.send(h, payload);
    };

    process.on('exit', onExitHook);
    if (handleSignals) {
      process.on('SIGINT', onSignal);
      process.on('SIGTERM', onSignal);
    }
    if (cluster) {
      if (isMaster) startMaster();
      else void startNode();
    }
    for (let r = 0; r < L; r++) {
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
        for (let i = r; i < L; i++) exited[i] = true;
        fail(`starting rank ${first + r} failed: ${(err as Error).message}`);
        finishIfDone();
        return;
      }
      children.push(child);
      child.on('message', (m) => onMessage(r, m as WorkerMessage));
      child.on('error', (err) => {
        // A worker that could not start never emits 'exit'.
        if (child.pid === undefined) exited[r] = true;
        fail(`rank ${first + r}: ${err.message}`);
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
      if (child.pid !== undefined) opts.onWorker?.(first + r, child.pid);
    }
  });
}
