/**
 * The GRU cells of lib/ops/nn.ts for all B·K slots at once as single ops: the two input/hidden
 * products on the addon's GEMM and the gates (r, u, n, h') in one pass, forward and backward,
 * instead of a dozen small tfjs ops each way. With a_r, a_u, a_n the input parts and c_r, c_u, c_n
 * the hidden parts of the pre-activations:
 *
 *   r = σ(a_r + c_r),  u = σ(a_u + c_u),  n = tanh(a_n + r ⊙ c_n),  h' = (1 − u) ⊙ n + u ⊙ h
 *   dn = dh' (1 − u),  du = dh' (h − n),  d(n pre) = dn (1 − n²),  dr = d(n pre) ⊙ c_n,
 *   d a = (dr r(1 − r), du u(1 − u), d(n pre)),  d c = (…, …, d(n pre) ⊙ r),  dh = d c · W_hh + dh' u.
 *
 * The DualGRU cell is two such cells on the same input with the original's weight layout
 * rearranged into nn.GRU's (reset, update, new) rows.
 */
import { tf } from '../tf';
import { colSums, f32 } from './arrays';
import { addonOps } from './addon';
import { paramGradsEnabled } from './conv';
import type { DualGruWeights, GruWeights } from './nn';

export function gruCell(x: tf.Tensor2D, h: tf.Tensor2D, p: GruWeights): tf.Tensor2D {
  const [N, I] = x.shape;
  const H = h.shape[1];
  if (h.shape[0] !== N) throw new Error(`gruCell: input has ${N} rows, hidden state [${h.shape}]`);
  if (p.weightIh.shape[0] !== 3 * H || p.weightIh.shape[1] !== I) throw new Error(`gruCell: weight_ih [${p.weightIh.shape}] does not fit input ${I}, hidden ${H}`);
  if (p.weightHh.shape[0] !== 3 * H || p.weightHh.shape[1] !== H) throw new Error(`gruCell: weight_hh [${p.weightHh.shape}] does not fit hidden ${H}`);
  if (p.biasIh.shape[0] !== 3 * H || p.biasHh.shape[0] !== 3 * H) throw new Error(`gruCell: biases [${p.biasIh.shape}], [${p.biasHh.shape}] do not fit hidden ${H}`);
  const m = addonOps();
  const G = 3 * H;
  const op = tf.customGrad((xt, ht, wih, whh, bih, bhh, save) => {
    const xd = f32(xt as tf.Tensor), hd = f32(ht as tf.Tensor);
    const wihd = f32(wih as tf.Tensor), whhd = f32(whh as tf.Tensor);
    const a = m.matmul(xd, [N, I], wihd, [G, I], false, true); // [N, 3H]
    const c = m.matmul(hd, [N, H], whhd, [G, H], false, true);
    const bi = f32(bih as tf.Tensor), bh = f32(bhh as tf.Tensor);
    const r = new Float32Array(N * H), u = new Float32Array(N * H), n = new Float32Array(N * H), cn = new Float32Array(N * H);
    const y = new Float32Array(N * H);
    for (let i = 0; i < N; i++) {
      const o = i * G, q = i * H;
      for (let j = 0; j < H; j++) {
        const rr = 1 / (1 + Math.exp(-(a[o + j] + bi[j] + c[o + j] + bh[j])));
        const uu = 1 / (1 + Math.exp(-(a[o + H + j] + bi[H + j] + c[o + H + j] + bh[H + j])));
        const hn = c[o + 2 * H + j] + bh[2 * H + j];
        const nn = Math.tanh(a[o + 2 * H + j] + bi[2 * H + j] + rr * hn);
        r[q + j] = rr;
        u[q + j] = uu;
        n[q + j] = nn;
        cn[q + j] = hn;
        y[q + j] = (1 - uu) * nn + uu * hd[q + j];
      }
    }
    (save as tf.GradSaveFunc)([xt as tf.Tensor, ht as tf.Tensor, wih as tf.Tensor, whh as tf.Tensor]);
    return {
      value: tf.tensor2d(y, [N, H]),
      gradFunc: (dy: tf.Tensor, saved: tf.Tensor[]) => {
        const g = f32(dy);
        const xs = f32(saved[0]), hs = f32(saved[1]), wi = f32(saved[2]), wh = f32(saved[3]);
        const da = new Float32Array(N * G), dc = new Float32Array(N * G), dhDirect = new Float32Array(N * H);
        for (let i = 0; i < N; i++) {
          const o = i * G, q = i * H;
          for (let j = 0; j < H; j++) {
            const gy = g[q + j], rr = r[q + j], uu = u[q + j], nn = n[q + j];
            const dnPre = gy * (1 - uu) * (1 - nn * nn);
            const du = gy * (hs[q + j] - nn) * uu * (1 - uu);
            const dr = dnPre * cn[q + j] * rr * (1 - rr);
            da[o + j] = dr;
            da[o + H + j] = du;
            da[o + 2 * H + j] = dnPre;
            dc[o + j] = dr;
            dc[o + H + j] = du;
            dc[o + 2 * H + j] = dnPre * rr;
            dhDirect[q + j] = gy * uu;
          }
        }
        const dx = m.matmul(da, [N, G], wi, [G, I], false, false);
        const dh = m.matmul(dc, [N, G], wh, [G, H], false, false);
        for (let i = 0; i < N * H; i++) dh[i] += dhDirect[i];
        const grads: tf.Tensor[] = [tf.tensor2d(dx, [N, I]), tf.tensor2d(dh, [N, H])];
        if (!paramGradsEnabled()) {
          grads.push(tf.zeros([G, I]), tf.zeros([G, H]), tf.zeros([G]), tf.zeros([G]));
          return grads;
        }
        grads.push(
          tf.tensor2d(m.matmul(da, [N, G], xs, [N, I], true, false), [G, I]),
          tf.tensor2d(m.matmul(dc, [N, G], hs, [N, H], true, false), [G, H]),
          tf.tensor1d(colSums(da, N, G)),
          tf.tensor1d(colSums(dc, N, G)),
        );
        return grads;
      },
    };
  });
  return op(x, h, p.weightIh, p.weightHh, p.biasIh, p.biasHh) as tf.Tensor2D;
}

/** dualGruCell (lib/ops/nn.ts): the two GRUs as gruCell with nn.GRU's row layout. */
export function dualGruCell(x: tf.Tensor2D, h1: tf.Tensor2D, h2: tf.Tensor2D, p: DualGruWeights): [tf.Tensor2D, tf.Tensor2D] {
  const [bir1, biu1, bir2, biu2] = tf.split(p.biasIh, 4);
  const [bhr1, bhu1, bhr2, bhu2] = tf.split(p.biasHh, 4);
  const [bin1, bin2] = tf.split(p.biasIn, 2);
  const [bhn1, bhn2] = tf.split(p.biasHn, 2);
  const cell = (h: tf.Tensor2D, wih: tf.Tensor2D, win: tf.Tensor2D, whh: tf.Tensor2D, whn: tf.Tensor2D, bs: tf.Tensor[], cs: tf.Tensor[]) =>
    gruCell(x, h, {
      weightIh: tf.concat([wih, win], 0) as tf.Tensor2D,
      weightHh: tf.concat([whh, whn], 0) as tf.Tensor2D,
      biasIh: tf.concat(bs, 0) as tf.Tensor1D,
      biasHh: tf.concat(cs, 0) as tf.Tensor1D,
    });
  return [
    cell(h1, p.weightIh1, p.weightIn1, p.weightHh1, p.weightHn1, [bir1, biu1, bin1], [bhr1, bhu1, bhn1]),
    cell(h2, p.weightIh2, p.weightIn2, p.weightHh2, p.weightHn2, [bir2, biu2, bin2], [bhr2, bhu2, bhn2]),
  ];
}
