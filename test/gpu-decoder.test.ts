/**
 * The decoding stage's GPU kernels (native/gpu/decoder_gpu.cu) against the CPU stage, which
 * test/decoder-stage.test.ts checks against the TypeScript reference: nll, means, log masks and
 * the gradients w.r.t. z, the positional map and every weight and bias, for the layer kinds of
 * all three decoders (broadcast conv, spatial broadcast, conv, strided transposed conv), both
 * likelihoods and odd sizes (K = 1, one image, non-square, more channels than one GEMM tile;
 * the emulated build splits filter gradients every 128 rows, so every case crosses splits).
 *
 * The NHWC convolutions outside the stage (the encoder's) likewise, values and gradients, and the
 * GRU step (native/gpu/gru_gpu.cu) against the CPU one (which test/model-native.test.ts checks
 * against the TypeScript cell), and through the ops against the TypeScript cell itself.
 *
 * Every case runs on the 'simt' device: the same kernel source compiled for the addon's SIMT
 * emulator, which runs each block's threads as fibers on the CPU (so CI checks the kernels'
 * indexing, tiling and barriers without a GPU), once in each of its schedules (blocks and
 * threads forward, then reversed: see describeOnDevices). On a machine with a CUDA build and a
 * GPU the cases run on 'cuda:0' as well; otherwise that part is skipped with a notice.
 */
import { tf, initBackend } from '../lib/tf';
import { nativeStatus } from '../lib/native';
import { addonOps, deviceTraffic, type DecoderStageLayer, type DecoderStageResult, type DecoderStageSpec, type StageDevice } from '../lib/ops/addon';
import { nativeOps, nativeOpsAvailable, nativeOpsOn, opsForBackend } from '../lib/ops/native';
import { tfjsOps } from '../lib/ops';
import type { DecoderLayerSpec, DecoderNllArgs } from '../lib/ops/decoder-stage';
import type { ConvStackLayer, EncoderArgs, EncoderOutput, Ops } from '../lib/ops';
import { hostKeysValues } from '../lib/ops/encoder-stage';
import { positionalEmbedding } from '../lib/model/positional';
import { experimentConfig } from '../lib/config/experiment';
import { Trainer } from '../lib/train/trainer';
import { expectRelClose } from './helpers';

const st = nativeStatus();
const available = st.available && nativeOpsAvailable() && st.info?.simtEmulator === true;
const cudaDevices = available ? st.info!.cudaDevices : 0;
if (!available) {
  // eslint-disable-next-line no-console
  console.warn(`gpu-decoder tests SKIPPED: ${st.reason ?? 'the addon has no GPU decoding stage (npm run build:native)'}`);
} else if (!cudaDevices) {
  // eslint-disable-next-line no-console
  console.warn(`gpu-decoder: no CUDA device (${st.info!.cudaBuilt ? st.info!.cudaError ?? '0 devices' : 'addon built without CUDA'}): the kernels run on the SIMT emulator only`);
}
const describeGpu = available ? describe : describe.skip;
const devices: StageDevice[] = ['simt', ...(cudaDevices ? (['cuda:0'] as const) : [])];

/**
 * `body()` with the addon's setting `name` (an EMORL_* variable its kernels read) at `value`, then
 * unset. Through the addon: the process.env that Jest gives a test file is a copy native code
 * never sees.
 */
function withAddonSetting<T>(name: string, value: string, body: () => T): T {
  const k = addonOps();
  k.setEnvironment(name, value);
  try {
    return body();
  } finally {
    k.setEnvironment(name, null);
  }
}

/** The tests `body` defines run under EMORL_SIMT_SCHEDULE=`schedule` (read at every emulated launch). */
function underSchedule(schedule: 'reverse', body: () => void): void {
  beforeAll(() => addonOps().setEnvironment('EMORL_SIMT_SCHEDULE', schedule));
  afterAll(() => addonOps().setEnvironment('EMORL_SIMT_SCHEDULE', null));
  body();
}

/**
 * A describe block per device; on the emulator a second one with its blocks, and each block's
 * threads between barriers, run in reverse order (native/gpu/simt.cc): a GPU promises no order,
 * and the default order hides a thread reading what a lower-numbered one wrote without a barrier.
 */
function describeOnDevices(title: (device: StageDevice) => string, body: (device: StageDevice) => void): void {
  for (const device of devices) {
    describeGpu(title(device), () => body(device));
    if (device === 'simt') describeGpu(`${title(device)} [reverse schedule]`, () => underSchedule('reverse', () => body(device)));
  }
}

beforeAll(async () => {
  await initBackend('cpu');
});

/** A deterministic generator (mulberry32) of uniform values in [lo, hi). */
function uniform(n: number, seed: number, lo = -1, hi = 1): Float32Array {
  let a = seed >>> 0;
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    out[i] = lo + (hi - lo) * (((t ^ (t >>> 14)) >>> 0) / 4294967296);
  }
  return out;
}

interface LayerDef {
  kind: 0 | 1 | 2 | 3;
  /** [Co, Ci, kh, kw] for conv kinds 0 and 2; [Ci, Co, kh, kw] for 3 */
  wShape?: [number, number, number, number];
  stride?: number;
  pad?: number;
  outputPad?: number;
  act?: 0 | 1 | 2;
}

interface Case {
  B: number;
  K: number;
  c: number;
  grid: [number, number];
  image: [number, number];
  layers: LayerDef[];
  gmm: boolean;
  seed: number;
}

function spec(cs: Case, device: StageDevice, workspace?: object): DecoderStageSpec {
  const n = cs.B * cs.K;
  const [gh, gw] = cs.grid;
  const [H, W] = cs.image;
  let seed = cs.seed * 1000;
  const layers: DecoderStageLayer[] = cs.layers.map((L) => {
    if (L.kind === 1) return { kind: 1 };
    const [a, b, kh, kw] = L.wShape!;
    const fanIn = (L.kind === 3 ? a : b) * kh * kw;
    const scale = 1.5 / Math.sqrt(fanIn);
    const cout = L.kind === 3 ? b : a;
    return {
      kind: L.kind, wShape: L.wShape, w: uniform(a * b * kh * kw, seed++, -scale, scale), b: uniform(cout, seed++, -0.1, 0.1),
      stride: L.stride ?? 1, pad: L.pad ?? 0, outputPad: L.outputPad ?? 0, act: L.act ?? 0,
    };
  });
  return {
    z: uniform(n * cs.c, seed++), n, c: cs.c, pos: uniform(gh * gw * cs.c, seed++), gh, gw, layers,
    target: uniform(cs.B * H * W * 3, seed++, 0, 1), B: cs.B, K: cs.K, H, W, C: 3,
    logVar: Math.fround(2 * Math.log(0.3)), gmm: cs.gmm, needDz: true, needParams: true, needOutputs: true, workspace, device,
  };
}

/** max |a − b| ≤ tol · max |b| (expectRelClose on flat arrays; both must be there) */
function expectClose(a: Float32Array | null, b: Float32Array | null, tol: number, what: string): void {
  if (!a || !b) throw new Error(`${what}: missing (${a ? 'expected' : 'actual'} is null)`);
  expectRelClose({ shape: [a.length], dataSync: () => a }, { shape: [b.length], dataSync: () => b }, tol, what);
}

function compareStage(r: DecoderStageResult, ref: DecoderStageResult, what: string): void {
  expectClose(r.nll, ref.nll, 1e-5, `${what}: nll`);
  expectClose(r.means, ref.means, 1e-5, `${what}: means`);
  expectClose(r.logMasks, ref.logMasks, 1e-5, `${what}: log masks`);
  expectClose(r.dz, ref.dz, 1e-4, `${what}: dz`);
  expectClose(r.dpos, ref.dpos, 1e-4, `${what}: dpos`);
  ref.dw.forEach((dw, i) => {
    if (!dw) return expect(r.dw[i]).toBeNull();
    expectClose(r.dw[i], dw, 1e-4, `${what}: dw[${i}]`);
    expectClose(r.db[i], ref.db[i], 1e-4, `${what}: db[${i}]`);
  });
}

// the layer stacks of the three decoders, at test sizes (see lib/model/decoders.ts)
const smallLayers = (c: number, ch: number): LayerDef[] => [
  { kind: 0, wShape: [ch, c, 5, 5], pad: 1, act: 1 },
  { kind: 2, wShape: [ch + 1, ch, 5, 5], pad: 1, act: 1 },
  { kind: 2, wShape: [ch, ch + 1, 5, 5], pad: 1, act: 1 },
  { kind: 2, wShape: [4, ch, 3, 3], pad: 1, act: 0 },
];
const iodineLayers = (c: number, ch: number): LayerDef[] => [
  { kind: 0, wShape: [ch, c, 3, 3], act: 2 },
  { kind: 2, wShape: [ch, ch, 3, 3], act: 2 },
  { kind: 2, wShape: [ch, ch, 3, 3], act: 2 },
  { kind: 2, wShape: [ch, ch, 3, 3], act: 2 },
  { kind: 2, wShape: [4, ch, 3, 3], act: 0 },
];
// a 3x3 grid upsampled x4 by two stride-2 transposed convs, then stride-1 ones (the big decoder's kinds)
const bigLayers = (c: number, ch: number): LayerDef[] => [
  { kind: 1 },
  { kind: 3, wShape: [c, ch, 5, 5], stride: 2, pad: 2, outputPad: 1, act: 1 },
  { kind: 3, wShape: [ch, ch, 5, 5], stride: 2, pad: 2, outputPad: 1, act: 1 },
  { kind: 3, wShape: [ch, ch, 5, 5], stride: 1, pad: 2, act: 1 },
  { kind: 3, wShape: [ch, 4, 3, 3], stride: 1, pad: 1, act: 0 },
];

const cases: [string, Case][] = [
  ['small decoder, non-square, Gaussian', { B: 2, K: 3, c: 5, grid: [15, 13], image: [9, 7], layers: smallLayers(5, 6), gmm: false, seed: 1 }],
  ['small decoder, non-square, GMM', { B: 2, K: 3, c: 5, grid: [15, 13], image: [9, 7], layers: smallLayers(5, 6), gmm: true, seed: 2 }],
  ['small decoder, K=1, one image', { B: 1, K: 1, c: 4, grid: [14, 14], image: [8, 8], layers: smallLayers(4, 5), gmm: true, seed: 3 }],
  ['iodine decoder, non-square, Gaussian', { B: 2, K: 2, c: 6, grid: [17, 20], image: [7, 10], layers: iodineLayers(6, 8), gmm: false, seed: 4 }],
  ['iodine decoder, GMM', { B: 1, K: 2, c: 6, grid: [16, 16], image: [6, 6], layers: iodineLayers(6, 8), gmm: true, seed: 5 }],
  ['big decoder kinds (strided transposed convs), GMM', { B: 1, K: 2, c: 4, grid: [3, 3], image: [12, 12], layers: bigLayers(4, 6), gmm: true, seed: 6 }],
  ['big decoder kinds, non-square, Gaussian', { B: 2, K: 1, c: 3, grid: [3, 2], image: [12, 8], layers: bigLayers(3, 5), gmm: false, seed: 7 }],
  // channel counts in fours: the GEMMs read their operands in 128-bit runs
  ['big decoder kinds, 8 channels, GMM', { B: 1, K: 2, c: 4, grid: [3, 3], image: [12, 12], layers: bigLayers(4, 8), gmm: true, seed: 9 }],
  // 70 channels: two column tiles of the GEMM
  ['more channels than one GEMM tile', {
    B: 1, K: 2, c: 3, grid: [10, 9], image: [6, 5], gmm: false, seed: 8,
    layers: [{ kind: 0, wShape: [70, 3, 3, 3], pad: 0, act: 1 }, { kind: 2, wShape: [4, 70, 3, 3], pad: 0, act: 0 }],
  }],
];

describeOnDevices((device) => `decoderStage on ${device} vs the CPU stage`, (device) => {
  for (const [name, cs] of cases) {
    test(name, () => {
      const k = addonOps();
      compareStage(k.decoderStage(spec(cs, device)), k.decoderStage(spec(cs, 'cpu')), `${device}, ${name}`);
    }, 120_000);
  }

  test('the other GEMM kernels (EMORL_GPU_GEMM=tiled, simple) as well', () => {
    const k = addonOps();
    for (const variant of ['tiled', 'simple']) {
      for (const [name, cs] of [cases[0], cases[3], cases[5], cases[7], cases[8]]) {
        const other = withAddonSetting('EMORL_GPU_GEMM', variant, () => k.decoderStage(spec(cs, device)));
        compareStage(other, k.decoderStage(spec(cs, 'cpu')), `${device}, ${variant} GEMM, ${name}`);
      }
    }
    // the setting reaches the kernels (an unknown value is refused there)
    withAddonSetting('EMORL_GPU_GEMM', 'fast', () => expect(() => k.decoderStage(spec(cases[0][1], device))).toThrow(/EMORL_GPU_GEMM must be 'stepped', 'tiled' or 'simple', got 'fast'/));
  }, 240_000);

  test('tagged layers, target and grid: a second call uploads z only, and gives the same results', () => {
    const k = addonOps();
    const cs = cases[0][1];
    const workspace = new k.DecoderWorkspace();
    let tag = 100;
    const s = spec(cs, device, workspace);
    const tagged = { ...s, targetTag: tag++, posTag: tag++, layers: s.layers.map((L) => (L.kind === 1 ? L : { ...L, wTag: tag++, bTag: tag++ })) };
    const first = k.decoderStage(tagged);
    const t1 = workspace.traffic();
    const second = k.decoderStage(tagged);
    const t2 = workspace.traffic();
    expect(t2.upBytes - t1.upBytes).toBe(4 * s.z.length);
    // the first call: each weight once as it is (packed on the device into both forms, and the
    // broadcast layer's tap sums made there too), z, the grid and the target
    const weights = s.layers.reduce((a, L) => a + (L.w ? L.w.length + L.b!.length : 0), 0);
    expect(t1.upBytes).toBe(4 * (s.z.length + s.pos.length + s.target.length + weights));
    compareStage(second, first, 'second call');
    compareStage(second, k.decoderStage(spec(cs, 'cpu')), 'against the CPU');
  });

  test('a kept workspace: batches of changing size, then the CPU on the same workspace', () => {
    const k = addonOps();
    const ws = new k.DecoderWorkspace();
    for (const B of [2, 1, 3]) {
      const cs: Case = { B, K: 2, c: 4, grid: [12, 11], image: [6, 5], layers: smallLayers(4, 5), gmm: B === 1, seed: 10 + B };
      compareStage(k.decoderStage(spec(cs, device, ws)), k.decoderStage(spec(cs, 'cpu')), `${device}, batch ${B}`);
      compareStage(k.decoderStage(spec(cs, 'cpu', ws)), k.decoderStage(spec(cs, 'cpu')), `cpu after ${device}, batch ${B}`);
    }
  }, 120_000);

  test('kept parameter gradients: two stages left on the device, summed there with their u, the host\'s bits in one download per buffer', () => {
    const k = addonOps();
    for (const cs of [cases[1][1], cases[5][1]]) {  // a broadcast layer (its tap-class gradients), a spatial broadcast one
      const ws = new k.DecoderWorkspace();
      const a = spec(cs, device, ws), b = { ...spec({ ...cs, seed: cs.seed + 1 }, device, ws), layers: a.layers, pos: a.pos };
      const us = [0.37, -1.3];
      const own = [a, b].map((x) => k.decoderStage(x));
      const ids = [9001, 9002];
      const kept = [a, b].map((x, i) => k.decoderStage({ ...x, keepParamGrads: ids[i] }));
      kept.forEach((r, i) => {
        expect([r.dpos, ...r.dw, ...r.db].every((g) => g === null)).toBe(true);
        expect(r.dz).toEqual(own[i].dz);
      });
      // the host's sum: u0·g0, then + u1·g1, each rounded to float
      const f = Math.fround;
      const hostSum = (g0: Float32Array, g1: Float32Array) => Float32Array.from(g0, (v, j) => f(f(v * f(us[0])) + f(g1[j] * f(us[1]))));
      const grads = (r: DecoderStageResult) => [r.dpos!, ...r.dw.flatMap((w, i) => (w ? [w, r.db[i]!] : []))];
      const g0 = grads(own[0]), g1 = grads(own[1]);
      const before = ws.traffic();
      const sums = k.decoderParamGradSums({ workspace: ws, device, ids, us, sizes: g0.map((g) => g.length) });
      const after = ws.traffic();
      expect(after.downloads - before.downloads).toBe(g0.length);
      sums.forEach((sum, i) => expect(sum).toEqual(hostSum(g0[i], g1[i])));
      // consumed: the sets are gone
      expect(() => k.decoderParamGradSums({ workspace: ws, device, ids, us, sizes: g0.map((g) => g.length) })).toThrow(/kept set 9001 has no buffer 0 of \d+ floats \(the set is gone\)/);
    }
  }, 120_000);

  test('kept parameter gradients: more sets and buffers than one launch takes (10 sets of 21 buffers), summed in order', () => {
    const k = addonOps();
    // ten layers: the grid's positions, then a weight and a bias each
    const layers: LayerDef[] = [
      { kind: 0, wShape: [6, 3, 3, 3], act: 2 },
      ...Array.from({ length: 8 }, () => ({ kind: 2, wShape: [6, 6, 1, 1], act: 2 } as LayerDef)),
      { kind: 2, wShape: [4, 6, 1, 1], act: 0 },
    ];
    const cs: Case = { B: 1, K: 2, c: 3, grid: [8, 7], image: [6, 5], layers, gmm: false, seed: 40 };
    const ws = new k.DecoderWorkspace();
    const base = spec(cs, device, ws);
    const sets = Array.from({ length: 10 }, (_, i) => ({ ...spec({ ...cs, seed: cs.seed + i }, device, ws), layers: base.layers, pos: base.pos }));
    const us = sets.map((_, i) => (i % 3 === 0 ? -0.7 : 0.3) * (i + 1));
    const ids = sets.map((_, i) => 500 + i);
    const grads = (r: DecoderStageResult) => [r.dpos!, ...r.dw.flatMap((w, i) => (w ? [w, r.db[i]!] : []))];
    const own = sets.map((x) => grads(k.decoderStage(x)));
    sets.forEach((x, i) => k.decoderStage({ ...x, keepParamGrads: ids[i] }));
    expect(own[0]).toHaveLength(21);
    const f = Math.fround;
    const sums = k.decoderParamGradSums({ workspace: ws, device, ids, us, sizes: own[0].map((g) => g.length) });
    sums.forEach((sum, b) => {
      // the host's order: u0·g0, then + u1·g1, + u2·g2, ..., each rounded to float
      const host = Float32Array.from(own[0][b], (v, j) => own.slice(1).reduce((a, g, i) => f(a + f(g[b][j] * f(us[i + 1]))), f(v * f(us[0]))));
      expect(sum).toEqual(host);
    });
  }, 120_000);

  test('kept parameter gradients: clear errors', () => {
    const k = addonOps();
    const ws = new k.DecoderWorkspace();
    const s = spec(cases[2][1], device, ws);
    expect(() => k.decoderStage({ ...spec(cases[2][1], 'cpu'), keepParamGrads: 3 })).toThrow(/'spec.keepParamGrads' is for GPU devices/);
    expect(() => k.decoderStage({ ...s, needParams: false, keepParamGrads: 3 })).toThrow(/'spec.keepParamGrads' needs needParams/);
    expect(() => k.decoderStage({ ...s, workspace: undefined, keepParamGrads: 3 })).toThrow(/'spec.keepParamGrads' needs a workspace/);
    expect(() => k.decoderStage({ ...s, keepParamGrads: 0.5 })).toThrow(/'spec.keepParamGrads' must be an id \(an integer >= 1\)/);
    k.decoderStage({ ...s, keepParamGrads: 3 });
    const sizes = [s.pos.length];
    expect(() => k.decoderParamGradSums({ workspace: ws, device: 'cpu', ids: [3], us: [1], sizes })).toThrow(/must be 'cuda:N' or 'simt'/);
    expect(() => k.decoderParamGradSums({ workspace: ws, device, ids: [3], us: [], sizes })).toThrow(/one u per kept set/);
    expect(() => k.decoderParamGradSums({ workspace: ws, device, ids: [3], us: [1], sizes: [s.pos.length + 1] })).toThrow(/kept set 3 has no buffer 0 of \d+ floats$/);
    expect(() => k.decoderParamGradSums({ workspace: ws, device, ids: [4], us: [1], sizes })).toThrow(/kept set 4 has no buffer 0 .*the set is gone/);
    expect(k.decoderParamGradSums({ workspace: ws, device, ids: [3], us: [1], sizes })[0]).toHaveLength(s.pos.length);
    // a workspace keeps at most 32 sets: past that the oldest (an abandoned pass's) is dropped
    for (let id = 100; id < 133; id++) k.decoderStage({ ...s, needDz: false, needOutputs: false, keepParamGrads: id });
    expect(() => k.decoderParamGradSums({ workspace: ws, device, ids: [100], us: [1], sizes })).toThrow(/kept set 100 .*the set is gone/);
    expect(k.decoderParamGradSums({ workspace: ws, device, ids: [101, 132], us: [1, 1], sizes })).toHaveLength(1);
  });

  test('only what is asked for: no gradients, outputs only; a profile by phase', () => {
    const k = addonOps();
    const cs = cases[0][1];
    const r = k.decoderStage({ ...spec(cs, device), needDz: false, needParams: false, needOutputs: false });
    expect(r.dz).toBeNull();
    expect(r.dpos).toBeNull();
    expect(r.means).toBeNull();
    expect(r.dw.every((d) => d === null)).toBe(true);
    expectClose(r.nll, k.decoderStage(spec(cs, 'cpu')).nll, 1e-5, 'nll');
    expect(r.profile).toBeUndefined();
    const profiled = k.decoderStage({ ...spec(cs, device), profile: true });
    expect(Object.keys(profiled.profile!)).toEqual(expect.arrayContaining(['forward: broadcast layer', 'forward: convolutions', 'backward: filter gradients']));
    expectClose(profiled.dz, k.decoderStage(spec(cs, 'cpu')).dz, 1e-4, 'dz (profiled)');
    const dzOnly = k.decoderStage({ ...spec(cs, device), needParams: false });
    expect(dzOnly.dpos).toBeNull();
    expectClose(dzOnly.dz, k.decoderStage(spec(cs, 'cpu')).dz, 1e-4, 'dz');
  }, 120_000);
});

describeOnDevices((device) => `nhwcConv2d on ${device} vs the CPU kernels (the encoder's convolutions)`, (device) => {
  const convCases: [string, number[], number[], number, number, 0 | 1 | 2][] = [
    // name, xShape [N,H,W,C], wShape [Co,C,kh,kw], stride, pad, act
    ['encoder layer 1 (3 -> 16, 5x5, pad 2, ReLU), non-square', [2, 9, 7, 3], [16, 3, 5, 5], 1, 2, 1],
    ['encoder layer 2 (16 -> 16), one image', [1, 8, 8, 16], [16, 16, 5, 5], 1, 2, 1],
    ['stride 2, ELU', [2, 11, 9, 5], [7, 5, 3, 3], 2, 1, 2],
    ['1x1, linear, 70 output channels', [1, 5, 6, 4], [70, 4, 1, 1], 1, 0, 0],
    // channel counts in fours: the GEMMs read their operands in 128-bit runs (the strided data gradient too)
    ['stride 2, 8 -> 12 channels, ELU', [2, 11, 9, 8], [12, 8, 3, 3], 2, 1, 2],
  ];
  for (const [name, xs, ws, stride, pad, act] of convCases) {
    test(name, () => {
      const k = addonOps();
      const x = uniform(xs.reduce((a, b) => a * b), 31), w = uniform(ws.reduce((a, b) => a * b), 32, -0.3, 0.3), b = uniform(ws[0], 33, -0.1, 0.1);
      const args: [Float32Array, number[], Float32Array, number[], Float32Array, number[], number[], number[]] = [x, [...xs], w, [...ws], b, [stride, stride], [pad, pad], [act]];
      const workspace = new k.DecoderWorkspace();
      const y = k.nhwcConv2d(...args, device, workspace);
      const yc = k.nhwcConv2d(...args);
      expectClose(y, yc, 1e-5, 'y');
      const dy = uniform(yc.length, 34);
      const back = (dev?: StageDevice) => k.nhwcConv2dBackward(x, xs, w, ws, act ? yc : null, dy, [stride, stride], [pad, pad], [act], true, true, dev, dev ? workspace : undefined);
      const g = back(device), gc = back();
      expectClose(g.dx, gc.dx, 1e-5, 'dx');
      expectClose(g.dw, gc.dw, 1e-5, 'dw');
      expectClose(g.db, gc.db, 1e-5, 'db');
      const dxOnly = k.nhwcConv2dBackward(x, xs, w, ws, act ? yc : null, dy, [stride, stride], [pad, pad], [act], true, false, device);
      expect(dxOnly.dw).toBeNull();
      expectClose(dxOnly.dx, gc.dx, 1e-5, 'dx (no parameter gradients)');
    });
  }
  test('asymmetric padding is refused on the GPU path', () => {
    const k = addonOps();
    expect(() => k.nhwcConv2d(uniform(2 * 6 * 6 * 3, 1), [2, 6, 6, 3], uniform(4 * 3 * 3 * 3, 2), [4, 3, 3, 3], null, [1, 1], [1, 0], [0], device)).toThrow(/padding and stride must be the same on both axes/);
  });
});

describeOnDevices((device) => `convStack on ${device}: the encoder's convolutions as one stage, maps kept on the device`, (device) => {
  const stackCases: [string, number[], [number, number, number, number][], number[], number[], ConvStackLayer['activation'][]][] = [
    // name, xShape, wShapes, strides, pads, activations
    ['the encoder (3 -> 16 -> 16 -> 16, 5x5, pad 2, ReLU), non-square', [2, 9, 7, 3], [[16, 3, 5, 5], [16, 16, 5, 5], [16, 16, 5, 5]], [1, 1, 1], [2, 2, 2], ['relu', 'relu', 'relu']],
    ['stride 2, ELU, then linear 1x1 to 70 channels', [1, 11, 9, 5], [[7, 5, 3, 3], [70, 7, 1, 1]], [2, 1], [1, 0], ['elu', 'linear']],
    ['one layer, one image', [1, 6, 6, 4], [[5, 4, 3, 3]], [1], [1], ['relu']],
  ];
  const tensors = (xs: number[], ws: [number, number, number, number][], strides: number[], pads: number[], acts: ConvStackLayer['activation'][], seed: number) => {
    const x = tf.tensor4d(uniform(xs.reduce((a, b) => a * b), seed), xs as [number, number, number, number]);
    const layers: ConvStackLayer[] = ws.map((w, i) => ({
      weight: tf.tensor4d(uniform(w.reduce((a, b) => a * b), seed + 1 + i, -0.3, 0.3), w), bias: tf.tensor1d(uniform(w[0], seed + 20 + i, -0.1, 0.1)),
      stride: strides[i], pad: pads[i], activation: acts[i],
    }));
    return { x, layers };
  };
  for (const [name, xs, ws, strides, pads, acts] of stackCases) {
    test(`${name}: values and gradients against the CPU's layer-by-layer convolutions`, () => {
      tf.tidy(() => {
        const { x, layers } = tensors(xs, ws, strides, pads, acts, 41);
        const ops = nativeOpsOn(device);
        const f = (o: Ops) => (...t: tf.Tensor[]) => {
          const y = o.convStack(t[0] as tf.Tensor4D, layers.map((L, i) => ({ ...L, weight: t[1 + 2 * i], bias: t[2 + 2 * i] })));
          return tf.sum(tf.mul(y, tf.sin(tf.range(0, y.size).reshape(y.shape)))) as tf.Scalar;
        };
        const all = [x, ...layers.flatMap((L) => [L.weight, L.bias])];
        const yd = ops.convStack(x, layers), yc = nativeOps.convStack(x, layers);
        expect(yd.shape).toEqual(yc.shape);
        expectClose(yd.dataSync() as Float32Array, yc.dataSync() as Float32Array, 1e-5, 'y');
        const gd = tf.grads(f(ops))(all), gc = tf.grads(f(nativeOps))(all);
        gd.forEach((g, i) => expectClose(g.dataSync() as Float32Array, gc[i].dataSync() as Float32Array, 1e-5, i ? `parameter gradient ${i - 1}` : 'dx'));
        const gz = ops.withoutParamGrads(() => tf.grads(f(ops))(all));
        expectClose(gz[0].dataSync() as Float32Array, gc[0].dataSync() as Float32Array, 1e-5, 'dx without parameter gradients');
        expect(tf.max(tf.abs(gz[1])).dataSync()[0]).toBe(0);
      });
    });
  }

  test('a backward after another forward on the same workspace recomputes its maps (stamps)', () => {
    const k = addonOps();
    const xs = [2, 8, 8, 3];
    const layers = [
      { w: uniform(8 * 3 * 9, 51, -0.3, 0.3), wShape: [8, 3, 3, 3], b: uniform(8, 52, -0.1, 0.1), pad: 1, act: 1 },
      { w: uniform(8 * 8 * 9, 53, -0.3, 0.3), wShape: [8, 8, 3, 3], b: uniform(8, 54, -0.1, 0.1), pad: 1, act: 1 },
    ];
    const workspace = new k.DecoderWorkspace();
    const specA = { x: uniform(2 * 8 * 8 * 3, 55), xShape: xs, layers, device, workspace };
    const specB = { ...specA, x: uniform(2 * 8 * 8 * 3, 56) };
    const dy = uniform(2 * 8 * 8 * 8, 57);
    const a = k.convStack(specA);
    const b = k.convStack(specB);
    expect(b.stamp).not.toBe(a.stamp);
    const back = (spec: typeof specA, stamp: number) => k.convStackBackward({ ...spec, dy, stamp, needDx: true, needParams: true });
    const fresh = (spec: typeof specA) => k.convStackBackward({ ...spec, workspace: new k.DecoderWorkspace(), dy, stamp: 0, needDx: true, needParams: true });
    const staleA = back(specA, a.stamp), refA = fresh(specA);
    const residentB = back(specB, b.stamp), refB = fresh(specB);
    for (const [got, ref, what] of [[staleA, refA, 'A after B'], [residentB, refB, 'B resident']] as const) {
      expectClose(got.dx, ref.dx, 1e-6, `${what}: dx`);
      got.dw!.forEach((dw, i) => expectClose(dw, ref.dw![i], 1e-6, `${what}: dw[${i}]`));
      got.db!.forEach((db, i) => expectClose(db, ref.db![i], 1e-6, `${what}: db[${i}]`));
    }
    // the two inputs differ, so equal gradients would mean a stale map was used
    expect(Math.abs(refA.dw![0][0] - refB.dw![0][0])).toBeGreaterThan(1e-4);
  });

  test('what crosses the bus: the images, weights and last map forward; with its stamp the backward uploads only dy and the weights', () => {
    const k = addonOps();
    const layers = [
      { w: uniform(8 * 3 * 9, 61, -0.3, 0.3), wShape: [8, 3, 3, 3], b: uniform(8, 62, -0.1, 0.1), pad: 1, act: 1 },
      { w: uniform(6 * 8 * 9, 63, -0.3, 0.3), wShape: [6, 8, 3, 3], b: uniform(6, 64, -0.1, 0.1), pad: 1, act: 1 },
    ];
    const workspace = new k.DecoderWorkspace();
    expect(workspace.traffic()).toEqual({ upBytes: 0, downBytes: 0, uploads: 0, downloads: 0 });
    const spec = { x: uniform(2 * 7 * 7 * 3, 65), xShape: [2, 7, 7, 3], layers, device, workspace };
    const f = k.convStack(spec);
    const weights = 8 * 3 * 9 + 8 + 6 * 8 * 9 + 6;
    expect(workspace.traffic()).toEqual({ upBytes: 4 * (spec.x.length + weights), downBytes: 4 * f.y.length, uploads: 5, downloads: 1 });
    k.convStackBackward({ ...spec, dy: uniform(f.y.length, 66), stamp: f.stamp, needDx: false, needParams: true });
    const t = workspace.traffic();
    // dy and layer 1's weights for its input gradient (layer 0 needs none without dx); dw, db of both layers
    expect(t.upBytes - 4 * (spec.x.length + weights)).toBe(4 * (f.y.length + 6 * 8 * 9));
    expect(t.uploads).toBe(5 + 2);
    expect(t.downBytes - 4 * f.y.length).toBe(4 * weights);
    expect(t.downloads).toBe(1 + 4);
  });

  test('tagged weights stay on the device: the same tags upload nothing again, a new tag uploads the new weights', () => {
    const k = addonOps();
    const w0 = uniform(8 * 3 * 9, 71, -0.3, 0.3), w1 = uniform(8 * 3 * 9, 72, -0.3, 0.3), b = uniform(8, 73, -0.1, 0.1);
    const workspace = new k.DecoderWorkspace();
    const spec = (w: Float32Array, wTag: number) => ({
      x: uniform(2 * 6 * 6 * 3, 74), xShape: [2, 6, 6, 3], device, workspace, layers: [{ w, wShape: [8, 3, 3, 3], b, pad: 1, act: 1, wTag, bTag: 3 }],
    });
    const up = () => workspace.traffic().upBytes;
    k.convStack(spec(w0, 1));
    const first = up();
    const again = k.convStack(spec(w0, 1));
    expect(up() - first).toBe(4 * 2 * 6 * 6 * 3);  // the images only
    const changed = k.convStack(spec(w1, 2));
    expect(up() - first - 4 * 2 * 6 * 6 * 3).toBe(4 * (2 * 6 * 6 * 3 + 8 * 3 * 9));  // the images and the new weight (not the bias)
    const cpu = (w: Float32Array) => k.nhwcConv2d(spec(w, 0).x, [2, 6, 6, 3], w, [8, 3, 3, 3], b, [1, 1], [1, 1], [1]);
    expectClose(again.y, cpu(w0), 1e-5, 'y with the kept weights');
    expectClose(changed.y, cpu(w1), 1e-5, 'y with the new weights');
  });

  test('clear errors: the CPU, a channel mismatch, a kernel larger than the padded map', () => {
    const k = addonOps();
    const layer = { w: uniform(4 * 3 * 9, 1), wShape: [4, 3, 3, 3], b: uniform(4, 2), pad: 1, act: 1 };
    const spec = { x: uniform(1 * 5 * 5 * 3, 3), xShape: [1, 5, 5, 3], layers: [layer], device };
    expect(k.convStack(spec).yShape).toEqual([1, 5, 5, 4]);
    expect(() => k.convStack({ ...spec, device: 'cpu' })).toThrow(/a conv stack is a GPU stage/);
    expect(() => k.convStack({ ...spec, layers: [layer, layer] })).toThrow(/'spec.layers\[1\].wShape' \[4,3,3,3\] takes 3 input channels, but the previous layer gives 4/);
    expect(() => k.convStack({ ...spec, layers: [{ ...layer, w: uniform(4 * 3 * 81, 1), wShape: [4, 3, 9, 9] }] })).toThrow(/'spec.layers\[0\]': the kernel and padding leave no output/);
  });
});

describeOnDevices((device) => `encoder on ${device}: convolutions, positional embedding, LayerNorm + MLP, keys and values as one stage`, (device) => {
  const make = (B: number, H: number, W: number, C: number, D: number, Z: number, convs: number, seed: number): EncoderArgs => {
    const t = (shape: number[], r: number) => tf.tensor(uniform(shape.reduce((a, b) => a * b), seed++, -r, r), shape);
    return {
      x: t([B, H, W, C], 1) as tf.Tensor4D,
      convs: Array.from({ length: convs }, (_, i) => ({ weight: t([D, i ? D : C, 5, 5], 0.15), bias: t([D], 0.1), pad: 2, activation: 'relu' as const })),
      pos: tf.tensor3d(positionalEmbedding(H, W), [H, W, 4]),
      posWeight: t([D, 4], 0.5), posBias: t([D], 0.1), lnWeight: tf.add(1, t([D], 0.2)), lnBias: t([D], 0.1),
      w1: t([D, D], 0.3), b1: t([D], 0.1), w2: t([D, D], 0.3), b2: t([D], 0.1), wk: t([Z, D], 0.3), wv: t([Z, D], 0.3),
    };
  };
  const params = (a: EncoderArgs) => [...a.convs.flatMap((L) => [L.weight, L.bias]), a.posWeight, a.posBias, a.lnWeight, a.lnBias, a.w1, a.b1, a.w2, a.b2, a.wk, a.wv];
  const withParams = (a: EncoderArgs, p: tf.Tensor[]): EncoderArgs => {
    const n = a.convs.length;
    const h = p.slice(2 * n);
    return {
      ...a, convs: a.convs.map((L, i) => ({ ...L, weight: p[2 * i], bias: p[2 * i + 1] })),
      posWeight: h[0], posBias: h[1], lnWeight: h[2], lnBias: h[3], w1: h[4], b1: h[5], w2: h[6], b2: h[7], wk: h[8], wv: h[9],
    };
  };
  for (const [name, dims] of [
    ['two images 7x6, 3 -> 16 channels, 2 convolutions, Z 8', [2, 7, 6, 3, 16, 8, 2]],
    ['one image 5x5, 70 channels (past one GEMM tile), 1 convolution, Z 5', [1, 5, 5, 2, 70, 5, 1]],
  ] as [string, number[]][]) {
    test(`${name}: k, v and every parameter gradient against the CPU ops`, () => {
      tf.tidy(() => {
        const [B, H, W, C, D, Z, n] = dims;
        const a = make(B, H, W, C, D, Z, n, 300);
        const ops = nativeOpsOn(device);
        const kd = hostKeysValues(ops.encoder(a), 'test'), kc = hostKeysValues(nativeOps.encoder(a), 'test');
        expect(kd.k.shape).toEqual([B, H * W, Z]);
        expectClose(kd.k.dataSync() as Float32Array, kc.k.dataSync() as Float32Array, 1e-5, 'k');
        expectClose(kd.v.dataSync() as Float32Array, kc.v.dataSync() as Float32Array, 1e-5, 'v');
        const wk = tf.sin(tf.range(0, B * H * W * Z).reshape([B, H * W, Z])), wv = tf.cos(tf.range(0, B * H * W * Z).reshape([B, H * W, Z]));
        const f = (o: Ops) => (...p: tf.Tensor[]) => {
          const r = hostKeysValues(o.encoder(withParams(a, p)), 'test');
          return tf.add(tf.sum(tf.mul(r.k, wk)), tf.sum(tf.mul(r.v, wv))) as tf.Scalar;
        };
        const gd = tf.grads(f(ops))(params(a)), gc = tf.grads(f(nativeOps))(params(a));
        gd.forEach((g, i) => expectClose(g.dataSync() as Float32Array, gc[i].dataSync() as Float32Array, 1e-4, `parameter gradient ${i}`));
        const gz = ops.withoutParamGrads(() => tf.grads(f(ops))(params(a)));
        expect(tf.max(tf.abs(gz[0])).dataSync()[0]).toBe(0);
      });
    });
  }

  test('a backward after another forward recomputes; the weights stay on the device under their tags', () => {
    tf.tidy(() => {
      const a = make(1, 6, 6, 3, 16, 8, 2, 400), b = { ...make(1, 6, 6, 3, 16, 8, 2, 400), x: make(1, 6, 6, 3, 16, 8, 2, 500).x };
      const ops = nativeOpsOn(device);
      const lossOf = (e: EncoderOutput) => {
        const r = hostKeysValues(e, 'test');
        return tf.add(tf.sum(tf.square(r.k)), tf.sum(r.v)) as tf.Scalar;
      };
      // a's forward, then b's on the same weights (so the same workspace), then a's backward
      const ga = tf.grads((...p: tf.Tensor[]) => {
        const la = lossOf(ops.encoder(withParams(a, p)));
        ops.encoder(withParams(b, p));
        return la;
      })(params(a));
      const gref = tf.grads((...p: tf.Tensor[]) => lossOf(nativeOps.encoder(withParams(a, p))))(params(a));
      ga.forEach((g, i) => expectClose(g.dataSync() as Float32Array, gref[i].dataSync() as Float32Array, 1e-4, `gradient ${i}`));
    });
    const k = addonOps();
    const workspace = new k.DecoderWorkspace();
    const D = 8, Z = 4, hw = 16;
    const layers = [{ w: uniform(D * 3 * 9, 1, -0.3, 0.3), wShape: [D, 3, 3, 3], b: uniform(D, 2), pad: 1, act: 1, wTag: 1, bTag: 2 }];
    const head = { pos: uniform(hw * 4, 3), posW: uniform(D * 4, 4), posB: uniform(D, 5), lnW: uniform(D, 6), lnB: uniform(D, 7), eps: 1e-5,
      w1: uniform(D * D, 8), b1: uniform(D, 9), w2: uniform(D * D, 10), b2: uniform(D, 11), wk: uniform(Z * D, 12), wv: uniform(Z * D, 13),
      tags: [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13] };
    const spec = { x: uniform(hw * 3, 14), xShape: [1, 4, 4, 3], layers, head, device, workspace };
    const r1 = k.encoderStage(spec);
    const up1 = workspace.traffic().upBytes;
    const r2 = k.encoderStage({ ...spec, x: uniform(hw * 3, 15) });
    expect(workspace.traffic().upBytes - up1).toBe(4 * hw * 3);  // the images only
    expect(r2.stamp).not.toBe(r1.stamp);
    expect(() => k.encoderStage({ ...spec, head: { ...head, wk: uniform(Z * D + 1, 12) } })).toThrow(/'spec.head.wk' has 33 elements, not \[Z, D\]/);
    expect(() => k.encoderStage({ ...spec, head: { ...head, pos: uniform(hw * 4 - 1, 3) } })).toThrow(/'spec.head.pos' has 63 elements, not a positive multiple of the last map's 16 pixels/);
  });

  // The models' way: k and v stay on the device (attentionOnly), the attention rounds read them
  // there and sum dk, dv there for the encoder's backward call.
  const queries = (B: number, K: number, Z: number, seed: number, sharp: number) =>
    tf.tensor3d(uniform(B * K * Z, seed, -sharp, sharp), [B, K, Z]);
  /** Σ over rounds of updates·du, from q (one per round) and the encoder's parameters */
  const attentionLoss = (o: Ops, a: EncoderArgs, du: tf.Tensor[]) => (...p: tf.Tensor[]) => {
    const qs = p.slice(0, du.length) as tf.Tensor3D[];
    const kv = o.encoder(withParams(a, p.slice(du.length)));
    return tf.addN(qs.map((q, r) => tf.sum(tf.mul(o.slotCompetition(q, kv, false).updates, du[r])))) as tf.Scalar;
  };
  for (const [name, dims] of [
    ['two images 7x6, Z 8, K 3', [2, 7, 6, 3, 16, 8, 2, 3]],
    ['one image 5x5, 70 channels, Z 40 (two column blocks), K 7', [1, 5, 5, 2, 70, 40, 1, 7]],
    ['two images 4x4, K 1', [2, 4, 4, 3, 8, 6, 1, 1]],
  ] as [string, number[]][]) {
    test(`k, v kept on the device, ${name}: attention and every gradient over two rounds against the CPU ops`, () => {
      tf.tidy(() => {
        const [B, H, W, C, D, Z, n, K] = dims;
        const a = { ...make(B, H, W, C, D, Z, n, 600), attentionOnly: true };
        const ops = nativeOpsOn(device);
        const kvd = ops.encoder(a), kvc = nativeOps.encoder(a);
        expect(kvd.resident?.shape).toEqual([B, H * W, Z]);
        expect(kvc.resident?.device).toBe('cpu');
        const q = [queries(B, K, Z, 610, 2), queries(B, K, Z, 611, 0.5)];
        const rd = ops.slotCompetition(q[0], kvd), rc = nativeOps.slotCompetition(q[0], kvc);
        expectClose(rd.updates.dataSync() as Float32Array, rc.updates.dataSync() as Float32Array, 1e-5, 'updates');
        expectClose(rd.attn!.dataSync() as Float32Array, rc.attn!.dataSync() as Float32Array, 1e-5, 'attn');
        expect(ops.slotCompetition(q[1], kvd, false).attn).toBeUndefined();
        const du = [queries(B, K, Z, 612, 1), queries(B, K, Z, 613, 1)];
        const gd = tf.grads(attentionLoss(ops, a, du))([...q, ...params(a)]);
        const gc = tf.grads(attentionLoss(nativeOps, a, du))([...q, ...params(a)]);
        gd.forEach((g, i) => expectClose(g.dataSync() as Float32Array, gc[i].dataSync() as Float32Array, 1e-4, `gradient ${i}`));
      });
    });
  }

  test('k, v kept on the device: two encoder passes on the same weights, interleaved, each recomputed where needed', () => {
    tf.tidy(() => {
      const B = 1, K = 2, Z = 8;
      const a = { ...make(B, 6, 5, 3, 16, Z, 2, 700), attentionOnly: true };
      const b = { ...a, x: make(B, 6, 5, 3, 16, Z, 2, 800).x };
      const qa = queries(B, K, Z, 701, 1), qb = queries(B, K, Z, 702, 1);
      const da = queries(B, K, Z, 703, 1), db = queries(B, K, Z, 704, 1);
      // a's encoder, b's, then a's attention (a recomputed), b's (b recomputed); backward in reverse
      const loss = (o: Ops) => (...p: tf.Tensor[]) => {
        const ka = o.encoder(withParams(a, p)), kb = o.encoder(withParams(b, p));
        const ua = o.slotCompetition(qa, ka, false).updates, ub = o.slotCompetition(qb, kb, false).updates;
        return tf.add(tf.sum(tf.mul(ua, da)), tf.sum(tf.mul(ub, db))) as tf.Scalar;
      };
      const gd = tf.grads(loss(nativeOpsOn(device)))(params(a)), gc = tf.grads(loss(nativeOps))(params(a));
      gd.forEach((g, i) => expectClose(g.dataSync() as Float32Array, gc[i].dataSync() as Float32Array, 1e-4, `gradient ${i}`));
    });
  });

  test('k, v kept on the device: neither they nor their gradients cross the bus; errors name the mismatch', () => {
    tf.tidy(() => {
      const B = 2, K = 3, Z = 8, H = 6, W = 6, rounds = 2;
      const host = make(B, H, W, 3, 16, Z, 2, 900);
      const kept = { ...host, attentionOnly: true };
      const ops = nativeOpsOn(device);
      const du = [queries(B, K, Z, 901, 1), queries(B, K, Z, 902, 1)];
      const q = [queries(B, K, Z, 903, 1), queries(B, K, Z, 904, 1)];
      const bus = (a: EncoderArgs) => {
        const t0 = deviceTraffic();
        tf.grads(attentionLoss(ops, a, du))([...q, ...params(a)]);
        const t1 = deviceTraffic();
        return { up: t1.upBytes - t0.upBytes, down: t1.downBytes - t0.downBytes };
      };
      bus(host);
      bus(kept);  // every weight on the device already
      const viaHost = bus(host), onDevice = bus(kept);
      const kv = 4 * B * H * W * Z, qkz = 4 * B * K * Z;
      // the host way: k and v down, dk and dv up; kept: q and the updates per round forward, q, dU and dq backward
      expect(onDevice.down - viaHost.down).toBe(rounds * 2 * qkz - 2 * kv);
      expect(onDevice.up - viaHost.up).toBe(rounds * 3 * qkz - 2 * kv);

      const kvd = ops.encoder(kept);
      expect(() => nativeOps.slotCompetition(q[0], kvd)).toThrow(new RegExp(`on the CPU: the keys and values are kept on ${device} by other ops`));
      expect(() => tfjsOps.slotCompetition(q[0], kvd)).toThrow(new RegExp(`kept by the ops that made them, on ${device} \\(encoder attentionOnly\\)`));
      expect(() => ops.slotCompetition(q[0], nativeOps.encoder(kept))).toThrow(new RegExp(`on ${device}: the keys and values are kept on cpu by other ops`));
      expect(() => ops.slotCompetition(queries(B, K, Z + 1, 905, 1), kvd)).toThrow(/queries \[2,3,9\] do not fit the keys \[2,36,8\]/);
    });
  });
});

describeOnDevices((device) => `gruCell on ${device} vs the CPU kernels (the inference and refinement GRUs)`, (device) => {
  const gruCases: [string, number, number, number][] = [
    // name, N rows, I inputs, H hidden
    ['N 7, input 5, hidden 4', 7, 5, 4],
    ['one row', 1, 3, 6],
    // 3H = 99 and I = 70 cross the 64-column tiles, 130 rows the 128-row ones
    ['more rows and columns than one GEMM tile', 130, 70, 33],
  ];
  for (const [name, N, I, H] of gruCases) {
    test(name, () => {
      const k = addonOps();
      const spec = {
        x: uniform(N * I, 61), h: uniform(N * H, 62), wIh: uniform(3 * H * I, 63, -0.5, 0.5), wHh: uniform(3 * H * H, 64, -0.5, 0.5),
        bIh: uniform(3 * H, 65, -0.3, 0.3), bHh: uniform(3 * H, 66, -0.3, 0.3), N, I, H,
      };
      const workspace = new k.DecoderWorkspace();
      const f = k.gruCell({ ...spec, device, workspace }), fc = k.gruCell(spec);
      expectClose(f.y, fc.y, 1e-5, 'y');
      expectClose(f.gates, fc.gates, 1e-5, 'gates');
      const back = { x: spec.x, h: spec.h, wIh: spec.wIh, wHh: spec.wHh, gates: fc.gates!, dy: uniform(N * H, 67), N, I, H, needParams: true };
      const g = k.gruCellBackward({ ...back, device, workspace }), gc = k.gruCellBackward(back);
      for (const key of ['dx', 'dh', 'dwIh', 'dwHh', 'dbIh', 'dbHh'] as const) expectClose(g[key], gc[key], 1e-5, key);
      const inputsOnly = k.gruCellBackward({ ...back, needParams: false, device, workspace });
      expect(inputsOnly.dwIh).toBeNull();
      expect(inputsOnly.dbHh).toBeNull();
      expectClose(inputsOnly.dh, gc.dh, 1e-5, 'dh (no parameter gradients)');
    });
  }

  test('the forward keeps x, h and the gates on the device: the backward uploads dy only, or recomputes when they are gone', () => {
    const k = addonOps();
    const N = 9, I = 5, H = 6;
    const spec = {
      x: uniform(N * I, 161), h: uniform(N * H, 162), wIh: uniform(3 * H * I, 163, -0.5, 0.5), wHh: uniform(3 * H * H, 164, -0.5, 0.5),
      bIh: uniform(3 * H, 165, -0.3, 0.3), bHh: uniform(3 * H, 166, -0.3, 0.3), N, I, H,
    };
    const tags = { wIhTag: 901, wHhTag: 902, bIhTag: 903, bHhTag: 904 };
    const workspace = new k.DecoderWorkspace();
    const on = { device, workspace, ...tags };
    const cpu = k.gruCell(spec);
    const dy = uniform(N * H, 167);
    const back = { x: spec.x, h: spec.h, wIh: spec.wIh, wHh: spec.wHh, dy, N, I, H, needParams: true };
    const want = k.gruCellBackward({ ...back, gates: cpu.gates! });
    const same = (g: ReturnType<typeof k.gruCellBackward>, what: string) => {
      for (const key of ['dx', 'dh', 'dwIh', 'dwHh', 'dbIh', 'dbHh'] as const) expectClose(g[key], want[key], 1e-5, `${what}: ${key}`);
    };
    const f = k.gruCell({ ...spec, ...on, keep: true });
    expect(f.gates).toBeNull();
    expect(f.kept).toBeGreaterThan(0);
    expectClose(f.y, cpu.y, 1e-5, 'y');
    const t0 = workspace.traffic();
    same(k.gruCellBackward({ ...back, ...on, kept: f.kept, bIh: spec.bIh, bHh: spec.bHh }), 'kept');
    const t1 = workspace.traffic();
    expect(t1.upBytes - t0.upBytes).toBe(4 * N * H);  // dy
    expect(t1.uploads - t0.uploads).toBe(1);
    // 40 more forwards take every kept set over: the first one's backward recomputes its gates
    for (let i = 0; i < 40; i++) k.gruCell({ ...spec, x: uniform(N * I, 200 + i), ...on, keep: true });
    same(k.gruCellBackward({ ...back, ...on, kept: f.kept, bIh: spec.bIh, bHh: spec.bHh }), 'recomputed');
    expect(workspace.traffic().upBytes - t1.upBytes).toBeGreaterThan(4 * (N * I + N * H)); // forwards' x, h and the backward's x, h, dy
    same(k.gruCellBackward({ ...back, ...on, gates: cpu.gates! }), 'given gates');
    expect(() => k.gruCellBackward({ ...back, ...on, kept: f.kept })).toThrow(/'spec.bIh' must be a Float32Array/);
    expect(() => k.gruCell({ ...spec, keep: true })).toThrow(/'spec.keep' is for GPU devices/);
  });

  test('through the ops: gruCell and dualGruCell against the TypeScript cells, values and gradients', () => {
    const ops = nativeOpsOn(device);
    expect(ops.gruCell).not.toBe(nativeOps.gruCell);
    const N = 5, I = 6, H = 4;
    tf.tidy(() => {
      const t = (shape: number[], seed: number, r = 1) => tf.tensor(uniform(shape.reduce((a, b) => a * b), seed, -r, r), shape);
      const xs = [t([N, I], 71), t([N, H], 72), t([N, H], 73)];
      const dual = [t([2 * H, I], 74, 0.5), t([2 * H, H], 75, 0.5), t([2 * H, I], 76, 0.5), t([2 * H, H], 77, 0.5),
        t([H, I], 78, 0.5), t([H, H], 79, 0.5), t([H, I], 80, 0.5), t([H, H], 81, 0.5),
        t([4 * H], 82, 0.3), t([4 * H], 83, 0.3), t([2 * H], 84, 0.3), t([2 * H], 85, 0.3)];
      const single = [t([3 * H, I], 86, 0.5), t([3 * H, H], 87, 0.5), t([3 * H], 88, 0.3), t([3 * H], 89, 0.3)];
      const dy = t([N, 3 * H], 90);
      // one loss over a GRU cell and a DualGRU cell, so that every input and weight gets a gradient
      const f = (o: Ops) => (...v: tf.Tensor[]) => {
        const [x, h1, h2] = v as tf.Tensor2D[];
        const m = (i: number) => v[3 + i] as tf.Tensor2D;
        const b1 = (i: number) => v[3 + i] as tf.Tensor1D;
        const g = o.gruCell(x, h1, { weightIh: m(12), weightHh: m(13), biasIh: b1(14), biasHh: b1(15) });
        const [a, b] = o.dualGruCell(x, h1, h2, {
          weightIh1: m(0), weightHh1: m(1), weightIh2: m(2), weightHh2: m(3), weightIn1: m(4), weightHn1: m(5), weightIn2: m(6), weightHn2: m(7),
          biasIh: b1(8), biasHh: b1(9), biasIn: b1(10), biasHn: b1(11),
        });
        return tf.sum(tf.mul(tf.concat([g, a, b], 1), dy)) as tf.Scalar;
      };
      const all = [...xs, ...dual, ...single];
      expect(Math.abs((f(ops)(...all).dataSync()[0]) - f(tfjsOps)(...all).dataSync()[0])).toBeLessThan(1e-4);
      // the DualGRU cuts its cells' weights from its parameters on every call: their tags come
      // from those parameters, so a second call uploads x and h only
      const t0 = deviceTraffic();
      f(ops)(...all);
      const t1 = deviceTraffic();
      expect([t1.uploads - t0.uploads, t1.upBytes - t0.upBytes]).toEqual([6, 4 * 3 * (N * I + N * H)]);
      const gd = tf.grads(f(ops))(all), gt = tf.grads(f(tfjsOps))(all);
      gd.forEach((g, i) => expectClose(g.dataSync() as Float32Array, gt[i].dataSync() as Float32Array, 1e-5, `gradient ${i}`));
    });
  });

  test('wrong sizes are refused with the key and the shape at fault', () => {
    const k = addonOps();
    const spec = { x: uniform(6, 1), h: uniform(8, 2), wIh: uniform(12 * 3, 3), wHh: uniform(12 * 4, 4), bIh: uniform(12, 5), bHh: uniform(12, 6), N: 2, I: 3, H: 4, device };
    expect(k.gruCell(spec).y).toHaveLength(8);
    expect(() => k.gruCell({ ...spec, wHh: uniform(12 * 3, 4) })).toThrow(/'spec.wHh' has 36 elements but \[3H,H\] = \[12,4\] needs 48/);
    expect(() => k.gruCell({ ...spec, H: 0 })).toThrow(/'spec.H' is 0; expected an integer >= 1/);
    expect(() => k.gruCellBackward({ ...spec, gates: uniform(8, 7), dy: uniform(8, 8), needParams: true })).toThrow(/'spec.gates' has 8 elements but \[4,N,H\] = \[4,2,4\] needs 32/);
  });
});

describeGpu('the decoding stage on a device through the ops', () => {
  test("opsForBackend('native', 'simt') gives nativeOps' nll and gradients through tf.grads", () => {
    const ops = opsForBackend('native', 'simt');
    expect(ops).toBe(nativeOpsOn('simt'));
    expect(ops.decoderNll).not.toBe(nativeOps.decoderNll);
    const cs = cases[0][1];
    const s = spec(cs, 'cpu');
    const K = cs.K;
    tf.tidy(() => {
      const z = tf.tensor2d(s.z, [s.n, s.c]);
      const pos = tf.tensor3d(s.pos, [s.gh, s.gw, s.c]);
      const ws = s.layers.flatMap((L) => [tf.tensor4d(L.w!, L.wShape as [number, number, number, number]), tf.tensor1d(L.b!)]);
      const target = tf.tensor4d(s.target, [s.B, s.H, s.W, 3]);
      const args = (t: tf.Tensor[]): DecoderNllArgs => {
        let i = 2;
        const layers = s.layers.map((L): DecoderLayerSpec => {
          const weight = t[i++] as tf.Tensor4D;
          const bias = t[i++] as tf.Tensor1D;
          const activation = (['linear', 'relu', 'elu'] as const)[L.act ?? 0];
          return L.kind === 0 ? { kind: 'broadcastConv', weight, bias, pad: L.pad!, activation } : { kind: 'conv', weight, bias, pad: L.pad!, activation };
        });
        return { spec: { layers }, z: t[0] as tf.Tensor2D, pos: t[1] as tf.Tensor3D, target, K, logVar: s.logVar, likelihood: 'Gaussian', grads: 'all', outputs: false };
      };
      const xs = [z, pos, ...ws];
      const f = (o: typeof ops) => (...t: tf.Tensor[]) => tf.mul(tf.mean(o.decoderNll(args(t)).nll), 0.5) as tf.Scalar;
      const gd = tf.grads(f(ops))(xs);
      const gc = tf.grads(f(nativeOps))(xs);
      gd.forEach((g, i) => expectClose(g.dataSync() as Float32Array, gc[i].dataSync() as Float32Array, 1e-4, `gradient ${i}`));
      expectClose(ops.decoderNll(args(xs)).nll.dataSync() as Float32Array, nativeOps.decoderNll(args(xs)).nll.dataSync() as Float32Array, 1e-5, 'nll');
    });
  }, 120_000);

  test('training steps with the stage, the encoder convolutions and the GRU cells on simt take the CPU\'s steps (refinement, GECO, Adam)', () => {
    const S = 8;
    const config = experimentConfig({
      Net: { K: 3, input_size: [3, S, S], z_size: 6, image_decoder: 'small', image_likelihood: 'GMM', stochastic_layers: 1, refinement_iters: 1 },
      training: { batch_size: 2, lr: 1e-3, use_scheduler: false, use_geco: true, geco_reconstruction_target: -0.5, refinement_curriculum: [[-1, 1]] },
      seed: 3,
    });
    const images = tf.tensor4d(uniform(2 * 3 * S * S, 77), [2, 3, S, S]);
    const run = (ops: Ops) => {
      const t = new Trainer(config, { ops });
      try {
        return [0, 1].map(() => {
          const r = t.step(images);
          return [r.totalLoss, r.nll, r.kl, r.gradNorm];
        });
      } finally {
        t.dispose();
      }
    };
    const cpu = run(nativeOps);
    const bus0 = deviceTraffic();
    const dev = run(nativeOpsOn('simt'));
    const bus = deviceTraffic();
    expect(bus.uploads).toBeGreaterThan(bus0.uploads);
    expect(bus.downBytes).toBeGreaterThan(bus0.downBytes);
    // the kernels use no atomics, so no schedule may change a bit of the steps
    const reversed = withAddonSetting('EMORL_SIMT_SCHEDULE', 'reverse', () => run(nativeOpsOn('simt')));
    images.dispose();
    cpu.forEach((row, i) => row.forEach((v, j) => expect(Math.abs(dev[i][j] - v)).toBeLessThanOrEqual(1e-4 * Math.max(1, Math.abs(v)))));
    expect(reversed).toEqual(dev);
  }, 300_000);

  test('EMORL_SIMT_SCHEDULE takes forward or reverse; anything else is refused by name; setEnvironment checks its arguments', () => {
    const k = addonOps();
    const s = spec(cases[2][1], 'simt');
    withAddonSetting('EMORL_SIMT_SCHEDULE', 'sideways', () =>
      expect(() => k.decoderStage(s)).toThrow(/EMORL_SIMT_SCHEDULE must be 'forward' or 'reverse', got 'sideways'/));
    const forward = withAddonSetting('EMORL_SIMT_SCHEDULE', 'forward', () => k.decoderStage(s));
    // no atomics: the same bits in any order
    expect(withAddonSetting('EMORL_SIMT_SCHEDULE', 'reverse', () => k.decoderStage(s))).toEqual(forward);
    expect(() => k.setEnvironment('PATH', '/')).toThrow(/name must be an EMORL_\* variable, not 'PATH'/);
    expect(() => k.setEnvironment('EMORL_X=1', '/')).toThrow(/name must be an EMORL_\* variable/);
    expect(() => k.setEnvironment('EMORL_X', 'a\0b')).toThrow(/the value of EMORL_X holds a NUL character/);
    expect(() => k.setEnvironment('EMORL_X', 3 as unknown as string)).toThrow(/value must be a string or null/);
  });

  test('device names: clear errors for unknown names, the js backend, and CUDA that is not there', () => {
    expect(opsForBackend('native', 'cpu')).toBe(nativeOps);
    expect(() => opsForBackend('native', 'gpu')).toThrow(/unknown device "gpu" \(use cpu or cuda:N\)/);
    expect(() => opsForBackend('js', 'simt')).toThrow(/needs the native backend/);
    const n = st.info!.cudaDevices;
    expect(() => opsForBackend('native', `cuda:${n}`)).toThrow(st.info!.cudaBuilt ? new RegExp(`cuda:${n}: ${n} CUDA device`) : /built without CUDA/);
    const k = addonOps();
    const s = spec(cases[0][1], 'cpu');
    expect(() => k.decoderStage({ ...s, device: `cuda:${n}` })).toThrow(st.info!.cudaBuilt ? /CUDA device/ : /built without CUDA/);
    expect(() => k.decoderStage({ ...s, device: 'tpu' as StageDevice })).toThrow(/'spec.device' must be 'cpu', 'cuda:N' or 'simt', not 'tpu'/);
  });
});
