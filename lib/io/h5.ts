/**
 * A small, checked wrapper over h5wasm's Node build. Every failure names the file and the key,
 * so that a bad dataset never surfaces as an error from inside the wasm HDF5 library.
 *
 * h5wasm is ESM-only; this CommonJS build reaches it through a real dynamic import() (kept as is
 * by tsconfig's "module": "node16").
 */
import * as fs from 'node:fs';
import * as path from 'node:path';

type H5Module = typeof import('h5wasm/node', { with: { 'resolution-mode': 'import' } });
type H5Dataset = H5Module['Dataset']['prototype'];
type H5Group = H5Module['Group']['prototype'];
type H5NativeFile = H5Module['File']['prototype'];

let h5Module: Promise<H5Module> | undefined;

/** Loads and initialises h5wasm once per process. */
export function loadH5wasm(): Promise<H5Module> {
  if (!h5Module) {
    h5Module = import('h5wasm/node').then(async (m) => {
      await m.ready;
      return m;
    });
  }
  return h5Module;
}

/**
 * Absolute path of h5wasm's Node entry point, for a worker thread that imports it itself (the
 * package's "exports" admits only ESM `import`, so require.resolve cannot find it).
 */
export function h5wasmNodeEntry(): string {
  const starts = [__dirname, process.cwd()];
  for (const start of starts) {
    let dir = start;
    for (;;) {
      const candidate = path.join(dir, 'node_modules', 'h5wasm', 'dist', 'node', 'hdf5_hl.js');
      if (fs.existsSync(candidate)) return candidate;
      const parent = path.dirname(dir);
      if (parent === dir) break;
      dir = parent;
    }
  }
  throw new H5Error('cannot locate the h5wasm package (node_modules/h5wasm/dist/node/hdf5_hl.js)');
}

/** The typed array kinds h5wasm returns for numeric datasets. */
export type NumericArray =
  | Float32Array
  | Float64Array
  | Uint8Array
  | Int8Array
  | Uint16Array
  | Int16Array
  | Uint32Array
  | Int32Array;

/** A dtype as h5wasm spells it: '<f' float32, '<d' float64, '<B' uint8, '<i' int32, ... */
export type H5Dtype = string;

export interface DatasetInfo {
  shape: number[];
  dtype: H5Dtype;
}

export class H5Error extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'H5Error';
  }
}

/** Element types a dataset may be written with; uint8 for images and masks. */
export type WriteDtype = 'uint8' | 'float32' | 'float64' | 'int32';

const WRITE_DTYPES: Record<WriteDtype, string> = {
  uint8: '<B',
  float32: '<f',
  float64: '<d',
  int32: '<i',
};

/** A dtype kind that readers check against, independent of endianness spelling. */
export function dtypeKind(dtype: H5Dtype): 'uint8' | 'float32' | 'float64' | 'int32' | 'other' {
  switch (dtype) {
    case '<B':
    case '>B':
    case '|u1':
      return 'uint8';
    case '<f':
    case '>f':
      return 'float32';
    case '<d':
    case '>d':
      return 'float64';
    case '<i':
    case '>i':
      return 'int32';
    default:
      return 'other';
  }
}

/** One open HDF5 file. Close it (or use `withH5File`) when done. */
export class H5File {
  private closed = false;

  private constructor(
    readonly filePath: string,
    private readonly file: H5NativeFile,
    readonly writable: boolean,
  ) {}

  /** Opens an existing file for reading ('r') or creates/truncates one for writing ('w'). */
  static async open(filePath: string, mode: 'r' | 'w' = 'r'): Promise<H5File> {
    const abs = path.resolve(filePath);
    if (mode === 'r') {
      if (!fs.existsSync(abs)) throw new H5Error(`${filePath}: no such file`);
      if (!fs.statSync(abs).isFile()) throw new H5Error(`${filePath}: not a regular file`);
      const fd = fs.openSync(abs, 'r');
      try {
        const sig = Buffer.alloc(8);
        fs.readSync(fd, sig, 0, 8, 0);
        // The HDF5 superblock signature; h5wasm aborts inside wasm on anything else.
        if (!sig.equals(Buffer.from([0x89, 0x48, 0x44, 0x46, 0x0d, 0x0a, 0x1a, 0x0a]))) {
          throw new H5Error(`${filePath}: not an HDF5 file (bad signature)`);
        }
      } finally {
        fs.closeSync(fd);
      }
    } else {
      fs.mkdirSync(path.dirname(abs), { recursive: true });
    }
    const h5 = await loadH5wasm();
    let file: H5NativeFile;
    try {
      file = new h5.File(abs, mode);
    } catch (err) {
      throw new H5Error(`${filePath}: cannot open as HDF5 (${(err as Error).message})`);
    }
    return new H5File(filePath, file, mode === 'w');
  }

  private ensureOpen(): void {
    if (this.closed) throw new H5Error(`${this.filePath}: file is closed`);
  }

  /** Whether a group or dataset exists at `key` ('train/imgs'). */
  has(key: string): boolean {
    this.ensureOpen();
    const parts = key.split('/').filter((p) => p.length > 0);
    let group: H5Group = this.file;
    for (let i = 0; i < parts.length; i++) {
      if (!group.keys().includes(parts[i])) return false;
      if (i === parts.length - 1) return true;
      const next = group.get(parts[i]);
      if (!next || next.constructor.name !== 'Group') return false;
      group = next as H5Group;
    }
    return true;
  }

  /** Names directly under a group ('' for the root). */
  keys(groupKey = ''): string[] {
    this.ensureOpen();
    if (groupKey === '') return this.file.keys();
    return this.group(groupKey).keys();
  }

  /** Whether `key` names a group (as opposed to a dataset). */
  isGroup(key: string): boolean {
    if (!this.has(key)) return false;
    return this.file.get(key)?.constructor.name === 'Group';
  }

  private group(key: string): H5Group {
    if (!this.has(key)) throw new H5Error(`${this.filePath}: no group '${key}'`);
    const g = this.file.get(key);
    if (!g || g.constructor.name !== 'Group') {
      throw new H5Error(`${this.filePath}: '${key}' is not a group`);
    }
    return g as H5Group;
  }

  private dataset(key: string): H5Dataset {
    if (!this.has(key)) throw new H5Error(`${this.filePath}: no dataset '${key}'`);
    const d = this.file.get(key);
    if (!d || d.constructor.name !== 'Dataset') {
      throw new H5Error(`${this.filePath}: '${key}' is not a dataset`);
    }
    return d as H5Dataset;
  }

  /** 64-bit integers come back as BigInt arrays; they are widened to float64 here. */
  private numeric(key: string, v: unknown): NumericArray {
    // Scalar datasets come back as plain numbers.
    if (typeof v === 'number') return dtypeKind(this.info(key).dtype) === 'float64' ? Float64Array.of(v) : Float32Array.of(v);
    if (typeof v === 'bigint') return Float64Array.of(Number(v));
    if (v instanceof BigInt64Array || v instanceof BigUint64Array) return Float64Array.from(v, (x) => Number(x));
    if (!ArrayBuffer.isView(v) || v instanceof DataView) {
      throw new H5Error(`${this.filePath}: dataset '${key}' is not numeric`);
    }
    return v as NumericArray;
  }

  info(key: string): DatasetInfo {
    const d = this.dataset(key);
    const shape = d.shape;
    if (!shape) throw new H5Error(`${this.filePath}: dataset '${key}' has no shape`);
    return { shape: [...shape], dtype: String(d.dtype) };
  }

  /** Reads a whole numeric dataset. */
  read(key: string): NumericArray {
    const d = this.dataset(key);
    const v = d.value;
    return this.numeric(key, v);
  }

  /** Reads a scalar or a whole dataset as float32. */
  readFloat32(key: string): Float32Array {
    const v = this.read(key);
    if (v instanceof Float32Array) return v;
    return Float32Array.from(v);
  }

  /**
   * Reads rows [start, end) along the first axis (all of the other axes), without loading the
   * rest of the dataset: the real datasets are tens of GB.
   */
  readRows(key: string, start: number, end: number): NumericArray {
    const d = this.dataset(key);
    const shape = d.shape ?? [];
    if (shape.length === 0) throw new H5Error(`${this.filePath}: dataset '${key}' is a scalar`);
    if (!Number.isInteger(start) || !Number.isInteger(end) || start < 0 || end > shape[0] || start > end) {
      throw new H5Error(
        `${this.filePath}: rows [${start}, ${end}) out of range for dataset '${key}' with ${shape[0]} rows`,
      );
    }
    const v = d.slice([[start, end]]);
    return this.numeric(key, v);
  }

  /** An attribute of the root (key '') or of a group/dataset, as a JSON-compatible value. */
  attr(key: string, name: string): unknown {
    this.ensureOpen();
    const obj = key === '' ? this.file : this.file.get(key);
    if (!obj) throw new H5Error(`${this.filePath}: no object '${key}'`);
    const attrs = (obj as H5Group).attrs;
    if (!(name in attrs)) throw new H5Error(`${this.filePath}: '${key || '/'}' has no attribute '${name}'`);
    return attrs[name].json_value;
  }

  hasAttr(key: string, name: string): boolean {
    this.ensureOpen();
    const obj = key === '' ? this.file : this.file.get(key);
    if (!obj) return false;
    return name in (obj as H5Group).attrs;
  }

  attrNames(key: string): string[] {
    this.ensureOpen();
    const obj = key === '' ? this.file : this.file.get(key);
    if (!obj) throw new H5Error(`${this.filePath}: no object '${key}'`);
    return Object.keys((obj as H5Group).attrs);
  }

  /** Creates a group and its parents as needed. */
  ensureGroup(key: string): void {
    this.ensureWritable();
    const parts = key.split('/').filter((p) => p.length > 0);
    let prefix = '';
    for (const p of parts) {
      const next = prefix ? `${prefix}/${p}` : p;
      if (!this.has(next)) {
        const parent: H5Group = prefix ? this.group(prefix) : this.file;
        parent.create_group(p);
      }
      prefix = next;
    }
  }

  /** Writes a whole dataset (creating parent groups). */
  write(key: string, data: NumericArray, shape: number[], dtype: WriteDtype, compress = false): void {
    this.ensureWritable();
    const n = shape.reduce((a, b) => a * b, 1);
    if (data.length !== n) {
      throw new H5Error(`${this.filePath}: '${key}' data has ${data.length} values, shape [${shape}] needs ${n}`);
    }
    const slash = key.lastIndexOf('/');
    const parentKey = slash > 0 ? key.slice(0, slash) : '';
    const name = slash >= 0 ? key.slice(slash + 1) : key;
    if (parentKey) this.ensureGroup(parentKey);
    const parent: H5Group = parentKey ? this.group(parentKey) : this.file;
    const chunked = compress && shape.length > 0 && shape[0] > 0;
    parent.create_dataset({
      name,
      data,
      shape,
      dtype: WRITE_DTYPES[dtype],
      ...(chunked ? { chunks: [1, ...shape.slice(1)], compression: 'gzip' as const, compression_opts: 4 } : {}),
    });
  }

  /**
   * Creates an empty dataset that grows along its first axis, to be filled with `appendRows`:
   * a whole dataset never has to sit in memory (h5wasm's heap is capped at 2 GiB).
   */
  createRowDataset(key: string, rowShape: number[], dtype: WriteDtype, chunkRows = 1, compress = true): void {
    this.ensureWritable();
    const slash = key.lastIndexOf('/');
    const parentKey = slash > 0 ? key.slice(0, slash) : '';
    if (parentKey) this.ensureGroup(parentKey);
    const parent: H5Group = parentKey ? this.group(parentKey) : this.file;
    parent.create_dataset({
      name: slash >= 0 ? key.slice(slash + 1) : key,
      data: new (dtype === 'uint8' ? Uint8Array : dtype === 'int32' ? Int32Array : dtype === 'float64' ? Float64Array : Float32Array)(0),
      shape: [0, ...rowShape],
      maxshape: [null, ...rowShape],
      chunks: [Math.max(1, chunkRows), ...rowShape],
      dtype: WRITE_DTYPES[dtype],
      ...(compress ? { compression: 'gzip' as const, compression_opts: 4 } : {}),
    });
  }

  /** Appends whole rows to a dataset made by `createRowDataset`. */
  appendRows(key: string, data: NumericArray): void {
    this.ensureWritable();
    const d = this.dataset(key);
    const shape = d.shape ?? [];
    const rowSize = shape.slice(1).reduce((a, b) => a * b, 1);
    if (shape.length === 0 || data.length % rowSize !== 0) {
      throw new H5Error(`${this.filePath}: ${data.length} values are not whole rows of '${key}' [${shape}]`);
    }
    const start = shape[0];
    const end = start + data.length / rowSize;
    d.resize([end, ...shape.slice(1)]);
    d.write_slice([[start, end]], data);
  }

  /** Sets an attribute on the root ('') or on a group/dataset. Objects are stored as JSON text. */
  setAttr(key: string, name: string, value: string | number | object): void {
    this.ensureWritable();
    const obj = key === '' ? this.file : this.file.get(key);
    if (!obj) throw new H5Error(`${this.filePath}: no object '${key}'`);
    const stored = typeof value === 'object' ? JSON.stringify(value) : value;
    (obj as H5Group).create_attribute(name, stored);
  }

  private ensureWritable(): void {
    this.ensureOpen();
    if (!this.writable) throw new H5Error(`${this.filePath}: opened read-only`);
  }

  flush(): void {
    this.ensureOpen();
    if (this.writable) this.file.flush();
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.file.close();
  }
}

/** Opens a file, runs `fn`, and always closes it. */
export async function withH5File<T>(
  filePath: string,
  mode: 'r' | 'w',
  fn: (file: H5File) => T | Promise<T>,
): Promise<T> {
  const file = await H5File.open(filePath, mode);
  try {
    return await fn(file);
  } finally {
    file.close();
  }
}
