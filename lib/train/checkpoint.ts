/**
 * Checkpoint files: a JSON header (step, config, optimizer and GECO state, RNG and data-iterator
 * positions: whatever the loop needs to continue exactly) and named float32 tensors, closed by
 * a CRC-32 of everything before it, so that a truncated or foreign file is refused by name.
 *
 * Layout: "EMORLCK1" | u32 header bytes | header JSON | zero pad to 8 | tensor data (float32 LE)
 *         | u32 CRC-32 of all preceding bytes | "EMORLEND"
 *
 * Writes are atomic: a temporary file in the same folder, fsync, rename, fsync of the folder. A
 * reader therefore sees the old checkpoint or the new one, never half of one.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { crc32 } from '../util/crc32';

const MAGIC = Buffer.from('EMORLCK1', 'ascii');
const END = Buffer.from('EMORLEND', 'ascii');
const FORMAT_VERSION = 1;

export interface TensorEntry {
  shape: number[];
  data: Float32Array;
}

export interface CheckpointData {
  /** JSON-serialisable state. */
  meta: Record<string, unknown>;
  /** Named float32 tensors (model parameters, optimizer moments, ...). */
  tensors: Map<string, TensorEntry>;
}

interface HeaderTensor {
  name: string;
  shape: number[];
  offset: number;
  length: number;
}

export class CheckpointError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'CheckpointError';
  }
}

/** Serialises a checkpoint; refuses non-finite values so that a NaN never reaches a checkpoint. */
export function encodeCheckpoint(ckpt: CheckpointData): Buffer {
  const entries: HeaderTensor[] = [];
  let offset = 0;
  for (const [name, { shape, data }] of ckpt.tensors) {
    const n = shape.reduce((a, b) => a * b, 1);
    if (n !== data.length) throw new CheckpointError(`tensor '${name}': shape [${shape}] needs ${n} values, has ${data.length}`);
    for (let i = 0; i < data.length; i++) {
      if (!Number.isFinite(data[i])) throw new CheckpointError(`tensor '${name}' holds a non-finite value at index ${i}; not saved`);
    }
    entries.push({ name, shape, offset, length: n });
    offset += n * 4;
  }
  const header = Buffer.from(JSON.stringify({ format: FORMAT_VERSION, meta: ckpt.meta, tensors: entries }), 'utf8');
  const headerEnd = 8 + 4 + header.length;
  const dataStart = Math.ceil(headerEnd / 8) * 8;
  const total = dataStart + offset + 4 + END.length;
  const buf = Buffer.alloc(total);
  MAGIC.copy(buf, 0);
  buf.writeUInt32LE(header.length, 8);
  header.copy(buf, 12);
  for (const e of entries) {
    const { data } = ckpt.tensors.get(e.name) as TensorEntry;
    const bytes = Buffer.from(data.buffer, data.byteOffset, data.byteLength);
    if (bytes.length !== e.length * 4) throw new CheckpointError(`tensor '${e.name}': unexpected byte length`);
    // Float32Array is little-endian on every platform Node runs on that we support.
    bytes.copy(buf, dataStart + e.offset);
  }
  const crcAt = dataStart + offset;
  buf.writeUInt32LE(crc32(buf.subarray(0, crcAt)), crcAt);
  END.copy(buf, crcAt + 4);
  return buf;
}

export function decodeCheckpoint(buf: Buffer, source: string): CheckpointData {
  if (buf.length < MAGIC.length || !buf.subarray(0, MAGIC.length).equals(MAGIC)) {
    throw new CheckpointError(`${source}: not an emorl checkpoint (bad magic; PyTorch .pth files load with --init-from)`);
  }
  if (buf.length < 12 + 4 + END.length || !buf.subarray(buf.length - END.length).equals(END)) {
    throw new CheckpointError(`${source}: truncated checkpoint (${buf.length} bytes, no end marker)`);
  }
  const crcAt = buf.length - END.length - 4;
  const stored = buf.readUInt32LE(crcAt);
  if (crc32(buf.subarray(0, crcAt)) !== stored) throw new CheckpointError(`${source}: corrupt checkpoint (CRC mismatch)`);
  const headerLength = buf.readUInt32LE(8);
  if (12 + headerLength > crcAt) throw new CheckpointError(`${source}: corrupt checkpoint (header length ${headerLength})`);
  let header: { format: number; meta: Record<string, unknown>; tensors: HeaderTensor[] };
  try {
    header = JSON.parse(buf.subarray(12, 12 + headerLength).toString('utf8'));
  } catch {
    throw new CheckpointError(`${source}: corrupt checkpoint (header is not JSON)`);
  }
  if (header.format !== FORMAT_VERSION) {
    throw new CheckpointError(`${source}: checkpoint format ${header.format} is not supported (expected ${FORMAT_VERSION})`);
  }
  const dataStart = Math.ceil((12 + headerLength) / 8) * 8;
  const tensors = new Map<string, TensorEntry>();
  for (const t of header.tensors) {
    const start = dataStart + t.offset;
    if (start + t.length * 4 > crcAt) throw new CheckpointError(`${source}: tensor '${t.name}' runs past the data`);
    // Copy out: the result must not alias the file buffer (and must be 4-byte aligned).
    const data = new Float32Array(t.length);
    new Uint8Array(data.buffer).set(buf.subarray(start, start + t.length * 4));
    tensors.set(t.name, { shape: t.shape, data });
  }
  return { meta: header.meta, tensors };
}

/** Writes `buf` to `file` atomically (temporary file, fsync, rename, fsync of the folder). */
export function writeFileAtomic(file: string, buf: Buffer): void {
  const dir = path.dirname(path.resolve(file));
  const tmp = path.join(dir, `.${path.basename(file)}.${process.pid}.tmp`);
  const fd = fs.openSync(tmp, 'w');
  try {
    fs.writeSync(fd, buf, 0, buf.length, 0);
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
  try {
    fs.renameSync(tmp, file);
  } catch (err) {
    fs.rmSync(tmp, { force: true });
    throw err;
  }
  try {
    const dfd = fs.openSync(dir, 'r');
    try {
      fs.fsyncSync(dfd);
    } finally {
      fs.closeSync(dfd);
    }
  } catch {
    // Some file systems refuse to fsync a directory; the rename itself is still atomic.
  }
}

export function writeCheckpoint(file: string, ckpt: CheckpointData): void {
  writeFileAtomic(file, encodeCheckpoint(ckpt));
}

export function readCheckpoint(file: string): CheckpointData {
  if (!fs.existsSync(file)) throw new CheckpointError(`${file}: no such checkpoint`);
  return decodeCheckpoint(fs.readFileSync(file), file);
}

const NAME = /^checkpoint-(\d+)\.emorl$/;

export function checkpointName(step: number): string {
  return `checkpoint-${String(step).padStart(8, '0')}.emorl`;
}

/** Checkpoints in a run folder, oldest first. */
export function listCheckpoints(dir: string): Array<{ step: number; file: string }> {
  if (!fs.existsSync(dir)) return [];
  return fs
    .readdirSync(dir)
    .map((f) => ({ m: NAME.exec(f), f }))
    .filter((x) => x.m)
    .map((x) => ({ step: Number((x.m as RegExpExecArray)[1]), file: path.join(dir, x.f) }))
    .sort((a, b) => a.step - b.step);
}

export function latestCheckpoint(dir: string): string | undefined {
  const all = listCheckpoints(dir);
  return all.length ? all[all.length - 1].file : undefined;
}

/** Saves the checkpoint of `step` into `dir` and deletes all but the newest `keep`. */
export function saveRunCheckpoint(dir: string, step: number, ckpt: CheckpointData, keep: number): string {
  fs.mkdirSync(dir, { recursive: true });
  const file = path.join(dir, checkpointName(step));
  writeCheckpoint(file, ckpt);
  const all = listCheckpoints(dir);
  for (const old of all.slice(0, Math.max(0, all.length - keep))) fs.rmSync(old.file, { force: true });
  return file;
}
