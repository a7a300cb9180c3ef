/**
 * Image likelihoods (lib/utils.py in the original), both with one global log-scale σ and without
 * the -½·log 2π constant, exactly as the original reports them.
 *   Gaussian: the mask-weighted mean image Σ_k m_k μ_k is one Gaussian per pixel;
 *   GMM:      each pixel is a mixture over slots, log Σ_k exp(log m_k + log N(x; μ_k, σ²)).
 * Returns the per-image negative log-likelihood [B].
 */
import { tf } from '../tf';

/**
 * x: target [B,H,W,C] in [0,1]; means [B,K,H,W,C]; logMasks [B,K,H,W,1] (log-softmax over K);
 * logVar = 2·log_scale as a float32 scalar.
 */
export function gaussianNll(x: tf.Tensor4D, means: tf.Tensor5D, logMasks: tf.Tensor5D, logVar: tf.Scalar): tf.Tensor1D {
  const meanImage = tf.sum(tf.mul(means, tf.exp(logMasks)), 1);
  const sq = tf.square(tf.sub(x, meanImage));
  const nll = tf.add(tf.mul(0.5, logVar), tf.mul(0.5, tf.div(sq, tf.exp(logVar))));
  return tf.sum(nll, [1, 2, 3]) as tf.Tensor1D;
}

export function gmmNll(x: tf.Tensor4D, means: tf.Tensor5D, logMasks: tf.Tensor5D, logVar: tf.Scalar): tf.Tensor1D {
  const sq = tf.square(tf.sub(tf.expandDims(x, 1), means));
  const normalLl = tf.sub(tf.mul(-0.5, logVar), tf.mul(0.5, tf.div(sq, tf.exp(logVar))));
  const logP = tf.logSumExp(tf.add(logMasks, normalLl), 1);
  return tf.neg(tf.sum(logP, [1, 2, 3])) as tf.Tensor1D;
}
