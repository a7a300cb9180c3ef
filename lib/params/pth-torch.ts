/**
 * torch.load without Python: the two container formats and tensor rebuilding, over the
 * restricted pickle reader. The result is the checkpoint's object with every tensor as a
 * TorchTensor whose storage bytes are attached; nothing in the file is executed.
 *
 * - zip (torch.save since 1.6): `<archive>/data.pkl` plus one record `<archive>/data/<key>` per
 *   storage; persistent ids ('storage', <torch.XStorage>, key, location, numel); an optional
 *   `<archive>/byteorder` record ('little' / 'big').
 * - legacy (before 1.6, or _use_new_zipfile_serialization=False): five pickles back to back —
 *   magic number, protocol version 1001, sys info, the object (persistent ids
 *   ('storage', type, root_key, location, numel, view_metadata)), the list of storage keys —
 *   then for each listed key an int64 element count and the raw elements.
 */
import { PickleError, PyDict, PyGlobal, PyTuple, describe, unpickle, type PickleValue, type PyOpaque } from '../io/pickle';
import { ZipReader, looksLikeZip } from '../io/zip';

export class PthError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'PthError';
  }
}

export type TorchDtype = 'float32' | 'float64' | 'float16' | 'bfloat16' | 'int64' | 'int32' | 'int16' | 'int8' | 'uint8' | 'bool';

/** torch.<Name>Storage -> element type. */
export const STORAGE_TYPES: Record<string, { dtype: TorchDtype; itemsize: number }> = {
  FloatStorage: { dtype: 'float32', itemsize: 4 },
  DoubleStorage: { dtype: 'float64', itemsize: 8 },
  HalfStorage: { dtype: 'float16', itemsize: 2 },
  BFloat16Storage: { dtype: 'bfloat16', itemsize: 2 },
  LongStorage: { dtype: 'int64', itemsize: 8 },
  IntStorage: { dtype: 'int32', itemsize: 4 },
  ShortStorage: { dtype: 'int16', itemsize: 2 },
  CharStorage: { dtype: 'int8', itemsize: 1 },
  ByteStorage: { dtype: 'uint8', itemsize: 1 },
  BoolStorage: { dtype: 'bool', itemsize: 1 },
};

const REBUILD_TENSOR = 'torch._utils._rebuild_tensor_v2';
/** The pre-0.4 form: (storage, storage_offset, size, stride). */
const REBUILD_TENSOR_V1 = 'torch._utils._rebuild_tensor';
const REBUILD_PARAMETER = 'torch._utils._rebuild_parameter';

/** Everything a PyTorch checkpoint of plain tensors may name: nothing else is loaded. */
export const TORCH_ALLOWED_GLOBALS: ReadonlySet<string> = new Set([
  'collections.OrderedDict',
  REBUILD_TENSOR,
  REBUILD_TENSOR_V1,
  REBUILD_PARAMETER,
  ...Object.keys(STORAGE_TYPES).map((s) => `torch.${s}`),
]);

export class TorchStorage implements PyOpaque {
  readonly pyOpaque = true as const;
  /** Raw bytes, attached once the container is read (a view: copy before mutating). */
  bytes: Uint8Array | undefined;
  /** A legacy view into another storage: [root, element offset]. */
  viewOf: [TorchStorage, number] | undefined;
  constructor(
    readonly dtype: TorchDtype,
    readonly itemsize: number,
    readonly key: string,
    readonly location: string,
    readonly numel: number,
  ) {}
}

export class TorchTensor implements PyOpaque {
  readonly pyOpaque = true as const;
  constructor(
    readonly storage: TorchStorage,
    readonly offset: number,
    readonly shape: number[],
    readonly stride: number[],
    readonly requiresGrad: boolean,
  ) {}
  get numel(): number {
    return this.shape.reduce((a, b) => a * b, 1);
  }
}

export interface TorchFile {
  format: 'zip' | 'legacy';
  /** The checkpoint object: dicts are PyDicts, tensors TorchTensors. */
  root: PickleValue;
  /** The zip archive's folder name, for zip files. */
  archive?: string;
}

function isInt(v: PickleValue): v is number {
  return typeof v === 'number' && Number.isSafeInteger(v);
}

function intTuple(v: PickleValue, what: string, fail: (m: string) => never): number[] {
  if (!(v instanceof PyTuple)) return fail(`${what} is a ${describe(v)}, not a tuple`);
  return v.items.map((x) => (isInt(x) ? x : fail(`${what} holds a non-integer (${describe(x)})`)));
}

interface Hooks {
  persistentLoad: (pid: PickleValue, at: number) => PickleValue;
  storages: Map<string, TorchStorage>;
}

function makeHooks(source: string, legacy: boolean): Hooks {
  const storages = new Map<string, TorchStorage>();
  const fail = (msg: string): never => {
    throw new PthError(`${source}: ${msg}`);
  };
  const persistentLoad = (pid: PickleValue, at: number): PickleValue => {
    if (!(pid instanceof PyTuple) || pid.items[0] !== 'storage') {
      return fail(`pickle offset ${at}: unsupported persistent id (${describe(pid)}); only storages are supported`);
    }
    const it = pid.items;
    if (it.length !== (legacy ? 6 : 5)) fail(`pickle offset ${at}: storage persistent id has ${it.length} fields`);
    const [, type, key, location, numel] = it;
    if (!(type instanceof PyGlobal) || type.module !== 'torch' || !(type.name in STORAGE_TYPES)) {
      return fail(`pickle offset ${at}: unsupported storage type ${describe(type)}`);
    }
    if (typeof key !== 'string' || typeof location !== 'string' || !isInt(numel) || numel < 0) {
      return fail(`pickle offset ${at}: malformed storage persistent id`);
    }
    const { dtype, itemsize } = STORAGE_TYPES[type.name];
    let st = storages.get(key);
    if (!st) {
      st = new TorchStorage(dtype, itemsize, key, location, numel);
      storages.set(key, st);
    } else if (st.dtype !== dtype || st.numel !== numel) {
      fail(`storage '${key}' is referenced as ${type.name} of ${numel} and as ${st.dtype} of ${st.numel}`);
    }
    if (legacy && it[5] !== null) {
      const vm = it[5];
      if (!(vm instanceof PyTuple) || vm.items.length !== 3) return fail(`pickle offset ${at}: malformed storage view of '${key}'`);
      const [viewKey, off, size] = vm.items;
      if (typeof viewKey !== 'string' || !isInt(off) || !isInt(size) || off < 0 || size < 0 || off + size > numel) {
        return fail(`pickle offset ${at}: storage view of '${key}' is out of range`);
      }
      let view = storages.get(viewKey);
      if (!view) {
        view = new TorchStorage(dtype, itemsize, viewKey, location, size);
        view.viewOf = [st, off];
        storages.set(viewKey, view);
      }
      return view;
    }
    return st;
  };
  return { persistentLoad, storages };
}

function reduceHook(source: string) {
  return (fn: PyGlobal, args: PyTuple, at: number): PickleValue | undefined => {
    const fail = (msg: string): never => {
      throw new PthError(`${source}: pickle offset ${at}: ${fn.qualified}: ${msg}`);
    };
    const a = args.items;
    if (fn.qualified === REBUILD_TENSOR || fn.qualified === REBUILD_TENSOR_V1) {
      const v1 = fn.qualified === REBUILD_TENSOR_V1;
      if (v1 ? a.length !== 4 : a.length !== 6 && a.length !== 7) fail(`expected ${v1 ? '4' : '6 or 7'} arguments, got ${a.length}`);
      const [storage, offset, size, stride] = a;
      const requiresGrad = v1 ? false : a[4];
      const hooks = v1 ? new PyDict() : a[5];
      if (!(storage instanceof TorchStorage)) return fail(`the storage argument is a ${describe(storage)}`);
      if (!isInt(offset) || offset < 0) return fail('bad storage offset');
      const shape = intTuple(size, 'size', fail);
      const strides = intTuple(stride, 'stride', fail);
      if (shape.length !== strides.length) fail(`size has ${shape.length} dims, stride ${strides.length}`);
      if (shape.some((d) => d < 0) || strides.some((s) => s < 0)) fail('negative size or stride');
      if (typeof requiresGrad !== 'boolean') fail('requires_grad is not a bool');
      if (!(hooks instanceof PyDict) || hooks.size !== 0) fail('backward hooks are not supported');
      return new TorchTensor(storage, offset, shape, strides, requiresGrad as boolean);
    }
    if (fn.qualified === REBUILD_PARAMETER) {
      if (a.length !== 3 || !(a[0] instanceof TorchTensor)) return fail('expected (tensor, requires_grad, hooks)');
      if (!(a[2] instanceof PyDict) || a[2].size !== 0) fail('backward hooks are not supported');
      return a[0];
    }
    return undefined;
  };
}

function checkStorageBytes(source: string, st: TorchStorage, bytes: Uint8Array, where: string): void {
  if (bytes.length % st.itemsize !== 0) {
    throw new PthError(`${source}: storage '${st.key}' (${where}) has ${bytes.length} bytes, not a whole number of ${st.dtype}`);
  }
}

function swapBytes(bytes: Uint8Array, itemsize: number): Uint8Array {
  if (itemsize === 1) return bytes;
  const out = new Uint8Array(bytes.length);
  for (let i = 0; i < bytes.length; i += itemsize) for (let j = 0; j < itemsize; j++) out[i + j] = bytes[i + itemsize - 1 - j];
  return out;
}

const LEGACY_MAGIC = 0x1950a86a20f9469cfc6cn;

function loadZip(buf: Uint8Array, source: string): TorchFile {
  const zip = ZipReader.fromBuffer(buf, source);
  const pkls = zip.names().filter((n) => /^[^/]+\/data\.pkl$/.test(n));
  if (pkls.length !== 1) {
    throw new PthError(`${source}: not a PyTorch zip checkpoint (${pkls.length} '<archive>/data.pkl' records; found ${zip.names().slice(0, 5).join(', ')})`);
  }
  const archive = pkls[0].slice(0, -'/data.pkl'.length);
  let bigEndian = false;
  if (zip.has(`${archive}/byteorder`)) {
    const order = zip.read(`${archive}/byteorder`).toString('latin1').trim();
    if (order !== 'little' && order !== 'big') throw new PthError(`${source}: unknown byteorder record '${order.slice(0, 20)}'`);
    bigEndian = order === 'big';
  }
  const hooks = makeHooks(source, false);
  const { value } = unpickle(zip.read(pkls[0]), {
    source: `${source} (${pkls[0]})`,
    allowedGlobals: TORCH_ALLOWED_GLOBALS,
    persistentLoad: hooks.persistentLoad,
    reduce: reduceHook(source),
  });
  for (const st of hooks.storages.values()) {
    const name = `${archive}/data/${st.key}`;
    if (!zip.has(name)) throw new PthError(`${source}: storage record '${name}' is missing`);
    let bytes: Uint8Array = zip.read(name);
    checkStorageBytes(source, st, bytes, name);
    if (bigEndian) bytes = swapBytes(bytes, st.itemsize);
    st.bytes = bytes;
  }
  return { format: 'zip', root: value, archive };
}

function loadLegacy(buf: Uint8Array, source: string): TorchFile {
  const header = (at: number, what: string) => {
    try {
      return unpickle(buf, { source, allowedGlobals: new Set() }, at);
    } catch (err) {
      if (err instanceof PickleError) throw new PthError(`${source}: not a PyTorch checkpoint (${what}: ${err.message})`);
      throw err;
    }
  };
  const magic = header(0, 'magic number');
  if (!(magic.value === Number(LEGACY_MAGIC) || magic.value === LEGACY_MAGIC)) {
    throw new PthError(`${source}: not a PyTorch checkpoint (bad magic number)`);
  }
  const proto = header(magic.end, 'protocol version');
  if (proto.value !== 1001) throw new PthError(`${source}: unsupported legacy protocol version ${String(proto.value)}`);
  const sys = header(proto.end, 'sys info');
  let bigEndian = false;
  if (sys.value instanceof PyDict && sys.value.get('little_endian') === false) bigEndian = true;
  const hooks = makeHooks(source, true);
  const obj = unpickle(
    buf,
    { source, allowedGlobals: TORCH_ALLOWED_GLOBALS, persistentLoad: hooks.persistentLoad, reduce: reduceHook(source) },
    sys.end,
  );
  const keysPickle = unpickle(buf, { source, allowedGlobals: new Set() }, obj.end);
  const keys = keysPickle.value;
  if (!Array.isArray(keys) || keys.some((k) => typeof k !== 'string')) throw new PthError(`${source}: storage key list is malformed`);
  const view = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  let p = keysPickle.end;
  for (const key of keys as string[]) {
    const st = hooks.storages.get(key);
    if (!st || st.viewOf) throw new PthError(`${source}: storage '${key}' is listed but no tensor references it`);
    if (p + 8 > buf.length) throw new PthError(`${source}: truncated checkpoint (no size header for storage '${key}')`);
    const numel = view.getBigInt64(p, !bigEndian);
    p += 8;
    if (numel !== BigInt(st.numel)) throw new PthError(`${source}: storage '${key}' holds ${numel} elements, the pickle says ${st.numel}`);
    const nbytes = st.numel * st.itemsize;
    if (p + nbytes > buf.length) {
      throw new PthError(`${source}: truncated checkpoint (storage '${key}' needs ${nbytes} bytes, ${buf.length - p} left)`);
    }
    let bytes = buf.subarray(p, p + nbytes);
    if (bigEndian) bytes = swapBytes(bytes, st.itemsize);
    st.bytes = bytes;
    p += nbytes;
  }
  for (const st of hooks.storages.values()) {
    if (st.viewOf) {
      const [root, off] = st.viewOf;
      if (!root.bytes) throw new PthError(`${source}: storage '${root.key}' has no data`);
      st.bytes = root.bytes.subarray(off * st.itemsize, (off + st.numel) * st.itemsize);
    } else if (!st.bytes) throw new PthError(`${source}: storage '${st.key}' has no data in the file`);
  }
  return { format: 'legacy', root: obj.value };
}

/** Reads a torch.save file (zip or legacy) into plain values and TorchTensors. */
export function loadTorch(buf: Uint8Array, source: string): TorchFile {
  if (buf.length === 0) throw new PthError(`${source}: empty file`);
  if (looksLikeZip(buf)) return loadZip(buf, source);
  if (buf[0] === 0x80) return loadLegacy(buf, source);
  throw new PthError(`${source}: not a PyTorch checkpoint (neither a zip archive nor a legacy pickle)`);
}

/** The most elements one tensor may have (4 GiB of float32). */
const MAX_ELEMENTS = 2 ** 30;

function halfToFloat(h: number): number {
  const s = h & 0x8000 ? -1 : 1;
  const e = (h >> 10) & 0x1f;
  const m = h & 0x3ff;
  if (e === 0) return s * m * 2 ** -24;
  if (e === 31) return m ? NaN : s * Infinity;
  return s * (1 + m / 1024) * 2 ** (e - 15);
}

/**
 * A tensor's elements in row-major order as float32, gathered through its offset and strides.
 * float32 is copied bit for bit; float16/bfloat16 convert exactly; float64 rounds to nearest;
 * integers and bools convert only while exact (|v| <= 2^24). `key` names the tensor in errors.
 */
export function tensorToFloat32(t: TorchTensor, key: string, source: string): Float32Array {
  const st = t.storage;
  const fail = (msg: string): never => {
    throw new PthError(`${source}: tensor '${key}': ${msg}`);
  };
  if (!st.bytes) return fail('storage data was not loaded');
  const n = t.numel;
  if (!Number.isSafeInteger(n) || n > MAX_ELEMENTS) fail(`size [${t.shape}] is too large (${n} elements)`);
  if (n === 0) return new Float32Array(0);
  let maxIndex = t.offset;
  for (let d = 0; d < t.shape.length; d++) maxIndex += (t.shape[d] - 1) * t.stride[d];
  const available = Math.floor(st.bytes.length / st.itemsize);
  if (maxIndex >= available) {
    fail(`storage '${st.key}' is too short (${available} ${st.dtype} elements; offset ${t.offset}, size [${t.shape}], stride [${t.stride}] need ${maxIndex + 1})`);
  }
  // Row-major contiguous: strides equal the suffix products.
  let contiguous = true;
  let expect = 1;
  for (let d = t.shape.length - 1; d >= 0; d--) {
    if (t.shape[d] !== 1 && t.stride[d] !== expect) contiguous = false;
    expect *= t.shape[d];
  }
  const bytes = st.bytes;
  const out = new Float32Array(n);
  if (st.dtype === 'float32' && contiguous) {
    new Uint8Array(out.buffer).set(bytes.subarray(t.offset * 4, (t.offset + n) * 4));
    return out;
  }
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const get = ((): ((i: number) => number) => {
    switch (st.dtype) {
      case 'float32':
        return (i) => view.getFloat32(i * 4, true);
      case 'float64':
        return (i) => view.getFloat64(i * 8, true);
      case 'float16':
        return (i) => halfToFloat(view.getUint16(i * 2, true));
      case 'bfloat16':
        return (i) => {
          const b = new DataView(new ArrayBuffer(4));
          b.setUint32(0, view.getUint16(i * 2, true) << 16, true);
          return b.getFloat32(0, true);
        };
      case 'int64':
        return (i) => {
          const v = view.getBigInt64(i * 8, true);
          if (v > 16777216n || v < -16777216n) fail(`int64 value ${v} at element ${i} is not exactly representable as float32`);
          return Number(v);
        };
      case 'int32':
        return (i) => {
          const v = view.getInt32(i * 4, true);
          if (Math.abs(v) > 16777216) fail(`int32 value ${v} is not exactly representable as float32`);
          return v;
        };
      case 'int16':
        return (i) => view.getInt16(i * 2, true);
      case 'int8':
        return (i) => view.getInt8(i);
      case 'uint8':
        return (i) => view.getUint8(i);
      case 'bool':
        return (i) => (view.getUint8(i) ? 1 : 0);
      default:
        return fail(`dtype ${String(st.dtype)} is not supported`);
    }
  })();
  const rank = t.shape.length;
  const idx = new Array<number>(rank).fill(0);
  let at = t.offset;
  for (let k = 0; k < n; k++) {
    out[k] = get(at);
    for (let d = rank - 1; d >= 0; d--) {
      idx[d]++;
      at += t.stride[d];
      if (idx[d] < t.shape[d]) break;
      at -= t.stride[d] * t.shape[d];
      idx[d] = 0;
    }
  }
  return out;
}

/** A one-element tensor's value at full precision (float64 and int64 exact where possible). */
export function tensorScalar(t: TorchTensor, key: string, source: string): number {
  if (t.numel !== 1) throw new PthError(`${source}: '${key}' has ${t.numel} elements, expected a scalar`);
  const st = t.storage;
  if (st.bytes && (st.dtype === 'float64' || st.dtype === 'int64')) {
    if ((t.offset + 1) * 8 > st.bytes.length) throw new PthError(`${source}: tensor '${key}': storage '${st.key}' is too short`);
    const v = new DataView(st.bytes.buffer, st.bytes.byteOffset, st.bytes.byteLength);
    return st.dtype === 'float64' ? v.getFloat64(t.offset * 8, true) : Number(v.getBigInt64(t.offset * 8, true));
  }
  return tensorToFloat32(t, key, source)[0];
}
