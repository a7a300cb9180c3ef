/**
 * The training loop on a tiny model and tiny generated data: exact resume, non-finite steps,
 * a decreasing loss, signal handling and the CLI's exit codes.
 */
import { spawn, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { initBackend, tf } from '../lib/tf';
import { experimentConfig, type ExperimentConfig } from '../lib/config/experiment';
import { withH5File } from '../lib/io/h5';
import { readCheckpoint } from '../lib/train/checkpoint';
import { loadTrainingCheckpoint, train, TrainingError } from '../lib/train/loop';
import { Trainer } from '../lib/train/trainer';
import { Rng } from '../lib/util/rng';
import { TRAINING_NODE_FLAGS, TRAINING_SHEBANG, hasTrainingNodeFlags } from '../lib/cli/node-flags';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'emorl-loop-'));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));
const S = 8;

/** Images of one or two coloured squares on black, with masks: a dataset a tiny model can learn. */
async function writeSquares(file: string, n: number): Promise<void> {
  const rng = new Rng(5);
  const make = (count: number) => {
    const imgs = new Uint8Array(count * S * S * 3);
    const masks = new Uint8Array(count * 3 * S * S);
    for (let b = 0; b < count; b++) {
      const owner = new Uint8Array(S * S);
      const objects = 1 + rng.int(2);
      for (let o = 1; o <= objects; o++) {
        const size = 2 + rng.int(3);
        const y0 = rng.int(S - size);
        const x0 = rng.int(S - size);
        const colour = [rng.int(2), rng.int(2), 1];
        for (let y = y0; y < y0 + size; y++)
          for (let x = x0; x < x0 + size; x++) {
            owner[y * S + x] = o;
            for (let c = 0; c < 3; c++) imgs[((b * S + y) * S + x) * 3 + c] = colour[c] * 230;
          }
      }
      for (let p = 0; p < S * S; p++) masks[(b * 3 + owner[p]) * S * S + p] = 255;
    }
    return { imgs, masks };
  };
  await withH5File(file, 'w', (f) => {
    for (const [split, count] of [['train', n], ['test', 8]] as const) {
      const { imgs, masks } = make(count);
      f.write(`${split}/imgs`, imgs, [count, S, S, 3], 'uint8');
      f.write(`${split}/masks`, masks, [count, 3, S, S, 1], 'uint8');
    }
  });
}

function tinyConfig(training: Record<string, unknown> = {}): ExperimentConfig {
  return experimentConfig({
    Net: { K: 3, input_size: [3, S, S], z_size: 8, image_decoder: 'small', image_likelihood: 'Gaussian', stochastic_layers: 1, refinement_iters: 1, log_scale: Math.log(0.1), geco_warm_start: 2 },
    training: {
      batch_size: 2,
      lr: 1e-3,
      use_scheduler: false,
      use_geco: false,
      refinement_curriculum: [[-1, 1]],
      checkpoint_freq: 2,
      tensorboard_freq: 3,
      log_freq: 1,
      ari_freq: 3,
      ari_batch_size: 2,
      ...training,
    },
    seed: 3,
  });
}

const data = path.join(tmp, 'squares.h5');
beforeAll(async () => {
  await initBackend('cpu');
  await writeSquares(data, 40);
});

const quiet = () => undefined;

describe('training loop', () => {
  test('a run stopped and resumed equals the uninterrupted run, bit for bit', async () => {
    const config = tinyConfig({ use_geco: true, geco_reconstruction_target: -0.5, use_scheduler: true, warmup: 2 });
    const full = await train({ config, dataFile: data, outDir: path.join(tmp, 'full'), steps: 5, log: quiet, progress: false, handleSignals: false });
    const part = await train({ config, dataFile: data, outDir: path.join(tmp, 'part'), steps: 3, log: quiet, progress: false, handleSignals: false });
    expect(part.step).toBe(3);
    const resumed = await train({ config, dataFile: data, outDir: path.join(tmp, 'part'), steps: 5, resume: true, log: quiet, progress: false, handleSignals: false });
    expect(resumed.step).toBe(5);
    const a = readCheckpoint(full.lastCheckpoint as string);
    const b = readCheckpoint(resumed.lastCheckpoint as string);
    expect([...b.tensors.keys()].sort()).toEqual([...a.tensors.keys()].sort());
    for (const [name, t] of a.tensors) {
      expect(Buffer.from(b.tensors.get(name)!.data.buffer).equals(Buffer.from(t.data.buffer))).toBe(true);
    }
    const meta = loadTrainingCheckpoint(full.lastCheckpoint as string).meta;
    expect(meta.trainer.step).toBe(5);
    expect(loadTrainingCheckpoint(resumed.lastCheckpoint as string).meta.iterator).toEqual(meta.iterator);
    // GECO took over at the warm-start step: its state moved and was saved.
    expect(a.tensors.get('param/geco_C_ema')!.data[0]).not.toBe(0);
    const lines = fs.readFileSync(path.join(tmp, 'full', 'log.jsonl'), 'utf8').trim().split('\n').map((l) => JSON.parse(l));
    expect(lines.map((l) => l.step)).toEqual([0, 1, 2, 3, 4]);
    expect(lines[3].heldout_fg_ari).toBeGreaterThanOrEqual(-1);
    expect(fs.readdirSync(path.join(tmp, 'full', 'tb'))[0]).toMatch(/^events\.out\.tfevents/);
  }, 600000);

  test('the loss decreases on tiny generated data', async () => {
    const losses: number[] = [];
    await train({
      config: tinyConfig({ lr: 3e-3, batch_size: 4 }),
      dataFile: data,
      outDir: path.join(tmp, 'learn'),
      steps: 16,
      log: quiet,
      progress: false,
      handleSignals: false,
      callbacks: { onStep: (r) => void losses.push(r.totalLoss) },
    });
    const mean = (xs: number[]) => xs.reduce((a, b) => a + b, 0) / xs.length;
    expect(mean(losses.slice(-4))).toBeLessThan(0.8 * mean(losses.slice(0, 4)));
  }, 600000);

  test('a batch that makes the loss non-finite is skipped and counted; too many in a row stop the run', async () => {
    const config = tinyConfig();
    const trainer = new Trainer(config);
    try {
      const before = trainer.parameters();
      const bad = tf.fill([2, 3, S, S], 1e30);
      const r = trainer.step(bad);
      r.release();
      bad.dispose();
      expect(r.applied).toBe(false);
      expect(r.skipReason).toMatch(/non-finite/);
      expect(trainer.state).toMatchObject({ step: 1, consecutiveNonFinite: 1, skippedSteps: 1 });
      const after = trainer.parameters();
      for (const k of Object.keys(before)) expect(Array.from(after[k].data)).toEqual(Array.from(before[k].data));
      const good = tf.randomUniform([2, 3, S, S], -1, 1);
      const r2 = trainer.step(good);
      r2.release();
      good.dispose();
      expect(r2.applied).toBe(true);
      expect(trainer.state.consecutiveNonFinite).toBe(0);
    } finally {
      trainer.dispose();
    }
    // log_scale −100 makes every nll infinite: the run stops with a clear error, and its last
    // checkpoint holds the (finite) state from before the bad steps.
    const broken = tinyConfig({ max_nonfinite_steps: 2 });
    broken.Net.log_scale = -100;
    const out = path.join(tmp, 'nan');
    await expect(train({ config: broken, dataFile: data, outDir: out, steps: 5, log: quiet, progress: false, handleSignals: false })).rejects.toThrow(
      /stopped: 2 consecutive steps had non-finite losses or gradients/,
    );
    expect(fs.readdirSync(path.join(out, 'checkpoints'))).toEqual(['checkpoint-00000002.emorl']);
  }, 600000);

  test('Slot Attention trains through the same loop, with its own loss and checkpoints', async () => {
    const config = tinyConfig({ model: 'SlotAttention', clip_grad_norm: false, use_scheduler: true, warmup: 2 });
    const losses: number[] = [];
    const out = path.join(tmp, 'sa');
    const summary = await train({ config, dataFile: data, outDir: out, steps: 4, log: quiet, progress: false, handleSignals: false, callbacks: { onStep: (r) => void losses.push(r.totalLoss) } });
    expect(summary.step).toBe(4);
    expect(losses.every(Number.isFinite)).toBe(true);
    const ckpt = loadTrainingCheckpoint(summary.lastCheckpoint as string);
    expect(Object.keys(ckpt.params)).toContain('init_slots');
    expect(Object.keys(ckpt.params)).not.toContain('geco_beta');
    const lines = fs.readFileSync(path.join(out, 'log.jsonl'), 'utf8').trim().split('\n').map((l) => JSON.parse(l));
    expect(lines[0].refinement_iters).toBe(0);
    expect(lines[3].heldout_fg_ari).toBeGreaterThanOrEqual(-1);
    expect(() => experimentConfig({ training: { model: 'SlotAttention', use_geco: true } })).toThrow(/training\.use_geco: SlotAttention has no KL term/);
  }, 600000);

  test('bad input fails before any work: data that does not fit, unwritable folder, foreign checkpoint', async () => {
    const wrong = tinyConfig();
    wrong.Net.input_size = [3, 16, 16];
    await expect(train({ config: wrong, dataFile: data, outDir: path.join(tmp, 'w'), steps: 1, log: quiet, handleSignals: false })).rejects.toThrow(
      /squares\.h5: 'train\/imgs' gives 3×8×8 images .* but Net\.input_size is \[3, 16, 16\]/,
    );
    await expect(train({ config: tinyConfig(), dataFile: path.join(tmp, 'none.h5'), outDir: path.join(tmp, 'w'), steps: 1, log: quiet, handleSignals: false })).rejects.toThrow(
      /none\.h5: no such file/,
    );
    const blocker = path.join(tmp, 'a-file');
    fs.writeFileSync(blocker, '');
    await expect(train({ config: tinyConfig(), dataFile: data, outDir: path.join(blocker, 'sub'), steps: 1, log: quiet, handleSignals: false })).rejects.toThrow(
      /a-file\/sub: output folder is not writable/,
    );
    const foreign = path.join(tmp, 'foreign.emorl');
    fs.writeFileSync(foreign, 'PK\x03\x04 not ours');
    await expect(train({ config: tinyConfig(), dataFile: data, outDir: path.join(tmp, 'w'), resume: foreign, log: quiet, handleSignals: false })).rejects.toThrow(
      /foreign\.emorl: not an emorl checkpoint/,
    );
    expect(() => loadTrainingCheckpoint(path.join(tmp, 'missing.emorl'))).toThrow(/missing\.emorl: no such checkpoint/);
    expect(TrainingError).toBeDefined();
  });
});

describe('the Node flags training processes start with', () => {
  test("emorl-train's and emorl-eval's #! lines carry them, and this node accepts them", () => {
    for (const bin of ['emorl-train.ts', 'emorl-eval.ts']) {
      const first = fs.readFileSync(path.join(__dirname, '..', 'bin', bin), 'utf8').split('\n')[0];
      expect(`${bin}: ${first}`).toBe(`${bin}: ${TRAINING_SHEBANG}`);
    }
    const r = spawnSync(process.execPath, [...TRAINING_NODE_FLAGS, '-e', 'process.stdout.write(JSON.stringify(process.execArgv))'], { encoding: 'utf8' });
    expect(r.stderr).toBe('');
    expect(r.status).toBe(0);
    expect(hasTrainingNodeFlags(JSON.parse(r.stdout) as string[])).toBe(true);
    expect(hasTrainingNodeFlags([])).toBe(false);
  });
});

describe('emorl-train CLI', () => {
  const cli = path.join(__dirname, '..', 'dist', 'bin', 'emorl-train.js');
  const built = fs.existsSync(cli);
  const maybe = built ? test : test.skip;
  if (!built) test.skip('emorl-train CLI tests need `npm run build` (dist/bin/emorl-train.js is missing)', () => undefined);
  const configFile = path.join(tmp, 'tiny.json');
  beforeAll(() => {
    const c = tinyConfig({ checkpoint_freq: 1000 });
    fs.writeFileSync(configFile, JSON.stringify({ Net: c.Net, training: { ...c.training }, seed: c.seed }));
  });

  maybe('bad arguments: exit code 1 and a message naming the problem', () => {
    const run = (...args: string[]) => spawnSync(process.execPath, [cli, ...args], { encoding: 'utf8' });
    let r = run('--steps', '-2');
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/--steps must be an integer >= 0/);
    r = run('--config', path.join(tmp, 'nope.json'));
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/nope\.json: no such config file/);
    r = run('--config', configFile, '--data', data, '--set', 'training.lrr=1', '--out', path.join(tmp, 'cli-bad'));
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/tiny\.json: training\.lrr: unknown key/);
    r = run('--bogus');
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/unknown option '--bogus'/);
  });

  maybe('SIGINT finishes the step, writes a valid checkpoint and exits 130', async () => {
    const out = path.join(tmp, 'cli-sigint');
    const child = spawn(process.execPath, [cli, '--config', configFile, '--data', data, '--out', out, '--steps', '100000', '--no-progress'], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stderr = '';
    child.stderr.on('data', (d) => (stderr += d));
    // Wait until training runs (the log has a line), then interrupt.
    const logFile = path.join(out, 'log.jsonl');
    for (let i = 0; i < 600 && !(fs.existsSync(logFile) && fs.readFileSync(logFile, 'utf8').length > 0); i++) {
      await new Promise((r) => setTimeout(r, 100));
    }
    const exited = new Promise<number | null>((resolve) => child.on('exit', (c) => resolve(c)));
    let code: number | null;
    try {
      child.kill('SIGINT');
      code = await exited;
    } finally {
      child.kill('SIGKILL');
    }
    expect(stderr).toMatch(/SIGINT: finishing the current step/);
    expect(code).toBe(130);
    const files = fs.readdirSync(path.join(out, 'checkpoints'));
    expect(files).toHaveLength(1);
    const ckpt = loadTrainingCheckpoint(path.join(out, 'checkpoints', files[0]));
    expect(ckpt.meta.trainer.step).toBeGreaterThan(0);
  }, 600000);
});
