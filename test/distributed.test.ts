/**
 * Data-parallel training (lib/train/distributed.ts, launcher.ts, worker.ts, nccl.ts): N ranks
 * with B/N images each take the same steps as one rank with B, the launcher's worker processes
 * included; a dying worker stops the job with a clear message and leaves no process behind; the
 * NCCL loader names the missing library.
 */
import { fork, spawnSync } from 'node:child_process';
import * as net from 'node:net';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { experimentConfig, type ExperimentConfig } from '../lib/config/experiment';
import { withH5File } from '../lib/io/h5';
import { SeededNoise, ShardedNoise } from '../lib/model/noise';
import { nativeStatus } from '../lib/native';
import { initBackend, tf } from '../lib/tf';
import { readCheckpoint, type CheckpointData } from '../lib/train/checkpoint';
import { allgatherUint32, LocalGroup, shardRange, sumInRankOrder, type Communicator } from '../lib/train/distributed';
import { launchRanks } from '../lib/train/launcher';
import { clusterFromEnv } from '../lib/train/rendezvous';
import { train, type TrainOptions } from '../lib/train/loop';
import { ncclStatus, ncclUniqueId, NcclCommunicator } from '../lib/train/nccl';
import { Trainer, type StepResult } from '../lib/train/trainer';
import { EfficientMORL } from '../lib/model/efficient-morl';
import { nativeOpsOn } from '../lib/ops/native';
import { Rng } from '../lib/util/rng';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'emorl-dp-'));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));
const S = 8;
const data = path.join(tmp, 'squares.h5');
const quiet = () => undefined;

/** Coloured squares on black (train 24, test 4), as in train-loop.test.ts. */
async function writeSquares(file: string): Promise<void> {
  const rng = new Rng(5);
  await withH5File(file, 'w', (f) => {
    for (const [split, n] of [['train', 24], ['test', 4]] as const) {
      const imgs = new Uint8Array(n * S * S * 3);
      for (let b = 0; b < n; b++) {
        for (let o = 0; o < 1 + rng.int(2); o++) {
          const size = 2 + rng.int(3);
          const y0 = rng.int(S - size);
          const x0 = rng.int(S - size);
          const colour = [rng.int(2), rng.int(2), 1];
          for (let y = y0; y < y0 + size; y++) for (let x = x0; x < x0 + size; x++) for (let c = 0; c < 3; c++) imgs[((b * S + y) * S + x) * 3 + c] = colour[c] * 230;
        }
      }
      f.write(`${split}/imgs`, imgs, [n, S, S, 3], 'uint8');
    }
  });
}

function tinyConfig(training: Record<string, unknown> = {}, net: Record<string, unknown> = {}): ExperimentConfig {
  return experimentConfig({
    Net: { K: 3, input_size: [3, S, S], z_size: 8, image_decoder: 'small', image_likelihood: 'Gaussian', stochastic_layers: 1, refinement_iters: 1, log_scale: Math.log(0.1), geco_warm_start: 1, ...net },
    training: {
      batch_size: 4,
      lr: 1e-3,
      use_scheduler: false,
      use_geco: true,
      geco_reconstruction_target: -0.5,
      refinement_curriculum: [[-1, 1]],
      checkpoint_freq: 1000,
      tensorboard_freq: 1000,
      log_freq: 1,
      ari_freq: 0,
      ...training,
    },
    seed: 3,
  });
}

/** Records the result of each collective whose first buffer is large (the gradients). */
function recording(comm: Communicator, into: Float32Array[][]): Communicator {
  return {
    rank: comm.rank,
    worldSize: comm.worldSize,
    close: () => comm.close?.(),
    allreduceSum: async (buffers) => {
      const r = await comm.allreduceSum(buffers);
      if (buffers.length > 2) into.push(r);
      return r;
    },
  };
}

const params = (c: CheckpointData) => [...c.tensors].filter(([k]) => k.startsWith('param/'));

/**
 * Parameters whose gradient is zero in exact arithmetic, so that only float rounding makes it —
 * and Adam normalises any nonzero gradient to a step of about ±lr, whatever its size: there the
 * rounding (of one rank or of two, equally) decides the update. Both enter a softmax over slots
 * that is invariant to a shift shared by all slots: the mask-logit channel (3) of the small
 * decoder's last layer, decode.6 (weight [4,32,3,3]), and the bias of norm_slots (it shifts
 * every slot's query alike). Their values are held to Adam's bound instead.
 */
function degenerate(name: string, i: number, size: number): boolean {
  if (/norm_slots\.bias$/.test(name)) return true;
  if (/image_decoder\.decode\.6\.bias$/.test(name)) return i === 3;
  if (/image_decoder\.decode\.6\.weight$/.test(name)) return i >= (3 * size) / 4;
  return false;
}

/**
 * How far the parameters of two runs over different batch splits may differ after a few Adam steps,
 * relative to each tensor's largest value. Their gradients agree to 1e-5 of the largest gradient
 * (checked directly; about 5e-8 measured), but Adam divides each entry by its own running
 * magnitude: where a gradient is ~1e-4 of the largest, as at the corner taps of the decoder's
 * kernels, the two runs' rounding (the Winograd filter gradient's is a few times the direct sum's)
 * becomes a visible part of a step of ~lr (4e-5 of decode.4's largest weight, measured). A wrong
 * reduction differs by whole steps.
 */
const PARAM_TOL = 1e-4;

/** Parameters of two runs compared per tensor, relative to the tensor's largest magnitude. */
function compareParams(a: CheckpointData, b: CheckpointData): { maxRel: number; degenerateMaxAbs: number; compared: number } {
  let maxRel = 0;
  let degenerateMaxAbs = 0;
  let compared = 0;
  for (const [name, t] of params(a)) {
    const u = b.tensors.get(name);
    expect(u).toBeDefined();
    let scale = 0;
    for (const v of t.data) scale = Math.max(scale, Math.abs(v));
    for (let i = 0; i < t.data.length; i++) {
      const d = Math.abs(t.data[i] - u!.data[i]);
      if (degenerate(name, i, t.data.length)) {
        degenerateMaxAbs = Math.max(degenerateMaxAbs, d);
      } else {
        maxRel = Math.max(maxRel, d / Math.max(scale, 1e-12));
        compared++;
      }
    }
  }
  return { maxRel, degenerateMaxAbs, compared };
}

function relDiff(a: number, b: number): number {
  return Math.abs(a - b) / Math.max(Math.abs(a), Math.abs(b), 1e-12);
}

beforeAll(async () => {
  await initBackend('cpu');
  await writeSquares(data);
});

const STEPS = 3;
const config = tinyConfig();
const base = (outDir: string): TrainOptions => ({ config, dataFile: data, outDir, steps: STEPS, log: quiet, progress: false, handleSignals: false, prefetch: 0 });
let single: { checkpoint: string; steps: StepResult[] } | undefined;

describe('data-parallel training, ranks in one process', () => {
  test('2 ranks with 2 images each take the same steps as 1 rank with 4 (refinement and GECO on)', async () => {
    const steps1: StepResult[] = [];
    const t0 = Date.now();
    const one = await train({ ...base(path.join(tmp, 'one')), callbacks: { onStep: (r) => void steps1.push(r) } });
    const t1 = Date.now();
    // The first step's reduced gradients: 1 rank through the same (global-mean) path, and 2 ranks.
    const g1: Float32Array[][] = [];
    await train({ ...base(path.join(tmp, 'one-comm')), steps: 1, distributed: { comm: recording(LocalGroup.create(1)[0], g1) } });
    const g2: Float32Array[][] = [];
    const steps2: StepResult[] = [];
    const t2 = Date.now();
    const two = await Promise.all(
      LocalGroup.create(2).map((comm) =>
        train({
          ...base(path.join(tmp, 'two')),
          distributed: { comm: recording(comm, comm.rank === 0 ? g2 : []), checksumEvery: 1 },
          callbacks: comm.rank === 0 ? { onStep: (r) => void steps2.push(r) } : undefined,
        }),
      ),
    );
    const t3 = Date.now();
    single = { checkpoint: one.lastCheckpoint!, steps: steps1 };

    // Gradients of step 0, per tensor, relative to the largest gradient of the model.
    let gmax = 0;
    for (const g of g1[0].slice(0, -1)) for (const v of g) gmax = Math.max(gmax, Math.abs(v));
    let gradRel = 0;
    g1[0].slice(0, -1).forEach((g, i) => g.forEach((v, j) => (gradRel = Math.max(gradRel, Math.abs(v - g2[0][i][j]) / gmax))));
    expect(gradRel).toBeLessThan(1e-5);

    // Every step's reported values are the global batch's.
    expect(steps2.map((s) => s.step)).toEqual([0, 1, 2]);
    let scalarRel = 0;
    steps1.forEach((s, i) => {
      const t = steps2[i];
      for (const k of ['totalLoss', 'nll', 'kl', 'gradNorm', 'gecoBeta', 'gecoCEma'] as const) scalarRel = Math.max(scalarRel, relDiff(s[k], t[k]));
      s.deltas.forEach((d, j) => (scalarRel = Math.max(scalarRel, relDiff(d, t.deltas[j]))));
      expect(t.refinementIters).toBe(s.refinementIters);
    });
    expect(scalarRel).toBeLessThan(1e-5);
    expect(steps1[2].gecoCEma).not.toBe(0); // GECO took over

    // Parameters after the steps; rank 0 wrote the only checkpoint, in the single-rank format.
    expect(two[1].lastCheckpoint).toBe(two[0].lastCheckpoint);
    const a = readCheckpoint(one.lastCheckpoint!);
    const b = readCheckpoint(two[0].lastCheckpoint!);
    expect([...b.tensors.keys()].sort()).toEqual([...a.tensors.keys()].sort());
    const cmp = compareParams(a, b);
    expect(cmp.maxRel).toBeLessThan(PARAM_TOL);
    expect(cmp.degenerateMaxAbs).toBeLessThan(2 * STEPS * config.training.lr);
    expect(b.meta.iterator).toEqual(a.meta.iterator);
    expect(b.meta.noiseRng).toEqual(a.meta.noiseRng);

    // The data-parallel checkpoint resumes a data-parallel run (rank 0 wrote it; every rank reads it).
    const resumed = await Promise.all(
      LocalGroup.create(2).map((comm) => train({ ...base(path.join(tmp, 'two')), steps: STEPS + 1, resume: true, distributed: { comm } })),
    );
    expect(resumed.map((r) => r.step)).toEqual([STEPS + 1, STEPS + 1]);
    expect(readCheckpoint(resumed[0].lastCheckpoint!).meta.trainer).toMatchObject({ step: STEPS + 1 });
    process.stdout.write(
      `data parallel, 1 vs 2 ranks in one process: gradients max rel ${gradRel.toExponential(2)}, scalars ${scalarRel.toExponential(2)}, ` +
        `parameters ${cmp.maxRel.toExponential(2)} (${cmp.compared} values), zero-gradient parameters max abs ${cmp.degenerateMaxAbs.toExponential(2)}; ` +
        `${t1 - t0} ms vs ${t3 - t2} ms\n`,
    );
  }, 120000);

  test('Slot Attention: 2 ranks equal 1 rank', async () => {
    // lr 1e-4: Adam moves these small decoder weights by ~lr per step, whatever the gradient's size.
    const sa = tinyConfig({ model: 'SlotAttention', use_geco: false, clip_grad_norm: false, lr: 1e-4 });
    const opts = (out: string): TrainOptions => ({ ...base(path.join(tmp, out)), config: sa, steps: 2 });
    const one = await train(opts('sa1'));
    const two = await Promise.all(LocalGroup.create(2).map((comm) => train({ ...opts('sa2'), distributed: { comm } })));
    const cmp = compareParams(readCheckpoint(one.lastCheckpoint!), readCheckpoint(two[0].lastCheckpoint!));
    expect(cmp.maxRel).toBeLessThan(1e-5);
    expect(relDiff(one.last!.totalLoss, two[0].last!.totalLoss)).toBeLessThan(1e-5);
  }, 60000);

  test('a batch that does not split evenly, and ranks that disagree, are errors', async () => {
    expect(() => shardRange(4, 0, 3)).toThrow(/training\.batch_size 4 is not divisible by the 3 ranks/);
    const three = LocalGroup.create(3);
    const results = await Promise.allSettled(three.map((comm) => train({ ...base(path.join(tmp, 'odd')), distributed: { comm } })));
    for (const r of results) {
      expect(r.status).toBe('rejected');
      expect((r as PromiseRejectedResult).reason.message).toMatch(/training\.batch_size 4 is not divisible by the 3 ranks/);
    }
    expect(() => sumInRankOrder([new Float32Array(2), new Float32Array(3)])).toThrow(/rank 1 contributed 3 values, rank 0 2/);
    // Checksums travel through the sum allreduce exactly.
    const [c0, c1] = LocalGroup.create(2);
    const sums = await Promise.all([allgatherUint32(c0, 0xdeadbeef), allgatherUint32(c1, 0x0000ffff)]);
    expect(sums[0]).toEqual([0xdeadbeef, 0x0000ffff]);
    expect(sums[1]).toEqual(sums[0]);
    // Ranks that do not hold the same parameters are caught by the checksum compare.
    const init = new Trainer(config);
    const p0 = init.parameters();
    init.dispose();
    const p1 = { ...p0, 'hvae_networks.init_posterior': { ...p0['hvae_networks.init_posterior'], data: p0['hvae_networks.init_posterior'].data.map((v, i) => (i === 0 ? v + 1e-3 : v)) } };
    const diverged = await Promise.allSettled(
      LocalGroup.create(2).map((comm) => train({ ...base(path.join(tmp, 'diverged')), initialParams: comm.rank === 0 ? p0 : p1, distributed: { comm } })),
    );
    for (const r of diverged) expect((r as PromiseRejectedResult).reason.message).toMatch(/ranks diverged at step 0: parameter checksums rank 0 [0-9a-f]{8}, rank 1 [0-9a-f]{8}/);
    // A rank that leaves fails the others' collectives instead of leaving them waiting.
    const [d0, d1] = LocalGroup.create(2);
    const waiting = d0.allreduceSum([new Float32Array(1)]);
    d1.close!();
    await expect(waiting).rejects.toThrow(/rank 1 left the group/);
  });

  test("ShardedNoise gives each rank its rows of the single-rank draw", () => {
    const whole = new SeededNoise(7).normal([6, 4]);
    const parts = [0, 1, 2].map((r) => new ShardedNoise(new SeededNoise(7), r, 3).normal([2, 4]));
    expect(Array.from(tf.concat(parts).dataSync())).toEqual(Array.from(whole.dataSync()));
    expect(() => new ShardedNoise(new SeededNoise(1), 2, 2)).toThrow(/rank must be an integer in \[0, 2\)/);
  });
});

/**
 * The launcher forks worker processes; from the TypeScript sources they need a loader, which this
 * writes: `typescript.transpileModule` behind require('.ts') (what ts-jest does for the tests),
 * with the output cached on disk, filled once here so that every worker starts fast.
 */
const hook = path.join(tmp, 'ts-hook.js');
fs.writeFileSync(
  hook,
  `const fs = require('fs');
const path = require('path');
const cacheDir = ${JSON.stringify(path.join(tmp, 'ts-cache'))};
let ts;
function compiled(filename) {
  const st = fs.statSync(filename);
  const cached = path.join(cacheDir, filename.replace(/[^A-Za-z0-9]/g, '_') + '-' + st.mtimeMs + '-' + st.size + '.js');
  if (fs.existsSync(cached)) return fs.readFileSync(cached, 'utf8');
  ts ??= require(${JSON.stringify(require.resolve('typescript'))});
  const out = ts.transpileModule(fs.readFileSync(filename, 'utf8'), { fileName: filename, compilerOptions: {
    module: ts.ModuleKind.Node16, moduleResolution: ts.ModuleResolutionKind.Node16, target: ts.ScriptTarget.ES2022, esModuleInterop: true, isolatedModules: true } }).outputText;
  fs.mkdirSync(cacheDir, { recursive: true });
  const part = cached + '.' + process.pid;
  fs.writeFileSync(part, out);
  fs.renameSync(part, cached);
  return out;
}
exports.compiled = compiled;
if (process.env.EMORL_TEST_TS_HOOK === '1') {
  require.extensions['.ts'] = function (module, filename) { module._compile(compiled(filename), filename); };
}
`,
);
const execArgv = ['--require', hook];
const hookEnv = { EMORL_TEST_TS_HOOK: '1' };
const workerTs = path.join(__dirname, '..', 'lib', 'train', 'worker.ts');
beforeAll(() => {
  const { compiled } = require(hook) as { compiled: (f: string) => string };
  const walk = (dir: string): string[] => fs.readdirSync(dir, { withFileTypes: true }).flatMap((e) => (e.isDirectory() ? walk(path.join(dir, e.name)) : e.name.endsWith('.ts') ? [path.join(dir, e.name)] : []));
  for (const f of walk(path.join(__dirname, '..', 'lib'))) compiled(f);
});

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

describe('data-parallel training, worker processes', () => {
  test('2 worker processes (CPU allreduce through the launcher) equal 1 rank; rank 0 alone writes outputs', async () => {
    const out = path.join(tmp, 'proc2');
    const pids: number[] = [];
    const t0 = Date.now();
    const summary = await launchRanks({
      worldSize: 2,
      job: { config, dataFile: data, outDir: out, steps: STEPS, prefetch: 0, checksumEvery: 1 },
      entry: workerTs,
      execArgv,
      env: hookEnv,
      handleSignals: false,
      onWorker: (_, pid) => void pids.push(pid),
    });
    const ms = Date.now() - t0;
    expect(summary.step).toBe(STEPS);
    expect(summary.stoppedBy).toBe('done');
    expect(pids.every((p) => !alive(p))).toBe(true);
    const one = single ?? { checkpoint: (await train(base(path.join(tmp, 'one-again')))).lastCheckpoint!, steps: [] };
    const cmp = compareParams(readCheckpoint(one.checkpoint), readCheckpoint(summary.lastCheckpoint!));
    expect(cmp.maxRel).toBeLessThan(PARAM_TOL);
    expect(fs.readdirSync(path.join(out, 'checkpoints'))).toEqual(['checkpoint-00000003.emorl']);
    const lines = fs.readFileSync(path.join(out, 'log.jsonl'), 'utf8').trim().split('\n').map((l) => JSON.parse(l));
    expect(lines.map((l) => l.step)).toEqual([0, 1, 2]); // one line per step: rank 0 only
    if (single) lines.forEach((l, i) => expect(relDiff(l.total_loss, single!.steps[i].totalLoss)).toBeLessThan(1e-5));
    process.stdout.write(`data parallel, 2 worker processes: parameters max rel ${cmp.maxRel.toExponential(2)} vs 1 rank; ${ms} ms with start-up\n`);
  }, 120000);

  (nativeStatus().available && nativeStatus().info?.simtEmulator ? test : test.skip)('the job\'s device reaches every worker: 2 ranks with the GPU kernels on the emulator take the CPU ranks\' steps', async () => {
    const run = (device: string, out: string) =>
      launchRanks({ worldSize: 2, job: { config, dataFile: data, outDir: path.join(tmp, out), steps: 2, prefetch: 0, backend: 'native', device }, entry: workerTs, execArgv, env: hookEnv, handleSignals: false });
    const gpu = await run('simt', 'simt2');
    const cpu = await run('cpu', 'cpu2');
    const cmp = compareParams(readCheckpoint(cpu.lastCheckpoint!), readCheckpoint(gpu.lastCheckpoint!));
    expect(cmp.maxRel).toBeLessThan(1e-4);
    expect(gpu.last!.totalLoss).toBeCloseTo(cpu.last!.totalLoss, 3);
    // and it is the job's device the workers use: one they cannot have is their error (every rank
    // meets it; whichever exits first is reported)
    if (!nativeStatus().info!.cudaBuilt) await expect(run('cuda:0', 'nocuda')).rejects.toThrow(/rank [01] failed: device cuda:0: the addon was built without CUDA/);
  }, 120000);

  (nativeStatus().available && nativeStatus().info?.bf16 ? test : test.skip)('the job\'s precision reaches every worker: 2 bf16 ranks train near, not equal to, 2 fp32 ranks', async () => {
    const run = (precision: string, out: string) =>
      launchRanks({ worldSize: 2, job: { config, dataFile: data, outDir: path.join(tmp, out), steps: 2, prefetch: 0, backend: 'native', precision }, entry: workerTs, execArgv, env: hookEnv, handleSignals: false });
    const bf16 = await run('bf16', 'bf16x2');
    const fp32 = await run('fp32', 'fp32x2');
    const cmp = compareParams(readCheckpoint(fp32.lastCheckpoint!), readCheckpoint(bf16.lastCheckpoint!));
    expect(cmp.maxRel).toBeGreaterThan(1e-5);
    expect(relDiff(bf16.last!.totalLoss, fp32.last!.totalLoss)).toBeLessThan(1e-2);
    await expect(run('half', 'half')).rejects.toThrow(/rank [01] failed: unknown precision "half" \(use fp32 or bf16\)/);
  }, 120000);

  test('a killed worker ends the job with a message naming it; no process is left behind', async () => {
    const pids: number[] = [];
    let killed = false;
    const t0 = Date.now();
    const run = launchRanks({
      worldSize: 2,
      job: { config, dataFile: data, outDir: path.join(tmp, 'killed'), steps: 100000, prefetch: 0 },
      entry: workerTs,
      execArgv,
      env: hookEnv,
      handleSignals: false,
      onWorker: (_, pid) => void pids.push(pid),
      onStep: (step) => {
        if (step >= 1 && !killed) {
          killed = true;
          process.kill(pids[1], 'SIGKILL');
        }
      },
    });
    await expect(run).rejects.toThrow(new RegExp(`rank 1 \\(pid ${pids[1] ?? '\\d+'}\\) was killed by signal SIGKILL; stopped the other ranks; no checkpoint was written yet`));
    expect(killed).toBe(true);
    expect(Date.now() - t0).toBeLessThan(60000);
    expect(pids).toHaveLength(2);
    expect(pids.filter(alive)).toEqual([]);
  }, 90000);

  test('an error every rank reaches together (non-finite steps) is reported once, by rank 0, after its checkpoint', async () => {
    const broken = tinyConfig({ max_nonfinite_steps: 1 }, { log_scale: -100 });
    const out = path.join(tmp, 'nan');
    await expect(
      launchRanks({ worldSize: 2, job: { config: broken, dataFile: data, outDir: out, steps: 5, prefetch: 0 }, entry: workerTs, execArgv, env: hookEnv, handleSignals: false }),
    ).rejects.toThrow(/^rank 0 failed: stopped: 1 consecutive steps had non-finite losses .* the last good state is in .*checkpoint-00000001\.emorl; stopped the other ranks; resume with --resume/);
    expect(fs.readdirSync(path.join(out, 'checkpoints'))).toEqual(['checkpoint-00000001.emorl']);
  }, 60000);

  test('a worker exits by itself when the launcher goes away', async () => {
    const child = fork(workerTs, [], { execArgv, env: { ...process.env, ...hookEnv }, stdio: ['ignore', 'ignore', 'pipe', 'ipc'], serialization: 'advanced' });
    let stderr = '';
    child.stderr!.on('data', (d) => (stderr += d));
    try {
      await new Promise<void>((resolve, reject) => {
        child.once('message', () => resolve());
        child.once('exit', () => reject(new Error(`worker exited early: ${stderr}`)));
      });
      const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
      child.disconnect();
      expect(await exited).toBe(1);
      expect(stderr).toMatch(/the launcher is gone \(IPC channel closed\); exiting/);
    } finally {
      child.kill('SIGKILL');
    }
  }, 60000);
});

/** A TCP port nobody listens on right now. */
function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const port = (srv.address() as net.AddressInfo).port;
      srv.close(() => resolve(port));
    });
  });
}

describe('several nodes: launchers meeting over TCP (two on this host)', () => {
  const job = (out: string, steps = STEPS) => ({ config, dataFile: data, outDir: out, steps, prefetch: 0, checksumEvery: 1 });
  const common = { worldSize: 2, localRanks: 1, entry: workerTs, execArgv, env: hookEnv, handleSignals: false };

  test('a master and a node with one rank each take the steps one rank takes', async () => {
    const port = await freePort();
    const out = path.join(tmp, 'nodes2');
    const pids: number[] = [];
    const [m, n] = await Promise.all([
      launchRanks({ ...common, job: job(out), cluster: { firstRank: 0, masterAddr: '127.0.0.1', masterPort: port }, onWorker: (_, pid) => void pids.push(pid) }),
      launchRanks({ ...common, job: job(out), cluster: { firstRank: 1, masterAddr: '127.0.0.1', masterPort: port }, onWorker: (_, pid) => void pids.push(pid) }),
    ]);
    expect(m.step).toBe(STEPS);
    expect(n).toEqual(m); // the node reports rank 0's summary
    expect(pids.filter(alive)).toEqual([]);
    const one = single ?? { checkpoint: (await train(base(path.join(tmp, 'one-nodes')))).lastCheckpoint!, steps: [] };
    const cmp = compareParams(readCheckpoint(one.checkpoint), readCheckpoint(m.lastCheckpoint!));
    expect(cmp.maxRel).toBeLessThan(PARAM_TOL);
    expect(fs.readdirSync(path.join(out, 'checkpoints'))).toEqual(['checkpoint-00000003.emorl']);
  }, 120000);

  test("a worker killed on the node stops both nodes, each naming rank 1; no process is left", async () => {
    const port = await freePort();
    const out = path.join(tmp, 'nodes-killed');
    const pids = new Map<number, number>();
    let killed = false;
    const onWorker = (rank: number, pid: number) => void pids.set(rank, pid);
    const master = launchRanks({
      ...common, job: job(out, 100000), cluster: { firstRank: 0, masterAddr: '127.0.0.1', masterPort: port }, onWorker,
      onStep: (step) => {
        if (step >= 1 && !killed) {
          killed = true;
          process.kill(pids.get(1)!, 'SIGKILL');
        }
      },
    });
    const node = launchRanks({ ...common, job: job(out, 100000), cluster: { firstRank: 1, masterAddr: '127.0.0.1', masterPort: port }, onWorker });
    const [rm, rn] = await Promise.allSettled([master, node]);
    expect(killed).toBe(true);
    expect(rm.status).toBe('rejected');
    expect(rn.status).toBe('rejected');
    expect(String((rm as PromiseRejectedResult).reason)).toMatch(/the node with ranks 1\.\.1: rank 1 \(pid \d+\) was killed by signal SIGKILL; stopped the other ranks/);
    expect(String((rn as PromiseRejectedResult).reason)).toMatch(/rank 1 \(pid \d+\) was killed by signal SIGKILL; stopped this node's ranks \(1\.\.1\) and told the master/);
    expect([...pids.values()].filter(alive)).toEqual([]);
  }, 120000);

  test('a node whose master never listens gives up after the timeout, naming the address', async () => {
    const port = await freePort();
    const pids: number[] = [];
    await expect(
      launchRanks({ ...common, job: job(path.join(tmp, 'nomaster')), cluster: { firstRank: 1, masterAddr: '127.0.0.1', masterPort: port, joinTimeoutMs: 1000 }, onWorker: (_, pid) => void pids.push(pid) }),
    ).rejects.toThrow(new RegExp(`could not reach the master at 127\\.0\\.0\\.1:${port} within 1 s`));
    expect(pids.filter(alive)).toEqual([]);
  }, 60000);

  test('a master whose nodes never come names the missing ranks; a node that does not fit is refused', async () => {
    const port = await freePort();
    await expect(
      launchRanks({ ...common, worldSize: 4, job: job(path.join(tmp, 'nonode')), cluster: { firstRank: 0, masterAddr: '127.0.0.1', masterPort: port, joinTimeoutMs: 1500 } }),
    ).rejects.toThrow(/ranks 1\.\.3 never joined: no node brought them to port \d+ within 2 s/);
    const port2 = await freePort();
    const [rm, rn] = await Promise.allSettled([
      launchRanks({ ...common, job: job(path.join(tmp, 'misfit')), cluster: { firstRank: 0, masterAddr: '127.0.0.1', masterPort: port2, joinTimeoutMs: 20000 } }),
      // (a world of 4 splits the batch of 4, so only the mismatch can stop this node)
      launchRanks({ ...common, worldSize: 4, job: job(path.join(tmp, 'misfit')), cluster: { firstRank: 2, masterAddr: '127.0.0.1', masterPort: port2, joinTimeoutMs: 20000 } }),
    ]);
    expect(String((rm as PromiseRejectedResult).reason)).toMatch(/says the world has 4 ranks, the master 2/);
    expect(String((rn as PromiseRejectedResult).reason)).toMatch(/the master refused this node: .*says the world has 4 ranks, the master 2/);
  }, 90000);

  test('clusterFromEnv: the variables, and errors naming the one at fault', () => {
    expect(clusterFromEnv({}, 2)).toBeNull();
    expect(clusterFromEnv({ EMORL_WORLD_SIZE: '8', EMORL_RANK: '4', EMORL_MASTER_ADDR: 'node0', EMORL_MASTER_PORT: '29500' }, 4)).toEqual({
      worldSize: 8, cluster: { firstRank: 4, masterAddr: 'node0', masterPort: 29500, joinTimeoutMs: undefined },
    });
    expect(() => clusterFromEnv({ EMORL_WORLD_SIZE: '8', EMORL_MASTER_ADDR: 'a', EMORL_MASTER_PORT: '1' }, 4)).toThrow(/EMORL_RANK is not set/);
    expect(() => clusterFromEnv({ EMORL_WORLD_SIZE: '8', EMORL_RANK: '6', EMORL_MASTER_ADDR: 'a', EMORL_MASTER_PORT: '1' }, 4)).toThrow(/EMORL_RANK=6 with 4 ranks on this node does not fit EMORL_WORLD_SIZE=8/);
    expect(() => clusterFromEnv({ EMORL_WORLD_SIZE: '8', EMORL_RANK: '0', EMORL_MASTER_PORT: '1' }, 4)).toThrow(/EMORL_MASTER_ADDR is not set/);
    expect(() => clusterFromEnv({ EMORL_WORLD_SIZE: '8', EMORL_RANK: '0', EMORL_MASTER_ADDR: 'a', EMORL_MASTER_PORT: 'x' }, 4)).toThrow(/EMORL_MASTER_PORT="x" is not an integer/);
  });
});

describe('NCCL loader', () => {
  const addonBuilt = nativeStatus().available;
  const maybe = addonBuilt ? test : test.skip;

  maybe('without libnccl.so.2 it reports a clear error naming the library', () => {
    if (fs.existsSync('/usr/lib/x86_64-linux-gnu/libnccl.so.2')) return; // a machine with NCCL: nothing to check
    const s = ncclStatus();
    expect(s.available).toBe(false);
    expect(s.error).toMatch(/cannot load libnccl\.so\.2 .*install NCCL 2/);
    expect(() => ncclUniqueId()).toThrow(/emorl\.ncclGetUniqueId: cannot load libnccl\.so\.2/);
    expect(() => new NcclCommunicator(new Uint8Array(128), 0, 2)).toThrow(/emorl\.NcclComm: cannot load libnccl\.so\.2/);
    expect(ncclStatus('/nonexistent/libnccl.so.2').error).toMatch(/cannot load \/nonexistent\/libnccl\.so\.2/);
    expect(() => new NcclCommunicator(new Uint8Array(12), 0, 2)).toThrow(/argument 'uniqueId' has 12 bytes, an ncclUniqueId has 128/);
    expect(() => new NcclCommunicator(new Uint8Array(128), 2, 2)).toThrow(/argument 'rank' must be an integer in \[0, 1\], got 2/);
  });

  // A stand-in libnccl (when a C compiler is here): the loader's prototypes, the 128-byte id
  // passed by value, the communicator's lifetime.
  const cc = spawnSync('cc', ['--version']).status === 0;
  (addonBuilt && cc && !nativeStatus().info?.cudaBuilt ? test : test.skip)('a stand-in NCCL library: unique id by value, communicator lifetime', () => {
    const src = path.join(tmp, 'fake-nccl.c');
    const lib = path.join(tmp, 'libfakenccl.so');
    fs.writeFileSync(
      src,
      `#include <string.h>
typedef struct { char internal[128]; } ncclUniqueId;
static int comms;
int ncclGetUniqueId(ncclUniqueId* id) { for (int i = 0; i < 128; i++) id->internal[i] = (char)(i * 7 + 1); return 0; }
int ncclCommInitRank(void** comm, int nranks, ncclUniqueId id, int rank) {
  for (int i = 0; i < 128; i++) if (id.internal[i] != (char)(i * 7 + 1)) return 4; /* ncclInvalidArgument */
  if (nranks != 2 || rank != 1) return 4;
  *comm = &comms; comms++; return 0;
}
int ncclAllReduce(const void* s, void* r, unsigned long n, int t, int op, void* comm, void* stream) { return 5; }
int ncclCommDestroy(void* comm) { comms--; return 0; }
const char* ncclGetErrorString(int r) { return r == 4 ? "invalid argument" : "internal error"; }
int ncclGetVersion(int* v) { *v = 22105; return 0; }
`,
    );
    const built = spawnSync('cc', ['-shared', '-fPIC', '-o', lib, src], { encoding: 'utf8' });
    expect(built.stderr).toBe('');
    expect(ncclStatus(lib)).toEqual({ available: true, library: lib, version: 22105 });
    const id = ncclUniqueId(lib);
    expect(id.length).toBe(128);
    const comm = new NcclCommunicator(id, 1, 2, 0, lib);
    if (nativeStatus().info?.simtEmulator) {
      // NCCL sums device memory of its own device: weights kept on the emulator are refused by name
      const m = new EfficientMORL(config.Net, { ops: nativeOpsOn('simt'), seed: 1 });
      try {
        const [decoder] = m.keepWeightsOnDevice();
        expect(() => comm.allreduceDeviceGradients(decoder)).toThrow(/NCCL on cuda:0 cannot sum the decoder's gradients, which lie on simt/);
      } finally {
        m.dispose();
      }
    }
    comm.close();
    comm.close(); // idempotent
    const other = new Uint8Array(id);
    other[127] ^= 1;
    expect(() => new NcclCommunicator(other, 1, 2, 0, lib)).toThrow(/ncclCommInitRank failed: invalid argument \(ncclResult_t 4\) \(rank 1 of 2, device 0\)/);
  });
});
