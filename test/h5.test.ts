import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { H5File, withH5File } from '../lib/io/h5';
import { fixturePath } from './helpers';

describe('H5File', () => {
  test('reads the real Tetrominoes fixture by rows', async () => {
    await withH5File(fixturePath('tetrominoes-real-10.h5'), 'r', (f) => {
      expect(f.info('test/imgs')).toEqual({ shape: [10, 35, 35, 3], dtype: '<B' });
      const rows = f.readRows('test/imgs', 2, 4);
      expect(rows.length).toBe(2 * 35 * 35 * 3);
      expect(() => f.readRows('test/imgs', 9, 11)).toThrow(/rows \[9, 11\) out of range.*'test\/imgs'.*10 rows/);
      expect(() => f.read('test/nope')).toThrow(/tetrominoes-real-10\.h5: no dataset 'test\/nope'/);
      expect(f.has('test')).toBe(true);
      expect(f.isGroup('test')).toBe(true);
    });
  });

  test('round-trips datasets and attributes', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'emorl-h5-'));
    const file = path.join(dir, 'a.h5');
    await withH5File(file, 'w', (f) => {
      f.write('g/x', new Float32Array([1, 2, 3, 4, 5, 6]), [2, 3], 'float32');
      f.write('g/h/u', new Uint8Array([7, 8]), [2], 'uint8', true);
      f.setAttr('', 'cfg', { a: 1 });
    });
    await withH5File(file, 'r', (f) => {
      expect(Array.from(f.readRows('g/x', 1, 2))).toEqual([4, 5, 6]);
      expect(Array.from(f.read('g/h/u'))).toEqual([7, 8]);
      expect(JSON.parse(f.attr('', 'cfg') as string)).toEqual({ a: 1 });
    });
    fs.rmSync(dir, { recursive: true });
  });

  test('missing and foreign files are clear errors', async () => {
    await expect(H5File.open('/nonexistent/x.h5')).rejects.toThrow('/nonexistent/x.h5: no such file');
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'emorl-h5-'));
    const bad = path.join(dir, 'bad.h5');
    fs.writeFileSync(bad, 'not hdf5 at all');
    await expect(H5File.open(bad)).rejects.toThrow(/bad\.h5: not an HDF5 file/);
    fs.rmSync(dir, { recursive: true });
  });
});
