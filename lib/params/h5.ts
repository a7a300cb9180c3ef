/**
 * Reads a state_dict stored as an HDF5 group of datasets named by the original keys (the golden
 * fixtures' `params/` group). Node-only (file I/O), so it lives apart from the store.
 */
import * as path from 'node:path';
import { loadH5wasm, type H5File } from '../io/h5';
import type { ParamArray, ParamRecord } from './store';

/**
 * A scalar (rank-0) dataset. H5File.read only returns typed arrays and h5wasm gives scalars as
 * plain numbers, so these are read through a second read-only handle.
 */
export async function readScalarDataset(file: H5File, key: string): Promise<number> {
  const h5 = await loadH5wasm();
  const f = new h5.File(path.resolve(file.filePath), 'r');
  try {
    const d = f.get(key);
    if (!d || d.constructor.name !== 'Dataset') throw new Error(`${file.filePath}: no dataset '${key}'`);
    const v = (d as unknown as { value: unknown }).value;
    if (typeof v === 'number') return v;
    if (typeof v === 'bigint') return Number(v);
    if (ArrayBuffer.isView(v) && !(v instanceof DataView) && (v as Float32Array).length === 1) return Number((v as Float32Array)[0]);
    throw new Error(`${file.filePath}: dataset '${key}' is not a numeric scalar`);
  } finally {
    f.close();
  }
}

/** One dataset as float32 with its shape (scalars included). */
export async function readArray(file: H5File, key: string): Promise<ParamArray> {
  const { shape } = file.info(key);
  if (shape.length === 0) return { data: new Float32Array([await readScalarDataset(file, key)]), shape: [] };
  return { data: file.readFloat32(key), shape };
}

/** Every dataset directly under `group`, as float32 with its shape. */
export async function readParamGroup(file: H5File, group = 'params'): Promise<ParamRecord> {
  const out: ParamRecord = {};
  for (const key of file.keys(group)) {
    const p = `${group}/${key}`;
    if (file.isGroup(p)) continue;
    out[key] = await readArray(file, p);
  }
  return out;
}
