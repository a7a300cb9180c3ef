/**
 * Reads row runs of an HDF5 file in a worker thread, so that the training loop (which keeps the
 * main thread busy with synchronous tensor work) never waits on I/O. The worker holds its own
 * h5wasm instance and file handle; it only slices rows and hands back fresh buffers, while the
 * layout checks and batch assembly stay in lib/data/dataset.ts.
 */
import { pathToFileURL } from 'node:url';
import * as path from 'node:path';
import { Worker } from 'node:worker_threads';
import { h5wasmNodeEntry, NumericArray } from '../io/h5';
import { DatasetError, RowReader, RowRequest } from './dataset';

// Plain JavaScript run with `eval: true`: this module must work both compiled and under ts-jest,
// where no compiled worker file exists.
const WORKER_SOURCE = `
const { parentPort, workerData } = require('node:worker_threads');
(async () => {
  const h5 = await import(workerData.h5wasmUrl);
  await h5.ready;
  const file = new h5.File(workerData.file, 'r');
  parentPort.on('message', (msg) => {
    if (msg.type === 'close') { file.close(); parentPort.close(); return; }
    try {
      const arrays = msg.requests.map(({ key, runs }) => {
        const ds = file.get(key);
        if (!ds) throw new Error("no dataset '" + key + "'");
        const parts = runs.map(([s, e]) => ds.slice([[s, e]]));
        const total = parts.reduce((a, p) => a + p.length, 0);
        // Always a fresh buffer: it is transferred, and must never alias wasm memory.
        const out = new parts[0].constructor(total);
        let at = 0;
        for (const p of parts) { out.set(p, at); at += p.length; }
        return out;
      });
      parentPort.postMessage({ id: msg.id, arrays }, arrays.map((a) => a.buffer));
    } catch (err) {
      parentPort.postMessage({ id: msg.id, error: String((err && err.message) || err) });
    }
  });
  parentPort.postMessage({ type: 'ready' });
})().catch((err) => {
  parentPort.postMessage({ type: 'fatal', error: String((err && err.message) || err) });
  process.exit(1);
});
`;

interface Pending {
  resolve: (arrays: NumericArray[]) => void;
  reject: (err: Error) => void;
}

export class ReaderThread implements RowReader {
  private readonly worker: Worker;
  private readonly pending = new Map<number, Pending>();
  private nextId = 0;
  private failure: Error | undefined;
  private closed = false;

  constructor(private readonly filePath: string) {
    this.worker = new Worker(WORKER_SOURCE, {
      eval: true,
      workerData: { file: path.resolve(filePath), h5wasmUrl: pathToFileURL(h5wasmNodeEntry()).href },
    });
    // The loop must be able to exit while the thread idles between batches.
    this.worker.unref();
    this.worker.on('message', (msg: { id?: number; type?: string; arrays?: NumericArray[]; error?: string }) => {
      if (msg.type === 'fatal') return this.fail(new DatasetError(`${filePath}: reader thread failed: ${msg.error}`));
      if (msg.id === undefined) return;
      const p = this.pending.get(msg.id);
      if (!p) return;
      this.pending.delete(msg.id);
      if (msg.error !== undefined) p.reject(new DatasetError(`${filePath}: ${msg.error}`));
      else p.resolve(msg.arrays as NumericArray[]);
    });
    this.worker.on('error', (err) => this.fail(new DatasetError(`${filePath}: reader thread failed: ${err.message}`)));
    this.worker.on('exit', (code) => {
      if (!this.closed) this.fail(new DatasetError(`${filePath}: reader thread exited with code ${code}`));
    });
  }

  private fail(err: Error): void {
    this.failure ??= err;
    for (const p of this.pending.values()) p.reject(err);
    this.pending.clear();
  }

  readRuns(requests: RowRequest[]): Promise<NumericArray[]> {
    if (this.closed) return Promise.reject(new DatasetError(`${this.filePath}: reader thread is closed`));
    if (this.failure) return Promise.reject(this.failure);
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      this.worker.ref();
      this.worker.postMessage({ id, requests });
    }).finally(() => {
      if (this.pending.size === 0 && !this.closed) this.worker.unref();
    }) as Promise<NumericArray[]>;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.fail(new DatasetError(`${this.filePath}: reader thread closed`));
    this.worker.postMessage({ type: 'close' });
    await this.worker.terminate();
  }
}
