import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { H5ImageDataset } from '../lib/data/dataset';
import { BatchIterator, epochIndices } from '../lib/data/iterator';
import { withH5File } from '../lib/io/h5';
import { cropHWC, preprocessImage } from '../lib/data/clevr';
import { fixturePath } from './helpers';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'emorl-data-'));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

/** Writes a small dataset whose pixel values encode (example, row, column, channel). */
async function writeSynthetic(
  name: string,
  opts: { n: number; h: number; w: number; o?: number; f?: number; imgsDtype?: 'uint8' | 'float32'; masksShape?: number[] },
): Promise<string> {
  const file = path.join(tmp, name);
  const { n, h, w, o = 3, f = 2 } = opts;
  const imgs = new Uint8Array(n * h * w * 3);
  for (let i = 0; i < imgs.length; i++) imgs[i] = (i * 7 + Math.floor(i / 97)) % 256;
  const masks = new Uint8Array(n * o * h * w);
  for (let b = 0; b < n; b++)
    for (let p = 0; p < h * w; p++) masks[(b * o + ((p + b) % o)) * h * w + p] = 255;
  const factors = new Float32Array(n * o * f).map((_, i) => i * 0.5);
  await withH5File(file, 'w', (x) => {
    for (const split of ['train', 'test']) {
      if (opts.imgsDtype === 'float32') x.write(`${split}/imgs`, Float32Array.from(imgs), [n, h, w, 3], 'float32');
      else x.write(`${split}/imgs`, imgs, [n, h, w, 3], 'uint8');
      x.write(`${split}/masks`, masks, opts.masksShape ?? [n, o, h, w, 1], 'uint8');
      x.write(`${split}/factors`, factors, [n, o, f], 'float32');
    }
  });
  return file;
}

describe('H5ImageDataset', () => {
  test('reads the real fixture as NCHW in [-1,1] with masks [B,O,1,H,W]', async () => {
    const ds = await H5ImageDataset.open(fixturePath('tetrominoes-real-10.h5'), { split: 'test', masks: true });
    expect(ds.info).toMatchObject({ length: 10, channels: 3, height: 35, width: 35, numEntities: 4 });
    const batch = await ds.readBatch([3, 1]);
    const raw = await ds.readRaw([3, 1]);
    expect(batch.images.length).toBe(2 * 3 * 35 * 35);
    // pixel (row 10, col 20, channel 1) of the first example
    const stored = raw.imgs[(10 * 35 + 20) * 3 + 1];
    expect(batch.images[1 * 35 * 35 + 10 * 35 + 20]).toBeCloseTo((stored / 255) * 2 - 1, 6);
    expect(Math.min(...batch.images)).toBeGreaterThanOrEqual(-1);
    expect(Math.max(...batch.images)).toBeLessThanOrEqual(1);
    expect(batch.masks?.length).toBe(2 * 4 * 35 * 35);
    // masks partition the image
    for (let p = 0; p < 35 * 35; p++) {
      let sum = 0;
      for (let o = 0; o < 4; o++) sum += (batch.masks as Uint8Array)[o * 35 * 35 + p];
      expect(sum).toBe(255);
    }
    ds.close();
  });

  test('unsorted and repeated indices give the same rows as single reads', async () => {
    const file = await writeSynthetic('a.h5', { n: 20, h: 6, w: 5 });
    const ds = await H5ImageDataset.open(file, { masks: true, factors: true });
    const idx = [7, 2, 3, 7, 19, 0, 4];
    const batch = await ds.readBatch(idx);
    for (let b = 0; b < idx.length; b++) {
      const one = await ds.readBatch([idx[b]]);
      const size = 3 * 6 * 5;
      expect(Array.from(batch.images.subarray(b * size, (b + 1) * size))).toEqual(Array.from(one.images));
      expect(Array.from((batch.masks as Uint8Array).subarray(b * 90, (b + 1) * 90))).toEqual(Array.from(one.masks as Uint8Array));
      expect(Array.from((batch.factors as Float32Array).subarray(b * 6, (b + 1) * 6))).toEqual(Array.from(one.factors as Float32Array));
    }
    ds.close();
  });

  test('CLEVR styles crop and resize images and crop masks to 192x192', async () => {
    const file = await writeSynthetic('clevr.h5', { n: 2, h: 240, w: 320, o: 2 });
    const ds = await H5ImageDataset.open(file, { split: 'test', masks: true, preprocess: 'clevr-small' });
    expect(ds.info).toMatchObject({ height: 96, width: 96, maskHeight: 192, maskWidth: 192 });
    const raw = await ds.readRaw([1]);
    const batch = await ds.readBatch([1]);
    const expected = preprocessImage({ data: raw.imgs, height: 240, width: 320, channels: 3 }, 'clevr-small');
    expect(batch.images[2 * 96 * 96 + 5 * 96 + 7]).toBeCloseTo((expected.data[(5 * 96 + 7) * 3 + 2] / 255) * 2 - 1, 6);
    const plane = (raw.masks as Uint8Array).subarray(240 * 320, 2 * 240 * 320);
    expect(Array.from((batch.masks as Uint8Array).subarray(192 * 192))).toEqual(Array.from(cropHWC(plane, 240, 320, 1, 29, 64, 192, 192)));
    ds.close();
    const large = await H5ImageDataset.open(file, { preprocess: 'clevr-large' });
    expect([large.info.height, large.info.width]).toEqual([128, 128]);
    large.close();
  });

  test('bad input is a clear error naming the file and key', async () => {
    await expect(H5ImageDataset.open(path.join(tmp, 'missing.h5'))).rejects.toThrow(/missing\.h5: no such file/);
    const good = await writeSynthetic('good.h5', { n: 4, h: 5, w: 5 });
    await expect(H5ImageDataset.open(good, { split: 'val' })).rejects.toThrow(/good\.h5: no group 'val' \(groups: test, train\)/);
    await expect(H5ImageDataset.open(good, { preprocess: 'clevr-big' as never })).rejects.toThrow(/unknown preprocessing style 'clevr-big'/);
    await expect(H5ImageDataset.open(good, { preprocess: 'clevr-small' })).rejects.toThrow(/images are 5×5; 'clevr-small' crops rows 29:221/);
    const floats = await writeSynthetic('floats.h5', { n: 4, h: 5, w: 5, imgsDtype: 'float32' });
    await expect(H5ImageDataset.open(floats)).rejects.toThrow(/floats\.h5: 'train\/imgs' has dtype <f, expected uint8/);
    const badMasks = await writeSynthetic('badmasks.h5', { n: 4, h: 5, w: 5, o: 3, masksShape: [4, 3, 5, 5] as number[] }).catch(() => '');
    if (badMasks) {
      await expect(H5ImageDataset.open(badMasks, { masks: true })).rejects.toThrow(/'train\/masks' has shape \[4,3,5,5\], expected \[N,O,H,W,1\]/);
    }
    const fx = fixturePath('tetrominoes-real-10.h5');
    await expect(H5ImageDataset.open(fx, { split: 'test', factors: true })).rejects.toThrow(/no dataset 'test\/factors' \(factors were requested\)/);
    const ds = await H5ImageDataset.open(good);
    await expect(ds.readBatch([0, 4])).rejects.toThrow(/good\.h5: index 4 out of range for 'train\/imgs' with 4 examples/);
    ds.close();
  });

  test('masks whose size differs from the images are refused', async () => {
    const file = path.join(tmp, 'mismatch.h5');
    await withH5File(file, 'w', (x) => {
      x.write('train/imgs', new Uint8Array(2 * 4 * 4 * 3), [2, 4, 4, 3], 'uint8');
      x.write('train/masks', new Uint8Array(2 * 2 * 5 * 4), [2, 2, 5, 4, 1], 'uint8');
    });
    await expect(H5ImageDataset.open(file, { masks: true })).rejects.toThrow(
      /mismatch\.h5: 'train\/masks' has shape \[2,2,5,4,1\], which does not match 'train\/imgs' \[2,4,4,3\]/,
    );
  });
});

describe('BatchIterator', () => {
  test('epoch orders are seeded permutations, reshuffled per epoch, sharded like DistributedSampler', () => {
    const a = epochIndices(10, 0, { seed: 3 });
    expect(Array.from(a).sort((x, y) => x - y)).toEqual([0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
    expect(Array.from(epochIndices(10, 0, { seed: 3 }))).toEqual(Array.from(a));
    expect(Array.from(epochIndices(10, 1, { seed: 3 }))).not.toEqual(Array.from(a));
    expect(Array.from(epochIndices(10, 0, { seed: 4 }))).not.toEqual(Array.from(a));
    expect(Array.from(epochIndices(5, 0, { seed: 1, shuffle: false }))).toEqual([0, 1, 2, 3, 4]);
    // 10 examples on 4 ranks: padded to 12 by wrapping, each rank 3, every example covered.
    const shards = [0, 1, 2, 3].map((rank) => Array.from(epochIndices(10, 2, { seed: 3, rank, worldSize: 4 })));
    expect(shards.every((s) => s.length === 3)).toBe(true);
    expect(new Set(shards.flat()).size).toBe(10);
    const even = [0, 1].map((rank) => Array.from(epochIndices(10, 0, { seed: 3, rank, worldSize: 2 })));
    expect(new Set([...even[0], ...even[1]]).size).toBe(10);
    expect(() => epochIndices(10, 0, { seed: 1, rank: 2, worldSize: 2 })).toThrow(/rank must be an integer in \[0, 2\)/);
  });

  test('drop-last, prefetch from the reader thread equals reading in this thread, and exact resume', async () => {
    const file = await writeSynthetic('it.h5', { n: 23, h: 4, w: 3 });
    const opts = { batchSize: 5, seed: 11 };
    const sync = await BatchIterator.open(file, { masks: true }, { ...opts, prefetch: 0 });
    const threaded = await BatchIterator.open(file, { masks: true }, { ...opts, prefetch: 3 });
    expect(sync.batchesPerEpoch).toBe(4);
    const seen: number[][] = [];
    let resumeAt: { epoch: number; batch: number } | undefined;
    for (let i = 0; i < 10; i++) {
      if (i === 6) resumeAt = threaded.position();
      const [x, y] = await Promise.all([sync.next(), threaded.next()]);
      expect(Array.from(y.indices)).toEqual(Array.from(x.indices));
      expect(Array.from(y.images)).toEqual(Array.from(x.images));
      expect(Array.from(y.masks as Uint8Array)).toEqual(Array.from(x.masks as Uint8Array));
      expect(x.size).toBe(5);
      expect([x.epoch, x.batchInEpoch]).toEqual([Math.floor(i / 4), i % 4]);
      seen.push(Array.from(x.indices));
    }
    expect(resumeAt).toEqual({ epoch: 1, batch: 2 });
    // Within an epoch no example repeats; the 3 dropped ones differ between epochs.
    expect(new Set(seen.slice(0, 4).flat()).size).toBe(20);
    const resumed = await BatchIterator.open(file, { masks: true }, { ...opts, prefetch: 2 }, resumeAt);
    for (let i = 6; i < 10; i++) expect(Array.from((await resumed.next()).indices)).toEqual(seen[i]);
    await Promise.all([sync.close(), threaded.close(), resumed.close()]);
  });

  test('too few examples and bad positions are errors', async () => {
    const file = await writeSynthetic('few.h5', { n: 3, h: 2, w: 2 });
    await expect(BatchIterator.open(file, {}, { batchSize: 4, seed: 1 })).rejects.toThrow(/has 3 examples, too few for one batch of 4/);
    await expect(BatchIterator.open(file, {}, { batchSize: 1, seed: 1 }, { epoch: 0, batch: 3 })).rejects.toThrow(/bad iterator position/);
  });
});
