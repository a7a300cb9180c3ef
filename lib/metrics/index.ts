/** Evaluation metrics: ARI (with and without background), pixel MSE, optimal assignment, IoU matching. */
export {
  MetricsError,
  adjustedRandIndex,
  adjustedRandIndices,
  adjustedRandIndexFromLabels,
  ariFromContingency,
  argmaxLabelsInto,
  contingencyTables,
  maskDims,
  trueLabelsInto,
  type AriOptions,
  type MaskData,
  type MaskDims,
  type MaskTensor,
  type TrueLabelOptions,
  type TrueLabelRule,
} from './ari';
export { pixelMse, type ImageLayout, type ImageTensor } from './mse';
export { linearSumAssignment, type Assignment, type AssignmentOptions, type CostMatrix } from './hungarian';
export {
  iouMatrix,
  matchByIou,
  type ImageMatch,
  type IouMatrices,
  type IouOptions,
  type MatchOptions,
  type PredBinarize,
  type TrueBinarize,
} from './iou';
