/**
 * emorl-eval: test-config parsing, the ARI/MSE aggregation against the real Tetrominoes
 * fixture's reference values, the CLEVR mask upsampling, ARI_MSE_KL and sample_viz end to end on
 * a tiny trained model, clear errors before any work, and the HTML report in headless Chromium.
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { initBackend } from '../lib/tf';
import { experimentConfig } from '../lib/config/experiment';
import { H5File, withH5File } from '../lib/io/h5';
import { train } from '../lib/train/loop';
import { exportCommand } from '../lib/cli/export';
import { resizeBicubicFloat } from '../lib/data/resize';
import { loadTestConfigFile, parseTestConfig, testConfig, TestConfigError } from '../lib/eval/config';
import { ariMse, meanStd, resizeBicubicF32 } from '../lib/eval/metrics';
import { runEval, EvalError } from '../lib/eval/run';
import { Rng } from '../lib/util/rng';
import { encodeGif, gifIndex, gifPalette, lzwEncode } from '../lib/eval/gif';
import { fixturePath } from './helpers';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'emorl-eval-'));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));
const S = 8;
const quiet = () => undefined;

/** Coloured squares on black with masks [N,3,S,S,1]; `size` changes the image size, `masks` may be left out. */
async function writeSquares(file: string, n: number, size = S, masks = true): Promise<void> {
  const rng = new Rng(7);
  await withH5File(file, 'w', (f) => {
    for (const [split, count] of [['train', n], ['test', n]] as const) {
      const imgs = new Uint8Array(count * size * size * 3);
      const m = new Uint8Array(count * 3 * size * size);
      for (let b = 0; b < count; b++) {
        const owner = new Uint8Array(size * size);
        for (let o = 1; o <= 2; o++) {
          const w = 2 + rng.int(2);
          const y0 = rng.int(size - w);
          const x0 = rng.int(size - w);
          for (let y = y0; y < y0 + w; y++)
            for (let x = x0; x < x0 + w; x++) {
              owner[y * size + x] = o;
              for (let c = 0; c < 3; c++) imgs[((b * size + y) * size + x) * 3 + c] = c === o ? 230 : 40;
            }
        }
        for (let p = 0; p < size * size; p++) m[(b * 3 + owner[p]) * size * size + p] = 255;
      }
      f.write(`${split}/imgs`, imgs, [count, size, size, 3], 'uint8');
      if (masks) f.write(`${split}/masks`, m, [count, 3, size, size, 1], 'uint8');
    }
  });
}

const NET = { K: 3, input_size: [3, S, S], z_size: 8, image_decoder: 'small', image_likelihood: 'Gaussian', stochastic_layers: 2, refinement_iters: 1, log_scale: Math.log(0.1), geco_warm_start: 1 };

function testConfigJson(test: Record<string, unknown> = {}): string {
  return JSON.stringify({
    Net: NET,
    dataset: { data_path: '', h5_path: 'squares.h5', masks: true },
    seed: 1,
    test: { batch_size: 2, output_size: [3, S, S], num_images_to_process: 5, use_geco: true, geco_reconstruction_target: -0.5, eval_type: 'ARI_MSE_KL', mode: 'test', model: 'EfficientMORL', ...test },
  });
}

const data = path.join(tmp, 'squares.h5');
const configFile = path.join(tmp, 'test-config.json');
const runDir = path.join(tmp, 'run');
let checkpoint = '';

beforeAll(async () => {
  await initBackend('cpu');
  await writeSquares(data, 6);
  fs.writeFileSync(configFile, testConfigJson());
  const config = experimentConfig({
    Net: NET,
    training: { batch_size: 2, lr: 1e-3, use_scheduler: false, use_geco: true, geco_reconstruction_target: -0.5, refinement_curriculum: [[-1, 1]], checkpoint_freq: 2, tensorboard_freq: 100, log_freq: 1, ari_freq: 0 },
    seed: 3,
  });
  const summary = await train({ config, dataFile: data, outDir: runDir, steps: 2, log: quiet, progress: false, handleSignals: false });
  checkpoint = summary.lastCheckpoint as string;
}, 300000);

describe('test configs', () => {
  test('the bundled test configs parse', () => {
    const root = path.join(__dirname, '..', 'configs', 'test');
    const files: string[] = [];
    const walk = (d: string) => fs.readdirSync(d, { withFileTypes: true }).forEach((e) => (e.isDirectory() ? walk(path.join(d, e.name)) : files.push(path.join(d, e.name))));
    walk(root);
    expect(files.length).toBeGreaterThanOrEqual(10);
    for (const f of files) {
      const c = loadTestConfigFile(f);
      expect(c.test.model).toBe(path.basename(f).startsWith('SlotAttention') ? 'SlotAttention' : 'EfficientMORL');
    }
    const t = loadTestConfigFile(path.join(root, 'tetrominoes', 'ARI_MSE_KL', 'EMORL.json'));
    expect(t.Net.K).toBe(4);
    expect(t.test).toMatchObject({ eval_type: 'ARI_MSE_KL', num_images_to_process: 320, use_geco: true, geco_reconstruction_target: -1.224 });
    expect(loadTestConfigFile(path.join(root, 'clevr6-96x96', 'ARI_MSE_KL', 'EMORL.json')).dataset.clevr_preprocess_style).toBe('clevr-small');
  });

  test('unknown keys and wrong types name the key', () => {
    expect(() => parseTestConfig(testConfigJson({ batch_sise: 2 }), 'x.json')).toThrow(/x\.json: test\.batch_sise: unknown key/);
    expect(() => parseTestConfig(testConfigJson({ use_geco: 'yes' }), 'x.json')).toThrow(/test\.use_geco: must be a boolean/);
    expect(() => parseTestConfig(testConfigJson({ output_size: [3, 8] }), 'x.json')).toThrow(/test\.output_size: must be three positive integers/);
    expect(() => testConfig({ Net: { K: 'four' } })).toThrow(/Net\.K/);
    expect(() => testConfig({ dataset: { masks: 1 } })).toThrow(/dataset\.masks: must be a boolean/);
    expect(() => testConfig({ training: {} })).toThrow(TestConfigError);
    expect(() => parseTestConfig('{', 'bad.json')).toThrow(/bad\.json: not valid JSON/);
    expect(testConfig({}).test.batch_size).toBe(1);
  });
});

describe('ARI / MSE aggregation', () => {
  test('meanStd is numpy mean and std (ddof 0)', () => {
    expect(meanStd([1, 2, 3, 4])).toEqual({ mean: 2.5, std: Math.sqrt(1.25), n: 4 });
  });

  const fixture = fixturePath('tetrominoes-real-10.h5');
  const maybe = fs.existsSync(fixture) ? test : test.skip;
  maybe('agrees with the real Tetrominoes fixture\'s reference FG-ARI, ARI and MSE at every stage', async () => {
    await withH5File(fixture, 'r', (f) => {
      const imgs = f.read('test/imgs') as Uint8Array; // [10,35,35,3]
      const masks = f.read('test/masks') as Uint8Array; // [10,4,35,35,1]
      const pred = f.read('reference/pred_mask') as Float32Array; // [10,6,4,35,35,1]
      const recons = f.read('reference/recons') as Float32Array; // [10,6,35,35,3]
      const fg = f.read('reference/fg_ari') as Float64Array;
      const bg = f.read('reference/ari_with_bg') as Float64Array;
      const mse = f.read('reference/mse') as Float64Array;
      const [N, T, K, H, W] = [10, 6, 4, 35, 35];
      const P = H * W;
      const chw = (src: ArrayLike<number>, scale: number) => {
        const out = new Float32Array(3 * P);
        for (let p = 0; p < P; p++) for (let c = 0; c < 3; c++) out[c * P + p] = src[p * 3 + c] / scale;
        return out;
      };
      const images = new Float32Array(N * 3 * P);
      for (let b = 0; b < N; b++) images.set(chw(imgs.subarray(b * 3 * P, (b + 1) * 3 * P), 255), b * 3 * P);
      for (let t = 0; t < T; t++) {
        const pm = new Float32Array(N * K * P);
        const rc = new Float32Array(N * 3 * P);
        for (let b = 0; b < N; b++) {
          pm.set(pred.subarray((b * T + t) * K * P, (b * T + t + 1) * K * P), b * K * P);
          rc.set(chw(recons.subarray((b * T + t) * 3 * P, (b * T + t + 1) * 3 * P), 1), b * 3 * P);
        }
        const v = ariMse({ trueMasks: masks, numEntities: 4, maskHeight: H, maskWidth: W, predMasks: pm, K, images, recons: rc, batch: N, channels: 3, height: H, width: W });
        for (let b = 0; b < N; b++) {
          expect(v.fgAri[b]).toBeCloseTo(fg[b * T + t], 6);
          expect(v.ari[b]).toBeCloseTo(bg[b * T + t], 6);
          expect(Math.abs(v.mse[b] - mse[b * T + t])).toBeLessThan(1e-6 * Math.max(1, mse[b * T + t]) + 1e-9);
        }
        if (t === T - 1) expect(meanStd(v.fgAri).mean).toBeCloseTo(1, 6);
      }
    });
  });

  test('CLEVR: predicted masks are upsampled with Pillow\'s float bicubic filter before the ARI', () => {
    const rng = new Rng(2);
    const planes = Float32Array.from({ length: 2 * 6 * 5 }, () => rng.uniform());
    const up = resizeBicubicF32(planes, 2, 6, 5, 12, 9);
    for (let p = 0; p < 2; p++) {
      const ref = resizeBicubicFloat({ data: planes.subarray(p * 30, (p + 1) * 30) as unknown as Uint8Array, height: 6, width: 5, channels: 1 }, 12, 9);
      for (let i = 0; i < ref.length; i++) expect(up[p * 108 + i]).toBeCloseTo(ref[i], 5);
    }
    const ones = resizeBicubicF32(new Float32Array(16).fill(1), 1, 4, 4, 8, 8);
    ones.forEach((v) => expect(v).toBeCloseTo(1, 6));
    // masks of 4×4 against true masks of 8×8: the upsampled argmax recovers the halves
    const pred = new Float32Array(2 * 16);
    for (let y = 0; y < 4; y++) for (let x = 0; x < 4; x++) pred[(x < 2 ? 0 : 1) * 16 + y * 4 + x] = 1;
    const truth = new Uint8Array(3 * 64);
    for (let y = 0; y < 8; y++) for (let x = 0; x < 8; x++) truth[(x < 4 ? 1 : 2) * 64 + y * 8 + x] = 255;
    const img = new Float32Array(3 * 16);
    const v = ariMse({ trueMasks: truth, numEntities: 3, maskHeight: 8, maskWidth: 8, predMasks: pred, K: 2, images: img, recons: img, batch: 1, channels: 3, height: 4, width: 4 });
    expect(v.fgAri[0]).toBeCloseTo(1, 10);
    expect(v.mse[0]).toBe(0);
  });
});

describe('emorl-eval on a tiny trained model', () => {
  test('ARI_MSE_KL: batched, writes ARI.txt, MSE.txt, KL.txt, results.json and the HTML report', async () => {
    const out = path.join(tmp, 'ari');
    const report = path.join(out, 'report.html');
    const s = await runEval({ checkpoint, config: configFile, data, out, images: 5, batchSize: 2, report, run: runDir, log: quiet });
    expect(s.type).toBe('ARI_MSE_KL');
    const r = JSON.parse(fs.readFileSync(path.join(out, 'results.json'), 'utf8'));
    expect(r.images).toBe(5);
    expect(r.per_image.fg_ari).toHaveLength(5);
    expect(r.final_stage).toBe(NET.stochastic_layers - 1 + NET.refinement_iters);
    expect(r.stages.map((x: { t: number }) => x.t)).toEqual([0, 1, 2]);
    expect(r.stages[2].fg_ari.mean).toBeCloseTo(r.fg_ari.mean, 12);
    for (const k of ['fg_ari', 'ari_with_bg']) expect(Math.abs(r[k].mean)).toBeLessThanOrEqual(1);
    expect(r.mse.mean).toBeGreaterThan(0);
    expect(Number.isFinite(r.kl.mean)).toBe(true);
    expect(r.kl.std_over).toBe('batches');
    expect(fs.readFileSync(path.join(out, 'ARI.txt'), 'utf8')).toMatch(/^-?\d\.\d{3},\d\.\d{3}\n$/);
    expect(fs.readFileSync(path.join(out, 'MSE.txt'), 'utf8').trim().split(',').map(Number)).toEqual([r.mse.mean, r.mse.std]);
    expect(fs.readFileSync(path.join(out, 'KL.txt'), 'utf8').trim().split(',')).toHaveLength(2);

    // The original's .pth format (weights only; the Net config comes from the test config) gives the same numbers.
    const pth = path.join(tmp, 'model.pth');
    exportCommand({ checkpoint, to: 'pth', out: pth });
    const viaPth = await runEval({ checkpoint: pth, config: configFile, data, out: path.join(tmp, 'ari-pth'), images: 5, batchSize: 2, log: quiet });
    expect(viaPth.results!.per_image).toEqual(r.per_image);
    expect(viaPth.results!.kl!.mean).toBe(r.kl.mean);

    const one = await runEval({ checkpoint, config: configFile, data, out: path.join(tmp, 'ari1'), images: 2, batchSize: 1, log: quiet });
    expect(one.results!.kl!.std_over).toBe('images');

    const html = fs.readFileSync(report, 'utf8');
    expect(html).toContain('data-metric="fg_ari"');
    expect(html).toMatch(/<svg class="chart"/);
    expect(html).not.toMatch(/src="(?!data:)/);
    expect((html.match(/<img /g) ?? []).length).toBeGreaterThanOrEqual(2);
    renderedReport = report;
    renderedAri = r.fg_ari.mean;
  }, 300000);

  test('sample_viz: every stage\'s arrays in sample_viz.h5 and one PNG grid per image', async () => {
    const out = path.join(tmp, 'viz');
    const s = await runEval({ checkpoint, config: configFile, data, out, type: 'sample_viz', images: 3, batchSize: 2, log: quiet });
    expect(s.type).toBe('sample_viz');
    const T = NET.stochastic_layers + NET.refinement_iters;
    await withH5File(path.join(out, 'sample_viz.h5'), 'r', (f) => {
      expect(f.info('image').shape).toEqual([3, S, S, 3]);
      expect(f.info('recons').shape).toEqual([3, T, S, S, 3]);
      expect(f.info('pred_mask').shape).toEqual([3, T, 3, S, S, 1]);
      expect(f.info('pred_mask_logits').shape).toEqual([3, T, 3, S, S, 1]);
      expect(f.info('components').shape).toEqual([3, T, 3, S, S, 3]);
      expect(f.info('attention').shape.slice(0, 3)).toEqual([3, T, 3]);
      expect(f.info('true_mask').shape).toEqual([3, 3, 1, S, S]);
      const m = f.read('pred_mask') as Float32Array;
      const l = f.read('pred_mask_logits') as Float32Array;
      expect(m[5]).toBeCloseTo(Math.exp(l[5]), 6);
      // masks sum to one over slots
      let sum = 0;
      for (let k = 0; k < 3; k++) sum += m[k * S * S + 7];
      expect(sum).toBeCloseTo(1, 5);
    });
    const pngs = fs.readdirSync(path.join(out, 'sample_viz'));
    expect(pngs).toEqual(['image_0000.png', 'image_0001.png', 'image_0002.png']);
    expect(fs.readFileSync(path.join(out, 'sample_viz', pngs[0])).subarray(1, 4).toString()).toBe('PNG');
  }, 300000);

  test('disentanglement_preprocessing, activeness and disentanglement_viz', async () => {
    const out = path.join(tmp, 'dis');
    const Z = NET.z_size;
    // activeness first: it runs the preprocessing itself when z_range.txt is missing
    const a = await runEval({ checkpoint, config: configFile, data, out, type: 'activeness', images: 3, batchSize: 2, log: quiet });
    expect(a.files.map((f) => path.basename(f))).toEqual(['z_range.txt', 'activeness.h5', 'activeness.csv']);
    const lines = fs.readFileSync(path.join(out, 'z_range.txt'), 'utf8').trim().split('\n');
    expect(lines).toHaveLength(Z);
    const range = lines.map((l) => l.split(',').map(Number));
    for (const [lo, hi] of range) expect(lo).toBeLessThan(hi);
    await withH5File(path.join(out, 'activeness.h5'), 'r', (f) => {
      expect(f.info('activeness').shape).toEqual([3, Z]);
      const v = f.read('activeness') as Float32Array;
      for (const x of v) expect(x).toBeGreaterThanOrEqual(0);
      expect(Math.max(...v)).toBeGreaterThan(0);
      for (const s of f.read('slot') as Int32Array) expect(s).toBeLessThan(NET.K);
    });
    // preprocessing alone rewrites the same ranges (same seed, same images)
    const p = await runEval({ checkpoint, config: configFile, data, out: path.join(tmp, 'pre'), type: 'disentanglement_preprocessing', images: 3, batchSize: 2, log: quiet });
    expect(fs.readFileSync(p.files[0], 'utf8')).toBe(fs.readFileSync(path.join(out, 'z_range.txt'), 'utf8'));
    const v = await runEval({ checkpoint, config: configFile, data, out, type: 'disentanglement_viz', images: 2, batchSize: 2, log: quiet });
    expect(v.files.filter((f) => f.endsWith('.png'))).toHaveLength(2);
    await withH5File(path.join(out, 'disentanglement.h5'), 'r', (f) => {
      expect(f.info('images').shape).toEqual([2, Z, 8, S, S, 3]);
      expect(f.info('ground_truth').shape).toEqual([2, S, S, 3]);
      expect(f.info('masks').shape).toEqual([2, NET.K, S, S, 1]);
    });
  }, 300000);

  test('make_gifs: one looping GIF per slot and most active dimension', async () => {
    const out = path.join(tmp, 'gifs');
    const g = await runEval({ checkpoint, config: configFile, data, out, type: 'make_gifs', images: 2, batchSize: 2, log: quiet });
    const gifs = g.files.filter((f) => f.endsWith('.gif'));
    const dims = Math.min(10, NET.z_size);
    expect(gifs).toHaveLength(NET.K * dims);
    expect(path.basename(gifs[0])).toBe('slot_0_row_0.gif');
    const meta = JSON.parse(fs.readFileSync(path.join(out, 'gifs.json'), 'utf8'));
    expect(meta.top_dims).toHaveLength(dims);
    const frames = decodeGif(fs.readFileSync(gifs[0]));
    expect(frames.width).toBe(S);
    expect(frames.frames).toHaveLength(8);
    gifFile = gifs[0];
  }, 300000);

  test('bad input is a clear error before any work', async () => {
    const out = path.join(tmp, 'bad');
    const big = path.join(tmp, 'big.h5');
    await writeSquares(big, 2, 12);
    await expect(runEval({ checkpoint, config: configFile, data: big, out, log: quiet })).rejects.toThrow(/expects 3×8×8 images .* has 3×12×12/);
    const noMasks = path.join(tmp, 'nomasks.h5');
    await writeSquares(noMasks, 2, S, false);
    await expect(runEval({ checkpoint, config: configFile, data: noMasks, out, log: quiet })).rejects.toThrow(/no masks .*ARI_MSE_KL needs ground-truth masks/);
    await expect(runEval({ checkpoint: path.join(tmp, 'nope.emorl'), config: configFile, data, out, log: quiet })).rejects.toThrow(/nope\.emorl: no such checkpoint/);
    await expect(runEval({ checkpoint, config: configFile, data: path.join(tmp, 'nope.h5'), out, log: quiet })).rejects.toThrow(EvalError);
    await expect(runEval({ checkpoint, config: configFile, data, out, type: 'dci_clevr', log: quiet })).rejects.toThrow(/has no factors .*dci_clevr needs ground-truth factors/);
    // a .pth takes its Net config from the test config: weights that do not fit are named as such
    const k4 = path.join(tmp, 'k4.json');
    fs.writeFileSync(k4, JSON.stringify({ ...JSON.parse(testConfigJson()), Net: { ...NET, z_size: 16 } }));
    await expect(runEval({ checkpoint: path.join(tmp, 'model.pth'), config: k4, data, out, log: quiet })).rejects.toThrow(/model\.pth: .*does not match.*Net section of/);
    expect(fs.existsSync(out)).toBe(false);
  }, 120000);
});

let renderedReport = '';
let gifFile = '';

/** An independent GIF decoder (LZW per the GIF89a spec) for the tests: palette indices per frame. */
function lzwDecode(data: Uint8Array, minCodeSize: number): number[] {
  const clear = 1 << minCodeSize;
  const eoi = clear + 1;
  let dict: number[][] = [];
  let codeSize = minCodeSize + 1;
  const reset = () => {
    dict = Array.from({ length: clear }, (_, i) => [i]);
    dict.push([], []);
    codeSize = minCodeSize + 1;
  };
  reset();
  const out: number[] = [];
  let prev: number[] | null = null;
  let bit = 0;
  const read = () => {
    let v = 0;
    for (let i = 0; i < codeSize; i++, bit++) v |= ((data[bit >> 3] >> (bit & 7)) & 1) << i;
    return v;
  };
  while (bit + codeSize <= data.length * 8) {
    const code = read();
    if (code === clear) {
      reset();
      prev = null;
      continue;
    }
    if (code === eoi) return out;
    let entry: number[];
    if (code < dict.length) entry = dict[code];
    else if (code === dict.length && prev) entry = [...prev, prev[0]];
    else throw new Error(`bad LZW code ${code}`);
    out.push(...entry);
    if (prev && dict.length < 4096) dict.push([...prev, entry[0]]);
    prev = entry;
    if (dict.length === 1 << codeSize && codeSize < 12) codeSize++;
  }
  throw new Error('no end-of-information code');
}

function decodeGif(buf: Buffer): { width: number; height: number; frames: number[][] } {
  expect(buf.subarray(0, 6).toString('ascii')).toBe('GIF89a');
  const width = buf.readUInt16LE(6);
  const height = buf.readUInt16LE(8);
  let o = 13 + (buf[10] & 0x80 ? 3 * (1 << ((buf[10] & 7) + 1)) : 0);
  const frames: number[][] = [];
  const subBlocks = () => {
    const parts: number[] = [];
    while (buf[o] !== 0) {
      parts.push(...buf.subarray(o + 1, o + 1 + buf[o]));
      o += 1 + buf[o];
    }
    o++;
    return Uint8Array.from(parts);
  };
  for (;;) {
    const b = buf[o++];
    if (b === 0x3b) break;
    if (b === 0x21) {
      o++;
      subBlocks();
    } else if (b === 0x2c) {
      o += 9;
      const min = buf[o++];
      const px = lzwDecode(subBlocks(), min);
      expect(px).toHaveLength(width * height);
      frames.push(px);
    } else throw new Error(`unexpected GIF block 0x${b.toString(16)}`);
  }
  return { width, height, frames };
}

describe('GIF encoder', () => {
  test('LZW round-trips through an independent decoder, including table resets', () => {
    const rng = new Rng(4);
    for (const n of [1, 2, 300, 5000, 70000]) {
      const idx = Uint8Array.from({ length: n }, (_, i) => (n > 10000 ? rng.int(256) : (i >> 3) % 7));
      const enc = lzwEncode(idx);
      const raw: number[] = [];
      for (let o = 0; enc[o] !== 0; o += enc[o] + 1) raw.push(...enc.subarray(o + 1, o + 1 + enc[o]));
      expect(lzwDecode(Uint8Array.from(raw), 8)).toEqual(Array.from(idx));
    }
  });

  test('frames keep their colours (to the nearest palette entry)', () => {
    const f = new Uint8Array(4 * 3 * 3);
    for (let p = 0; p < 12; p++) f.set([p * 20, 255 - p * 20, 128], p * 3);
    const gif = decodeGif(encodeGif([f, f.map((v) => 255 - v)], 3, 4));
    expect(gif.frames).toHaveLength(2);
    const pal = gifPalette();
    for (let p = 0; p < 12; p++) {
      const i = gif.frames[0][p];
      expect(i).toBe(gifIndex(f[p * 3], f[p * 3 + 1], f[p * 3 + 2]));
      for (let c = 0; c < 3; c++) expect(Math.abs(pal[i * 3 + c] - f[p * 3 + c])).toBeLessThanOrEqual(26);
    }
  });
});
let renderedAri = NaN;

describe('the HTML report in headless Chromium', () => {
  const chromium = ['/usr/bin/chromium', '/usr/bin/chromium-browser'].find((p) => fs.existsSync(p));
  if (!chromium) {
    process.stderr.write('NOTICE: eval.test.ts skips the headless-Chromium report test: chromium is not installed (apt-get install chromium)\n');
    test.skip('renders with all images loaded (needs chromium)', () => undefined);
    return;
  }
  test('renders with all images loaded and the metrics shown', () => {
    expect(renderedReport).not.toBe('');
    const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'emorl-chromium-'));
    try {
      const r = spawnSync(
        chromium,
        ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--no-first-run',
          `--user-data-dir=${profile}`, '--virtual-time-budget=5000', '--dump-dom', `file://${renderedReport}`],
        { encoding: 'utf8', timeout: 60000 },
      );
      expect(r.status).toBe(0);
      expect(r.stdout).toMatch(/<body[^>]*data-images-loaded="true"/);
      expect(r.stdout).toMatch(/data-image-count="[1-9]/);
      expect(r.stdout).toContain(renderedAri.toFixed(4));
      expect(r.stdout).toContain('MSE');
      // a make_gifs GIF decodes in the browser too
      expect(gifFile).not.toBe('');
      const page = path.join(tmp, 'gif.html');
      fs.writeFileSync(page, `<!DOCTYPE html><html><body><img src="${path.basename(gifFile)}"><script>window.addEventListener('load',function(){var i=document.images[0];document.body.setAttribute('data-gif',i.naturalWidth+'x'+i.naturalHeight);});</script></body></html>`);
      fs.copyFileSync(gifFile, path.join(tmp, path.basename(gifFile)));
      const g = spawnSync(
        chromium,
        ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--no-first-run',
          `--user-data-dir=${profile}`, '--virtual-time-budget=5000', '--dump-dom', `file://${page}`],
        { encoding: 'utf8', timeout: 60000 },
      );
      expect(g.stdout).toContain(`data-gif="${S}x${S}"`);
    } finally {
      fs.rmSync(profile, { recursive: true, force: true });
    }
  }, 90000);
});

describe('emorl-eval CLI', () => {
  const cli = path.join(__dirname, '..', 'dist', 'bin', 'emorl-eval.js');
  const built = fs.existsSync(cli);
  if (!built) {
    test.skip('emorl-eval CLI tests need `npm run build` (dist/bin/emorl-eval.js is missing)', () => undefined);
    return;
  }
  test('runs ARI_MSE_KL and reports bad arguments with exit code 1', () => {
    const run = (...args: string[]) => spawnSync(process.execPath, [cli, ...args], { encoding: 'utf8', timeout: 120000 });
    const out = path.join(tmp, 'cli');
    let r = run('--checkpoint', checkpoint, '--config', configFile, '--data', data, '--out', out, '--images', '2', '--batch-size', '2', '--no-progress');
    expect(r.stderr).toMatch(/FG-ARI/);
    expect(r.status).toBe(0);
    expect(fs.existsSync(path.join(out, 'results.json'))).toBe(true);
    r = run('--checkpoint', checkpoint, '--config', configFile, '--data', data, '--out', out, '--type', 'nope');
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/--type/);
    r = run('--checkpoint', checkpoint, '--config', path.join(tmp, 'missing.json'), '--data', data, '--out', out);
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/missing\.json: no such config file/);
  }, 180000);
});
