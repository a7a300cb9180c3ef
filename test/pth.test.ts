import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import * as zlib from 'node:zlib';
import { withH5File } from '../lib/io/h5';
import { PickleError, PickleWriter, PyDict, PyGlobal, PyTuple, pickleOpcodes, unpickle, type PickleOut } from '../lib/io/pickle';
import { ZipError, ZipReader, encodeZip } from '../lib/io/zip';
import { readParamGroup } from '../lib/params/h5';
import { crc32 } from '../lib/util/crc32';
import { PthError, decodePth, encodePth, mapStateDictName, readPth, writePth, type PthTensor } from '../lib/params/pth';
import { fixturePath } from './helpers';

const ZIP_PTH = fixturePath('tetrominoes-small-gaussian.pth');
const LEGACY_PTH = fixturePath('tetrominoes-small-gaussian-legacy.pth');

let h5params: Map<string, PthTensor>;
let h5geco: { C_ema: number; beta: number };
let tmp: string;

beforeAll(async () => {
  h5params = new Map();
  await withH5File(fixturePath('tetrominoes-small-gaussian.h5'), 'r', async (f) => {
    const rec = await readParamGroup(f, 'params');
    for (const [k, v] of Object.entries(rec)) h5params.set(k, { shape: v.shape, data: v.data });
    h5geco = { C_ema: f.attr('geco', 'geco_C_ema') as number, beta: f.attr('geco', 'geco_beta') as number };
  });
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'emorl-pth-'));
});

afterAll(() => {
  fs.rmSync(tmp, { recursive: true, force: true });
});

/** Same names, shapes and every float32 bit pattern. */
function expectBitEqual(actual: Map<string, PthTensor>, expected: Map<string, PthTensor>): void {
  expect([...actual.keys()].sort()).toEqual([...expected.keys()].sort());
  for (const [k, e] of expected) {
    const a = actual.get(k) as PthTensor;
    expect({ k, shape: a.shape }).toEqual({ k, shape: e.shape });
    const ab = new Uint32Array(a.data.buffer, a.data.byteOffset, a.data.length);
    const eb = new Uint32Array(e.data.buffer, e.data.byteOffset, e.data.length);
    expect(ab.length).toBe(eb.length);
    let diff = -1;
    for (let i = 0; i < ab.length; i++) if (ab[i] !== eb[i]) { diff = i; break; }
    expect({ k, diff }).toEqual({ k, diff: -1 });
  }
}

/** A zip checkpoint from a hand-made data.pkl and storage records. */
function handMadePth(name: string, pkl: Uint8Array, storages: Record<string, Uint8Array> = {}): string {
  const entries = [{ name: 'ckpt/data.pkl', data: pkl }];
  for (const [k, v] of Object.entries(storages)) entries.push({ name: `ckpt/data/${k}`, data: v });
  entries.push({ name: 'ckpt/version', data: Buffer.from('3\n') });
  const file = path.join(tmp, name);
  fs.writeFileSync(file, encodeZip(entries));
  return file;
}

const rebuild = new PyGlobal('torch._utils', '_rebuild_tensor_v2');
function tensorOut(type: string, key: string, numel: number, offset: number, shape: number[], stride: number[]): PickleOut {
  return {
    call: rebuild,
    args: [{ persistentId: ['storage', new PyGlobal('torch', type), key, 'cpu', numel] }, offset, new PyTuple(shape), new PyTuple(stride), false, { ordered: [] }],
  };
}

describe('readPth on the fixtures', () => {
  test('both serialisations hold identical tensors', () => {
    const a = readPth(ZIP_PTH);
    const b = readPth(LEGACY_PTH);
    expectBitEqual(b.params, a.params);
    expect([...b.params.keys()]).toEqual([...a.params.keys()]);
  });

  test.each([
    ['zip', ZIP_PTH],
    ['legacy', LEGACY_PTH],
  ])('%s serialisation reproduces params/ of the .h5 bit for bit', (format, file) => {
    const c = readPth(file);
    expect(c.format).toBe(format);
    expect(c.step).toBe(1234);
    expect(c.klBeta).toBe(1);
    expect(c.dropped).toEqual([]);
    expect(c.renamed).toEqual([]);
    // The checkpoints hold GECO's state of the fixture's `geco` pass (C_ema 37.5, beta 0.9), not
    // the initial 0 / 0.55 of params/; every other tensor equals params/ bit for bit.
    const isGeco = (k: string) => k === 'geco_C_ema' || k === 'geco_beta';
    const notGeco = (m: Map<string, PthTensor>) => new Map([...m].filter(([k]) => !isGeco(k)));
    expectBitEqual(notGeco(c.params), notGeco(h5params));
    expect([...c.params.keys()].sort()).toEqual([...h5params.keys()].sort());
    for (const k of ['geco_C_ema', 'geco_beta']) expect(c.params.get(k)?.shape).toEqual(h5params.get(k)?.shape);
    expect(c.geco).toEqual({ C_ema: Math.fround(h5geco.C_ema), beta: Math.fround(h5geco.beta) });
    expect(c.params.get('geco_C_ema')?.data[0]).toBe(c.geco?.C_ema);
    expect(c.params.get('geco_beta')?.data[0]).toBe(c.geco?.beta);
    const opt = c.optimizer!;
    expect(opt.paramGroups).toHaveLength(1);
    expect(opt.paramGroups[0]).toMatchObject({ lr: 4e-4, betas: [0.9, 0.999], eps: 1e-8, weight_decay: 0, amsgrad: false });
    expect(opt.paramGroups[0].params).toEqual([...Array(c.params.size).keys()]);
    expect(opt.state.size).toBe(0);
    expect(opt.mappingNote).toBeUndefined();
    expect(opt.indexToName).toEqual([...c.params.keys()]);
  });
});

describe('name mapping (eval.py rename_state)', () => {
  test('old names, DDP prefix and obsolete entries', () => {
    expect(mapStateDictName('module.hvae_networks.to_q.weight')).toBe('hvae_networks.to_q.weight');
    expect(mapStateDictName('hvae_networks.to_q.weight')).toBe('hvae_networks.to_q.weight');
    expect(mapStateDictName('module.object_discovery_block.to_q.weight')).toBe('hvae_networks.to_q.weight');
    expect(mapStateDictName('module.pos_embed_projection.weight')).toBe('hvae_networks.pos_embed_projection.weight');
    expect(mapStateDictName('module.encoder_pt_1.0.bias')).toBe('hvae_networks.encoder_pt_1.0.bias');
    expect(mapStateDictName('encoder_pt_2.3.weight')).toBe('hvae_networks.encoder_pt_2.3.weight');
    expect(mapStateDictName('module.hvae_networks.image_decoder.pos_embed_projection.bias')).toBe(
      'hvae_networks.image_decoder.pos_embed_projection.bias',
    );
    expect(mapStateDictName('module.object_discovery_block.gru.cell.zeros')).toBeNull();
    expect(mapStateDictName('module.object_discovery_block.gru.cell.zeros_n')).toBeNull();
    expect(mapStateDictName('module.hvae_networks.gru.cell.zeros')).toBeNull();
    expect(mapStateDictName('module.object_discovery_block.generation_relation.0.weight')).toBeNull();
    expect(mapStateDictName('module.geco_beta')).toBe('geco_beta');
  });

  test('an old-style checkpoint is renamed and its optimizer state follows the raw order', () => {
    const f32 = (xs: number[]) => new Uint8Array(Float32Array.from(xs).buffer);
    const keys = ['module.object_discovery_block.to_q.weight', 'module.object_discovery_block.gru.cell.zeros', 'module.encoder_pt_1.0.bias'];
    const model: Array<[string, PickleOut]> = keys.map((k, i) => [k, tensorOut('FloatStorage', String(i), 2, 0, [2], [1])]);
    const slot = (i: number, step: number) => {
      const d = new PyDict();
      d.set('step', step);
      d.set('exp_avg', tensorOut('FloatStorage', `m${i}`, 2, 0, [2], [1]) as never);
      d.set('exp_avg_sq', tensorOut('FloatStorage', `v${i}`, 2, 0, [2], [1]) as never);
      return d;
    };
    const state = new PyDict();
    state.set(0, slot(0, 7));
    state.set(2, slot(2, 9));
    const group = new PyDict();
    group.set('lr', { float: 1e-3 } as never);
    group.set('params', [0, 1, 2]);
    const opt = new PyDict();
    opt.set('state', state);
    opt.set('param_groups', [group]);
    const root = new PyDict();
    root.set('step', 5);
    root.set('model', { ordered: model } as never);
    root.set('model_opt', opt);
    const file = handMadePth('old.pth', PickleWriter.dump(root), {
      '0': f32([1, 2]), '1': f32([0, 0]), '2': f32([3, 4]), m0: f32([5, 6]), v0: f32([7, 8]), m2: f32([9, 10]), v2: f32([11, 12]),
    });
    const c = readPth(file);
    expect([...c.params.keys()]).toEqual(['hvae_networks.to_q.weight', 'hvae_networks.encoder_pt_1.0.bias']);
    expect(c.dropped).toEqual(['module.object_discovery_block.gru.cell.zeros']);
    expect(c.renamed).toEqual([
      ['module.object_discovery_block.to_q.weight', 'hvae_networks.to_q.weight'],
      ['module.encoder_pt_1.0.bias', 'hvae_networks.encoder_pt_1.0.bias'],
    ]);
    const o = c.optimizer!;
    expect(o.indexToName).toEqual(['hvae_networks.to_q.weight', null, 'hvae_networks.encoder_pt_1.0.bias']);
    expect(o.byName.get('hvae_networks.to_q.weight')?.step).toBe(7);
    expect(Array.from(o.byName.get('hvae_networks.encoder_pt_1.0.bias')!.exp_avg_sq!.data)).toEqual([11, 12]);
  });
});

describe('tensor rebuilding', () => {
  test('gathers offset and strides; converts float64 and int64', () => {
    const root = new PyDict();
    root.set('t', tensorOut('FloatStorage', '0', 6, 0, [3, 2], [1, 3]) as never);
    root.set('o', tensorOut('FloatStorage', '0', 6, 1, [2], [2]) as never);
    root.set('s', tensorOut('FloatStorage', '0', 6, 5, [], []) as never);
    root.set('d', tensorOut('DoubleStorage', '1', 2, 0, [2], [1]) as never);
    root.set('l', tensorOut('LongStorage', '2', 2, 0, [1, 2], [2, 1]) as never);
    const pid0: PickleOut = { persistentId: ['storage', new PyGlobal('torch', 'FloatStorage'), '0', 'cpu', 6] };
    // torch < 0.4's _rebuild_tensor, and an nn.Parameter (state_dict(keep_vars=True)).
    root.set('v1', { call: new PyGlobal('torch._utils', '_rebuild_tensor'), args: [pid0, 4, new PyTuple([2]), new PyTuple([1])] } as never);
    root.set('p', { call: new PyGlobal('torch._utils', '_rebuild_parameter'), args: [tensorOut('FloatStorage', '0', 6, 0, [2], [1]), true, { ordered: [] }] } as never);
    const file = handMadePth('strided.pth', PickleWriter.dump(root), {
      '0': new Uint8Array(Float32Array.from([0, 1, 2, 3, 4, 5]).buffer),
      '1': new Uint8Array(Float64Array.from([0.5, 1e-3]).buffer),
      '2': new Uint8Array(BigInt64Array.from([-3n, 7n]).buffer),
    });
    const p = readPth(file).params;
    expect(p.get('t')).toEqual({ shape: [3, 2], data: Float32Array.from([0, 3, 1, 4, 2, 5]) });
    expect(p.get('o')).toEqual({ shape: [2], data: Float32Array.from([1, 3]) });
    expect(p.get('s')).toEqual({ shape: [], data: Float32Array.from([5]) });
    expect(p.get('d')?.data).toEqual(Float32Array.from([0.5, 1e-3]));
    expect(p.get('l')).toEqual({ shape: [1, 2], data: Float32Array.from([-3, 7]) });
    expect(p.get('v1')).toEqual({ shape: [2], data: Float32Array.from([4, 5]) });
    expect(p.get('p')).toEqual({ shape: [2], data: Float32Array.from([0, 1]) });
  });
});

describe('containers', () => {
  test('a DEFLATE entry in a plain (non-ZIP64) archive', () => {
    const body = Buffer.from('hello hello hello hello, deflated world'.repeat(20));
    const packed = zlib.deflateRawSync(body);
    const name = Buffer.from('a/b.txt');
    const local = Buffer.alloc(30);
    local.writeUInt32LE(0x04034b50, 0);
    local.writeUInt16LE(20, 4);
    local.writeUInt16LE(8, 8);
    local.writeUInt32LE(crc32(body), 14);
    local.writeUInt32LE(packed.length, 18);
    local.writeUInt32LE(body.length, 22);
    local.writeUInt16LE(name.length, 26);
    const cd = Buffer.alloc(46);
    cd.writeUInt32LE(0x02014b50, 0);
    cd.writeUInt16LE(8, 10);
    cd.writeUInt32LE(crc32(body), 16);
    cd.writeUInt32LE(packed.length, 20);
    cd.writeUInt32LE(body.length, 24);
    cd.writeUInt16LE(name.length, 28);
    const cdOffset = 30 + name.length + packed.length;
    const eocd = Buffer.alloc(22);
    eocd.writeUInt32LE(0x06054b50, 0);
    eocd.writeUInt16LE(1, 8);
    eocd.writeUInt16LE(1, 10);
    eocd.writeUInt32LE(46 + name.length, 12);
    eocd.writeUInt32LE(cdOffset, 16);
    const zip = Buffer.concat([local, name, packed, cd, name, eocd]);
    const z = ZipReader.fromBuffer(zip, 'd.zip');
    expect(z.read('a/b.txt').equals(body)).toBe(true);
    expect(() => z.read('nope')).toThrow("d.zip: no entry 'nope' in the zip archive");
    // The same entry with its sizes in a ZIP64 extended-information field.
    const cd64 = Buffer.from(cd);
    cd64.writeUInt32LE(0xffffffff, 20);
    cd64.writeUInt32LE(0xffffffff, 24);
    cd64.writeUInt16LE(20, 30);
    const extra = Buffer.alloc(20);
    extra.writeUInt16LE(1, 0);
    extra.writeUInt16LE(16, 2);
    extra.writeBigUInt64LE(BigInt(body.length), 4);
    extra.writeBigUInt64LE(BigInt(packed.length), 12);
    const eocd64 = Buffer.from(eocd);
    eocd64.writeUInt32LE(46 + name.length + 20, 12);
    const z64 = ZipReader.fromBuffer(Buffer.concat([local, name, packed, cd64, name, extra, eocd64]), 'z64.zip');
    expect(z64.entry('a/b.txt')).toMatchObject({ size: body.length, compressedSize: packed.length });
    expect(z64.read('a/b.txt').equals(body)).toBe(true);
  });

  test('a legacy file with storage views; BUILD of an OrderedDict\'s _metadata', () => {
    // The three header pickles (magic, protocol 1001, sys info) as PyTorch wrote them.
    const head = fs.readFileSync(LEGACY_PTH).subarray(0, 137);
    const pid = (view: PickleOut) => ({ persistentId: ['storage', new PyGlobal('torch', 'FloatStorage'), 'root', 'cuda:0', 6, view] });
    const t = (view: PickleOut, shape: number[], stride: number[]): PickleOut => ({
      call: rebuild,
      args: [pid(view), 0, new PyTuple(shape), new PyTuple(stride), false, { ordered: [] }],
    });
    const root = new PyDict();
    root.set('a', t(new PyTuple(['v1', 2, 3]), [3], [1]) as never);
    root.set('b', t(null, [2, 3], [3, 1]) as never);
    const body = PickleWriter.dump(root);
    const keys = PickleWriter.dump(['root']);
    const count = Buffer.alloc(8);
    count.writeBigInt64LE(6n);
    const data = Buffer.from(Float32Array.from([10, 11, 12, 13, 14, 15]).buffer);
    const file = path.join(tmp, 'views-legacy.pth');
    fs.writeFileSync(file, Buffer.concat([head, body, keys, count, data]));
    const c = readPth(file);
    expect(c.format).toBe('legacy');
    expect(c.params.get('a')).toEqual({ shape: [3], data: Float32Array.from([12, 13, 14]) });
    expect(c.params.get('b')).toEqual({ shape: [2, 3], data: Float32Array.from([10, 11, 12, 13, 14, 15]) });
    const short = path.join(tmp, 'views-short.pth');
    count.writeBigInt64LE(5n);
    fs.writeFileSync(short, Buffer.concat([head, body, keys, count, data]));
    expect(() => readPth(short)).toThrow(/views-short\.pth: storage 'root' holds 5 elements, the pickle says 6/);

    // OrderedDict() ; {'_metadata': {}} BUILD
    const od = Buffer.concat([
      Buffer.from([0x80, 0x02]),
      Buffer.from('ccollections\nOrderedDict\n', 'latin1'),
      Buffer.from([0x29, 0x52, 0x7d, 0x8c, 9]),
      Buffer.from('_metadata'),
      Buffer.from([0x7d, 0x73, 0x62, 0x2e]),
    ]);
    const { value } = unpickle(od, { source: 'od.pkl', allowedGlobals: new Set(['collections.OrderedDict']) });
    expect((value as PyDict).ordered).toBe(true);
    expect((value as PyDict).attrs?.get('_metadata')).toBeInstanceOf(PyDict);
  });

  test('an absurd tensor size is refused before allocating', () => {
    const root = new PyDict();
    root.set('huge', tensorOut('FloatStorage', '0', 1, 0, [65536, 65536], [0, 0]) as never);
    const file = handMadePth('huge.pth', PickleWriter.dump(root), { '0': new Uint8Array(4) });
    expect(() => readPth(file)).toThrow(/huge\.pth: tensor 'huge': size \[65536,65536\] is too large/);
  });
});

describe('writePth', () => {
  test('export -> import round-trips bit for bit, with step, kl_beta and Adam state', () => {
    const src = readPth(ZIP_PTH).params;
    const file = path.join(tmp, 'export.pth');
    const name = 'hvae_networks.to_q.weight';
    const p = src.get(name)!;
    const m = p.data.map((x) => x * 0.5);
    const v = p.data.map((x) => x * x);
    writePth(file, src, { step: 4321, kl_beta: 0.25, optimizer: { lr: 1e-4, state: new Map([[name, { step: 17, exp_avg: m, exp_avg_sq: v }]]) } });
    const back = readPth(file);
    expect(back.format).toBe('zip');
    expect(back.step).toBe(4321);
    expect(back.klBeta).toBe(0.25);
    expectBitEqual(back.params, src);
    expect([...back.params.keys()]).toEqual([...src.keys()]);
    const o = back.optimizer!;
    expect(o.mappingNote).toBeUndefined();
    expect(o.paramGroups[0]).toMatchObject({ lr: 1e-4, betas: [0.9, 0.999], eps: 1e-8 });
    expect(o.byName.get(name)?.step).toBe(17);
    expect(o.byName.get(name)?.exp_avg?.data).toEqual(m);
    expect(o.byName.get(name)?.exp_avg_sq?.data).toEqual(v);
    // The bare state_dict layout too.
    const bare = encodePth(src, { layout: 'state_dict' });
    const b = decodePth(bare, 'bare.pth');
    expectBitEqual(b.params, src);
    expect(b.step).toBeUndefined();
  });

  test('the archive has the layout torch.save writes (entries, 64-byte alignment, pickle shape)', () => {
    const src = readPth(ZIP_PTH).params;
    const ours = ZipReader.fromBuffer(encodePth(src, { step: 1234, kl_beta: 1 }), 'ours');
    const theirs = ZipReader.open(ZIP_PTH);
    const rel = (z: ZipReader) => z.names().map((n) => n.slice(n.indexOf('/') + 1));
    const storageNames = rel(theirs).filter((n) => n.startsWith('data/'));
    expect(rel(ours)).toEqual(['data.pkl', 'byteorder', ...storageNames, 'version']);
    expect(rel(theirs)).toEqual(['data.pkl', ...storageNames, 'version']);
    for (const z of [ours, theirs]) {
      for (const e of z.entries) {
        expect({ n: e.name, method: e.method, flags: e.flags, aligned: z.dataOffset(e.name) % 64 }).toEqual({ n: e.name, method: 0, flags: 0x0808, aligned: 0 });
      }
      const archive = z.names()[0].split('/')[0];
      expect(z.read(`${archive}/version`).toString()).toBe('3\n');
    }
    expect(ours.read('archive/byteorder').toString()).toBe('little');
    // Every storage record holds the same bytes under the same key.
    for (const n of storageNames) expect(ours.read(`archive/${n}`).equals(theirs.read(`tetrominoes-small-gaussian/${n}`))).toBe(true);
    // The opcodes of each tensor record are those Python's pickler wrote for the fixture.
    const ops = (z: ZipReader, pkl: string) => pickleOpcodes(z.read(pkl), pkl).map((o) => (o.op === 'BINUNICODE' || o.op === 'GLOBAL' ? `${o.op} ${o.arg}` : o.op));
    const a = ops(ours, 'archive/data.pkl');
    const t = ops(theirs, 'tetrominoes-small-gaussian/data.pkl');
    const record = (xs: string[], key: string) => {
      const i = xs.indexOf(`BINUNICODE ${key}`);
      const j = xs.indexOf('BINUNICODE module.hvae_networks.pos_embed_projection.bias');
      return xs.slice(i, j);
    };
    const key = 'module.hvae_networks.pos_embed_projection.weight';
    expect(record(a, key)).toEqual(record(t, key));
    expect(record(a, key).length).toBeGreaterThan(20);
    expect(a.filter((o) => o.startsWith('GLOBAL'))).toEqual([
      'GLOBAL collections OrderedDict',
      'GLOBAL torch._utils _rebuild_tensor_v2',
      'GLOBAL torch FloatStorage',
    ]);
    expect(a[0]).toBe('PROTO');
  });

  test('storage records are byte-identical to those PyTorch wrote (headers, padding, descriptors)', () => {
    const src = readPth(ZIP_PTH).params;
    const oursBuf = encodePth(src, { step: 1234, kl_beta: 1, archiveName: 'tetrominoes-small-gaussian' });
    const theirsBuf = fs.readFileSync(ZIP_PTH);
    const ours = ZipReader.fromBuffer(oursBuf, 'ours');
    const theirs = ZipReader.fromBuffer(theirsBuf, 'theirs');
    const record = (z: ZipReader, buf: Buffer, name: string) => {
      const e = z.entry(name);
      const start = z.dataOffset(name);
      return Buffer.concat([buf.subarray(e.localHeaderOffset, start), buf.subarray(start + e.size, start + e.size + 16)]);
    };
    // data/0 follows a different record (byteorder, not data.pkl), so its padding differs.
    const names = theirs.names().filter((n) => n.includes('/data/') && !n.endsWith('/data/0'));
    expect(names.length).toBe(75);
    for (const n of [...names, 'tetrominoes-small-gaussian/version']) {
      expect({ n, same: record(ours, oursBuf, n).equals(record(theirs, theirsBuf, n)) }).toEqual({ n, same: true });
    }
  });
});

describe('bad input is refused by name', () => {
  test('truncated zip and legacy files', () => {
    const buf = fs.readFileSync(ZIP_PTH);
    const cut = path.join(tmp, 'cut.pth');
    fs.writeFileSync(cut, buf.subarray(0, buf.length >> 1));
    expect(() => readPth(cut)).toThrow(/cut\.pth: truncated zip archive/);
    const legacy = fs.readFileSync(LEGACY_PTH);
    const cutLegacy = path.join(tmp, 'cut-legacy.pth');
    fs.writeFileSync(cutLegacy, legacy.subarray(0, legacy.length - 100));
    expect(() => readPth(cutLegacy)).toThrow(/cut-legacy\.pth: truncated checkpoint \(storage '\d+' needs/);
  });

  test('corrupt central directory and corrupt data', () => {
    const buf = Buffer.from(fs.readFileSync(ZIP_PTH));
    const eocd = buf.lastIndexOf(Buffer.from([0x50, 0x4b, 0x05, 0x06]));
    const cd = buf.readUInt32LE(eocd + 16);
    const bad = Buffer.from(buf);
    // Corrupt the second central directory header's signature.
    const second = cd + 46 + buf.readUInt16LE(cd + 28) + buf.readUInt16LE(cd + 30) + buf.readUInt16LE(cd + 32);
    bad.writeUInt32LE(0xdeadbeef, second);
    const file = path.join(tmp, 'badcd.pth');
    fs.writeFileSync(file, bad);
    expect(() => readPth(file)).toThrow(/badcd\.pth: corrupt zip archive \(bad central directory header/);
    // A flipped byte in a storage record fails its CRC.
    const flipped = Buffer.from(buf);
    const z = ZipReader.fromBuffer(buf, 'x');
    flipped[z.dataOffset('tetrominoes-small-gaussian/data/11') + 5] ^= 1;
    const f2 = path.join(tmp, 'flip.pth');
    fs.writeFileSync(f2, flipped);
    expect(() => readPth(f2)).toThrow(/flip\.pth: corrupt zip archive \(CRC-32 mismatch in entry 'tetrominoes-small-gaussian\/data\/11'\)/);
  });

  test('a foreign class (os.system via GLOBAL + REDUCE) is never called', () => {
    const evil = Buffer.concat([
      Buffer.from([0x80, 0x02]),
      Buffer.from('cos\nsystem\n', 'latin1'),
      Buffer.from([0x8c, 4]),
      Buffer.from('echo', 'latin1'),
      Buffer.from([0x85, 0x52, 0x2e]), // TUPLE1 REDUCE STOP
    ]);
    const file = handMadePth('evil.pth', evil);
    expect(() => readPth(file)).toThrow(/evil\.pth.*GLOBAL.*class 'os\.system' is not in the allowed set/);
    // STACK_GLOBAL as well, and in a legacy-format stream.
    const stacked = Buffer.from([0x80, 0x02, 0x8c, 8, ...Buffer.from('builtins'), 0x8c, 4, ...Buffer.from('eval'), 0x93, 0x2e]);
    expect(() => unpickle(stacked, { source: 's.pkl', allowedGlobals: new Set() })).toThrow(/s\.pkl.*STACK_GLOBAL.*'builtins\.eval' is not in the allowed set/);
    // A storage class may be named but not called.
    const call = Buffer.from([0x80, 0x02, ...Buffer.from('ctorch\nFloatStorage\n'), 0x29, 0x52, 0x2e]);
    expect(() => readPth(handMadePth('call.pth', call))).toThrow(/call\.pth.*REDUCE.*'torch\.FloatStorage' may not be called/);
  });

  test('unknown and unsupported opcodes', () => {
    expect(() => readPth(handMadePth('op.pth', Buffer.from([0x80, 0x02, 0xff, 0x2e])))).toThrow(/op\.pth.*pickle offset 2.*unknown opcode 0xff/);
    expect(() => readPth(handMadePth('inst.pth', Buffer.from([0x80, 0x02, 0x69, 0x2e])))).toThrow(/inst\.pth.*opcode INST \(0x69\) is not supported/);
    expect(() => readPth(handMadePth('nostop.pth', Buffer.from([0x80, 0x02, 0x7d])))).toThrow(/nostop\.pth.*truncated pickle \(no STOP\)/);
  });

  test('a storage too short for its tensor names the key', () => {
    const root = new PyDict();
    root.set('module.w', tensorOut('FloatStorage', '0', 16, 0, [4, 4], [4, 1]) as never);
    const file = handMadePth('short.pth', PickleWriter.dump(root), { '0': new Uint8Array(8 * 4) });
    expect(() => readPth(file)).toThrow(/short\.pth: tensor 'module\.w': storage '0' is too short \(8 float32 elements/);
    const missing = handMadePth('missing.pth', PickleWriter.dump(root));
    expect(() => readPth(missing)).toThrow(/missing\.pth: storage record 'ckpt\/data\/0' is missing/);
  });

  test('dict keys are data: __proto__ pollutes nothing', () => {
    const d = new PyDict();
    d.set('__proto__', 1);
    d.set('constructor', 2);
    const { value } = unpickle(PickleWriter.dump(d), { source: 'p.pkl', allowedGlobals: new Set() });
    expect(value).toBeInstanceOf(PyDict);
    expect((value as PyDict).get('__proto__')).toBe(1);
    expect(({} as Record<string, unknown>).constructor).toBe(Object);
    expect(() => unpickle(Buffer.from([0x80, 0x02, 0x68, 0x05, 0x2e]), { source: 'm.pkl', allowedGlobals: new Set() })).toThrow(
      PickleError,
    );
  });

  test('random corruption gives only the three checked error types', () => {
    const legacy = fs.readFileSync(LEGACY_PTH);
    let seed = 7;
    const rnd = () => (seed = (seed * 1103515245 + 12345) >>> 0) / 2 ** 32;
    for (let it = 0; it < 60; it++) {
      const buf = Buffer.from(legacy);
      for (let j = 0; j < 3; j++) buf[Math.floor(rnd() * 10300)] = Math.floor(rnd() * 256);
      try {
        decodePth(buf, 'fuzz.pth');
      } catch (e) {
        expect(e instanceof PthError || e instanceof PickleError || e instanceof ZipError).toBe(true);
        expect((e as Error).message).toMatch(/^fuzz\.pth/);
      }
    }
  });
});
