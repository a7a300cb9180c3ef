import * as fs from 'node:fs';
import * as path from 'node:path';
import { preprocessImage } from '../lib/data/clevr';
import { ImageU8, resizeBicubicFloat, resizeBicubicU8 } from '../lib/data/resize';

/** The deterministic image of test/fixtures/pil-bicubic/make.py. */
function pattern(h: number, w: number): ImageU8 {
  const data = new Uint8Array(h * w * 3);
  for (let y = 0; y < h; y++)
    for (let x = 0; x < w; x++)
      for (let c = 0; c < 3; c++) {
        const smooth = (x + 2 * y + 50 * c) % 256;
        const busy = ((x * 37 + y * 61 + c * 97 + ((x * y) >> 3)) ^ (x * c * 5)) & 255;
        data[(y * w + x) * 3 + c] = (Math.floor(x / 40) + Math.floor(y / 40)) % 2 === 0 ? smooth : busy;
      }
  return { data, height: h, width: w, channels: 3 };
}

const refDir = path.join(__dirname, 'fixtures', 'pil-bicubic');
const reference = (name: string) => new Uint8Array(fs.readFileSync(path.join(refDir, name)));

describe('bicubic resize equals Pillow', () => {
  test.each([
    ['clevr-small', 96],
    ['clevr-large', 128],
  ] as const)('%s crop + resize is pixel-exact', (style, size) => {
    const out = preprocessImage(pattern(240, 320), style);
    expect([out.height, out.width]).toEqual([size, size]);
    const ref = reference(`clevr-${size}.u8`);
    let mismatches = 0;
    for (let i = 0; i < ref.length; i++) if (out.data[i] !== ref[i]) mismatches++;
    expect(mismatches).toBe(0);
  });

  test('upsampling to a non-square size is pixel-exact', () => {
    const out = resizeBicubicU8(pattern(35, 35), 64, 50);
    expect(Array.from(out.data)).toEqual(Array.from(reference('up-64x50.u8')));
  });

  test('deviation of the 8-bit path from the exact float filter is rounding only', () => {
    // The double-precision filter without intermediate rounding is the mathematical reference.
    // Pillow rounds and clips the horizontal pass to uint8 before the vertical pass; on this
    // deliberately busy image (ringing clipped at sharp edges) that costs at most a few levels,
    // and under half a level on average.
    const img = pattern(240, 320);
    const out = resizeBicubicU8(img, 96, 96);
    const exact = resizeBicubicFloat(img, 96, 96);
    let worst = 0;
    let sum = 0;
    for (let i = 0; i < exact.length; i++) {
      const d = Math.abs(out.data[i] - Math.min(255, Math.max(0, exact[i])));
      worst = Math.max(worst, d);
      sum += d;
    }
    const mean = sum / exact.length;
    expect(worst).toBeLessThan(6);
    expect(mean).toBeLessThan(0.5);
    if (process.env.EMORL_VERBOSE) console.log(`bicubic u8 vs float: max ${worst.toFixed(3)}, mean ${mean.toFixed(4)}`);
  });

  test('bad sizes are errors', () => {
    expect(() => resizeBicubicU8({ data: new Uint8Array(5), height: 2, width: 2, channels: 1 }, 4, 4)).toThrow(
      /5 values, expected 2×2×1/,
    );
    expect(() => preprocessImage(pattern(100, 100), 'clevr-small')).toThrow(/does not fit a 100×100 image/);
  });
});
