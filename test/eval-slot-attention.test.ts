/**
 * emorl-eval on Slot Attention checkpoints (test.model 'SlotAttention'): ARI_MSE_KL without KL,
 * the disentanglement evaluations on the slots, dci, sample_viz, the .pth round trip of an SA
 * checkpoint (its top-level names, which eval.py's rename_state would move), the bundled
 * SlotAttention test configs, and the error when the test config's model is not the checkpoint's.
 * A tiny model (12×12 images, K = 3, z = 8) trained one step.
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { initBackend, tf } from '../lib/tf';
import { experimentConfig } from '../lib/config/experiment';
import { H5ImageDataset } from '../lib/data/dataset';
import { withH5File } from '../lib/io/h5';
import { train } from '../lib/train/loop';
import { exportCommand } from '../lib/cli/export';
import { loadModel, ModelKindError } from '../lib/load';
import { EfficientMORL } from '../lib/model/efficient-morl';
import { SlotAttention } from '../lib/model/slot-attention';
import { mapStateDictName, readPth, writePth, type PthTensor } from '../lib/params/pth';
import { loadTestConfigFile } from '../lib/eval/config';
import { ariMse } from '../lib/eval/metrics';
import { runEval, EvalError } from '../lib/eval/run';
import { Rng } from '../lib/util/rng';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'emorl-eval-sa-'));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));
const quiet = () => undefined;
const S = 12;
const K = 3;
const Z = 8;
const NET = { K, input_size: [3, S, S], z_size: Z, image_decoder: 'small' };
const SEED = 1;

/** Two halves (left / right of a random column) per image, entity 0 empty; factors: column, red, side, visibility. */
async function writeHalves(file: string, n: number): Promise<void> {
  const rng = new Rng(5);
  const P = S * S;
  await withH5File(file, 'w', (f) => {
    for (const split of ['train', 'test']) {
      const imgs = new Uint8Array(n * P * 3);
      const masks = new Uint8Array(n * 3 * P);
      const factors = new Float32Array(n * 3 * 4);
      for (let b = 0; b < n; b++) {
        const c = 5 + rng.int(3);
        const red = [rng.int(2), rng.int(2)];
        for (let y = 0; y < S; y++)
          for (let x = 0; x < S; x++) {
            const o = x < c ? 1 : 2;
            masks[(b * 3 + o) * P + y * S + x] = 255;
            imgs[(b * P + y * S + x) * 3] = red[o - 1] ? 220 : 30;
            imgs[(b * P + y * S + x) * 3 + 1] = o === 1 ? 200 : 60;
          }
        factors.set([c, red[0], 0, 1], (b * 3 + 1) * 4);
        factors.set([c, red[1], 1, 1], (b * 3 + 2) * 4);
      }
      f.write(`${split}/imgs`, imgs, [n, S, S, 3], 'uint8');
      f.write(`${split}/masks`, masks, [n, 3, S, S, 1], 'uint8');
      f.write(`${split}/factors`, factors, [n, 3, 4], 'float32');
    }
  });
}

function testConfigJson(test: Record<string, unknown> = {}, net: Record<string, unknown> = NET): string {
  return JSON.stringify({
    Net: net,
    dataset: { data_path: '', h5_path: 'halves.h5', masks: true },
    seed: SEED,
    test: { batch_size: 2, output_size: [3, S, S], num_images_to_process: 5, eval_type: 'ARI_MSE_KL', mode: 'test', model: 'SlotAttention', ...test },
  });
}

const data = path.join(tmp, 'halves.h5');
const configFile = path.join(tmp, 'sa.json');
let checkpoint = '';

beforeAll(async () => {
  await initBackend('cpu');
  await writeHalves(data, 6);
  fs.writeFileSync(configFile, testConfigJson());
  const config = experimentConfig({
    Net: NET,
    training: { model: 'SlotAttention', batch_size: 2, lr: 1e-3, use_scheduler: false, use_geco: false, clip_grad_norm: false, checkpoint_freq: 1, tensorboard_freq: 100, log_freq: 1, ari_freq: 0 },
    seed: 3,
  });
  const summary = await train({ config, dataFile: data, outDir: path.join(tmp, 'run'), steps: 1, log: quiet, progress: false, handleSignals: false });
  checkpoint = summary.lastCheckpoint as string;
}, 120000);

/** What the evaluation should see: model.infer on batches of 2 of the first n test images, in order, on a freshly loaded model. */
async function directPasses(n: number, f: (out: { masks: Float32Array; recons: Float32Array; slots: Float32Array; attn: Float32Array }, images: Float32Array, trueMasks: Uint8Array, B: number) => void): Promise<void> {
  const loaded = loadModel(checkpoint, undefined, { seed: SEED });
  expect(loaded.kind).toBe('SlotAttention');
  const model = loaded.model as SlotAttention;
  const ds = await H5ImageDataset.open(data, { split: 'test', masks: true });
  try {
    for (let start = 0; start < n; start += 2) {
      const B = Math.min(2, n - start);
      const batch = await ds.readBatch(Array.from({ length: B }, (_, i) => start + i));
      const x = tf.tensor4d(batch.images, [B, 3, S, S]);
      const r = model.infer(x);
      const o = r.outputs;
      f(
        {
          masks: (o.masks.dataSync() as Float32Array).map(Math.exp),
          recons: Float32Array.from(o.recons.dataSync() as Float32Array),
          slots: Float32Array.from(o.slots.dataSync() as Float32Array),
          attn: Float32Array.from(o.attn[o.attn.length - 1].dataSync() as Float32Array),
        },
        batch.images.map((v) => (v + 1) / 2),
        batch.masks!,
        B,
      );
      r.dispose();
      x.dispose();
    }
  } finally {
    ds.close();
    model.dispose();
  }
}

describe('Slot Attention test configs', () => {
  test('the bundled SlotAttention*.json configs parse (test.model SlotAttention, Net valid)', () => {
    const root = path.join(__dirname, '..', 'configs', 'test');
    const files = [
      'tetrominoes/ARI_MSE_KL/SlotAttention.json',
      'multi_dsprites/ARI_MSE_KL/SlotAttention.json',
      'clevr6-96x96/ARI_MSE_KL/SlotAttention.json',
      'clevr6-96x96/disentanglement/SlotAttention_activeness.json',
      'clevr6-96x96/disentanglement/SlotAttention_dci.json',
      'clevr6-96x96/disentanglement/SlotAttention_preprocessing.json',
      'clevr6-96x96/disentanglement/SlotAttention_viz.json',
    ];
    for (const f of files) {
      const c = loadTestConfigFile(path.join(root, f));
      expect(c.test.model).toBe('SlotAttention');
    }
    const clevr = loadTestConfigFile(path.join(root, 'clevr6-96x96/disentanglement/SlotAttention_dci.json'));
    expect(clevr.Net).toMatchObject({ K: 7, z_size: 64, image_decoder: 'big', input_size: [3, 96, 96] });
    expect(clevr.test.eval_type).toBe('dci_clevr');
    expect(() => loadTestConfigFile(path.join(tmp, 'nope.json'))).toThrow(/no such config file/);
    const bad = path.join(tmp, 'bad-model.json');
    fs.writeFileSync(bad, testConfigJson({ model: 'IODINE' }));
    expect(() => loadTestConfigFile(bad)).toThrow(/test\.model: must be 'EfficientMORL' or 'SlotAttention', got "IODINE"/);
  });
});

describe('emorl-eval on a tiny Slot Attention model', () => {
  let ariResults: { per_image: { fg_ari: number[]; ari_with_bg: number[]; mse: number[] }; fg_ari: { mean: number } } | undefined;

  test('ARI_MSE_KL: ARI.txt and MSE.txt, no KL, values of ariMse on model.infer\'s outputs; the report copes', async () => {
    const out = path.join(tmp, 'ari');
    const report = path.join(out, 'report.html');
    const logs: string[] = [];
    const s = await runEval({ checkpoint, config: configFile, data, out, images: 5, batchSize: 2, report, log: (m) => logs.push(m) });
    expect(s.model).toBe('SlotAttention');
    expect(fs.existsSync(path.join(out, 'ARI.txt'))).toBe(true);
    expect(fs.existsSync(path.join(out, 'MSE.txt'))).toBe(true);
    expect(fs.existsSync(path.join(out, 'KL.txt'))).toBe(false);
    expect(s.files.map((f) => path.basename(f))).toEqual(['ARI.txt', 'MSE.txt', 'results.json', 'report.html']);
    const r = JSON.parse(fs.readFileSync(path.join(out, 'results.json'), 'utf8'));
    expect(r.model).toBe('SlotAttention');
    expect(r.kl).toBeUndefined();
    expect(r.final_stage).toBe(0);
    expect(r.stages.map((x: { t: number }) => x.t)).toEqual([0]);
    const fgLine = logs.find((l) => l.startsWith('FG-ARI'))!;
    expect(fgLine).toBeDefined();
    expect(fgLine).not.toMatch(/KL/);

    const expected = { fg_ari: [] as number[], ari_with_bg: [] as number[], mse: [] as number[] };
    await directPasses(5, (o, images, trueMasks, B) => {
      const v = ariMse({ trueMasks, numEntities: 3, maskHeight: S, maskWidth: S, predMasks: o.masks, K, images, recons: o.recons, batch: B, channels: 3, height: S, width: S });
      expected.fg_ari.push(...v.fgAri);
      expected.ari_with_bg.push(...v.ari);
      expected.mse.push(...v.mse);
    });
    expect(r.per_image).toEqual(expected);
    expect(fs.readFileSync(path.join(out, 'MSE.txt'), 'utf8').trim().split(',').map(Number)).toEqual([r.mse.mean, r.mse.std]);
    expect(fs.readFileSync(path.join(out, 'ARI.txt'), 'utf8')).toBe(`${r.fg_ari.mean.toFixed(3)},${r.fg_ari.std.toFixed(3)}\n`);
    ariResults = r;

    const html = fs.readFileSync(report, 'utf8');
    expect(html).toContain('Slot Attention evaluation');
    expect(html).toContain('data-metric="fg_ari"');
    expect(html).not.toContain('data-metric="kl"');
    expect(html).not.toContain('Per-stage refinement');
    expect((html.match(/<img /g) ?? []).length).toBe(1);
  }, 60000);

  test('a .pth export keeps the top-level names and evaluates to identical numbers', async () => {
    expect(ariResults).toBeDefined();
    const pth = path.join(tmp, 'sa.pth');
    exportCommand({ checkpoint, to: 'pth', out: pth });
    const c = readPth(pth);
    expect(c.model).toBe('SlotAttention');
    expect(c.params.has('encoder_pt_1.0.weight')).toBe(true);
    expect(c.params.has('pos_embed_projection.weight')).toBe(true);
    expect(c.params.has('image_decoder.pos_embed_projection.weight')).toBe(true);
    expect(c.renamed).toEqual([]);
    expect(c.optimizer?.mappingNote).toBeUndefined();
    expect(c.optimizer?.indexToName?.[0]).toBe('init_slots');
    // eval.py's rename_state would move the encoder (the original's strict load would then fail)
    expect(mapStateDictName('module.encoder_pt_1.0.weight')).toBe('hvae_networks.encoder_pt_1.0.weight');
    expect(mapStateDictName('module.encoder_pt_1.0.weight', 'SlotAttention')).toBe('encoder_pt_1.0.weight');
    expect(mapStateDictName('module.hvae_networks.pos_embed_projection.bias', 'SlotAttention')).toBe('pos_embed_projection.bias');
    expect(mapStateDictName('module.image_decoder.decode.0.weight', 'SlotAttention')).toBe('image_decoder.decode.0.weight');

    const viaPth = await runEval({ checkpoint: pth, config: configFile, data, out: path.join(tmp, 'ari-pth'), images: 5, batchSize: 2, log: quiet });
    expect(viaPth.model).toBe('SlotAttention');
    expect(viaPth.results!.per_image).toEqual(ariResults!.per_image);
    expect(viaPth.results!.kl).toBeUndefined();

    // a bare state_dict, the names renamed as eval.py's rename_state does, loads too
    const renamed = new Map<string, PthTensor>();
    for (const [k, v] of c.params) renamed.set(mapStateDictName(k) as string, v);
    expect(renamed.has('hvae_networks.encoder_pt_2.1.weight')).toBe(true);
    const bare = path.join(tmp, 'sa-renamed.pth');
    writePth(bare, renamed, { layout: 'state_dict' });
    const m = loadModel(bare, { ...NET, input_size: [3, S, S], image_decoder: 'small' }, { seed: SEED });
    expect(m.kind).toBe('SlotAttention');
    expect(Array.from(m.model.params.get('encoder_pt_2.1.weight').dataSync())).toEqual(Array.from(c.params.get('encoder_pt_2.1.weight')!.data));
    m.model.dispose();
  }, 60000);

  test('disentanglement_preprocessing, activeness, disentanglement_viz and make_gifs on the slots', async () => {
    const out = path.join(tmp, 'dis');
    const p = await runEval({ checkpoint, config: configFile, data, out, type: 'disentanglement_preprocessing', images: 3, batchSize: 2, log: quiet });
    expect(p.model).toBe('SlotAttention');
    const lines = fs.readFileSync(path.join(out, 'z_range.txt'), 'utf8').trim().split('\n');
    expect(lines).toHaveLength(Z);
    // the range of the slots of the first 3 images, as a fresh model's passes give them
    const mins = new Float32Array(Z).fill(Infinity);
    const maxs = new Float32Array(Z).fill(-Infinity);
    await directPasses(3, (o) => {
      for (let i = 0; i < o.slots.length; i++) {
        const j = i % Z;
        mins[j] = Math.min(mins[j], o.slots[i]);
        maxs[j] = Math.max(maxs[j], o.slots[i]);
      }
    });
    lines.forEach((l, j) => {
      const [lo, hi] = l.split(',').map(Number);
      expect(Math.fround(lo)).toBe(mins[j]);
      expect(Math.fround(hi)).toBe(maxs[j]);
      expect(lo).toBeLessThan(hi);
    });

    const a = await runEval({ checkpoint, config: configFile, data, out, type: 'activeness', images: 1, batchSize: 2, log: quiet });
    expect(a.files.map((f) => path.basename(f))).toEqual(['activeness.h5', 'activeness.csv']);
    await withH5File(path.join(out, 'activeness.h5'), 'r', (f) => {
      expect(f.info('activeness').shape).toEqual([1, Z]);
      const v = f.read('activeness') as Float32Array;
      for (const x of v) expect(x).toBeGreaterThanOrEqual(0);
      expect(Math.max(...v)).toBeGreaterThan(0);
    });

    const v = await runEval({ checkpoint, config: configFile, data, out, type: 'disentanglement_viz', images: 1, batchSize: 2, log: quiet });
    expect(v.files.filter((f) => f.endsWith('.png'))).toHaveLength(1);
    await withH5File(path.join(out, 'disentanglement.h5'), 'r', (f) => {
      expect(f.info('images').shape).toEqual([1, Z, 8, S, S, 3]);
      expect(f.info('masks').shape).toEqual([1, K, S, S, 1]);
    });

    const g = await runEval({ checkpoint, config: configFile, data, out: path.join(tmp, 'gifs'), type: 'make_gifs', images: 1, batchSize: 2, log: quiet });
    const gifs = g.files.filter((f) => f.endsWith('.gif'));
    expect(gifs).toHaveLength(K * Math.min(10, Z));
    for (const f of gifs) expect(fs.readFileSync(f).subarray(0, 6).toString('ascii')).toBe('GIF89a');
    expect(JSON.parse(fs.readFileSync(path.join(tmp, 'gifs', 'gifs.json'), 'utf8')).top_dims).toHaveLength(Math.min(10, Z));
  }, 60000);

  test('dci on data with factors: the slots as codes', async () => {
    const out = path.join(tmp, 'dci');
    const s = await runEval({ checkpoint, config: configFile, data, out, type: 'dci', images: 6, batchSize: 2, log: quiet });
    expect(s.files.map((f) => path.basename(f))).toEqual(['dci.txt', 'dci.json']);
    const r = JSON.parse(fs.readFileSync(path.join(out, 'dci.json'), 'utf8'));
    expect(r.codes).toBe(Z);
    expect(r.factors).toBe(3);
    expect(r.matched).toBeGreaterThanOrEqual(2);
    expect(r.matched_per_image).toHaveLength(6);
    for (const k of ['disentanglement', 'completeness']) {
      expect(r[k]).toBeGreaterThanOrEqual(-1e-9);
      expect(r[k]).toBeLessThanOrEqual(1 + 1e-9);
    }
  }, 60000);

  test('sample_viz: one stage, the last attention iteration', async () => {
    const out = path.join(tmp, 'viz');
    const s = await runEval({ checkpoint, config: configFile, data, out, type: 'sample_viz', images: 3, batchSize: 2, log: quiet });
    expect(s.model).toBe('SlotAttention');
    const attn: Float32Array[] = [];
    const masks: Float32Array[] = [];
    await directPasses(3, (o) => {
      attn.push(o.attn);
      masks.push(o.masks);
    });
    await withH5File(path.join(out, 'sample_viz.h5'), 'r', (f) => {
      expect(f.info('image').shape).toEqual([3, S, S, 3]);
      expect(f.info('recons').shape).toEqual([3, 1, S, S, 3]);
      expect(f.info('pred_mask').shape).toEqual([3, 1, K, S, S, 1]);
      expect(f.info('components').shape).toEqual([3, 1, K, S, S, 3]);
      expect(f.info('attention').shape).toEqual([3, 1, K, S, S, 1]);
      expect(f.info('true_mask').shape).toEqual([3, 3, 1, S, S]);
      expect(Array.from(f.read('attention') as Float32Array)).toEqual([...attn[0], ...attn[1]]);
      expect(Array.from(f.read('pred_mask') as Float32Array)).toEqual([...masks[0], ...masks[1]]);
    });
    expect(fs.readdirSync(path.join(out, 'sample_viz'))).toEqual(['image_0000.png', 'image_0001.png', 'image_0002.png']);
  }, 60000);

  test('a test config for another model than the checkpoint\'s is a clear error before any work', async () => {
    const out = path.join(tmp, 'mismatch');
    // an EfficientMORL .pth with the SlotAttention test config
    const emorl = new EfficientMORL({ ...NET, input_size: [3, S, S], image_decoder: 'small', stochastic_layers: 1, refinement_iters: 1 }, { seed: 1 });
    const params = new Map<string, PthTensor>(Object.entries(emorl.params.snapshot()).map(([k, v]) => [k, { shape: v.shape, data: v.data }]));
    emorl.dispose();
    const emorlPth = path.join(tmp, 'emorl.pth');
    writePth(emorlPth, params);
    await expect(runEval({ checkpoint: emorlPth, config: configFile, data, out, log: quiet })).rejects.toThrow(EvalError);
    await expect(runEval({ checkpoint: emorlPth, config: configFile, data, out, log: quiet })).rejects.toThrow(
      /emorl\.pth holds an EfficientMORL model but .*sa\.json is a test config for SlotAttention \(test\.model "SlotAttention"\)/,
    );
    // the Slot Attention .emorl with an EfficientMORL test config
    const emorlConfig = path.join(tmp, 'emorl.json');
    fs.writeFileSync(emorlConfig, testConfigJson({ model: 'EfficientMORL' }, { ...NET, stochastic_layers: 1, refinement_iters: 1 }));
    await expect(runEval({ checkpoint, config: emorlConfig, data, out, log: quiet })).rejects.toThrow(
      /\.emorl holds a SlotAttention model but .*emorl\.json is a test config for EfficientMORL .*SlotAttention\*\.json/,
    );
    expect(fs.existsSync(out)).toBe(false);
    expect(() => loadModel(checkpoint, undefined, { model: 'EfficientMORL' })).toThrow(ModelKindError);
  }, 60000);
});

describe('emorl-eval CLI on a Slot Attention checkpoint', () => {
  const cli = path.join(__dirname, '..', 'dist', 'bin', 'emorl-eval.js');
  if (!fs.existsSync(cli)) {
    test.skip('needs `npm run build` (dist/bin/emorl-eval.js is missing)', () => undefined);
    return;
  }
  test('ARI_MSE_KL with a SlotAttention test config: no KL in the output', () => {
    const out = path.join(tmp, 'cli');
    const r = spawnSync(process.execPath, [cli, '--checkpoint', checkpoint, '--config', configFile, '--data', data, '--out', out, '--images', '2', '--no-progress'], { encoding: 'utf8', timeout: 60000 });
    expect(r.stderr).toMatch(/FG-ARI .*MSE/);
    expect(r.stderr).not.toMatch(/\bKL\b/);
    expect(r.status).toBe(0);
    expect(fs.readdirSync(out).sort()).toEqual(['ARI.txt', 'MSE.txt', 'results.json']);
  }, 60000);
});
