import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { withH5File } from '../lib/io/h5';
import { Rng } from '../lib/util/rng';
import { GENERATORS, defaultSplits, generateDataset } from '../lib/data/generators';
import {
  BEVEL,
  TETROMINO_COLOURS,
  TETROMINO_ENTITIES,
  TETROMINO_FACTORS,
  TETROMINO_SHAPES,
  TETROMINO_SIZE,
  generateTetrominoes,
  renderTetrominoExample,
  tetrominoExtent,
} from '../lib/data/generators/tetrominoes';
import {
  DSPRITES_ENTITIES,
  DSPRITES_FACTORS,
  DSPRITES_SIZE,
  MIN_VISIBLE_PIXELS,
  hsvToRgb,
  renderMultiDspritesExample,
} from '../lib/data/generators/multi-dsprites';
import { fixturePath } from './helpers';

const S = TETROMINO_SIZE;
const P = S * S;
const O = TETROMINO_ENTITIES;
const F = TETROMINO_FACTORS;

interface Split {
  n: number;
  imgs: Uint8Array;
  masks: Uint8Array;
  factors?: Float32Array;
}

async function readSplit(file: string, split: string): Promise<Split> {
  return withH5File(file, 'r', (f) => {
    const n = f.info(`${split}/imgs`).shape[0];
    return {
      n,
      imgs: f.read(`${split}/imgs`) as Uint8Array,
      masks: f.read(`${split}/masks`) as Uint8Array,
      factors: f.has(`${split}/factors`) ? f.readFloat32(`${split}/factors`) : undefined,
    };
  });
}

interface Piece {
  /** Pixel indices (r*35+c) covered by the entity's mask. */
  pixels: number[];
  top: number;
  left: number;
  /** The cell pattern ('#'/'.' rows) sampled on the 5-px grid from the bounding box corner. */
  pattern: string[];
  colour: [number, number, number];
}

function piece(s: Split, n: number, o: number): Piece {
  const base = (n * O + o) * P;
  const pixels: number[] = [];
  let top = S;
  let left = S;
  let bottom = -1;
  let right = -1;
  for (let p = 0; p < P; p++) {
    if (s.masks[base + p]) {
      pixels.push(p);
      const r = Math.floor(p / S);
      const c = p % S;
      top = Math.min(top, r);
      left = Math.min(left, c);
      bottom = Math.max(bottom, r);
      right = Math.max(right, c);
    }
  }
  const pattern: string[] = [];
  for (let r = top; r <= bottom; r += 5) {
    let row = '';
    for (let c = left; c <= right; c += 5) row += s.masks[base + r * S + c] ? '#' : '.';
    pattern.push(row);
  }
  const colour: [number, number, number] = [0, 0, 0];
  for (const p of pixels) for (let ch = 0; ch < 3; ch++) colour[ch] = Math.max(colour[ch], s.imgs[(n * P + p) * 3 + ch]);
  return { pixels, top, left, pattern, colour: colour.map((v) => (v > 0 ? 1 : 0)) as [number, number, number] };
}

function shapeIdOf(pattern: string[]): number {
  return TETROMINO_SHAPES.findIndex((rows, id) => id > 0 && rows.join('/') === pattern.join('/'));
}

/** Every 5x5 cell of a piece as "r,g,b|25 values of the max channel", from the piece's origin. */
function cellsOf(s: Split, n: number, pc: Piece): string[] {
  const out: string[] = [];
  const cover = new Set(pc.pixels);
  for (const p of pc.pixels) {
    const r = Math.floor(p / S);
    const c = p % S;
    if ((r - pc.top) % 5 !== 0 || (c - pc.left) % 5 !== 0) continue;
    const vals: string[] = [];
    for (let i = 0; i < 5; i++) {
      for (let j = 0; j < 5; j++) {
        const q = (r + i) * S + c + j;
        if (!cover.has(q)) throw new Error(`cell at (${r},${c}) is not whole`);
        const px = Array.from(s.imgs.subarray((n * P + q) * 3, (n * P + q) * 3 + 3));
        vals.push(px.join('.'));
      }
    }
    out.push(`${pc.colour}|${vals.join(' ')}`);
  }
  return out;
}

/** Counts pixels that are not covered by exactly one entity at 255 (values other than 0/255 count too). */
function partitionErrors(masks: Uint8Array, n: number, entities: number, pixels: number): number {
  let bad = 0;
  for (let i = 0; i < n; i++) {
    for (let p = 0; p < pixels; p++) {
      let on = 0;
      for (let o = 0; o < entities; o++) {
        const v = masks[(i * entities + o) * pixels + p];
        if (v === 255) on++;
        else if (v !== 0) bad++;
      }
      if (on !== 1) bad++;
    }
  }
  return bad;
}

/** Background pixels (entity 0) of image n that are not black. */
function litBackground(s: Split, n: number): number {
  let lit = 0;
  for (let p = 0; p < P; p++) {
    if (s.masks[n * O * P + p]) {
      const q = (n * P + p) * 3;
      if (s.imgs[q] | s.imgs[q + 1] | s.imgs[q + 2]) lit++;
    }
  }
  return lit;
}

function mismatches(a: Uint8Array, aOff: number, b: Uint8Array, bOff: number, len: number): number {
  let bad = 0;
  for (let i = 0; i < len; i++) if (a[aOff + i] !== b[bOff + i]) bad++;
  return bad;
}

const REAL = fixturePath('tetrominoes-real-10.h5');
const MINI = fixturePath('data', 'tetrominoes-mini-10.h5');

let tmp: string;
let real: Split;
let mini: Split;
/** Real cells, as produced by cellsOf, from both real fixture files. */
const realCells = new Set<string>();

beforeAll(async () => {
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'emorl-gen-'));
  real = await readSplit(REAL, 'test');
  mini = await readSplit(MINI, 'test');
  for (const s of [real, mini]) {
    for (let n = 0; n < s.n; n++) for (let o = 1; o < O; o++) for (const c of cellsOf(s, n, piece(s, n, o))) realCells.add(c);
  }
});

afterAll(() => {
  if (tmp) fs.rmSync(tmp, { recursive: true, force: true });
});

describe('Tetrominoes shapes', () => {
  test('ids 1..19 are exactly the 19 fixed orientations of the seven tetrominoes', () => {
    const norm = (cells: [number, number][]): string => {
      const r0 = Math.min(...cells.map((c) => c[0]));
      const c0 = Math.min(...cells.map((c) => c[1]));
      const h = Math.max(...cells.map((c) => c[0])) - r0 + 1;
      const w = Math.max(...cells.map((c) => c[1])) - c0 + 1;
      const rows = Array.from({ length: h }, () => Array<string>(w).fill('.'));
      for (const [r, c] of cells) rows[r - r0][c - c0] = '#';
      return rows.map((r) => r.join('')).join('/');
    };
    const bases: [number, number][][] = [
      [[0, 0], [0, 1], [0, 2], [0, 3]], // I
      [[0, 0], [0, 1], [1, 0], [1, 1]], // O
      [[0, 0], [0, 1], [0, 2], [1, 1]], // T
      [[0, 0], [0, 1], [0, 2], [1, 0]], // L
      [[0, 0], [0, 1], [0, 2], [1, 2]], // J
      [[0, 1], [0, 2], [1, 0], [1, 1]], // S
      [[0, 0], [0, 1], [1, 1], [1, 2]], // Z
    ];
    const all = new Set<string>();
    for (const b of bases) {
      let cells = b;
      for (let k = 0; k < 4; k++) {
        all.add(norm(cells));
        cells = cells.map(([r, c]) => [c, -r] as [number, number]);
      }
    }
    expect(all.size).toBe(19);
    const ours = TETROMINO_SHAPES.slice(1).map((rows) => rows.join('/'));
    expect(ours).toHaveLength(19);
    expect(new Set(ours)).toEqual(all);
    expect(TETROMINO_SHAPES[2]).toEqual(['#', '#', '#', '#']);
    expect(TETROMINO_SHAPES[19]).toEqual(['##', '##']);
    expect(TETROMINO_SHAPES[15]).toEqual(['.#.', '###']);
    expect(TETROMINO_SHAPES[16]).toEqual(['###', '.#.']);
  });
});

describe('Tetrominoes against the real data', () => {
  test('real pieces: 100 px, whole 5x5 cells, one of our 19 shapes, one of the six colours, black background', () => {
    const colours = new Set<string>();
    for (const s of [real, mini]) {
      expect(s.imgs.length).toBe(s.n * P * 3);
      expect(partitionErrors(s.masks, s.n, O, P)).toBe(0);
      for (let n = 0; n < s.n; n++) {
        expect(litBackground(s, n)).toBe(0);
        for (let o = 1; o < O; o++) {
          const pc = piece(s, n, o);
          expect(pc.pixels).toHaveLength(100);
          expect(shapeIdOf(pc.pattern)).toBeGreaterThan(0);
          expect(cellsOf(s, n, pc)).toHaveLength(4);
          colours.add(pc.colour.join(','));
        }
      }
    }
    expect(colours).toEqual(new Set(TETROMINO_COLOURS.map((c) => c.join(','))));
  });

  test('every real cell is the bevel pattern times the colour, pixel for pixel, and our renderer matches each real piece', () => {
    const expectedCell = (colour: number[]) =>
      `${colour}|${BEVEL.flat().map((v) => colour.map((ch) => ch * v).join('.')).join(' ')}`;
    expect(realCells).toEqual(new Set(TETROMINO_COLOURS.map((c) => expectedCell([...c]))));
    // Render each real piece alone from (shape, position, colour) and compare its pixels and mask.
    const img = new Uint8Array(P * 3);
    const masks = new Uint8Array(O * P);
    let compared = 0;
    for (const s of [real, mini]) {
      for (let n = 0; n < s.n; n++) {
        for (let o = 1; o < O; o++) {
          const pc = piece(s, n, o);
          const fac = new Float32Array(O * F);
          fac.set([pc.top, pc.left, shapeIdOf(pc.pattern), ...pc.colour, 1], F);
          renderTetrominoExample(fac, 0, img, 0, masks, 0);
          const ours = [...masks.subarray(P, 2 * P).keys()].filter((p) => masks[P + p]);
          expect(ours).toEqual(pc.pixels);
          for (const p of pc.pixels) {
            expect(mismatches(img, p * 3, s.imgs, (n * P + p) * 3, 3)).toBe(0);
            compared++;
          }
        }
      }
    }
    expect(compared).toBe(20 * 3 * 100);
  });

  test("re-rendering DeepMind's mini examples from their factors reproduces images and masks exactly (shape numbering)", () => {
    const f = mini.factors!;
    expect(f.length).toBe(10 * O * F);
    const img = new Uint8Array(P * 3);
    const masks = new Uint8Array(O * P);
    const ids = new Set<number>();
    for (let n = 0; n < 10; n++) {
      expect(Array.from(f.subarray(n * O * F, n * O * F + F))).toEqual([0, 0, 0, 0, 0, 0, 1]);
      renderTetrominoExample(f, n * O * F, img, 0, masks, 0);
      expect(mismatches(img, 0, mini.imgs, n * P * 3, P * 3)).toBe(0);
      expect(mismatches(masks, 0, mini.masks, n * O * P, O * P)).toBe(0);
      for (let o = 1; o < O; o++) {
        const id = f[(n * O + o) * F + 2];
        ids.add(id);
        // x is the top row and y the left column of the bounding box.
        const pc = piece(mini, n, o);
        expect([f[(n * O + o) * F], f[(n * O + o) * F + 1]]).toEqual([pc.top, pc.left]);
        expect(shapeIdOf(pc.pattern)).toBe(id);
      }
    }
    expect(ids.size).toBe(16);
  });

  test('real pieces sit at arbitrary pixel offsets, not on a common 5-px grid', () => {
    const rowRes = new Set<number>();
    const colRes = new Set<number>();
    for (const s of [real, mini]) {
      for (let n = 0; n < s.n; n++) {
        for (let o = 1; o < O; o++) {
          const pc = piece(s, n, o);
          rowRes.add(pc.top % 5);
          colRes.add(pc.left % 5);
        }
      }
    }
    expect(rowRes.size).toBe(5);
    expect(colRes.size).toBe(5);
  });
});

describe('Tetrominoes generator', () => {
  let gen: Split;
  let genTest: Split;
  let attr: Record<string, unknown>;
  const file = () => path.join(tmp, 'tet-a.h5');
  const progress: [number, number][] = [];

  beforeAll(async () => {
    await generateDataset('tetrominoes', { out: file(), train: 2500, test: 40, seed: 7, onProgress: (d, t) => progress.push([d, t]) });
    gen = await readSplit(file(), 'train');
    genTest = await readSplit(file(), 'test');
    attr = await withH5File(file(), 'r', (f) => JSON.parse(f.attr('', 'generator') as string));
  });

  test('writes the processed layout and the generator attribute', async () => {
    await withH5File(file(), 'r', (f) => {
      expect(f.keys().sort()).toEqual(['test', 'train']);
      expect(f.info('train/imgs')).toEqual({ shape: [2500, 35, 35, 3], dtype: '<B' });
      expect(f.info('train/masks')).toEqual({ shape: [2500, 4, 35, 35, 1], dtype: '<B' });
      expect(f.info('train/factors')).toEqual({ shape: [2500, 4, 7], dtype: '<f' });
      expect(f.info('test/imgs')).toEqual({ shape: [40, 35, 35, 3], dtype: '<B' });
      expect(f.info('test/masks').shape).toEqual([40, 4, 35, 35, 1]);
      expect(f.info('test/factors').shape).toEqual([40, 4, 7]);
    });
    expect(attr).toMatchObject({ name: 'tetrominoes', seed: 7, counts: { train: 2500, test: 40 }, version: 1 });
    expect(attr.factor_columns).toHaveLength(7);
    expect(progress[0]).toEqual([0, 2540]);
    expect(progress[progress.length - 1]).toEqual([2540, 2540]);
    for (let i = 1; i < progress.length; i++) expect(progress[i][0]).toBeGreaterThan(progress[i - 1][0]);
  });

  test('masks partition the image; pieces are 100 px, never overlap, match the factors and re-render exactly', () => {
    const f = gen.factors!;
    expect(partitionErrors(gen.masks, gen.n, O, P)).toBe(0);
    expect(partitionErrors(genTest.masks, genTest.n, O, P)).toBe(0);
    const img = new Uint8Array(P * 3);
    const masks = new Uint8Array(O * P);
    const ids = new Set<number>();
    const colours = new Set<string>();
    const rowRes = new Set<number>();
    let touchesBottom = false;
    let touchesTop = false;
    const problems: string[] = [];
    for (let n = 0; n < gen.n; n++) {
      if (f.subarray(n * O * F, n * O * F + F).join() !== '0,0,0,0,0,0,1') problems.push(`${n}: background factors`);
      for (let o = 1; o < O; o++) {
        const pc = piece(gen, n, o);
        const row = (n * O + o) * F;
        if (pc.pixels.length !== 100) problems.push(`${n}/${o}: ${pc.pixels.length} px`);
        const want = [pc.top, pc.left, shapeIdOf(pc.pattern), ...pc.colour, 1].join();
        if (f.subarray(row, row + F).join() !== want) problems.push(`${n}/${o}: factors ${f.subarray(row, row + F)} vs mask ${want}`);
        ids.add(f[row + 2]);
        colours.add(pc.colour.join(','));
        rowRes.add(pc.top % 5);
        if (pc.top === 0) touchesTop = true;
        if (pc.top + tetrominoExtent(f[row + 2]).h === S) touchesBottom = true;
      }
      renderTetrominoExample(f, n * O * F, img, 0, masks, 0);
      if (mismatches(img, 0, gen.imgs, n * P * 3, P * 3)) problems.push(`${n}: image differs from its re-rendering`);
      if (mismatches(masks, 0, gen.masks, n * O * P, O * P)) problems.push(`${n}: masks differ from their re-rendering`);
    }
    expect(problems).toEqual([]);
    expect(ids.size).toBe(19);
    expect(colours.size).toBe(6);
    expect(rowRes.size).toBe(5);
    expect(touchesTop && touchesBottom).toBe(true);
  });

  test("every generated cell is pixel-identical to a real cell of the same colour, and the background is black", () => {
    const seen = new Set<string>();
    let lit = 0;
    for (let n = 0; n < gen.n; n++) {
      for (let o = 1; o < O; o++) for (const c of cellsOf(gen, n, piece(gen, n, o))) seen.add(c);
      lit += litBackground(gen, n);
    }
    expect(seen).toEqual(realCells);
    expect(lit).toBe(0);
  });

  test('the same seed gives identical datasets, a different seed a different one', async () => {
    const a = path.join(tmp, 'tet-s1.h5');
    const b = path.join(tmp, 'tet-s1-again.h5');
    const c = path.join(tmp, 'tet-s2.h5');
    await generateDataset('tetrominoes', { out: a, train: 60, test: 12, seed: 1 });
    await generateDataset('tetrominoes', { out: b, train: 60, test: 12, seed: 1 });
    await generateDataset('tetrominoes', { out: c, train: 60, test: 12, seed: 2 });
    for (const split of ['train', 'test']) {
      const [x, y, z] = await Promise.all([readSplit(a, split), readSplit(b, split), readSplit(c, split)]);
      expect(Buffer.from(y.imgs).equals(Buffer.from(x.imgs))).toBe(true);
      expect(Buffer.from(y.masks).equals(Buffer.from(x.masks))).toBe(true);
      expect(Buffer.from(y.factors!.buffer).equals(Buffer.from(x.factors!.buffer))).toBe(true);
      expect(Buffer.from(z.imgs).equals(Buffer.from(x.imgs))).toBe(false);
      expect(Buffer.from(z.factors!.buffer).equals(Buffer.from(x.factors!.buffer))).toBe(false);
    }
    // The test split does not depend on the train split's size.
    await generateDataset('tetrominoes', { out: b, train: 5, test: 12, seed: 1 });
    const [t1, t2] = await Promise.all([readSplit(a, 'test'), readSplit(b, 'test')]);
    expect(Buffer.from(t2.imgs).equals(Buffer.from(t1.imgs))).toBe(true);
  });
});

describe('Multi-dSprites generator', () => {
  const D = DSPRITES_SIZE * DSPRITES_SIZE;
  const E = DSPRITES_ENTITIES;
  const G = DSPRITES_FACTORS;

  test('masks partition the image, 2-5 visible sprites, unused entities empty, images re-render from factors', async () => {
    const file = path.join(tmp, 'md.h5');
    await generateDataset('multi_dsprites', { out: file, train: 400, test: 10, seed: 5 });
    await withH5File(file, 'r', (f) => {
      expect(f.info('train/imgs').shape).toEqual([400, 64, 64, 3]);
      expect(f.info('train/masks').shape).toEqual([400, 6, 64, 64, 1]);
      expect(f.info('train/factors').shape).toEqual([400, 6, 9]);
      expect(f.info('test/imgs').shape).toEqual([10, 64, 64, 3]);
      const attr = JSON.parse(f.attr('', 'generator') as string);
      expect(attr).toMatchObject({ name: 'multi_dsprites', seed: 5, counts: { train: 400, test: 10 }, version: 1 });
      expect(attr.factor_columns).toHaveLength(9);
    });
    const s = await readSplit(file, 'train');
    const fac = s.factors!;
    expect(partitionErrors(s.masks, s.n, E, D)).toBe(0);
    const counts = new Set<number>();
    const shapes = new Set<number>();
    let occluded = 0;
    const img = new Uint8Array(D * 3);
    const masks = new Uint8Array(E * D);
    for (let n = 0; n < s.n; n++) {
      const base = n * E * G;
      expect(fac[base + 8]).toBe(1);
      let k = 0;
      while (k + 1 < E && fac[base + (k + 1) * G + 8] === 1) k++;
      counts.add(k);
      for (let o = 1; o < E; o++) {
        let px = 0;
        for (let p = 0; p < D; p++) if (s.masks[(n * E + o) * D + p]) px++;
        if (o <= k) {
          expect(px).toBeGreaterThanOrEqual(MIN_VISIBLE_PIXELS);
          shapes.add(fac[base + o * G + 2]);
        } else {
          expect(px).toBe(0);
          expect(Array.from(fac.subarray(base + o * G, base + (o + 1) * G))).toEqual(Array(G).fill(0));
        }
      }
      // Background is grey; each pixel has its entity's colour.
      const grey = Math.round(fac[base + 7] * 255);
      for (let p = 0; p < D; p++) {
        let o = 0;
        while (!s.masks[(n * E + o) * D + p]) o++;
        const want = o === 0 ? [grey, grey, grey] : hsvToRgb(fac[base + o * G + 5], fac[base + o * G + 6], fac[base + o * G + 7]);
        if (mismatches(s.imgs, (n * D + p) * 3, Uint8Array.from(want), 0, 3) !== 0) throw new Error(`image ${n} pixel ${p}`);
      }
      const visible = renderMultiDspritesExample(fac, base, img, 0, masks, 0);
      expect(mismatches(img, 0, s.imgs, n * D * 3, D * 3)).toBe(0);
      expect(mismatches(masks, 0, s.masks, n * E * D, E * D)).toBe(0);
      // Occlusion happens: the later sprites hide part of some earlier sprite.
      const unoccluded = new Array<number>(E).fill(0);
      const single = new Float32Array(E * G);
      for (let o = 1; o <= k; o++) {
        single.fill(0);
        single.set(fac.subarray(base, base + G), 0);
        single.set(fac.subarray(base + o * G, base + (o + 1) * G), G);
        unoccluded[o] = renderMultiDspritesExample(single, 0, img, 0, masks, 0)[1];
        if (unoccluded[o] > visible[o]) occluded++;
      }
    }
    expect([...counts].sort()).toEqual([2, 3, 4, 5]);
    expect([...shapes].sort()).toEqual([1, 2, 3]);
    expect(occluded).toBeGreaterThan(0);
  });

  test('the same seed gives identical datasets, a different seed a different one', async () => {
    const a = path.join(tmp, 'md-1.h5');
    const b = path.join(tmp, 'md-1b.h5');
    const c = path.join(tmp, 'md-2.h5');
    for (const [out, seed] of [[a, 9], [b, 9], [c, 10]] as const) {
      await generateDataset('multi_dsprites', { out, train: 30, test: 5, seed });
    }
    const [x, y, z] = await Promise.all([readSplit(a, 'train'), readSplit(b, 'train'), readSplit(c, 'train')]);
    expect(Buffer.from(y.imgs).equals(Buffer.from(x.imgs))).toBe(true);
    expect(Buffer.from(y.masks).equals(Buffer.from(x.masks))).toBe(true);
    expect(Buffer.from(y.factors!.buffer).equals(Buffer.from(x.factors!.buffer))).toBe(true);
    expect(Buffer.from(z.imgs).equals(Buffer.from(x.imgs))).toBe(false);
  });
});

describe('generateDataset', () => {
  test('lists the generators and the paper splits', () => {
    expect(GENERATORS).toEqual(['tetrominoes', 'multi_dsprites']);
    expect(defaultSplits('tetrominoes')).toEqual({ train: 60000, test: 320 });
    expect(defaultSplits('multi_dsprites')).toEqual({ train: 60000, test: 320 });
    expect(() => defaultSplits('clevr6')).toThrow(/unknown dataset generator 'clevr6'.*tetrominoes, multi_dsprites/);
  });

  test('an unknown name is an error that lists the known names; bad counts are errors; nothing is written', async () => {
    const out = path.join(tmp, 'none.h5');
    await expect(generateDataset('sprites', { out, train: 1, test: 1, seed: 0 })).rejects.toThrow(
      "unknown dataset generator 'sprites'; known generators: tetrominoes, multi_dsprites",
    );
    await expect(generateDataset('tetrominoes', { out, train: -1, test: 1, seed: 0 })).rejects.toThrow(/train must be/);
    await expect(generateDataset('tetrominoes', { out, train: 1, test: 1.5, seed: 0 })).rejects.toThrow(/test must be/);
    expect(fs.existsSync(out)).toBe(false);
    expect(fs.readdirSync(tmp).filter((f) => f.endsWith('.tmp'))).toEqual([]);
  });
});
