import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { inflateSync } from 'node:zlib';
import { applyOverrides, experimentConfig, gecoTargetCheck, parseExperimentConfig } from '../lib/config/experiment';
import { learningRate, refinementItersAt } from '../lib/train/schedule';
import {
  CheckpointData,
  decodeCheckpoint,
  encodeCheckpoint,
  latestCheckpoint,
  listCheckpoints,
  readCheckpoint,
  saveRunCheckpoint,
} from '../lib/train/checkpoint';
import { readTfRecords, TensorBoardWriter } from '../lib/train/tensorboard';
import { crc32, crc32c } from '../lib/util/crc32';
import { encodePng } from '../lib/util/png';
import { imageGrid } from '../lib/util/image-grid';
import { withH5File } from '../lib/io/h5';
import { fixturePath } from './helpers';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'emorl-train-io-'));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));
const CONFIGS = path.join(__dirname, '..', 'configs', 'train');

describe('experiment config', () => {
  test.each(fs.readdirSync(CONFIGS))('configs/train/%s/EMORL.json loads with the paper values', (name) => {
    const file = path.join(CONFIGS, name, 'EMORL.json');
    const c = parseExperimentConfig(fs.readFileSync(file, 'utf8'), file);
    expect(c.training.model).toBe('EfficientMORL');
    expect(c.training.lr).toBe(0.0004);
    expect(c.training.batch_size).toBe(32);
    expect(c.Net.input_size[0]).toBe(3);
  });

  test.each(fs.readdirSync(CONFIGS).filter((d) => fs.existsSync(path.join(CONFIGS, d, 'SlotAttention.json'))))(
    'configs/train/%s/SlotAttention.json loads',
    (name) => {
      const file = path.join(CONFIGS, name, 'SlotAttention.json');
      const c = parseExperimentConfig(fs.readFileSync(file, 'utf8'), file);
      expect(c.training.model).toBe('SlotAttention');
      expect(c.training.use_geco).toBe(false);
    },
  );

  test('the Tetrominoes config: values, and the unreachable GECO target is reported with numbers', () => {
    const file = path.join(CONFIGS, 'tetrominoes', 'EMORL.json');
    const c = parseExperimentConfig(fs.readFileSync(file, 'utf8'), file);
    expect(c.Net).toMatchObject({ K: 4, z_size: 32, image_decoder: 'small', image_likelihood: 'Gaussian', stochastic_layers: 3 });
    expect(c.training.refinement_curriculum).toEqual([[-1, 3], [200000, 3]]);
    expect(c.training.warmup).toBe(10000); // the original's default: the config does not set it
    const g = gecoTargetCheck(c);
    expect(g.target).toBeCloseTo(-4498.2, 1);
    expect(g.attainableMin).toBeCloseTo(-4424.6, 1);
    expect(g.unreachable).toBe(true);
  });

  test('unknown keys and wrong types are errors naming the key', () => {
    expect(() => experimentConfig({ training: { lr: '1e-4' } })).toThrow(/training\.lr: must be a number, got "1e-4"/);
    expect(() => experimentConfig({ training: { learning_rate: 1 } })).toThrow(/training\.learning_rate: unknown key/);
    expect(() => experimentConfig({ Net: { KK: 4 } })).toThrow(/Net\.KK: unknown key/);
    expect(() => experimentConfig({ Net: { K: 0 } })).toThrow(/Net\.K: must be an integer >= 1/);
    expect(() => experimentConfig({ dataset: { masks: 'yes' } })).toThrow(/dataset\.masks: must be a boolean/);
    expect(() => experimentConfig({ extra: {} })).toThrow(/extra: unknown section/);
    expect(() => experimentConfig({ training: { refinement_curriculum: [[0]] } })).toThrow(/training\.refinement_curriculum/);
    expect(() => experimentConfig({ seed: -1 })).toThrow(/seed: must be a non-negative integer/);
    expect(() => parseExperimentConfig('{', 'x.json')).toThrow(/x\.json: not valid JSON/);
    expect(() => parseExperimentConfig('{"training": {"iters": 1.5}}', 'y.json')).toThrow(/y\.json: training\.iters: must be an integer/);
  });

  test('command-line overrides', () => {
    const raw = { Net: { K: 4 }, training: { lr: 0.0004 } };
    const c = experimentConfig(
      applyOverrides(raw, ['training.lr=1e-4', 'Net.K=5', 'training.refinement_curriculum=[[-1,1]]', 'seed=3', 'dataset.h5_path=a.h5']),
    );
    expect(c.training.lr).toBe(1e-4);
    expect(c.Net.K).toBe(5);
    expect(c.training.refinement_curriculum).toEqual([[-1, 1]]);
    expect(c.seed).toBe(3);
    expect(c.dataset.h5_path).toBe('a.h5');
    expect(raw.training.lr).toBe(0.0004); // the input is not modified
    expect(() => applyOverrides(raw, ['training.lr'])).toThrow(/expected section\.key=value/);
    expect(() => experimentConfig(applyOverrides(raw, ['training.lrr=1']))).toThrow(/training\.lrr: unknown key/);
  });
});

describe('schedule', () => {
  test("reproduces the original's learning rates and curriculum step for step", async () => {
    await withH5File(fixturePath('training', 'train-trajectory-tetrominoes.h5'), 'r', (f) => {
      const tc = JSON.parse(f.attr('', 'training_config') as string);
      const cfg = { lr: tc.lr, use_scheduler: tc.use_scheduler, warmup: tc.warmup, decay_rate: 0.5, decay_steps: 100000 };
      for (const step of f.keys('steps')) {
        const s = Number(step);
        expect(learningRate(s, cfg)).toBeCloseTo(f.attr(`steps/${step}`, 'lr') as number, 15);
        expect(refinementItersAt(s, tc.refinement_curriculum, 3)).toBe(f.attr(`steps/${step}`, 'refinement_iters'));
      }
    });
    expect(learningRate(123, { lr: 1e-3, use_scheduler: false, warmup: 10, decay_rate: 0.5, decay_steps: 10 })).toBe(1e-3);
  });
});

describe('checkpoints', () => {
  const sample = (): CheckpointData => ({
    meta: { step: 7, geco: { beta: 0.55 }, rng: [1, 2, 3, 4] },
    tensors: new Map([
      ['a.weight', { shape: [2, 3], data: new Float32Array([1, 2, 3, 4, 5, -6.5]) }],
      ['b', { shape: [], data: new Float32Array([0.25]) }],
    ]),
  });

  test('round-trip, keep the newest N, latest', () => {
    const dir = path.join(tmp, 'run');
    for (const step of [10, 20, 30, 40]) saveRunCheckpoint(dir, step, sample(), 2);
    expect(listCheckpoints(dir).map((c) => c.step)).toEqual([30, 40]);
    const latest = latestCheckpoint(dir) as string;
    expect(path.basename(latest)).toBe('checkpoint-00000040.emorl');
    const back = readCheckpoint(latest);
    expect(back.meta).toEqual(sample().meta);
    expect(Array.from(back.tensors.get('a.weight')!.data)).toEqual([1, 2, 3, 4, 5, -6.5]);
    expect(back.tensors.get('b')!.shape).toEqual([]);
    expect(fs.readdirSync(dir).filter((f) => f.includes('.tmp'))).toEqual([]);
  });

  test('truncated, corrupt and foreign files are refused by name; NaN is never saved', () => {
    const buf = encodeCheckpoint(sample());
    expect(() => decodeCheckpoint(buf.subarray(0, buf.length - 3), 'cut.emorl')).toThrow(/cut\.emorl: truncated checkpoint/);
    const bad = Buffer.from(buf);
    bad[40] ^= 0xff;
    expect(() => decodeCheckpoint(bad, 'flip.emorl')).toThrow(/flip\.emorl: corrupt checkpoint \(CRC mismatch\)/);
    expect(() => decodeCheckpoint(Buffer.from('PK\x03\x04 zip'), 'model.pth')).toThrow(/model\.pth: not an emorl checkpoint/);
    expect(() => readCheckpoint(path.join(tmp, 'none.emorl'))).toThrow(/none\.emorl: no such checkpoint/);
    const nan = sample();
    nan.tensors.get('a.weight')!.data[2] = NaN;
    expect(() => encodeCheckpoint(nan)).toThrow(/tensor 'a\.weight' holds a non-finite value at index 2/);
  });
});

describe('TensorBoard, PNG and CRC', () => {
  test('CRC-32 and CRC-32C check values', () => {
    const data = Buffer.from('123456789');
    expect(crc32(data)).toBe(0xcbf43926);
    expect(crc32c(data)).toBe(0xe3069283);
  });

  test('PNG: a valid stream that inflates back to the pixels', () => {
    const px = new Uint8Array([255, 0, 0, 0, 255, 0, 0, 0, 255, 10, 20, 30]);
    const png = encodePng(px, 2, 2, 3);
    expect(png.subarray(1, 4).toString('ascii')).toBe('PNG');
    const idatLen = png.readUInt32BE(33);
    expect(png.subarray(37, 41).toString('ascii')).toBe('IDAT');
    const raw = inflateSync(png.subarray(41, 41 + idatLen));
    expect(Array.from(raw)).toEqual([0, 255, 0, 0, 0, 255, 0, 0, 0, 0, 255, 10, 20, 30]);
  });

  test('event files: framed records with valid CRCs holding the version, scalars and images', () => {
    const w = new TensorBoardWriter(path.join(tmp, 'tb'));
    w.scalars(5, { 'train/total_loss': 1.5, 'train/skip': NaN });
    const grid = imageGrid(new Float32Array(2 * 3 * 4 * 4).fill(0.5), 1, 2, 3, 4, 4);
    w.image(5, 'train/recons', grid.data, grid.height, grid.width, 3);
    w.close();
    expect(path.basename(w.file)).toMatch(/^events\.out\.tfevents\./);
    const records = readTfRecords(fs.readFileSync(w.file));
    expect(records).toHaveLength(3);
    expect(records[0].includes(Buffer.from('brain.Event:2'))).toBe(true);
    expect(records[1].includes(Buffer.from('train/total_loss'))).toBe(true);
    expect(records[1].includes(Buffer.from('train/skip'))).toBe(false);
    const f = Buffer.alloc(4);
    f.writeFloatLE(1.5);
    expect(records[1].includes(Buffer.concat([Buffer.from([0x15]), f]))).toBe(true); // simple_value = 1.5
    expect(records[2].includes(Buffer.from('PNG'))).toBe(true);
    expect([grid.height, grid.width]).toEqual([6, 11]);
  });
});
