/**
 * Multi-node rendezvous for the data-parallel launcher (launcher.ts): one launcher per node, each
 * with its own workers; the launcher of the node holding rank 0 (the master) listens on
 * EMORL_MASTER_ADDR:EMORL_MASTER_PORT and is the hub of the whole job, the others connect to it.
 * Over one TCP connection per node travel the nodes' allreduce contributions and the results, the
 * ncclUniqueId, rank 0's summary, and failures (either way): a node that fails or disconnects
 * stops the job everywhere, with a message naming its ranks.
 *
 * Frames: [u32 header bytes][header JSON][u32 payload bytes][payload], little-endian.
 */
import * as net from 'node:net';
import { DistributedError } from './distributed';

export interface ClusterOptions {
  /** The global rank of this node's first worker (0 on the master). */
  firstRank: number;
  /** The master's host and port (the master listens on all interfaces at that port). */
  masterAddr: string;
  masterPort: number;
  /** How long the master waits for every node, and a node for the master (default 300 s). */
  joinTimeoutMs?: number;
}

export type FrameHeader = { type: string; [k: string]: unknown };

/** A TCP connection carrying frames (header + optional binary payload). */
export class FrameSocket {
  private buf = Buffer.alloc(0);
  private closed = false;

  constructor(
    readonly socket: net.Socket,
    onFrame: (h: FrameHeader, payload: Buffer) => void,
    onClose: (error?: Error) => void,
  ) {
    socket.setNoDelay(true);
    socket.on('data', (chunk) => {
      this.buf = this.buf.length ? Buffer.concat([this.buf, chunk]) : chunk;
      for (;;) {
        if (this.buf.length < 4) return;
        const hl = this.buf.readUInt32LE(0);
        if (this.buf.length < 8 + hl) return;
        const pl = this.buf.readUInt32LE(4 + hl);
        if (this.buf.length < 8 + hl + pl) return;
        let header: FrameHeader;
        try {
          header = JSON.parse(this.buf.subarray(4, 4 + hl).toString('utf8')) as FrameHeader;
        } catch {
          socket.destroy(new DistributedError('a malformed frame from the peer'));
          return;
        }
        const payload = Buffer.from(this.buf.subarray(8 + hl, 8 + hl + pl));
        this.buf = this.buf.subarray(8 + hl + pl);
        onFrame(header, payload);
      }
    });
    let error: Error | undefined;
    socket.on('error', (e) => (error = e));
    socket.on('close', () => {
      this.closed = true;
      onClose(error);
    });
  }

  send(header: FrameHeader, payload?: Uint8Array | Float32Array): void {
    if (this.closed || this.socket.destroyed) return;
    const h = Buffer.from(JSON.stringify(header), 'utf8');
    const p = payload ? Buffer.from(payload.buffer, payload.byteOffset, payload.byteLength) : Buffer.alloc(0);
    const lens = Buffer.alloc(4);
    lens.writeUInt32LE(h.length, 0);
    const plen = Buffer.alloc(4);
    plen.writeUInt32LE(p.length, 0);
    this.socket.write(Buffer.concat([lens, h, plen, p]));
  }

  close(): void {
    if (!this.socket.destroyed) this.socket.end();
  }
}

/** A Float32Array view of a frame's payload (copied: Buffers may be unaligned). */
export function floatsOf(payload: Buffer): Float32Array {
  const out = new Float32Array(payload.length / 4);
  new Uint8Array(out.buffer).set(payload);
  return out;
}

/** Connects to the master, retrying until it listens or the deadline passes. */
export function connectToMaster(addr: string, port: number, timeoutMs: number): Promise<net.Socket> {
  const deadline = Date.now() + timeoutMs;
  return new Promise((resolve, reject) => {
    const attempt = () => {
      const s = net.connect({ host: addr, port });
      s.once('connect', () => {
        s.removeAllListeners('error');
        resolve(s);
      });
      s.once('error', (err) => {
        s.destroy();
        if (Date.now() >= deadline) reject(new DistributedError(`could not reach the master at ${addr}:${port} within ${Math.round(timeoutMs / 1000)} s (${err.message})`));
        else setTimeout(attempt, 250);
      });
    };
    attempt();
  });
}

/** The contiguous global rank ranges [first, first+count) of the nodes must tile [0, N). */
export function checkJoin(joined: { first: number; count: number }[], worldSize: number, incoming: { first: number; count: number; worldSize: number }): string | null {
  if (incoming.worldSize !== worldSize) return `a node with ranks ${incoming.first}..${incoming.first + incoming.count - 1} says the world has ${incoming.worldSize} ranks, the master ${worldSize}`;
  if (!Number.isInteger(incoming.first) || !Number.isInteger(incoming.count) || incoming.count < 1 || incoming.first < 0 || incoming.first + incoming.count > worldSize) {
    return `a node announced ranks ${incoming.first}..${incoming.first + incoming.count - 1}, outside [0, ${worldSize})`;
  }
  for (const j of joined) {
    if (incoming.first < j.first + j.count && j.first < incoming.first + incoming.count) {
      return `a node announced ranks ${incoming.first}..${incoming.first + incoming.count - 1}, which overlap ranks ${j.first}..${j.first + j.count - 1}`;
    }
  }
  return null;
}

/** Ranks of [0, N) that no joined node covers, as "a..b" ranges. */
export function missingRanks(joined: { first: number; count: number }[], worldSize: number): string {
  const have = new Array<boolean>(worldSize).fill(false);
  for (const j of joined) for (let r = j.first; r < j.first + j.count; r++) have[r] = true;
  const out: string[] = [];
  for (let r = 0; r < worldSize; ) {
    if (have[r]) {
      r++;
      continue;
    }
    let e = r;
    while (e + 1 < worldSize && !have[e + 1]) e++;
    out.push(e === r ? `${r}` : `${r}..${e}`);
    r = e + 1;
  }
  return out.join(', ');
}

/**
 * A multi-node launch from the environment: EMORL_WORLD_SIZE (all ranks), EMORL_RANK (this node's
 * first global rank), EMORL_MASTER_ADDR and EMORL_MASTER_PORT (rank 0's node), and optionally
 * EMORL_RENDEZVOUS_TIMEOUT (seconds; default 300). Null when EMORL_WORLD_SIZE is unset; an error
 * naming the variable when one is missing or malformed.
 */
export function clusterFromEnv(env: NodeJS.ProcessEnv, localRanks: number): { worldSize: number; cluster: ClusterOptions } | null {
  if (env.EMORL_WORLD_SIZE === undefined || env.EMORL_WORLD_SIZE === '') return null;
  const int = (name: string, min: number): number => {
    const v = env[name];
    if (v === undefined || v === '') throw new DistributedError(`${name} is not set (a multi-node launch needs EMORL_WORLD_SIZE, EMORL_RANK, EMORL_MASTER_ADDR and EMORL_MASTER_PORT)`);
    const n = Number(v);
    if (!Number.isInteger(n) || n < min) throw new DistributedError(`${name}=${JSON.stringify(v)} is not an integer >= ${min}`);
    return n;
  };
  const worldSize = int('EMORL_WORLD_SIZE', 1);
  const firstRank = int('EMORL_RANK', 0);
  if (firstRank + localRanks > worldSize) {
    throw new DistributedError(`EMORL_RANK=${firstRank} with ${localRanks} rank${localRanks === 1 ? '' : 's'} on this node does not fit EMORL_WORLD_SIZE=${worldSize}`);
  }
  const masterAddr = env.EMORL_MASTER_ADDR ?? '';
  if (!masterAddr) throw new DistributedError('EMORL_MASTER_ADDR is not set (the host of the node with rank 0)');
  const masterPort = int('EMORL_MASTER_PORT', 1);
  if (masterPort > 65535) throw new DistributedError(`EMORL_MASTER_PORT=${masterPort} is not a TCP port`);
  const timeout = env.EMORL_RENDEZVOUS_TIMEOUT ? int('EMORL_RENDEZVOUS_TIMEOUT', 1) * 1000 : undefined;
  return { worldSize, cluster: { firstRank, masterAddr, masterPort, joinTimeoutMs: timeout } };
}
