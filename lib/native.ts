/**
 * The bridge to the native addon (build/Release/emorl_native.node, built by `npm install` or
 * `npm run build:native`). Only this module touches the addon; the model code asks
 * `nativeStatus()` and falls back to its tfjs path when the addon is not there.
 *
 * Nothing Node-only is imported at module level: the addon (and `node:fs`/`node:path`) are
 * required lazily on first use, so bundling this module for a browser costs nothing until a
 * native kernel is actually asked for (and then it reports "not available").
 *
 * Environment: EMORL_NATIVE=0 disables the addon; EMORL_NATIVE_PATH=<file.node> loads that file.
 * Threads: the kernels use OpenMP's settings (OMP_NUM_THREADS; default: all cores).
 *
 * Layouts are PyTorch's: activations NCHW, conv2d weights [out, in, kh, kw], conv2dTranspose
 * weights [in, out, kh, kw]. All buffers are float32, row-major; results are new arrays unless an `out` array is given.
 */

export type Shape4 = [number, number, number, number];
/** A single value for both spatial dimensions, or [height, width]. */
export type Pair = number | readonly [number, number];
/** conv2d padding: one value, [padH, padW] (symmetric), or [top, bottom, left, right]. */
export type Padding = number | readonly [number, number] | readonly [number, number, number, number];

export interface NativeInfo {
  /** the GEMM micro-kernel picked for this CPU: 'avx512' | 'avx2' | 'generic' */
  gemmIsa: string;
  threads: number;
  openmp: boolean;
  cudaBuilt: boolean;
  cudaDevices: number;
  cudaError?: string;
  /** the decoding stage's CUDA kernels can run in the SIMT emulator (device 'simt'; absent in older builds) */
  simtEmulator?: boolean;
  /**
   * the kernel behind precision 'bf16': 'avx512bf16' (the CPU's bf16 dot-product instructions) or
   * 'emulated' (the same results, slower than fp32); absent in older builds
   */
  bf16?: string;
  /**
   * how stride-1 3x3 and 5x5 convolutions run: 'winograd' (lib/ops/winograd.ts) or 'direct'
   * (EMORL_CONV_ALGO=direct); absent in older builds
   */
  convAlgo?: string;
}

export interface NativeStatus {
  available: boolean;
  /** why the addon is not available (absent when it is) */
  reason?: string;
  /** the file that was (or would have been) loaded */
  path?: string;
  info?: NativeInfo;
}

/** The raw N-API functions (see native/binding.cc for the argument checks). */
interface RawKernels {
  conv2d(x: Float32Array, xShape: number[], w: Float32Array, wShape: number[], bias: Float32Array | null,
    stride: number[], pad: number[], out?: Float32Array | null): Float32Array;
  conv2dBackwardInput(dy: Float32Array, dyShape: number[], w: Float32Array, wShape: number[], xShape: number[],
    stride: number[], pad: number[], out?: Float32Array | null): Float32Array;
  conv2dBackwardFilter(x: Float32Array, xShape: number[], dy: Float32Array, dyShape: number[], wShape: number[],
    stride: number[], pad: number[], withBias: boolean): { dw: Float32Array; db: Float32Array | null };
  conv2dTranspose(x: Float32Array, xShape: number[], w: Float32Array, wShape: number[], bias: Float32Array | null,
    stride: number[], padding: number[], outputPadding: number[], out?: Float32Array | null): Float32Array;
  conv2dTransposeBackwardInput(dy: Float32Array, dyShape: number[], w: Float32Array, wShape: number[],
    xShape: number[], stride: number[], padding: number[], outputPadding: number[], out?: Float32Array | null): Float32Array;
  conv2dTransposeBackwardFilter(x: Float32Array, xShape: number[], dy: Float32Array, dyShape: number[],
    wShape: number[], stride: number[], padding: number[], outputPadding: number[],
    withBias: boolean): { dw: Float32Array; db: Float32Array | null };
  matmul(a: Float32Array, aShape: number[], b: Float32Array, bShape: number[], transA: boolean,
    transB: boolean, out?: Float32Array | null): Float32Array;
}

interface RawModule extends RawKernels {
  reference: RawKernels;
  info(): NativeInfo;
  abiVersion: number;
}

const ABI_VERSION = 1;
const ADDON_FILE = ['build', 'Release', 'emorl_native.node'];

let loaded: { mod?: RawModule; status: NativeStatus } | undefined;

/** Walks up from this file's directory (lib/ under ts-jest, dist/lib/ when built) to the package root. */
function findAddon(): string | undefined {
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const fs = require('node:fs') as typeof import('node:fs');
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const path = require('node:path') as typeof import('node:path');
  let dir = __dirname;
  for (let i = 0; i < 4; i++) {
    const candidate = path.join(dir, ...ADDON_FILE);
    if (fs.existsSync(candidate)) return candidate;
    if (fs.existsSync(path.join(dir, 'package.json')) && fs.existsSync(path.join(dir, 'CMakeLists.txt'))) {
      return candidate; // the package root: report this path even though it is missing
    }
    const up = path.dirname(dir);
    if (up === dir) break;
    dir = up;
  }
  return undefined;
}

function load(): { mod?: RawModule; status: NativeStatus } {
  if (loaded) return loaded;
  const env = typeof process !== 'undefined' && process.env ? process.env : {};
  if (/^(0|false|no|off)$/i.test((env.EMORL_NATIVE ?? '').trim())) {
    return (loaded = { status: { available: false, reason: 'disabled by EMORL_NATIVE=0' } });
  }
  if (typeof process === 'undefined' || !process.versions?.node || typeof require !== 'function') {
    return (loaded = { status: { available: false, reason: 'not running under Node.js' } });
  }
  let file: string | undefined;
  try {
    file = env.EMORL_NATIVE_PATH || findAddon();
    if (!file) {
      return (loaded = { status: { available: false, reason: 'could not locate the package root to find build/Release/emorl_native.node' } });
    }
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    const fs = require('node:fs') as typeof import('node:fs');
    if (!fs.existsSync(file)) {
      return (loaded = {
        status: {
          available: false,
          path: file,
          reason: `the addon is not built (${file} is missing); run \`npm run build:native\` (needs cmake and a C++17 compiler)`,
        },
      });
    }
    // OpenMP's idle workers sleep at once instead of spinning for a while: between the addon's
    // parallel regions the main thread runs JavaScript, and spinning workers took cores from it and
    // from V8's GC threads (a Tetrominoes training step 4-8% slower on 2 cores). libgomp reads this
    // when it loads, with the addon; a policy the user set is kept.
    if (env.OMP_WAIT_POLICY === undefined && env.GOMP_SPINCOUNT === undefined) process.env.OMP_WAIT_POLICY = 'passive';
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    const mod = require(file) as RawModule;
    if (mod.abiVersion !== ABI_VERSION) {
      return (loaded = {
        status: {
          available: false,
          path: file,
          reason: `the addon at ${file} is out of date (ABI ${String(mod.abiVersion)}, expected ${ABI_VERSION}); run \`npm run build:native\``,
        },
      });
    }
    return (loaded = { mod, status: { available: true, path: file, info: mod.info() } });
  } catch (e) {
    return (loaded = {
      status: { available: false, path: file, reason: `loading the addon failed: ${(e as Error).message}` },
    });
  }
}

/** Whether the native kernels can be used, and if not, why. Loads the addon on first call. */
export function nativeStatus(): NativeStatus {
  return load().status;
}

export function nativeAvailable(): boolean {
  return load().status.available;
}

function raw(): RawModule {
  const l = load();
  if (!l.mod) throw new Error(`emorl native addon unavailable: ${l.status.reason}`);
  return l.mod;
}

// ---- shape helpers (pure) ----

function pair(v: Pair, name: string): [number, number] {
  const p: readonly number[] = typeof v === 'number' ? [v, v] : v;
  if (p.length !== 2) throw new RangeError(`${name} must be a number or [h, w], got ${JSON.stringify(v)}`);
  return [p[0], p[1]];
}

/** [top, bottom, left, right] from any Padding form. */
export function padding4(pad: Padding): [number, number, number, number] {
  if (typeof pad === 'number') return [pad, pad, pad, pad];
  if (pad.length === 2) return [pad[0], pad[0], pad[1], pad[1]];
  if (pad.length === 4) return [pad[0], pad[1], pad[2], pad[3]];
  throw new RangeError(`pad must be a number, [h, w] or [top, bottom, left, right], got ${JSON.stringify(pad)}`);
}

/** Output shape of conv2d (NCHW, weights [out, in, kh, kw]). */
export function conv2dOutputShape(xShape: Shape4, wShape: Shape4, stride: Pair = 1, pad: Padding = 0): Shape4 {
  const [sh, sw] = pair(stride, 'stride');
  const [t, b, l, r] = padding4(pad);
  return [xShape[0], wShape[0], Math.floor((xShape[2] + t + b - wShape[2]) / sh) + 1,
    Math.floor((xShape[3] + l + r - wShape[3]) / sw) + 1];
}

/** Output shape of conv2dTranspose (PyTorch ConvTranspose2d, weights [in, out, kh, kw]). */
export function conv2dTransposeOutputShape(xShape: Shape4, wShape: Shape4, stride: Pair = 1, padding: Pair = 0,
  outputPadding: Pair = 0): Shape4 {
  const [sh, sw] = pair(stride, 'stride');
  const [ph, pw] = pair(padding, 'padding');
  const [oh, ow] = pair(outputPadding, 'outputPadding');
  return [xShape[0], wShape[1], (xShape[2] - 1) * sh - 2 * ph + wShape[2] + oh, (xShape[3] - 1) * sw - 2 * pw + wShape[3] + ow];
}

export interface Conv2dOptions {
  stride?: Pair;
  pad?: Padding;
}

export interface Conv2dTransposeOptions {
  stride?: Pair;
  padding?: Pair;
  outputPadding?: Pair;
}

/**
 * Where the single-output kernels may write their result instead of a new array: exactly the
 * result's length, sharing no memory with any input (reusing buffers saves page faults).
 */
export interface OutOption {
  out?: Float32Array;
}

export interface Result<S extends number[] = number[]> {
  data: Float32Array;
  shape: S;
}

export interface FilterGrads {
  dw: Float32Array;
  /** the bias gradient, when asked for */
  db: Float32Array | null;
}

/** The typed kernels, over either the fast implementations or the plain reference loops. */
export class NativeKernels {
  constructor(private readonly k: RawKernels) {}

  conv2d(x: Float32Array, xShape: Shape4, w: Float32Array, wShape: Shape4, bias: Float32Array | null = null,
    opts: Conv2dOptions & OutOption = {}): Result<Shape4> {
    const stride = pair(opts.stride ?? 1, 'stride'), pad = padding4(opts.pad ?? 0);
    const data = this.k.conv2d(x, [...xShape], w, [...wShape], bias, stride, pad, opts.out);
    return { data, shape: conv2dOutputShape(xShape, wShape, stride, pad) };
  }

  conv2dBackwardInput(dy: Float32Array, dyShape: Shape4, w: Float32Array, wShape: Shape4, xShape: Shape4,
    opts: Conv2dOptions & OutOption = {}): Float32Array {
    return this.k.conv2dBackwardInput(dy, [...dyShape], w, [...wShape], [...xShape],
      pair(opts.stride ?? 1, 'stride'), padding4(opts.pad ?? 0), opts.out);
  }

  conv2dBackwardFilter(x: Float32Array, xShape: Shape4, dy: Float32Array, dyShape: Shape4, wShape: Shape4,
    opts: Conv2dOptions & { withBias?: boolean } = {}): FilterGrads {
    return this.k.conv2dBackwardFilter(x, [...xShape], dy, [...dyShape], [...wShape],
      pair(opts.stride ?? 1, 'stride'), padding4(opts.pad ?? 0), opts.withBias ?? false);
  }

  conv2dTranspose(x: Float32Array, xShape: Shape4, w: Float32Array, wShape: Shape4, bias: Float32Array | null = null,
    opts: Conv2dTransposeOptions & OutOption = {}): Result<Shape4> {
    const stride = pair(opts.stride ?? 1, 'stride'), padding = pair(opts.padding ?? 0, 'padding');
    const outputPadding = pair(opts.outputPadding ?? 0, 'outputPadding');
    const data = this.k.conv2dTranspose(x, [...xShape], w, [...wShape], bias, stride, padding, outputPadding, opts.out);
    return { data, shape: conv2dTransposeOutputShape(xShape, wShape, stride, padding, outputPadding) };
  }

  conv2dTransposeBackwardInput(dy: Float32Array, dyShape: Shape4, w: Float32Array, wShape: Shape4, xShape: Shape4,
    opts: Conv2dTransposeOptions & OutOption = {}): Float32Array {
    return this.k.conv2dTransposeBackwardInput(dy, [...dyShape], w, [...wShape], [...xShape],
      pair(opts.stride ?? 1, 'stride'), pair(opts.padding ?? 0, 'padding'), pair(opts.outputPadding ?? 0, 'outputPadding'),
      opts.out);
  }

  conv2dTransposeBackwardFilter(x: Float32Array, xShape: Shape4, dy: Float32Array, dyShape: Shape4, wShape: Shape4,
    opts: Conv2dTransposeOptions & { withBias?: boolean } = {}): FilterGrads {
    return this.k.conv2dTransposeBackwardFilter(x, [...xShape], dy, [...dyShape], [...wShape],
      pair(opts.stride ?? 1, 'stride'), pair(opts.padding ?? 0, 'padding'), pair(opts.outputPadding ?? 0, 'outputPadding'),
      opts.withBias ?? false);
  }

  /**
   * C = op(A)·op(B). Shapes are the stored shapes: [M,K] or [batch,M,K] for A ([K,M] / [batch,K,M]
   * with transA), [K,N] or [batch,K,N] for B ([N,K] / [batch,N,K] with transB). A batch of 1 or a
   * 2-D operand broadcasts. The result is [M,N], or [batch,M,N] if either operand is 3-D.
   */
  matmul(a: Float32Array, aShape: readonly number[], b: Float32Array, bShape: readonly number[],
    opts: { transA?: boolean; transB?: boolean } & OutOption = {}): Result {
    const ta = opts.transA ?? false, tb = opts.transB ?? false;
    const data = this.k.matmul(a, [...aShape], b, [...bShape], ta, tb, opts.out);
    const M = ta ? aShape[aShape.length - 1] : aShape[aShape.length - 2];
    const N = tb ? bShape[bShape.length - 2] : bShape[bShape.length - 1];
    const ba = aShape.length === 3 ? aShape[0] : 1, bb = bShape.length === 3 ? bShape[0] : 1;
    const batch = ba === 1 ? bb : ba;
    return { data, shape: aShape.length === 3 || bShape.length === 3 ? [batch, M, N] : [M, N] };
  }
}

let fastKernels: NativeKernels | undefined;
let refKernels: NativeKernels | undefined;

/** The fast kernels; throws (with the reason) when the addon is not available. */
export function nativeKernels(): NativeKernels {
  return (fastKernels ??= new NativeKernels(raw()));
}

/** The plain reference loops behind the same interface (slow; for checks). */
export function nativeReferenceKernels(): NativeKernels {
  return (refKernels ??= new NativeKernels(raw().reference));
}
