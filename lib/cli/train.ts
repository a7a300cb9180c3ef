/** What `emorl-train` does, kept out of bin/ so that it can be tested and reused. */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { parseExperimentConfig, type ExperimentConfig } from '../config/experiment';
import { defaultSplits, generateDataset, type GeneratorName } from '../data/generators';
import { readPth } from '../params/pth';
import type { ParamRecord } from '../params/store';
import { initBackend } from '../tf';
import { latestCheckpoint } from '../train/checkpoint';
import { shardRange } from '../train/distributed';
import { launchRanks } from '../train/launcher';
import { clusterFromEnv } from '../train/rendezvous';
import { train, type TrainSummary } from '../train/loop';
import { checkGpuTraining } from '../train/nccl';
import { opsForBackend } from '../ops/native';
import { nativeStatus } from '../native';

/** The package root (for the bundled configs), from dist/lib/cli or lib/cli. */
export function packageRoot(): string {
  let dir = __dirname;
  while (!fs.existsSync(path.join(dir, 'package.json'))) {
    const parent = path.dirname(dir);
    if (parent === dir) throw new Error('cannot locate the emorl package root');
    dir = parent;
  }
  return dir;
}

export const DEFAULT_CONFIG = path.join('configs', 'train', 'tetrominoes', 'EMORL.json');

/** A config shipped with the package: 'tetrominoes', 'multi_dsprites', 'clevr6-96x96', 'clevr6-128x128'. */
export function bundledConfig(dataset: string, model = 'EMORL'): string {
  const file = path.join(packageRoot(), 'configs', 'train', dataset, `${model}.json`);
  if (!fs.existsSync(file)) {
    const known = fs.readdirSync(path.join(packageRoot(), 'configs', 'train')).join(', ');
    throw new Error(`no bundled config for '${dataset}' (${model}); known: ${known}`);
  }
  return file;
}

/** Where generated datasets are cached: $EMORL_CACHE_DIR, else $XDG_CACHE_HOME/emorl, else ~/.cache/emorl. */
export function cacheDir(): string {
  if (process.env.EMORL_CACHE_DIR) return path.resolve(process.env.EMORL_CACHE_DIR);
  const base = process.env.XDG_CACHE_HOME || path.join(os.homedir(), '.cache');
  return path.join(base, 'emorl');
}

/** The original configs' dataset files that a built-in generator can make. */
const GENERATED: Record<string, GeneratorName> = {
  'tetrominoes.h5': 'tetrominoes',
  'multi_dsprites_colored_on_grayscale.h5': 'multi_dsprites',
};

export interface TrainCliOptions {
  config?: string;
  data?: string;
  out?: string;
  steps?: number;
  batchSize?: number;
  seed?: number;
  set: string[];
  resume?: string | boolean;
  /** Start from the weights of a PyTorch .pth checkpoint of the original code. */
  initFrom?: string;
  progress: boolean;
  prefetch?: number;
  /** Data parallel on CPU: this many worker processes, each with batch_size / ranks images of every batch. */
  ranks?: number;
  /** Data parallel on GPUs: one worker per GPU, gradients summed with NCCL. */
  gpus?: number;
  /** Data parallel: compare the ranks' parameter checksums every this many steps (default 100). */
  checksumEvery?: number;
  /** 'native', 'js' or 'auto' (default) */
  backend?: string;
  /** 'cpu' (default) or 'cuda:N': where the decoding stages, the encoder and the GRU cells run (with --gpus: cuda:<rank>) */
  device?: string;
  /** 'fp32' (default) or 'bf16': the CPU convolutions' products (see ConvPrecision) */
  precision?: string;
}

export function loadConfigFile(file: string, overrides: string[]): ExperimentConfig {
  if (!fs.existsSync(file)) throw new Error(`${file}: no such config file`);
  return parseExperimentConfig(fs.readFileSync(file, 'utf8'), file, overrides);
}

/**
 * The dataset file: --data, else the config's data_path/h5_path if it exists, else (for the
 * synthetic datasets) one generated once into the cache folder.
 */
export async function resolveDataFile(config: ExperimentConfig, data: string | undefined, log: (m: string) => void): Promise<string> {
  if (data) {
    if (!fs.existsSync(data)) throw new Error(`${data}: no such data file`);
    return data;
  }
  const { data_path, h5_path } = config.dataset;
  const configured = h5_path ? path.join(data_path, h5_path) : '';
  if (configured && fs.existsSync(configured)) return configured;
  const generator = GENERATED[h5_path];
  if (!generator) {
    throw new Error(
      `no data: dataset.h5_path ${JSON.stringify(configured)} does not exist; pass --data FILE (the original's processed .h5 file)`,
    );
  }
  const splits = defaultSplits(generator);
  const cached = path.join(cacheDir(), 'datasets', `${generator}-${splits.train}-${splits.test}-seed1.h5`);
  if (!fs.existsSync(cached)) {
    log(`generating the ${generator} dataset once (${splits.train} + ${splits.test} images) into ${cached}`);
    await generateDataset(generator, { out: cached, ...splits, seed: 1 });
  }
  return cached;
}

export async function trainCommand(opts: TrainCliOptions, log: (m: string) => void = (m) => process.stderr.write(`${m}\n`)): Promise<TrainSummary> {
  const overrides = [...opts.set];
  if (opts.batchSize !== undefined) overrides.push(`training.batch_size=${opts.batchSize}`);
  if (opts.seed !== undefined) overrides.push(`seed=${opts.seed}`);
  const configFile = opts.config ?? path.join(packageRoot(), DEFAULT_CONFIG);
  const config = loadConfigFile(configFile, overrides);
  if (opts.ranks !== undefined && opts.gpus !== undefined) throw new Error('--ranks (CPU processes) and --gpus (NCCL) exclude each other');
  const local = opts.gpus ?? opts.ranks ?? 1;
  // several nodes: EMORL_WORLD_SIZE, EMORL_RANK, EMORL_MASTER_ADDR/PORT (rendezvous.ts)
  const multi = clusterFromEnv(process.env, local);
  const world = multi?.worldSize ?? local;
  if (!opts.resume) shardRange(config.training.batch_size, 0, world); // B must split evenly (resumed: the checkpoint's config, checked by the ranks)
  if (opts.gpus !== undefined) checkGpuTraining(opts.gpus);
  if (opts.gpus !== undefined && opts.device !== undefined && opts.device !== 'cpu') throw new Error('--gpus N puts rank r on cuda:r: leave out --device');
  if (opts.device !== undefined || opts.precision !== undefined) opsForBackend(opts.backend ?? 'auto', opts.device, opts.precision); // a clear error before any work
  if (opts.precision === 'bf16' && nativeStatus().info?.bf16 === 'emulated') log('precision bf16: this CPU has no AVX512_BF16; the bf16 kernels are emulated (same results, slower than fp32)');
  const dataFile = await resolveDataFile(config, opts.data, log);
  const stamp = new Date().toISOString().replace(/[:.]/g, '-').slice(0, 19);
  const outDir = opts.out ?? path.join('runs', `${config.training.run_suffix || path.basename(path.dirname(configFile))}-${stamp}`);
  if (opts.resume && !opts.out && typeof opts.resume !== 'string') throw new Error('--resume without a file needs --out (the run folder to resume)');
  if (opts.initFrom && opts.resume) throw new Error('--init-from and --resume exclude each other');
  let initialParams: ParamRecord | undefined;
  if (opts.initFrom && (opts.ranks ?? 1) <= 1 && opts.gpus === undefined) {
    const pth = readPth(opts.initFrom);
    initialParams = Object.fromEntries(pth.params);
    log(`initial weights from ${opts.initFrom} (${pth.params.size} tensors${pth.step !== undefined ? `, saved at step ${pth.step}` : ''})`);
  }
  log(`config ${configFile}\ndata   ${dataFile}\nout    ${path.resolve(outDir)} (checkpoints/, log.jsonl, tb/ for TensorBoard)`);
  if (opts.gpus !== undefined || world > 1) {
    let resume: string | undefined;
    if (typeof opts.resume === 'string') resume = opts.resume;
    else if (opts.resume) {
      resume = latestCheckpoint(path.join(path.resolve(outDir), 'checkpoints'));
      if (!resume) throw new Error(`${path.join(path.resolve(outDir), 'checkpoints')}: no checkpoint to resume from`);
    }
    log(`data parallel: ${world} ${opts.gpus !== undefined ? 'GPU ranks (NCCL)' : 'CPU ranks (worker processes)'}, ${config.training.batch_size / world} images each of every batch of ${config.training.batch_size}` +
      (multi ? `; this node: ranks ${multi.cluster.firstRank}..${multi.cluster.firstRank + local - 1}, master ${multi.cluster.masterAddr}:${multi.cluster.masterPort}` : ''));
    const summary = await launchRanks({
      worldSize: world,
      localRanks: local,
      cluster: multi?.cluster,
      backend: opts.gpus !== undefined ? 'nccl' : 'cpu',
      job: {
        config,
        dataFile: path.resolve(dataFile),
        outDir: path.resolve(outDir),
        steps: opts.steps,
        resume,
        initFrom: opts.initFrom && path.resolve(opts.initFrom),
        progress: opts.progress && Boolean(process.stderr.isTTY),
        prefetch: opts.prefetch,
        checksumEvery: opts.checksumEvery,
        backend: opts.backend,
        device: opts.device,
        precision: opts.precision,
      },
    });
    log(`${summary.stoppedBy === 'signal' ? 'interrupted' : 'done'} at step ${summary.step}; checkpoint ${summary.lastCheckpoint}` + (summary.skippedSteps ? `; ${summary.skippedSteps} steps skipped for non-finite values` : ''));
    return summary;
  }
  await initBackend('cpu');
  const summary = await train({
    config,
    dataFile,
    outDir,
    steps: opts.steps,
    resume: opts.resume,
    initialParams,
    progress: opts.progress && Boolean(process.stderr.isTTY),
    prefetch: opts.prefetch,
    backend: opts.backend,
    device: opts.device,
    precision: opts.precision,
    log,
  });
  log(
    `${summary.stoppedBy === 'signal' ? 'interrupted' : 'done'} at step ${summary.step}; checkpoint ${summary.lastCheckpoint}` +
      (summary.skippedSteps ? `; ${summary.skippedSteps} steps skipped for non-finite values` : ''),
  );
  return summary;
}
