/**
 * A restricted pickle reader (and a small protocol-2 writer) for PyTorch checkpoints.
 *
 * The reader interprets only the opcodes a state dict needs and never executes anything: a
 * GLOBAL / STACK_GLOBAL must name a class in the caller's allow-list, REDUCE is applied only to
 * allow-listed callables (collections.OrderedDict here; anything else through the caller's
 * `reduce` hook), persistent ids go to the caller's `persistentLoad`. Every other opcode, and
 * every class outside the allow-list, is refused with a PickleError naming the source, the
 * opcode (or class) and its byte offset. All reads are bounds-checked; dicts are Maps, so keys
 * such as `__proto__` are plain data.
 *
 * Value model: None -> null, bool -> boolean, int -> number (bigint beyond 2^53), float ->
 * number, str -> string, bytes -> Uint8Array, list -> JS array, tuple -> PyTuple, dict and
 * OrderedDict -> PyDict (a Map), allow-listed class -> PyGlobal.
 */

export class PickleError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'PickleError';
  }
}

export class PyTuple {
  constructor(readonly items: PickleValue[]) {}
}

/** A dict; `ordered` for collections.OrderedDict; `attrs` holds a BUILD state (`_metadata`). */
export class PyDict extends Map<PickleValue, PickleValue> {
  ordered = false;
  attrs: PyDict | undefined;
}

/** A reference to an allow-listed module attribute (a class or a function). */
export class PyGlobal {
  constructor(
    readonly module: string,
    readonly name: string,
  ) {}
  get qualified(): string {
    return `${this.module}.${this.name}`;
  }
}

/** Whatever the caller's hooks return (tensors, storages). */
export interface PyOpaque {
  readonly pyOpaque: true;
}

export type PickleValue =
  | null
  | boolean
  | number
  | bigint
  | string
  | Uint8Array
  | PickleValue[]
  | PyTuple
  | PyDict
  | PyGlobal
  | PyOpaque;

export interface UnpickleOptions {
  /** Names the file in every error. */
  source: string;
  /** 'module.name' of every class or function the stream may name. */
  allowedGlobals: ReadonlySet<string>;
  /** Applies an allow-listed callable other than collections.OrderedDict. */
  reduce?: (fn: PyGlobal, args: PyTuple, at: number) => PickleValue | undefined;
  /** Resolves a persistent id (BINPERSID / PERSID). Without it, persistent ids are refused. */
  persistentLoad?: (pid: PickleValue, at: number) => PickleValue;
  /** Largest protocol accepted (default 5). */
  maxProtocol?: number;
}

/** Opcode names, for error messages (the full Python 3 set, supported or not). */
const OPCODE_NAMES: Record<number, string> = {
  0x28: 'MARK', 0x2e: 'STOP', 0x30: 'POP', 0x31: 'POP_MARK', 0x32: 'DUP', 0x46: 'FLOAT', 0x49: 'INT',
  0x4a: 'BININT', 0x4b: 'BININT1', 0x4c: 'LONG', 0x4d: 'BININT2', 0x4e: 'NONE', 0x50: 'PERSID',
  0x51: 'BINPERSID', 0x52: 'REDUCE', 0x53: 'STRING', 0x54: 'BINSTRING', 0x55: 'SHORT_BINSTRING',
  0x56: 'UNICODE', 0x58: 'BINUNICODE', 0x61: 'APPEND', 0x62: 'BUILD', 0x63: 'GLOBAL', 0x64: 'DICT',
  0x7d: 'EMPTY_DICT', 0x65: 'APPENDS', 0x67: 'GET', 0x68: 'BINGET', 0x69: 'INST', 0x6a: 'LONG_BINGET',
  0x6c: 'LIST', 0x5d: 'EMPTY_LIST', 0x6f: 'OBJ', 0x70: 'PUT', 0x71: 'BINPUT', 0x72: 'LONG_BINPUT',
  0x73: 'SETITEM', 0x74: 'TUPLE', 0x29: 'EMPTY_TUPLE', 0x75: 'SETITEMS', 0x47: 'BINFLOAT',
  0x80: 'PROTO', 0x81: 'NEWOBJ', 0x82: 'EXT1', 0x83: 'EXT2', 0x84: 'EXT4', 0x85: 'TUPLE1', 0x86: 'TUPLE2',
  0x87: 'TUPLE3', 0x88: 'NEWTRUE', 0x89: 'NEWFALSE', 0x8a: 'LONG1', 0x8b: 'LONG4', 0x42: 'BINBYTES',
  0x43: 'SHORT_BINBYTES', 0x8c: 'SHORT_BINUNICODE', 0x8d: 'BINUNICODE8', 0x8e: 'BINBYTES8',
  0x8f: 'EMPTY_SET', 0x90: 'ADDITEMS', 0x91: 'FROZENSET', 0x92: 'NEWOBJ_EX', 0x93: 'STACK_GLOBAL',
  0x94: 'MEMOIZE', 0x95: 'FRAME', 0x96: 'BYTEARRAY8', 0x97: 'NEXT_BUFFER', 0x98: 'READONLY_BUFFER',
};

export function opcodeName(op: number): string {
  const hex = `0x${op.toString(16).padStart(2, '0')}`;
  return OPCODE_NAMES[op] ? `${OPCODE_NAMES[op]} (${hex})` : `unknown opcode ${hex}`;
}

const MARK = Symbol('mark');
type StackItem = PickleValue | typeof MARK;

const utf8 = new TextDecoder('utf-8', { fatal: true });

/** Converts a little-endian two's complement integer of `n` bytes. */
function decodeLong(bytes: Uint8Array): number | bigint {
  if (bytes.length === 0) return 0;
  let v = 0n;
  for (let i = bytes.length - 1; i >= 0; i--) v = (v << 8n) | BigInt(bytes[i]);
  if (bytes[bytes.length - 1] & 0x80) v -= 1n << BigInt(8 * bytes.length);
  return v >= BigInt(Number.MIN_SAFE_INTEGER) && v <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(v) : v;
}

/**
 * Reads one pickle starting at `offset`; returns the value and the offset just past its STOP
 * (PyTorch's legacy format concatenates several pickles and raw data).
 */
export function unpickle(data: Uint8Array, opts: UnpickleOptions, offset = 0): { value: PickleValue; end: number } {
  const src = opts.source;
  const buf = data;
  const view = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  const n = buf.length;
  const stack: StackItem[] = [];
  const marks: number[] = [];
  const memo = new Map<number, PickleValue>();
  let p = offset;
  let opAt = offset;
  let opName = '';

  const fail = (msg: string): never => {
    throw new PickleError(`${src}: pickle offset ${opAt} (${opName}): ${msg}`);
  };
  const need = (k: number): void => {
    if (k < 0 || p + k > n) fail(`truncated pickle (needs ${k} bytes at offset ${p}, ${n - p} left)`);
  };
  const bytes = (k: number): Uint8Array => {
    need(k);
    const out = buf.subarray(p, p + k);
    p += k;
    return out;
  };
  const u8 = (): number => {
    need(1);
    return buf[p++];
  };
  const u16 = (): number => {
    need(2);
    const v = view.getUint16(p, true);
    p += 2;
    return v;
  };
  const u32 = (): number => {
    need(4);
    const v = view.getUint32(p, true);
    p += 4;
    return v;
  };
  const i32 = (): number => {
    need(4);
    const v = view.getInt32(p, true);
    p += 4;
    return v;
  };
  const u64 = (): number => {
    need(8);
    const v = view.getBigUint64(p, true);
    p += 8;
    if (v > BigInt(n)) fail(`length ${v} exceeds the data`);
    return Number(v);
  };
  const line = (): string => {
    const start = p;
    const limit = Math.min(n, p + 4096);
    while (p < limit && buf[p] !== 0x0a) p++;
    if (p >= limit) fail('unterminated text line');
    const s = Buffer.from(buf.subarray(start, p)).toString('latin1');
    p++;
    return s;
  };
  const text = (k: number): string => {
    const b = bytes(k);
    try {
      return utf8.decode(b);
    } catch {
      return fail('invalid UTF-8 string');
    }
  };
  const pop = (): PickleValue => {
    if (stack.length === 0) fail('stack underflow');
    const v = stack.pop() as StackItem;
    if (v === MARK) fail('unexpected MARK on the stack');
    return v as PickleValue;
  };
  const top = (): PickleValue => {
    if (stack.length === 0) fail('stack underflow');
    const v = stack[stack.length - 1];
    if (v === MARK) fail('unexpected MARK on the stack');
    return v as PickleValue;
  };
  const popMark = (): PickleValue[] => {
    if (marks.length === 0) fail('no MARK on the stack');
    const at = marks.pop() as number;
    const items = stack.splice(at);
    items.shift(); // the MARK itself
    for (const it of items) if (it === MARK) fail('nested MARK');
    return items as PickleValue[];
  };
  const push = (v: PickleValue): void => {
    stack.push(v);
  };
  const resolveGlobal = (module: string, name: string): PyGlobal => {
    const q = `${module}.${name}`;
    if (!opts.allowedGlobals.has(q)) fail(`class '${q}' is not in the allowed set; refusing to load it`);
    return new PyGlobal(module, name);
  };
  const asDict = (v: PickleValue, what: string): PyDict => {
    if (!(v instanceof PyDict)) fail(`${what} on a ${describe(v)}, not a dict`);
    return v as PyDict;
  };
  const asList = (v: PickleValue, what: string): PickleValue[] => {
    if (!Array.isArray(v)) fail(`${what} on a ${describe(v)}, not a list`);
    return v as PickleValue[];
  };
  const setItem = (d: PyDict, k: PickleValue, v: PickleValue): void => {
    if (k instanceof PyDict || Array.isArray(k)) fail('unhashable dict key');
    d.set(k, v);
  };
  const memoPut = (idx: number): void => {
    memo.set(idx, top());
  };
  const memoGet = (idx: number): void => {
    if (!memo.has(idx)) fail(`memo key ${idx} is not defined`);
    push(memo.get(idx) as PickleValue);
  };

  const maxProtocol = opts.maxProtocol ?? 5;
  for (;;) {
    if (p >= n) {
      opAt = p;
      opName = 'end of data';
      fail('truncated pickle (no STOP)');
    }
    opAt = p;
    const op = buf[p++];
    opName = opcodeName(op);
    switch (op) {
      case 0x80: {
        // PROTO
        const v = u8();
        if (v > maxProtocol) fail(`pickle protocol ${v} is not supported`);
        break;
      }
      case 0x95: // FRAME: a length hint; the opcodes follow in line.
        u64();
        break;
      case 0x2e: {
        // STOP
        const v = pop();
        if (stack.length !== 0) fail(`${stack.length} values left on the stack at STOP`);
        return { value: v, end: p };
      }
      case 0x28: // MARK
        marks.push(stack.length);
        stack.push(MARK);
        break;
      case 0x7d: // EMPTY_DICT
        push(new PyDict());
        break;
      case 0x64: {
        // DICT
        const items = popMark();
        if (items.length % 2) fail('odd number of items for DICT');
        const d = new PyDict();
        for (let i = 0; i < items.length; i += 2) setItem(d, items[i], items[i + 1]);
        push(d);
        break;
      }
      case 0x73: {
        // SETITEM
        const v = pop();
        const k = pop();
        setItem(asDict(top(), 'SETITEM'), k, v);
        break;
      }
      case 0x75: {
        // SETITEMS
        const items = popMark();
        if (items.length % 2) fail('odd number of items for SETITEMS');
        const d = asDict(top(), 'SETITEMS');
        for (let i = 0; i < items.length; i += 2) setItem(d, items[i], items[i + 1]);
        break;
      }
      case 0x5d: // EMPTY_LIST
        push([]);
        break;
      case 0x6c: // LIST
        push(popMark());
        break;
      case 0x61: {
        // APPEND
        const v = pop();
        asList(top(), 'APPEND').push(v);
        break;
      }
      case 0x65: {
        // APPENDS
        const items = popMark();
        const l = asList(top(), 'APPENDS');
        for (const it of items) l.push(it);
        break;
      }
      case 0x29: // EMPTY_TUPLE
        push(new PyTuple([]));
        break;
      case 0x74: // TUPLE
        push(new PyTuple(popMark()));
        break;
      case 0x85: // TUPLE1
        push(new PyTuple([pop()]));
        break;
      case 0x86: {
        // TUPLE2
        const b = pop();
        const a = pop();
        push(new PyTuple([a, b]));
        break;
      }
      case 0x87: {
        // TUPLE3
        const c = pop();
        const b = pop();
        const a = pop();
        push(new PyTuple([a, b, c]));
        break;
      }
      case 0x58: // BINUNICODE
        push(text(u32()));
        break;
      case 0x8c: // SHORT_BINUNICODE
        push(text(u8()));
        break;
      case 0x8d: // BINUNICODE8
        push(text(u64()));
        break;
      case 0x54: {
        // BINSTRING (Python 2 str; PyTorch loads with encoding='utf-8')
        const k = i32();
        if (k < 0) fail('negative BINSTRING length');
        push(text(k));
        break;
      }
      case 0x55: // SHORT_BINSTRING
        push(text(u8()));
        break;
      case 0x42: // BINBYTES
        push(Uint8Array.from(bytes(u32())));
        break;
      case 0x43: // SHORT_BINBYTES
        push(Uint8Array.from(bytes(u8())));
        break;
      case 0x4a: // BININT
        push(i32());
        break;
      case 0x4b: // BININT1
        push(u8());
        break;
      case 0x4d: // BININT2
        push(u16());
        break;
      case 0x8a: // LONG1
        push(decodeLong(bytes(u8())));
        break;
      case 0x8b: {
        // LONG4
        const k = i32();
        if (k < 0 || k > 4096) fail(`LONG4 of ${k} bytes is not supported`);
        push(decodeLong(bytes(k)));
        break;
      }
      case 0x47: {
        // BINFLOAT (big-endian)
        need(8);
        push(view.getFloat64(p, false));
        p += 8;
        break;
      }
      case 0x88: // NEWTRUE
        push(true);
        break;
      case 0x89: // NEWFALSE
        push(false);
        break;
      case 0x4e: // NONE
        push(null);
        break;
      case 0x71: // BINPUT
        memoPut(u8());
        break;
      case 0x72: // LONG_BINPUT
        memoPut(u32());
        break;
      case 0x94: // MEMOIZE
        memoPut(memo.size);
        break;
      case 0x68: // BINGET
        memoGet(u8());
        break;
      case 0x6a: // LONG_BINGET
        memoGet(u32());
        break;
      case 0x63: {
        // GLOBAL "module\nname\n"
        const module = line();
        const name = line();
        push(resolveGlobal(module, name));
        break;
      }
      case 0x93: {
        // STACK_GLOBAL
        const name = pop();
        const module = pop();
        if (typeof module !== 'string' || typeof name !== 'string') fail('STACK_GLOBAL needs two strings');
        push(resolveGlobal(module as string, name as string));
        break;
      }
      case 0x52: {
        // REDUCE
        const args = pop();
        const fn = pop();
        if (!(fn instanceof PyGlobal)) fail(`REDUCE on a ${describe(fn)}, not an allowed callable`);
        if (!(args instanceof PyTuple)) fail('REDUCE arguments are not a tuple');
        const g = fn as PyGlobal;
        const a = args as PyTuple;
        if (g.qualified === 'collections.OrderedDict') {
          const d = new PyDict();
          d.ordered = true;
          if (a.items.length !== 0) fail('collections.OrderedDict called with arguments; only OrderedDict() is supported');
          push(d);
        } else {
          const out = opts.reduce?.(g, a, opAt);
          if (out === undefined) fail(`'${g.qualified}' may not be called`);
          push(out as PickleValue);
        }
        break;
      }
      case 0x62: {
        // BUILD: only an OrderedDict's instance dict (state_dict()._metadata)
        const state = pop();
        const obj = top();
        if (!(obj instanceof PyDict) || !obj.ordered) fail(`BUILD on a ${describe(obj)} is not supported`);
        if (!(state instanceof PyDict)) fail('BUILD state is not a dict');
        for (const k of (state as PyDict).keys()) {
          if (k !== '_metadata') fail(`BUILD sets attribute '${String(k)}'; only '_metadata' is supported`);
        }
        (obj as PyDict).attrs = state as PyDict;
        break;
      }
      case 0x51: {
        // BINPERSID
        const pid = pop();
        if (!opts.persistentLoad) fail('persistent ids are not supported here');
        push((opts.persistentLoad as NonNullable<UnpickleOptions['persistentLoad']>)(pid, opAt));
        break;
      }
      case 0x50: {
        // PERSID (text)
        const pid = line();
        if (!opts.persistentLoad) fail('persistent ids are not supported here');
        push((opts.persistentLoad as NonNullable<UnpickleOptions['persistentLoad']>)(pid, opAt));
        break;
      }
      default:
        fail(`opcode ${opName} is not supported; refusing to load`);
    }
  }
}

export function describe(v: PickleValue | undefined): string {
  if (v === null) return 'None';
  if (v === undefined) return 'nothing';
  if (Array.isArray(v)) return 'list';
  if (v instanceof PyTuple) return 'tuple';
  if (v instanceof PyDict) return v.ordered ? 'OrderedDict' : 'dict';
  if (v instanceof PyGlobal) return `class ${v.qualified}`;
  if (v instanceof Uint8Array) return 'bytes';
  if (typeof v === 'object') return 'object';
  return typeof v;
}

// ---------------------------------------------------------------------------------------------
// Writer: protocol 2, the opcodes Python's pickler emits for a PyTorch state dict.

/** A value the writer emits: as PickleValue, plus calls (`fn(*args)`) and persistent ids. */
export type PickleOut =
  | null
  | boolean
  | number
  | string
  | PickleOut[]
  | PyTuple
  | PyDict
  | PyGlobal
  | { call: PyGlobal; args: PickleOut[] }
  | { persistentId: PickleOut[] }
  | { float: number }
  | { ordered: Array<[string, PickleOut]> };

export class PickleWriter {
  private readonly chunks: Buffer[] = [];
  private memoCount = 0;
  private readonly globals = new Map<string, number>();
  private readonly strings = new Map<string, number>();

  /** Serialises `value` as one protocol-2 pickle (PROTO 2 ... STOP). */
  static dump(value: PickleOut): Buffer {
    const w = new PickleWriter();
    w.op(0x80, 2);
    w.save(value);
    w.op(0x2e);
    return Buffer.concat(w.chunks);
  }

  private op(...b: number[]): void {
    this.chunks.push(Buffer.from(b));
  }

  private raw(b: Buffer): void {
    this.chunks.push(b);
  }

  private put(): number {
    const idx = this.memoCount++;
    if (idx < 256) this.op(0x71, idx);
    else {
      const b = Buffer.alloc(5);
      b[0] = 0x72;
      b.writeUInt32LE(idx, 1);
      this.raw(b);
    }
    return idx;
  }

  private get(idx: number): void {
    if (idx < 256) this.op(0x68, idx);
    else {
      const b = Buffer.alloc(5);
      b[0] = 0x6a;
      b.writeUInt32LE(idx, 1);
      this.raw(b);
    }
  }

  private saveInt(v: number): void {
    if (Number.isInteger(v) && v >= 0 && v < 256) this.op(0x4b, v);
    else if (Number.isInteger(v) && v >= 0 && v < 65536) this.op(0x4d, v & 0xff, v >> 8);
    else if (Number.isInteger(v) && v >= -0x80000000 && v <= 0x7fffffff) {
      const b = Buffer.alloc(5);
      b[0] = 0x4a;
      b.writeInt32LE(v, 1);
      this.raw(b);
    } else if (Number.isSafeInteger(v)) {
      // LONG1: minimal little-endian two's complement.
      let x = BigInt(v);
      const out: number[] = [];
      for (;;) {
        out.push(Number(x & 0xffn));
        x >>= 8n;
        const last = out[out.length - 1];
        if ((x === 0n && !(last & 0x80)) || (x === -1n && last & 0x80)) break;
      }
      this.op(0x8a, out.length, ...out);
    } else throw new PickleError(`pickle writer: ${v} is not an integer`);
  }

  private saveFloat(v: number): void {
    const b = Buffer.alloc(9);
    b[0] = 0x47;
    b.writeDoubleBE(v, 1);
    this.raw(b);
  }

  private saveString(s: string, memoize: boolean): void {
    const known = this.strings.get(s);
    if (memoize && known !== undefined) {
      this.get(known);
      return;
    }
    const body = Buffer.from(s, 'utf8');
    const head = Buffer.alloc(5);
    head[0] = 0x58;
    head.writeUInt32LE(body.length, 1);
    this.raw(head);
    this.raw(body);
    const idx = this.put();
    if (memoize) this.strings.set(s, idx);
  }

  private saveGlobal(g: PyGlobal): void {
    const known = this.globals.get(g.qualified);
    if (known !== undefined) {
      this.get(known);
      return;
    }
    this.op(0x63);
    this.raw(Buffer.from(`${g.module}\n${g.name}\n`, 'latin1'));
    this.globals.set(g.qualified, this.put());
  }

  private saveTuple(items: PickleOut[]): void {
    if (items.length === 0) {
      this.op(0x29);
      return;
    }
    if (items.length <= 3) {
      for (const it of items) this.save(it);
      this.op([0x85, 0x86, 0x87][items.length - 1]);
    } else {
      this.op(0x28);
      for (const it of items) this.save(it);
      this.op(0x74);
    }
    this.put();
  }

  private saveItems(pairs: Array<[PickleOut, PickleOut]>): void {
    // Python batches SETITEMS by 1000 and uses SETITEM for a batch of one.
    for (let i = 0; i < pairs.length; i += 1000) {
      const batch = pairs.slice(i, i + 1000);
      if (batch.length === 1) {
        this.save(batch[0][0]);
        this.save(batch[0][1]);
        this.op(0x73);
      } else {
        this.op(0x28);
        for (const [k, v] of batch) {
          this.save(k);
          this.save(v);
        }
        this.op(0x75);
      }
    }
  }

  save(v: PickleOut): void {
    if (v === null) this.op(0x4e);
    else if (v === true) this.op(0x88);
    else if (v === false) this.op(0x89);
    else if (typeof v === 'number') {
      if (Number.isInteger(v)) this.saveInt(v);
      else this.saveFloat(v);
    } else if (typeof v === 'string') this.saveString(v, true);
    else if (Array.isArray(v)) {
      this.op(0x5d);
      this.put();
      for (let i = 0; i < v.length; i += 1000) {
        const batch = v.slice(i, i + 1000);
        if (batch.length === 1) {
          this.save(batch[0]);
          this.op(0x61);
        } else {
          this.op(0x28);
          for (const it of batch) this.save(it);
          this.op(0x65);
        }
      }
    } else if (v instanceof PyTuple) this.saveTuple(v.items as PickleOut[]);
    else if (v instanceof PyGlobal) this.saveGlobal(v);
    else if (v instanceof PyDict) {
      if (v.ordered) {
        this.saveGlobal(new PyGlobal('collections', 'OrderedDict'));
        this.op(0x29, 0x52);
      } else this.op(0x7d);
      this.put();
      this.saveItems([...v.entries()] as Array<[PickleOut, PickleOut]>);
    } else if ('float' in v) this.saveFloat(v.float);
    else if ('ordered' in v) {
      this.saveGlobal(new PyGlobal('collections', 'OrderedDict'));
      this.op(0x29, 0x52);
      this.put();
      this.saveItems(v.ordered);
    } else if ('call' in v) {
      this.saveGlobal(v.call);
      this.saveTuple(v.args);
      this.op(0x52);
      this.put();
    } else if ('persistentId' in v) {
      this.saveTuple(v.persistentId);
      this.op(0x51);
    } else throw new PickleError('pickle writer: unsupported value');
  }
}

/**
 * Lists a pickle's opcodes without interpreting them (for inspection and structure checks);
 * stops after STOP. Only the opcodes the reader supports are decoded; others end the listing
 * with a PickleError.
 */
export function pickleOpcodes(data: Uint8Array, source: string, offset = 0): Array<{ at: number; op: string; arg?: string | number }> {
  const out: Array<{ at: number; op: string; arg?: string | number }> = [];
  const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
  let p = offset;
  const need = (k: number, at: number) => {
    if (p + k > data.length) throw new PickleError(`${source}: pickle offset ${at}: truncated pickle`);
  };
  while (p < data.length) {
    const at = p;
    const code = data[p++];
    const name = OPCODE_NAMES[code];
    const str = (k: number) => {
      need(k, at);
      const s = Buffer.from(data.subarray(p, p + k)).toString('utf8');
      p += k;
      return s;
    };
    let arg: string | number | undefined;
    switch (name) {
      case 'PROTO': case 'BINPUT': case 'BINGET': case 'BININT1':
        need(1, at); arg = data[p]; p += 1; break;
      case 'BININT2':
        need(2, at); arg = view.getUint16(p, true); p += 2; break;
      case 'BININT':
        need(4, at); arg = view.getInt32(p, true); p += 4; break;
      case 'LONG_BINPUT': case 'LONG_BINGET':
        need(4, at); arg = view.getUint32(p, true); p += 4; break;
      case 'BINFLOAT':
        need(8, at); arg = view.getFloat64(p, false); p += 8; break;
      case 'FRAME':
        need(8, at); p += 8; break;
      case 'LONG1': {
        need(1, at); const k = data[p++]; need(k, at); arg = String(decodeLong(data.subarray(p, p + k))); p += k; break;
      }
      case 'BINUNICODE': case 'BINBYTES': case 'BINSTRING': {
        need(4, at); const k = view.getUint32(p, true); p += 4; arg = str(k); break;
      }
      case 'SHORT_BINUNICODE': case 'SHORT_BINBYTES': case 'SHORT_BINSTRING': {
        need(1, at); const k = data[p++]; arg = str(k); break;
      }
      case 'GLOBAL': {
        const nl1 = data.indexOf(0x0a, p);
        const nl2 = nl1 < 0 ? -1 : data.indexOf(0x0a, nl1 + 1);
        if (nl2 < 0) throw new PickleError(`${source}: pickle offset ${at}: unterminated GLOBAL`);
        arg = `${Buffer.from(data.subarray(p, nl1)).toString('latin1')} ${Buffer.from(data.subarray(nl1 + 1, nl2)).toString('latin1')}`;
        p = nl2 + 1;
        break;
      }
      case 'MARK': case 'STOP': case 'EMPTY_DICT': case 'DICT': case 'SETITEM': case 'SETITEMS': case 'EMPTY_LIST':
      case 'LIST': case 'APPEND': case 'APPENDS': case 'EMPTY_TUPLE': case 'TUPLE': case 'TUPLE1': case 'TUPLE2':
      case 'TUPLE3': case 'NEWTRUE': case 'NEWFALSE': case 'NONE': case 'MEMOIZE': case 'STACK_GLOBAL':
      case 'REDUCE': case 'BUILD': case 'BINPERSID':
        break;
      default:
        throw new PickleError(`${source}: pickle offset ${at}: opcode ${opcodeName(code)} is not supported`);
    }
    out.push(arg === undefined ? { at, op: name } : { at, op: name, arg });
    if (name === 'STOP') break;
  }
  return out;
}
