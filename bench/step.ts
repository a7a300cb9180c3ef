/**
 * Training-step and inference times of the shipped configs (configs/train/<name>/EMORL.json),
 * native addon vs the pure TypeScript path, with each measurement's peak RSS, against the
 * original PyTorch code's times on this 2-core machine (../shared/STACK.md; 2 threads, denormals
 * flushed). A training step is the Trainer's whole step: loss and gradients, clipping, Adam, GECO.
 *
 *   node dist/bench/step.js                       the default set, as a table with ratios
 *   node dist/bench/step.js --json                the same, one JSON object per line
 *   node dist/bench/step.js --config tetrominoes --batch 32 --mode train --backend native --steps 3
 *                                                 one measurement (JSON line)
 *   --device cuda:0                               the decoding stages, encoder, attention, GRU cells on a GPU (native
 *                                                 rows; each row then also says what crossed the bus per step;
 *                                                 'simt' for the emulated kernels: slow, but the same copies)
 *   --precision bf16                              the CPU convolutions in mixed precision (native rows)
 *   --original DIR                                also time the original PyTorch code (a copy of its
 *                                                 repository in DIR) with bench/original.py, beside each
 *                                                 config: the ratios then compare the two programs on this
 *                                                 machine now (EMORL_PYTHON: the interpreter with torch,
 *                                                 default /usr/bin/python3)
 *
 * Each measurement runs in its own process, so each peak RSS is its own. `median_s` is the median
 * over --steps timed repetitions after one untimed warm-up repetition. Native rows also give
 * `host_s`: the median time per step outside the addon's calls, i.e. in tfjs and JavaScript. With
 * a GPU device that is the floor of a step's time on this host (the addon's CPU calls, such as the
 * small linear layers and Adam, come on top). `tfjs_kernels_per_step` counts the tfjs kernels a
 * step runs, forward and backward: the host's share grows with it. Every measurement runs under
 * the Node flags emorl-train starts with (lib/cli/node-flags.ts; started without them, this
 * script runs itself again with them), since they change the host's share.
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { tf, initBackend } from '../lib/tf';
import { bundledConfig, loadConfigFile } from '../lib/cli/train';
import { SeededNoise } from '../lib/model/noise';
import { Trainer } from '../lib/train/trainer';
import { tfjsOps } from '../lib/ops';
import { nativeOpsAvailable, nativeOpsOn, parseConvPrecision, parseStageDevice } from '../lib/ops/native';
import { deviceTraffic, type ConvPrecision } from '../lib/ops/addon';
import { nativeStatus } from '../lib/native';
import { TRAINING_NODE_FLAGS, hasTrainingNodeFlags } from '../lib/cli/node-flags';

interface Measurement {
  config: string;
  batch: number;
  mode: 'train' | 'infer';
  backend: 'native' | 'js';
  steps: number;
  median_s: number;
  times_s: number[];
  peak_rss_mib: number;
  isa?: string;
  threads?: number;
  /** where the decoding stage ran (native) */
  device?: string;
  /** the CPU convolutions' products (native): 'fp32' or 'bf16' (with the kernel behind it) */
  precision?: string;
  /** GPU devices: host <-> device copies per step (the timed steps' mean) */
  bus_per_step?: { up_mib: number; down_mib: number; uploads: number; downloads: number };
  /** native: the median time per step outside the addon's calls */
  host_s?: number;
  /**
   * native: each addon function's time and calls per step (the timed steps' mean), largest first.
   * On a GPU every call synchronises, so a call's time is its kernels, copies and launches.
   */
  addon_ms_per_step?: Record<string, { ms: number; calls: number }>;
  /** tfjs kernels run per step (the timed steps' mean): what the host's share of a step scales with */
  tfjs_kernels_per_step: number;
}

/** Counts the kernels tfjs' engine runs (every tfjs op, forward and backward, is one or more). */
function countKernels(): { n: number } {
  const count = { n: 0 };
  const engine = tf.engine() as unknown as { runKernel: (...a: unknown[]) => unknown };
  const run = engine.runKernel.bind(engine);
  engine.runKernel = (...a: unknown[]) => {
    count.n++;
    return run(...a);
  };
  return count;
}

/** Time inside the addon's calls: in all, and by function. */
interface AddonTimes {
  ms: number;
  byName: Map<string, { ms: number; calls: number }>;
}

/**
 * Wraps the addon's functions (the module object the library loads: require's cache) so that the
 * time inside them adds up in `inside.ms` and by name; before the first step, so every call is counted.
 */
function timeAddonCalls(): AddonTimes {
  const inside: AddonTimes = { ms: 0, byName: new Map() };
  const path = nativeStatus().path;
  if (!path) return inside;
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const mod = require(path) as Record<string, unknown>;
  for (const [name, f] of Object.entries(mod)) {
    if (typeof f !== 'function' || /^[A-Z]/.test(name)) continue; // classes (workspaces) stay as they are
    const entry = { ms: 0, calls: 0 };
    inside.byName.set(name, entry);
    mod[name] = function (this: unknown, ...args: unknown[]) {
      const t = performance.now();
      try {
        return (f as (...a: unknown[]) => unknown).apply(this, args);
      } finally {
        const dt = performance.now() - t;
        inside.ms += dt;
        entry.ms += dt;
        entry.calls++;
      }
    };
  }
  return inside;
}

/** Each function's share of the timed steps, per step, from the totals at their start (`before`). */
function perStep(inside: AddonTimes, before: Map<string, { ms: number; calls: number }>, steps: number): Record<string, { ms: number; calls: number }> {
  const rows = [...inside.byName].map(([name, e]) => {
    const b = before.get(name) ?? { ms: 0, calls: 0 };
    return [name, { ms: Math.round(((e.ms - b.ms) / steps) * 100) / 100, calls: (e.calls - b.calls) / steps }] as const;
  });
  return Object.fromEntries(rows.filter(([, e]) => e.calls > 0).sort((a, b) => b[1].ms - a[1].ms));
}

/** The original's figures on an earlier machine (STACK.md): seconds per step / per inference batch. */
const PYTORCH: Record<string, { batch: number; train?: number; infer?: number; peakMiB?: number }> = {
  tetrominoes: { batch: 32, train: 2.2, infer: 1.0, peakMiB: 1.24 * 1024 },
  multi_dsprites: { batch: 4, train: 2.5, infer: 1.24 },
  'clevr6-96x96': { batch: 4, train: 12.2, peakMiB: 3.5 * 1024 },
};

/** The default set: [config, batch, backend]; the TypeScript path at batch 4 (it takes minutes at 32). */
const DEFAULT_SET: [string, number, 'native' | 'js'][] = [
  ['tetrominoes', 32, 'native'],
  ['tetrominoes', 4, 'js'],
  ['multi_dsprites', 4, 'native'],
  ['clevr6-96x96', 4, 'native'],
];

function arg(name: string): string | undefined {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 && i + 1 < process.argv.length ? process.argv[i + 1] : undefined;
}

function median(a: number[]): number {
  const s = [...a].sort((x, y) => x - y);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

/** config: a bundled config name (`tetrominoes`, or `tetrominoes/SlotAttention`) or a JSON file. */
function configFile(config: string): string {
  if (fs.existsSync(config)) return config;
  const [dataset, model] = config.split('/');
  return bundledConfig(dataset, model ?? 'EMORL');
}

async function measure(config: string, batch: number, mode: 'train' | 'infer', backend: 'native' | 'js', steps: number, device: string,
  precision: ConvPrecision): Promise<Measurement> {
  await initBackend('cpu');
  if (backend === 'native' && !(nativeStatus().available && nativeOpsAvailable())) {
    throw new Error(`--backend native: the addon is unavailable (${nativeStatus().reason ?? 'no decoder-stage kernels'}); npm run build:native`);
  }
  const inside = backend === 'native' ? timeAddonCalls() : null;
  const exp = loadConfigFile(configFile(config), []);
  const trainer = new Trainer(exp, { seed: 1, ops: backend === 'native' ? nativeOpsOn(parseStageDevice(device), precision) : tfjsOps });
  const [C, H, W] = exp.Net.input_size;
  const images = tf.tidy(() => tf.sub(tf.mul(tf.randomUniform([batch, C, H, W], 0, 1, 'float32', 3), 2), 1));
  const times: number[] = [], hostTimes: number[] = [];
  let bus0 = deviceTraffic();
  const kernels = countKernels();
  let kernels0 = 0;
  let calls0 = new Map<string, { ms: number; calls: number }>();
  for (let r = 0; r <= steps; r++) {
    if (r === 1) {
      // after the warm-up
      bus0 = deviceTraffic();
      if (inside) calls0 = new Map([...inside.byName].map(([k, e]) => [k, { ...e }]));
      kernels0 = kernels.n;
    }
    const t = performance.now(), in0 = inside?.ms ?? 0;
    if (mode === 'train') trainer.step(images, { noise: new SeededNoise(r) }).release();
    else trainer.model.infer(images, { noise: new SeededNoise(r), outputs: false }).dispose();
    const dt = performance.now() - t;
    if (r > 0) {
      times.push(dt / 1000);
      if (inside) hostTimes.push((dt - (inside.ms - in0)) / 1000);
    }
  }
  const bus1 = deviceTraffic();
  const mib = (b: number) => Math.round((b / steps / 2 ** 20) * 100) / 100;
  const bus = device !== 'cpu' && backend === 'native'
    ? { bus_per_step: { up_mib: mib(bus1.upBytes - bus0.upBytes), down_mib: mib(bus1.downBytes - bus0.downBytes),
      uploads: (bus1.uploads - bus0.uploads) / steps, downloads: (bus1.downloads - bus0.downloads) / steps } }
    : {};
  images.dispose();
  trainer.dispose();
  const st = nativeStatus();
  return {
    config,
    batch,
    mode,
    backend,
    steps,
    median_s: median(times),
    times_s: times,
    ...(hostTimes.length ? { host_s: Math.round(median(hostTimes) * 1e4) / 1e4 } : {}),
    ...(inside ? { addon_ms_per_step: perStep(inside, calls0, steps) } : {}),
    tfjs_kernels_per_step: Math.round((kernels.n - kernels0) / steps),
    peak_rss_mib: process.resourceUsage().maxRSS / 1024,
    ...(backend === 'native'
      ? { isa: st.info?.gemmIsa, threads: st.info?.threads, device, precision: precision === 'bf16' ? `bf16 (${st.info?.bf16})` : precision }
      : {}),
    ...bus,
  };
}

function inChild(config: string, batch: number, mode: string, backend: string, steps: number, device: string, precision: string): Measurement {
  const r = spawnSync(process.execPath, [...TRAINING_NODE_FLAGS, process.argv[1], '--config', config, '--batch', String(batch), '--mode', mode, '--backend', backend, '--steps', String(steps),
    '--device', device, '--precision', precision], {
    encoding: 'utf8',
    stdio: ['ignore', 'pipe', 'inherit'],
    maxBuffer: 1 << 24,
  });
  const line = (r.stdout ?? '').trim().split('\n').pop() ?? '';
  if (r.status !== 0 || !line.startsWith('{')) throw new Error(`${config} ${mode} ${backend} batch ${batch} failed (status ${r.status}): ${r.stdout}`);
  return JSON.parse(line) as Measurement;
}

/** The original's time for one row (bench/original.py), or an error saying why not. */
function original(repo: string, config: string, batch: number, mode: string, steps: number): { median_s: number; peak_rss_mib: number } {
  const script = path.join(__dirname, '..', '..', 'bench', 'original.py');
  const file = path.join(repo, 'configs', 'train', config, 'EMORL.json');
  const python = process.env.EMORL_PYTHON ?? '/usr/bin/python3';
  const r = spawnSync(python, [script, '--repo', repo, '--config', file, '--batch', String(batch), '--mode', mode, '--steps', String(steps)], {
    encoding: 'utf8',
    stdio: ['ignore', 'pipe', 'pipe'],
    maxBuffer: 1 << 24,
  });
  const line = (r.stdout ?? '').trim().split('\n').pop() ?? '';
  if (r.status !== 0 || !line.startsWith('{')) throw new Error(`the original (${python} ${script}) on ${config} ${mode} failed: ${(r.stderr ?? '').trim().split('\n').slice(-3).join(' | ') || r.error?.message}`);
  return JSON.parse(line) as { median_s: number; peak_rss_mib: number };
}

async function main(): Promise<void> {
  if (!hasTrainingNodeFlags()) {
    const r = spawnSync(process.execPath, [...process.execArgv, ...TRAINING_NODE_FLAGS, ...process.argv.slice(1)], { stdio: 'inherit' });
    process.exit(r.status ?? 1);
  }
  const json = process.argv.includes('--json');
  const config = arg('config');
  const steps = Number(arg('steps') ?? '3');
  const device = parseStageDevice(arg('device') ?? 'cpu');
  const precision = parseConvPrecision(arg('precision') ?? 'fp32');
  if (!Number.isInteger(steps) || steps < 1) throw new Error(`--steps must be an integer >= 1`);
  const single = config !== undefined || arg('mode') !== undefined || arg('backend') !== undefined || arg('batch') !== undefined;
  if (single) {
    const mode = (arg('mode') ?? 'train') as 'train' | 'infer';
    const backend = (arg('backend') ?? 'native') as 'native' | 'js';
    if (mode !== 'train' && mode !== 'infer') throw new Error(`--mode must be train or infer, got ${mode}`);
    if (backend !== 'native' && backend !== 'js') throw new Error(`--backend must be native or js, got ${backend}`);
    const name = config ?? 'tetrominoes';
    const batch = Number(arg('batch') ?? String(PYTORCH[name]?.batch ?? 4));
    if (!Number.isInteger(batch) || batch < 1) throw new Error(`--batch must be an integer >= 1`);
    console.log(JSON.stringify(await measure(name, batch, mode, backend, steps, device, backend === 'js' ? 'fp32' : precision)));
    return;
  }
  const st = nativeStatus();
  const set = DEFAULT_SET.filter(([, , b]) => b === 'js' || (st.available && nativeOpsAvailable()));
  // native rows: the --precision asked for, else fp32 and (where the CPU runs it) bf16
  const precisions: ConvPrecision[] = arg('precision') !== undefined ? [precision] : st.info?.bf16 === 'avx512bf16' && device === 'cpu' ? ['fp32', 'bf16'] : ['fp32'];
  if (!json) console.log(`addon: ${st.available ? `${st.info?.gemmIsa}, ${st.info?.threads} threads, bf16 ${st.info?.bf16 ?? 'absent'}` : `unavailable (${st.reason})`}; decoding stage on ${device}; median of ${steps} after a warm-up`);
  const originalRepo = arg('original');
  const measured = new Map<string, { median_s: number; peak_rss_mib: number }>();
  for (const [name, batch, backend] of set) {
    for (const [mode, prec] of (['train', 'infer'] as const).flatMap((m) => (backend === 'js' ? ['fp32' as const] : precisions).map((p) => [m, p] as const))) {
      // the original, once per config / batch / mode, just before our first row of it
      const key = `${name}/${batch}/${mode}`;
      if (originalRepo && backend === 'native' && !measured.has(key)) {
        const o = original(originalRepo, name, batch, mode, steps);
        measured.set(key, o);
        if (json) console.log(JSON.stringify({ config: name, batch, mode, backend: 'pytorch-original', steps, ...o }));
        else console.log(`${name.padEnd(15)} batch ${String(batch).padStart(2)} ${mode.padEnd(5)} ${'original'.padEnd(11)} ${o.median_s.toFixed(2)} s; peak RSS ${o.peak_rss_mib.toFixed(0)} MiB (PyTorch, measured now)`);
      }
      const m = inChild(name, batch, mode, backend, backend === 'js' ? 1 : steps, backend === 'js' ? 'cpu' : device, prec);
      if (json) {
        console.log(JSON.stringify(m));
        continue;
      }
      const now = measured.get(key);
      const ref = PYTORCH[name];
      const refS = now ? now.median_s : ref?.[mode];
      const refMiB = now ? now.peak_rss_mib : ref?.peakMiB;
      const whose = now ? 'the original\'s' : 'PyTorch\'s (STACK.md)';
      const ratio = refS !== undefined && (now || ref.batch === batch) ? `, ${(m.median_s / refS).toFixed(2)}x ${whose} ${refS.toFixed(2)} s` : '';
      const mem = mode === 'train' && refMiB && (now || ref.batch === batch) ? ` (original ${refMiB.toFixed(0)} MiB)` : '';
      const label = backend === 'js' ? 'js' : `native ${prec}`;
      const b = m.bus_per_step;
      const busText = b ? `; per step ${b.up_mib} MiB up in ${b.uploads} copies, ${b.down_mib} MiB down in ${b.downloads}` : '';
      const hostText = m.host_s !== undefined ? `; ${(m.host_s * 1000).toFixed(0)} ms of it outside the addon (${m.tfjs_kernels_per_step} tfjs kernels)` : '';
      console.log(`${name.padEnd(15)} batch ${String(batch).padStart(2)} ${mode.padEnd(5)} ${label.padEnd(11)} ${m.median_s.toFixed(2)} s${ratio}${hostText}; peak RSS ${m.peak_rss_mib.toFixed(0)} MiB${mem}${busText}`);
    }
  }
}

main().catch((err) => {
  console.error(err instanceof Error ? err.message : err);
  process.exit(1);
});
