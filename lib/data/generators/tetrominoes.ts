/**
 * Tetrominoes, as in DeepMind's multi_object_datasets (the data EfficientMORL trains on), written
 * in the original EfficientMORL processed layout.
 *
 * Each 35x35 image has a black background and three non-overlapping tetrominoes. A tetromino is
 * 4 cells of 5x5 px (100 px), one of the 19 fixed orientations, in one of six binary RGB colours.
 * Every cell is shaded by the same bevel pattern (BEVEL, value/255 times the colour channel),
 * tiled from the piece's origin.
 *
 * Conventions checked against the real data (`tetrominoes-real-10.h5` and DeepMind's own
 * `tetrominoes_mini` examples, `data/tetrominoes-mini-10.h5`; see test/generators.test.ts):
 * - A piece's cells lie on a 5-px grid relative to the piece's own origin, but the piece itself
 *   is placed at any pixel position where its bounding box fits (rows 0..35-h, columns 0..35-w):
 *   the 20 real images show top rows such as 0, 1, 2, 3, 4, 9, 11, 12, 14, 17, 22, 24, 25 and
 *   left columns up to 25 (= 35-10), with no common 5-px grid offset.
 * - Pieces never overlap, but they may touch (1 px apart, even side by side) and their bounding
 *   boxes may overlap; colours and shapes may repeat within an image.
 * - The bevel is exactly BEVEL in every cell of every piece, for every colour (the pixel value
 *   is BEVEL[i][j] in each "on" channel, 0 in the others).
 * - Factors per entity (F=7): x = top row of the piece's bounding box, y = its left column,
 *   shape id (DeepMind's numbering, 1..19, TETROMINO_SHAPES), colour r, g, b (0/1), visibility.
 *   The background (entity 0) has all-zero factors and visibility 1.
 */
import { Rng } from '../../util/rng';

export const TETROMINO_SIZE = 35;
export const TETROMINO_CELL = 5;
/** Background + 3 pieces. */
export const TETROMINO_ENTITIES = 4;
export const TETROMINO_PIECES = 3;
export const TETROMINO_FACTORS = 7;
export const TETROMINO_FACTOR_COLUMNS = [
  'x (top row of the bounding box)',
  'y (left column of the bounding box)',
  'shape id (DeepMind numbering 1..19; 0 background)',
  'colour r (0/1)',
  'colour g (0/1)',
  'colour b (0/1)',
  'visibility',
] as const;

/** The shading of every 5x5 cell, row by row (value/255 times the colour channel). */
export const BEVEL: readonly (readonly number[])[] = [
  [191, 255, 255, 255, 223],
  [127, 159, 159, 159, 191],
  [127, 159, 159, 159, 191],
  [127, 159, 159, 159, 191],
  [95, 63, 63, 63, 127],
];

/** The six binary RGB colours: red, green, blue, yellow, magenta, cyan. */
export const TETROMINO_COLOURS: readonly (readonly [number, number, number])[] = [
  [1, 0, 0],
  [0, 1, 0],
  [0, 0, 1],
  [1, 1, 0],
  [1, 0, 1],
  [0, 1, 1],
];

/**
 * DeepMind's shape ids (index = id; index 0 is the background), each as rows of cells ('#' on).
 *
 * How the numbering was established. `data/tetrominoes-mini-10.h5` holds DeepMind's own factors;
 * matching each piece's mask against its shape id gives 16 ids directly:
 *   2 I standing; 3 ###/#..; 5 ..#/###; 6 ###/..#; 7 ##/.#/.#; 9 ##/#./#.; 10 #./#./##;
 *   11 ##./.##; 12 .##/##.; 13 .#/##/#.; 14 #./##/.#; 15 .#./### (T up); 16 ###/.#. (T down);
 *   17 .#/##/.#; 18 #./##/#.; 19 O.
 * Missing are 1, 4 and 8, and the missing orientations are the lying I (####), the lying J
 * #../### and the standing J .#/.#/##. The observed ids follow one pattern: each family is listed
 * lying (wider than tall) before standing, and within a family ids come in pairs (2k-1, 2k) that
 * are top-bottom mirror images: 5/6, 9/10, 11/12, 13/14, 15/16 (and 17/18, the standing T, whose
 * top-bottom mirror is itself, pairs with its left-right mirror). So:
 *   - 1 = I lying: the I family is 1-2, and 2 (the partner) is the standing I;
 *   - 4 = #../###: the top-bottom mirror of 3 (###/#..), and 3-6 are the lying L/J;
 *   - 8 = .#/.#/##: the top-bottom mirror of 7 (##/.#/.#), and 7-10 are the standing L/J.
 * The other assignment of 4 and 8 would put a standing piece among the lying ones (and the
 * reverse), breaking both the lying-before-standing order and the mirror pairs. The real images
 * of `tetrominoes-real-10.h5` (no factors) contain #../### twice: it is a real orientation.
 */
export const TETROMINO_SHAPES: readonly (readonly string[])[] = [
  [], // 0: background
  ['####'], // 1: I lying (derived)
  ['#', '#', '#', '#'], // 2: I standing
  ['###', '#..'], // 3: L lying
  ['#..', '###'], // 4: J lying (derived: mirror of 3)
  ['..#', '###'], // 5: L lying
  ['###', '..#'], // 6: J lying
  ['##', '.#', '.#'], // 7: L standing
  ['.#', '.#', '##'], // 8: J standing (derived: mirror of 7)
  ['##', '#.', '#.'], // 9: J standing
  ['#.', '#.', '##'], // 10: L standing
  ['##.', '.##'], // 11: Z lying
  ['.##', '##.'], // 12: S lying
  ['.#', '##', '#.'], // 13: Z standing
  ['#.', '##', '.#'], // 14: S standing
  ['.#.', '###'], // 15: T pointing up
  ['###', '.#.'], // 16: T pointing down
  ['.#', '##', '.#'], // 17: T pointing left
  ['#.', '##', '#.'], // 18: T pointing right
  ['##', '##'], // 19: O
];

export const TETROMINO_NUM_SHAPES = 19;

/** A shape compiled for rendering into a 35x35 image. */
interface CompiledShape {
  /** Height and width of the bounding box in pixels. */
  h: number;
  w: number;
  /** Pixel offsets (dr*35 + dc) of the 100 covered pixels from the piece's origin. */
  offsets: Int32Array;
  /** The bevel value of each of those pixels. */
  shade: Uint8Array;
}

function compileShape(rows: readonly string[]): CompiledShape {
  const cells: [number, number][] = [];
  rows.forEach((row, r) => {
    for (let c = 0; c < row.length; c++) if (row[c] === '#') cells.push([r, c]);
  });
  if (cells.length !== 4) throw new Error(`tetromino ${JSON.stringify(rows)} has ${cells.length} cells`);
  const C = TETROMINO_CELL;
  const offsets = new Int32Array(4 * C * C);
  const shade = new Uint8Array(4 * C * C);
  let k = 0;
  for (const [cr, cc] of cells) {
    for (let i = 0; i < C; i++) {
      for (let j = 0; j < C; j++) {
        offsets[k] = (cr * C + i) * TETROMINO_SIZE + cc * C + j;
        shade[k] = BEVEL[i][j];
        k++;
      }
    }
  }
  return { h: rows.length * C, w: Math.max(...rows.map((r) => r.length)) * C, offsets, shade };
}

const COMPILED: CompiledShape[] = TETROMINO_SHAPES.map((rows, id) =>
  id === 0 ? { h: 0, w: 0, offsets: new Int32Array(0), shade: new Uint8Array(0) } : compileShape(rows),
);

/** Height and width in pixels of a shape's bounding box. */
export function tetrominoExtent(id: number): { h: number; w: number } {
  if (!Number.isInteger(id) || id < 1 || id > TETROMINO_NUM_SHAPES) throw new Error(`tetrominoes: bad shape id ${id}`);
  return { h: COMPILED[id].h, w: COMPILED[id].w };
}

const PIXELS = TETROMINO_SIZE * TETROMINO_SIZE;
export const TETROMINO_IMAGE_VALUES = PIXELS * 3;
export const TETROMINO_MASK_VALUES = TETROMINO_ENTITIES * PIXELS;
export const TETROMINO_FACTOR_VALUES = TETROMINO_ENTITIES * TETROMINO_FACTORS;

/**
 * Renders one example from its factors (TETROMINO_ENTITIES rows of TETROMINO_FACTORS values at
 * `fOff`) into an image (35*35*3 values at `iOff`, HWC) and masks (4*35*35 values at `mOff`,
 * [O,H,W,1]). Entities with visibility 0 are skipped. Throws on a bad id or colour, a piece out
 * of the image, or overlapping pieces.
 */
export function renderTetrominoExample(
  factors: ArrayLike<number>,
  fOff: number,
  img: Uint8Array,
  iOff: number,
  masks: Uint8Array,
  mOff: number,
): void {
  img.fill(0, iOff, iOff + TETROMINO_IMAGE_VALUES);
  masks.fill(255, mOff, mOff + PIXELS);
  masks.fill(0, mOff + PIXELS, mOff + TETROMINO_MASK_VALUES);
  for (let o = 1; o < TETROMINO_ENTITIES; o++) {
    const f = fOff + o * TETROMINO_FACTORS;
    if (factors[f + 6] === 0) continue;
    const row = factors[f];
    const col = factors[f + 1];
    const id = factors[f + 2];
    const r = factors[f + 3];
    const g = factors[f + 4];
    const b = factors[f + 5];
    if (!Number.isInteger(id) || id < 1 || id > TETROMINO_NUM_SHAPES) {
      throw new Error(`tetrominoes: entity ${o} has bad shape id ${id}`);
    }
    if ((r !== 0 && r !== 1) || (g !== 0 && g !== 1) || (b !== 0 && b !== 1)) {
      throw new Error(`tetrominoes: entity ${o} has non-binary colour ${r},${g},${b}`);
    }
    const s = COMPILED[id];
    if (!Number.isInteger(row) || !Number.isInteger(col) || row < 0 || col < 0 ||
        row + s.h > TETROMINO_SIZE || col + s.w > TETROMINO_SIZE) {
      throw new Error(`tetrominoes: entity ${o} (shape ${id}) at (${row}, ${col}) does not fit the image`);
    }
    const origin = row * TETROMINO_SIZE + col;
    const om = mOff + o * PIXELS;
    for (let k = 0; k < s.offsets.length; k++) {
      const p = origin + s.offsets[k];
      if (masks[mOff + p] === 0) throw new Error(`tetrominoes: entity ${o} overlaps another piece`);
      masks[mOff + p] = 0;
      masks[om + p] = 255;
      const v = s.shade[k];
      const q = iOff + p * 3;
      img[q] = r * v;
      img[q + 1] = g * v;
      img[q + 2] = b * v;
    }
  }
}

/**
 * Samples the factors of one example into `factors` at `fOff`: each piece draws a shape id
 * (uniform over the 19), a position (uniform over every pixel position where the piece fits),
 * redrawing both until it overlaps no earlier piece, then a colour (uniform over the six).
 * `occ` is scratch space of 35*35 values.
 */
export function sampleTetrominoFactors(rng: Rng, factors: Float32Array, fOff: number, occ: Uint8Array): void {
  occ.fill(0);
  factors.fill(0, fOff, fOff + TETROMINO_FACTOR_VALUES);
  factors[fOff + 6] = 1; // background visibility
  for (let o = 1; o <= TETROMINO_PIECES; o++) {
    let id: number;
    let origin: number;
    let row: number;
    let col: number;
    for (;;) {
      id = 1 + rng.int(TETROMINO_NUM_SHAPES);
      const s = COMPILED[id];
      row = rng.int(TETROMINO_SIZE - s.h + 1);
      col = rng.int(TETROMINO_SIZE - s.w + 1);
      origin = row * TETROMINO_SIZE + col;
      let free = true;
      // Pieces sit at arbitrary pixel offsets (not on a shared 5-px grid): check all 100 px.
      for (let k = 0; k < s.offsets.length; k++) {
        if (occ[origin + s.offsets[k]]) {
          free = false;
          break;
        }
      }
      if (free) break;
    }
    const s = COMPILED[id];
    for (let k = 0; k < s.offsets.length; k++) occ[origin + s.offsets[k]] = 1;
    const colour = TETROMINO_COLOURS[rng.int(TETROMINO_COLOURS.length)];
    const f = fOff + o * TETROMINO_FACTORS;
    factors[f] = row;
    factors[f + 1] = col;
    factors[f + 2] = id;
    factors[f + 3] = colour[0];
    factors[f + 4] = colour[1];
    factors[f + 5] = colour[2];
    factors[f + 6] = 1;
  }
}

/**
 * Generates examples [start, start+count) into preallocated arrays holding the whole split
 * (imgs [N,35,35,3], masks [N,4,35,35,1], factors [N,4,7]).
 */
export function generateTetrominoes(
  rng: Rng,
  imgs: Uint8Array,
  masks: Uint8Array,
  factors: Float32Array,
  start: number,
  count: number,
): void {
  const occ = new Uint8Array(PIXELS);
  for (let n = start; n < start + count; n++) {
    const fOff = n * TETROMINO_FACTOR_VALUES;
    sampleTetrominoFactors(rng, factors, fOff, occ);
    renderTetrominoExample(factors, fOff, imgs, n * TETROMINO_IMAGE_VALUES, masks, n * TETROMINO_MASK_VALUES);
  }
}
