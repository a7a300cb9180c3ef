/**
 * Multi-dSprites in the spirit of DeepMind's `colored_on_grayscale` variant, written in the
 * original EfficientMORL processed layout.
 *
 * Each 64x64 image has a uniform grey background and 2..5 sprites (square, ellipse, heart) with
 * random scale, orientation, position and HSV colour, drawn in entity order: later sprites
 * occlude earlier ones, and each mask holds only the visible part of its sprite. Rasterisation
 * is a plain inside test at each pixel centre (no anti-aliasing), so every pixel belongs to
 * exactly one entity and the masks partition the image. An image is redrawn (all of it) if any
 * of its sprites would keep fewer than MIN_VISIBLE_PIXELS visible pixels.
 *
 * Entities: 0 = background, 1..n = sprites in drawing order, n+1..5 unused (all-zero masks and
 * factors, visibility 0).
 *
 * Factor columns (F=9), see DSPRITES_FACTOR_COLUMNS:
 *   0 x: the sprite centre's column / 64, in [0.15, 0.85]
 *   1 y: the sprite centre's row / 64, in [0.15, 0.85]
 *   2 shape: 1 square, 2 ellipse, 3 heart (0 background / unused)
 *   3 scale in [0.5, 1]: the sprite's half-extent is scale * SPRITE_BASE_RADIUS px
 *   4 orientation in radians, [0, 2*pi), counter-clockwise on screen
 *   5 h, 6 s, 7 v: the colour in HSV, h in [0,1], s and v in [0.5, 1]; for the background
 *     h = s = 0 and v = its grey level (an integer level / 255)
 *   8 visibility: 1 for the background and each sprite, 0 for unused entities
 * Images are rendered from the float32 factors as stored, so re-rendering a file's factors
 * reproduces its images and masks exactly.
 */
import { Rng } from '../../util/rng';

export const DSPRITES_SIZE = 64;
/** Background + up to 5 sprites. */
export const DSPRITES_ENTITIES = 6;
export const DSPRITES_MIN_SPRITES = 2;
export const DSPRITES_MAX_SPRITES = 5;
export const DSPRITES_FACTORS = 9;
/**
 * Half-extent in pixels of a sprite at scale 1: a square at scale 1 is 2*0.8*13 = 20.8 px wide,
 * an ellipse 26 x 13 px, a heart about 26 px.
 */
export const SPRITE_BASE_RADIUS = 13;
export const MIN_VISIBLE_PIXELS = 10;
export const DSPRITES_SHAPE_NAMES = ['background', 'square', 'ellipse', 'heart'] as const;
export const DSPRITES_FACTOR_COLUMNS = [
  'x (centre column / 64)',
  'y (centre row / 64)',
  'shape (1 square, 2 ellipse, 3 heart; 0 background/unused)',
  'scale (half-extent = scale * 13 px)',
  'orientation (radians, counter-clockwise)',
  'h (hue in [0,1))',
  's (saturation)',
  'v (value; background: grey level)',
  'visibility',
] as const;

const PIXELS = DSPRITES_SIZE * DSPRITES_SIZE;
export const DSPRITES_IMAGE_VALUES = PIXELS * 3;
export const DSPRITES_MASK_VALUES = DSPRITES_ENTITIES * PIXELS;
export const DSPRITES_FACTOR_VALUES = DSPRITES_ENTITIES * DSPRITES_FACTORS;

/**
 * Whether the point (u, v) in a sprite's own frame (units of its half-extent; v points down the
 * image at orientation 0) lies inside the shape.
 */
export function spriteContains(shape: number, u: number, v: number): boolean {
  switch (shape) {
    case 1: // square, side 1.6
      return Math.abs(u) <= 0.8 && Math.abs(v) <= 0.8;
    case 2: // ellipse, semi-axes 1 and 0.5
      return u * u + 4 * v * v <= 1;
    case 3: {
      // heart (x^2 + y^2 - 1)^3 <= x^2 y^3, lobes up, centred (y spans about [-1, 1.2])
      const x = u * 1.15;
      const y = 0.1 - v * 1.15;
      const a = x * x + y * y - 1;
      return a * a * a <= x * x * y * y * y;
    }
    default:
      return false;
  }
}

/** HSV in [0,1] to 8-bit RGB. */
export function hsvToRgb(h: number, s: number, v: number): [number, number, number] {
  const h6 = (h - Math.floor(h)) * 6;
  const i = Math.floor(h6) % 6;
  const f = h6 - Math.floor(h6);
  const p = v * (1 - s);
  const q = v * (1 - s * f);
  const t = v * (1 - s * (1 - f));
  let rgb: [number, number, number];
  switch (i) {
    case 0: rgb = [v, t, p]; break;
    case 1: rgb = [q, v, p]; break;
    case 2: rgb = [p, v, t]; break;
    case 3: rgb = [p, q, v]; break;
    case 4: rgb = [t, p, v]; break;
    default: rgb = [v, p, q]; break;
  }
  return [Math.round(rgb[0] * 255), Math.round(rgb[1] * 255), Math.round(rgb[2] * 255)];
}

/**
 * Renders one example from its factors (6 rows of 9 at `fOff`) into an image (64*64*3 at
 * `iOff`) and masks (6*64*64 at `mOff`); `ids` is scratch space of 64*64 values. Returns the
 * number of visible pixels of each entity.
 */
export function renderMultiDspritesExample(
  factors: ArrayLike<number>,
  fOff: number,
  img: Uint8Array,
  iOff: number,
  masks: Uint8Array,
  mOff: number,
  ids: Uint8Array = new Uint8Array(PIXELS),
): number[] {
  const S = DSPRITES_SIZE;
  const F = DSPRITES_FACTORS;
  ids.fill(0);
  const colours: [number, number, number][] = [];
  const grey = Math.round(factors[fOff + 7] * 255);
  colours.push([grey, grey, grey]);
  for (let o = 1; o < DSPRITES_ENTITIES; o++) {
    const f = fOff + o * F;
    colours.push(hsvToRgb(factors[f + 5], factors[f + 6], factors[f + 7]));
    if (factors[f + 8] === 0) continue;
    const shape = factors[f + 2];
    if (shape !== 1 && shape !== 2 && shape !== 3) throw new Error(`multi_dsprites: entity ${o} has bad shape ${shape}`);
    const cx = factors[f] * S;
    const cy = factors[f + 1] * S;
    const radius = factors[f + 3] * SPRITE_BASE_RADIUS;
    const theta = factors[f + 4];
    const cos = Math.cos(theta) / radius;
    const sin = Math.sin(theta) / radius;
    const reach = 1.5 * radius + 1;
    const r0 = Math.max(0, Math.floor(cy - reach));
    const r1 = Math.min(S - 1, Math.ceil(cy + reach));
    const c0 = Math.max(0, Math.floor(cx - reach));
    const c1 = Math.min(S - 1, Math.ceil(cx + reach));
    for (let r = r0; r <= r1; r++) {
      const dy = r + 0.5 - cy;
      for (let c = c0; c <= c1; c++) {
        const dx = c + 0.5 - cx;
        // Rotate the screen offset by -theta (screen y points down, so this is counter-clockwise).
        const u = cos * dx - sin * dy;
        const v = sin * dx + cos * dy;
        if (spriteContains(shape, u, v)) ids[r * S + c] = o;
      }
    }
  }
  const counts = new Array<number>(DSPRITES_ENTITIES).fill(0);
  masks.fill(0, mOff, mOff + DSPRITES_MASK_VALUES);
  for (let p = 0; p < PIXELS; p++) {
    const o = ids[p];
    counts[o]++;
    masks[mOff + o * PIXELS + p] = 255;
    const col = colours[o];
    const q = iOff + p * 3;
    img[q] = col[0];
    img[q + 1] = col[1];
    img[q + 2] = col[2];
  }
  return counts;
}

/**
 * Generates examples [start, start+count) into preallocated arrays holding the whole split
 * (imgs [N,64,64,3], masks [N,6,64,64,1], factors [N,6,9]).
 */
export function generateMultiDsprites(
  rng: Rng,
  imgs: Uint8Array,
  masks: Uint8Array,
  factors: Float32Array,
  start: number,
  count: number,
): void {
  const ids = new Uint8Array(PIXELS);
  const F = DSPRITES_FACTORS;
  for (let n = start; n < start + count; n++) {
    const fOff = n * DSPRITES_FACTOR_VALUES;
    const iOff = n * DSPRITES_IMAGE_VALUES;
    const mOff = n * DSPRITES_MASK_VALUES;
    for (;;) {
      factors.fill(0, fOff, fOff + DSPRITES_FACTOR_VALUES);
      const sprites = DSPRITES_MIN_SPRITES + rng.int(DSPRITES_MAX_SPRITES - DSPRITES_MIN_SPRITES + 1);
      factors[fOff + 7] = rng.int(256) / 255;
      factors[fOff + 8] = 1;
      for (let o = 1; o <= sprites; o++) {
        const f = fOff + o * F;
        factors[f] = rng.range(0.15, 0.85);
        factors[f + 1] = rng.range(0.15, 0.85);
        factors[f + 2] = 1 + rng.int(3);
        factors[f + 3] = rng.range(0.5, 1);
        factors[f + 4] = rng.range(0, 2 * Math.PI);
        factors[f + 5] = rng.uniform();
        factors[f + 6] = rng.range(0.5, 1);
        factors[f + 7] = rng.range(0.5, 1);
        factors[f + 8] = 1;
      }
      const counts = renderMultiDspritesExample(factors, fOff, imgs, iOff, masks, mOff, ids);
      let ok = true;
      for (let o = 1; o <= sprites; o++) if (counts[o] < MIN_VISIBLE_PIXELS) ok = false;
      if (ok) break;
    }
  }
}
