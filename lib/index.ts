/**
 * emorl's public API: `import { ... } from 'emorl'` (or `require('emorl')`).
 */
export { tf, initBackend, type BackendName } from './tf';

// Configs
export { netConfig, DEFAULT_NET_CONFIG, ConfigError, type NetConfig } from './config/net';
export {
  experimentConfig,
  parseExperimentConfig,
  applyOverrides,
  gecoTargetCheck,
  ExperimentConfigError,
  type ExperimentConfig,
  type DatasetConfig,
  type TrainingConfig,
} from './config/experiment';
export { loadConfigFile, bundledConfig, cacheDir } from './cli/train';
export { TRAINING_NODE_FLAGS, hasTrainingNodeFlags } from './cli/node-flags';

// Model
export { EfficientMORL, stageWeight, type ModelOptions, type PassOptions, type InferenceResult, type GradResult, type StageOutputs } from './model/efficient-morl';
export { Geco, GECO_BETA_FLOOR } from './model/geco';
export { SeededNoise, ReplayNoise, RecordingNoise, ShardedNoise, type NoiseSource, type RecordedDraw } from './model/noise';
export { ParamStore, ParamError, type ParamArray, type ParamRecord } from './params/store';
export { tfjsOps, type Ops, type EncoderArgs, type EncoderOutput, type HostKeysValues, type ResidentKeysValues, type SlotCompetition } from './ops';
export { nativeOps, defaultOps, opsForBackend, type ComputeBackend } from './ops/native';
export { DeviceParams, type EncoderParams } from './ops/device-params';
export { nativeStatus } from './native';
export { Adam, clipGradNorm, clipScale, clipFromNorms, gradNorms, type AdamState, type DeviceParamGroup } from './optim/adam';

// Training
export { Trainer, type StepResult, type TrainerState } from './train/trainer';
export { train, loadTrainingCheckpoint, TrainingError, type TrainOptions, type TrainSummary, type TrainCallbacks, type DistributedOptions } from './train/loop';
export { learningRate, refinementItersAt } from './train/schedule';
export { LocalGroup, DistributedError, shardRange, type Communicator } from './train/distributed';
export { launchRanks, type LaunchOptions, type WorkerJob, type DistributedBackend } from './train/launcher';
export { ncclStatus, NcclCommunicator, type NcclStatus } from './train/nccl';
export { readCheckpoint, writeCheckpoint, latestCheckpoint, CheckpointError } from './train/checkpoint';
export { loadModel, ModelKindError, MODEL_KINDS, type LoadedModel, type LoadOptions, type ModelKind } from './load';
export { readPth, writePth, PthError, type PthCheckpoint, type PthModel, type PthReadOptions } from './params/pth';

// Evaluation
export { runEval, EvalError, type EvalOptions, type EvalSummary, type AriMseKlResults } from './eval/run';
export { loadTestConfigFile, parseTestConfig, testConfig, SUPPORTED_EVAL_TYPES, TestConfigError, type EvalType, type TestConfig } from './eval/config';
export { renderReport } from './eval/report';
export { evalModel, type EvalModel, type EvalPass, type EvalStage } from './eval/eval-model';
export { SlotAttention } from './model/slot-attention';

// Data
export { H5File, H5Error, withH5File, type DatasetInfo as H5DatasetInfo, type NumericArray } from './io/h5';
export { Rng, mixSeeds, type RngState } from './util/rng';
export { H5ImageDataset, DatasetError, type Batch, type DatasetInfo, type DatasetOptions, type Split } from './data/dataset';
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

// Metrics
export * from './metrics';
