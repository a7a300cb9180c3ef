/**
 * Synthetic dataset generators that write the original EfficientMORL processed .h5 layout:
 * groups `train` and `test`, each with `imgs` uint8 [N,H,W,3], `masks` uint8 [N,O,H,W,1] (255
 * where entity o is; entity 0 is the background) and `factors` float32 [N,O,F], plus root
 * attributes `generator` (JSON: name, seed, counts, version, shapes, factor columns) and
 * `factor_columns` (text).
 *
 * Determinism: a root Rng(seed) draws one seed per split, and each split draws its examples in
 * order from its own Rng, so the same seed gives byte-identical images, masks and factors (and
 * the test split does not depend on the size of the train split).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { H5File } from '../../io/h5';
import { Rng } from '../../util/rng';
import {
  DSPRITES_ENTITIES,
  DSPRITES_FACTOR_COLUMNS,
  DSPRITES_FACTORS,
  DSPRITES_MAX_SPRITES,
  DSPRITES_MIN_SPRITES,
  DSPRITES_SIZE,
  generateMultiDsprites,
} from './multi-dsprites';
import {
  TETROMINO_ENTITIES,
  TETROMINO_FACTOR_COLUMNS,
  TETROMINO_FACTORS,
  TETROMINO_SIZE,
  generateTetrominoes,
} from './tetrominoes';

export const GENERATORS = ['tetrominoes', 'multi_dsprites'] as const;
export type GeneratorName = (typeof GENERATORS)[number];

/** Examples generated between progress reports. */
export const GENERATION_CHUNK = 1000;

export interface GeneratorSpec {
  name: GeneratorName;
  version: number;
  height: number;
  width: number;
  /** Entities per image, the background included. */
  entities: number;
  factors: number;
  factorColumns: readonly string[];
  /** Paper split sizes. */
  splits: { train: number; test: number };
  /** Extra facts recorded in the `generator` attribute. */
  notes: Record<string, unknown>;
  /** Fills examples [start, start+count) of whole-split arrays. */
  fill(rng: Rng, imgs: Uint8Array, masks: Uint8Array, factors: Float32Array, start: number, count: number): void;
}

export const GENERATOR_SPECS: Record<GeneratorName, GeneratorSpec> = {
  tetrominoes: {
    name: 'tetrominoes',
    version: 1,
    height: TETROMINO_SIZE,
    width: TETROMINO_SIZE,
    entities: TETROMINO_ENTITIES,
    factors: TETROMINO_FACTORS,
    factorColumns: TETROMINO_FACTOR_COLUMNS,
    splits: { train: 60000, test: 320 },
    notes: {
      pieces: 3,
      shape_ids: "DeepMind's numbering of the 19 fixed orientations, 1..19",
      placement: 'any pixel position where the piece fits; no overlap',
    },
    fill: generateTetrominoes,
  },
  multi_dsprites: {
    name: 'multi_dsprites',
    version: 1,
    height: DSPRITES_SIZE,
    width: DSPRITES_SIZE,
    entities: DSPRITES_ENTITIES,
    factors: DSPRITES_FACTORS,
    factorColumns: DSPRITES_FACTOR_COLUMNS,
    splits: { train: 60000, test: 320 },
    notes: {
      variant: 'colored_on_grayscale',
      sprites: [DSPRITES_MIN_SPRITES, DSPRITES_MAX_SPRITES],
      shapes: { 1: 'square', 2: 'ellipse', 3: 'heart' },
      occlusion: 'later entities occlude earlier ones; masks hold the visible part',
    },
    fill: generateMultiDsprites,
  },
};

function spec(name: string): GeneratorSpec {
  if (!(GENERATORS as readonly string[]).includes(name)) {
    throw new Error(`unknown dataset generator '${name}'; known generators: ${GENERATORS.join(', ')}`);
  }
  return GENERATOR_SPECS[name as GeneratorName];
}

/** The paper's split sizes for a generator. */
export function defaultSplits(name: string): { train: number; test: number } {
  return { ...spec(name).splits };
}

export interface GenerateOptions {
  /** Output .h5 path (parent directories are created). */
  out: string;
  train: number;
  test: number;
  seed: number;
  /** Called with (examples done, total examples) at the start and after each chunk. */
  onProgress?: (done: number, total: number) => void;
}

/**
 * Generates one split a chunk at a time, appending each chunk to the file, so memory stays at
 * one chunk whatever the split size.
 */
async function writeSplit(s: GeneratorSpec, file: H5File, split: string, rng: Rng, n: number, progress: (delta: number) => void): Promise<void> {
  const pixels = s.height * s.width;
  const keys = { imgs: `${split}/imgs`, masks: `${split}/masks`, factors: `${split}/factors` };
  // One example per chunk: training reads random examples, and a bigger chunk would be
  // decompressed whole for each of them.
  const chunkRows = 1;
  file.createRowDataset(keys.imgs, [s.height, s.width, 3], 'uint8', chunkRows);
  file.createRowDataset(keys.masks, [s.entities, s.height, s.width, 1], 'uint8', chunkRows);
  file.createRowDataset(keys.factors, [s.entities, s.factors], 'float32', chunkRows);
  for (let start = 0; start < n; start += GENERATION_CHUNK) {
    const count = Math.min(GENERATION_CHUNK, n - start);
    const imgs = new Uint8Array(count * pixels * 3);
    const masks = new Uint8Array(count * s.entities * pixels);
    const factors = new Float32Array(count * s.entities * s.factors);
    s.fill(rng, imgs, masks, factors, 0, count);
    file.appendRows(keys.imgs, imgs);
    file.appendRows(keys.masks, masks);
    file.appendRows(keys.factors, factors);
    progress(count);
    // Let a progress display redraw between chunks.
    await new Promise<void>((resolve) => setImmediate(resolve));
  }
}

/**
 * Generates a dataset and writes it to `opts.out` (written to a temporary file next to it and
 * renamed into place when complete). An unknown name throws an Error listing the known names.
 */
export async function generateDataset(name: string, opts: GenerateOptions): Promise<void> {
  const s = spec(name);
  for (const key of ['train', 'test'] as const) {
    const v = opts[key];
    if (!Number.isSafeInteger(v) || v < 0) throw new Error(`generateDataset: ${key} must be a non-negative integer, got ${v}`);
  }
  if (!Number.isSafeInteger(opts.seed)) throw new Error(`generateDataset: seed must be an integer, got ${opts.seed}`);
  if (!opts.out) throw new Error('generateDataset: out path is required');

  const root = new Rng(opts.seed);
  const splitSeeds = { train: root.nextUint32(), test: root.nextUint32() };
  const total = opts.train + opts.test;
  let done = 0;
  opts.onProgress?.(0, total);
  const progress = (delta: number) => {
    done += delta;
    opts.onProgress?.(done, total);
  };

  const out = path.resolve(opts.out);
  const tmp = path.join(path.dirname(out), `.${path.basename(out)}.${process.pid}.tmp`);
  const file = await H5File.open(tmp, 'w');
  try {
    for (const split of ['train', 'test'] as const) {
      await writeSplit(s, file, split, new Rng(splitSeeds[split]), opts[split], progress);
    }
    file.setAttr('', 'generator', {
      name: s.name,
      seed: opts.seed,
      counts: { train: opts.train, test: opts.test },
      version: s.version,
      image_size: [s.height, s.width],
      max_entities: s.entities,
      factor_columns: s.factorColumns,
      ...s.notes,
    });
    file.setAttr('', 'factor_columns', s.factorColumns.join(', '));
    file.close();
    fs.renameSync(tmp, out);
  } catch (err) {
    file.close();
    fs.rmSync(tmp, { force: true });
    throw err;
  }
}
