/**
 * emorl's public API: `import { ... } from 'emorl'` (or `require('emorl')`).
 */
export { tf, initBackend, type BackendName } from './tf';
export { H5File, H5Error, withH5File, type DatasetInfo as H5DatasetInfo, type NumericArray } from './io/h5';
export { Rng, mixSeeds, type RngState } from './util/rng';
export {
  H5ImageDataset,
  DatasetError,
  type Batch,
  type DatasetInfo,
  type DatasetOptions,
  type Split,
} from './data/dataset';
export {
  BatchIterator,
  epochIndices,
  batchesPerEpoch,
  type EpochBatch,
  type IteratorOptions,
  type IteratorPosition,
  type SamplerOptions,
} from './data/iterator';
export { CLEVR_CROP, preprocessImage, type PreprocessStyle } from './data/clevr';
export { resizeBicubicU8, type ImageU8 } from './data/resize';
export { GENERATORS, defaultSplits, generateDataset, type GenerateOptions, type GeneratorName } from './data/generators';
export * from './metrics';
