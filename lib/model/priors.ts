/**
 * Diagonal Gaussians parameterised as the original does — (μ, s) with σ = sqrt(softplus(min(s,80))
 * + 1e-5) — their reparameterised samples, the KL between two of them, and the hierarchical
 * prior network p(z^l | z^{l±1}) (IndependentPrior in the original) shared by every layer.
 *
 * σ and the KL run as one op each way: a loop per element that rounds every step to float32 as
 * the tfjs ops of the reference formulas (…Reference below) and their autodiff round them, so the
 * values and gradients are the same bits. As chains of tfjs ops they had cost ~1.7 ms (σ) and
 * ~3.5 ms (KL) forward and backward on [128, 64], tens of ms per training step.
 */
import { tf } from '../tf';
import type { Ops } from '../ops';
import type { ParamStore } from '../params/store';

export interface Gaussian {
  /** [N, z] */
  loc: tf.Tensor2D;
  /** [N, z] */
  std: tf.Tensor2D;
}

const f = Math.fround;
const STD_EPS = f(1e-5);

/** The reference: σ = sqrt(log(1 + exp(min(s, 80))) + 1e-5) in tfjs ops (the clamp keeps exp finite in float32). */
export function softplusToStdReference(s: tf.Tensor): tf.Tensor {
  return tf.sqrt(tf.add(tf.log(tf.add(1, tf.exp(tf.minimum(s, 80)))), 1e-5));
}

/** σ = sqrt(log(1 + exp(min(s, 80))) + 1e-5), one op each way (softplusToStdReference's bits). */
export function softplusToStd(s: tf.Tensor): tf.Tensor {
  if (s.dtype !== 'float32') return softplusToStdReference(s);
  const op = tf.customGrad((x, save) => {
    const xv = (x as tf.Tensor).dataSync() as Float32Array;
    const n = xv.length;
    const e = new Float32Array(n), a = new Float32Array(n), y = new Float32Array(n);
    for (let i = 0; i < n; i++) {
      e[i] = Math.exp(Math.min(xv[i], 80));
      a[i] = 1 + e[i];
      y[i] = Math.sqrt(f(f(Math.log(a[i])) + STD_EPS));
    }
    (save as tf.GradSaveFunc)([x as tf.Tensor]);
    return {
      value: tf.tensor(y, (x as tf.Tensor).shape, 'float32'),
      // sqrt: dy / (2σ); + 1e-5, 1 + ·: unchanged; log: / a; exp: · e; min(·, 80): · [s <= 80]
      gradFunc: (dy: tf.Tensor) => {
        const g = dy.dataSync() as Float32Array;
        const dx = new Float32Array(n);
        for (let i = 0; i < n; i++) dx[i] = f(f(f(g[i] / (2 * y[i])) / a[i]) * e[i]) * (xv[i] <= 80 ? 1 : 0);
        return tf.tensor(dx, dy.shape, 'float32');
      },
    };
  });
  return op(s);
}

export function gaussianFromParams(loc: tf.Tensor2D, softplusParam: tf.Tensor2D): Gaussian {
  return { loc, std: softplusToStd(softplusParam) as tf.Tensor2D };
}

/** z = μ + ε σ */
export function rsample(q: Gaussian, eps: tf.Tensor): tf.Tensor2D {
  return tf.add(q.loc, tf.mul(eps, q.std)) as tf.Tensor2D;
}

/**
 * KL(q ‖ p) summed over the last axis, in torch.distributions' form
 * ½(r + ((μq−μp)/σp)² − 1 − log r) with r = (σq/σp)². p = null is the standard normal.
 * One op each way (klDiagReference's bits).
 */
export function klDiag(q: Gaussian, p: Gaussian | null): tf.Tensor1D {
  const inputs = p ? [q.loc, q.std, p.loc, p.std] : [q.loc, q.std];
  const [rows, D] = q.loc.shape;
  if (inputs.some((t) => t.dtype !== 'float32' || t.rank !== 2 || t.shape[0] !== rows || t.shape[1] !== D)) return klDiagReference(q, p);
  const op = tf.customGrad((...args: unknown[]) => {
    const [mq, sq, mp, sp] = args.slice(0, inputs.length).map((t) => (t as tf.Tensor).dataSync() as Float32Array);
    const n = rows * D;
    // per element: r = σq/σp, x = (μq−μp)/σp (p absent: r = σq, x = μq), vr = r², t1 = x²
    const r = new Float32Array(n), x = new Float32Array(n), vr = new Float32Array(n);
    const kl = new Float32Array(rows);
    for (let row = 0, i = 0; row < rows; row++) {
      let sum = 0;
      for (let j = 0; j < D; j++, i++) {
        r[i] = sp ? sq[i] / sp[i] : sq[i];
        x[i] = sp ? f(mq[i] - mp[i]) / sp[i] : mq[i];
        vr[i] = r[i] * r[i];
        const t1 = f(x[i] * x[i]);
        sum += f(0.5 * f(f(f(vr[i] + t1) - 1) - f(Math.log(vr[i]))));
      }
      kl[row] = sum;
    }
    return {
      value: tf.tensor1d(kl, 'float32'),
      gradFunc: (dy: tf.Tensor) => {
        const g = dy.dataSync() as Float32Array;
        const dmq = new Float32Array(n), dsq = new Float32Array(n);
        const dmp = sp ? new Float32Array(n) : null, dsp = sp ? new Float32Array(n) : null;
        for (let row = 0, i = 0; row < rows; row++) {
          // ½·w: dw = dy·½; w = (vr + t1 − 1) − log vr: d vr = dw/(−vr)… summed with dw; d t1 = dw
          const dw = f(g[row] * 0.5);
          for (let j = 0; j < D; j++, i++) {
            const dvr = f(f(-dw / vr[i]) + dw);
            const dr = f(dvr * f(r[i] * 2)); // square
            const dx = f(dw * f(x[i] * 2));
            if (!sp || !mp || !dmp || !dsp) {
              dsq[i] = dr;
              dmq[i] = dx;
              continue;
            }
            const d = f(mq[i] - mp[i]);
            const s2 = f(sp[i] * sp[i]);
            dsq[i] = f(dr / sp[i]); // r = σq / σp
            const dd = f(dx / sp[i]); // x = d / σp
            dmq[i] = dd;
            dmp[i] = -dd;
            dsp[i] = f(-f(f(dr * sq[i]) / s2) + -f(f(dx * d) / s2));
          }
        }
        const shape = q.loc.shape;
        const grads = [tf.tensor(dmq, shape, 'float32'), tf.tensor(dsq, shape, 'float32')];
        if (dmp && dsp) grads.push(tf.tensor(dmp, shape, 'float32'), tf.tensor(dsp, shape, 'float32'));
        return grads;
      },
    };
  });
  return (op as (...t: tf.Tensor[]) => tf.Tensor)(...inputs) as tf.Tensor1D;
}

/** The reference: klDiag in tfjs ops. */
export function klDiagReference(q: Gaussian, p: Gaussian | null): tf.Tensor1D {
  let varRatio: tf.Tensor;
  let t1: tf.Tensor;
  if (p === null) {
    varRatio = tf.square(q.std);
    t1 = tf.square(q.loc);
  } else {
    varRatio = tf.square(tf.div(q.std, p.std));
    t1 = tf.square(tf.div(tf.sub(q.loc, p.loc), p.std));
  }
  const kl = tf.mul(0.5, tf.sub(tf.sub(tf.add(varRatio, t1), 1), tf.log(varRatio)));
  return tf.sum(kl, -1) as tf.Tensor1D;
}

/** The prior network: z -> Linear(z,128) ELU -> (Linear(128,z) for μ, Linear(128,z) for s). */
export function priorFromSample(p: ParamStore, ops: Ops, z: tf.Tensor2D): Gaussian {
  const n = 'hvae_networks.indep_prior';
  const hid = ops.linear(z, p.get(`${n}.z_linear.0.weight`), p.get(`${n}.z_linear.0.bias`), 'elu');
  const loc = ops.linear(hid, p.get(`${n}.z_mu.weight`), p.get(`${n}.z_mu.bias`)) as tf.Tensor2D;
  const sp = ops.linear(hid, p.get(`${n}.z_softplus.weight`), p.get(`${n}.z_softplus.bias`)) as tf.Tensor2D;
  return gaussianFromParams(loc, sp);
}
