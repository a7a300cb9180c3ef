/**
 * The GRU cells of lib/ops/nn.ts for all B·K slots at once as single ops on the addon
 * (native/gru.h): the two input/hidden products and the gates (r, u, n, h') in one call each way,
 * instead of a dozen small tfjs ops each way. With a_r, a_u, a_n the input parts and c_r, c_u,
 * c_n the hidden parts of the pre-activations:
 *
 *   r = σ(a_r + c_r),  u = σ(a_u + c_u),  n = tanh(a_n + r ⊙ c_n),  h' = (1 − u) ⊙ n + u ⊙ h
 *   dn = dh' (1 − u),  du = dh' (h − n),  d(n pre) = dn (1 − n²),  dr = d(n pre) ⊙ c_n,
 *   d a = (dr r(1 − r), du u(1 − u), d(n pre)),  d c = (…, …, d(n pre) ⊙ r),  dh = d c · W_hh + dh' u.
 *
 * On a GPU device ('cuda:N', or 'simt' for the same kernels emulated) the products and gates run
 * there (native/gpu/gru_gpu.cu), with device buffers kept in a workspace keyed by `key` (a
 * tensor that lives as long as the weights; default the input weights); the forward call's x, h
 * and gates stay there for its backward call.
 *
 * The DualGRU cell is two such cells on the same input with the original's weight layout
 * rearranged into nn.GRU's (reset, update, new) rows.
 */
import { tf } from '../tf';
import { f32 } from './arrays';
import { addonOps, contentTag, derivedTag, workspaceFor, type StageDevice } from './addon';
import { paramGradsEnabled } from './conv';
import type { DualGruWeights, GruWeights } from './nn';

/** What a cell's weights and biases are made from when they are built per call (GPU weight tags). */
interface GruSources {
  recipe: string;
  wIh: tf.Tensor[];
  wHh: tf.Tensor[];
  bIh: tf.Tensor[];
  bHh: tf.Tensor[];
}

export function gruCell(x: tf.Tensor2D, h: tf.Tensor2D, p: GruWeights, device: StageDevice = 'cpu', key: object = p.weightIh,
  sources?: GruSources): tf.Tensor2D {
  const [N, I] = x.shape;
  const H = h.shape[1];
  if (h.shape[0] !== N) throw new Error(`gruCell: input has ${N} rows, hidden state [${h.shape}]`);
  if (p.weightIh.shape[0] !== 3 * H || p.weightIh.shape[1] !== I) throw new Error(`gruCell: weight_ih [${p.weightIh.shape}] does not fit input ${I}, hidden ${H}`);
  if (p.weightHh.shape[0] !== 3 * H || p.weightHh.shape[1] !== H) throw new Error(`gruCell: weight_hh [${p.weightHh.shape}] does not fit hidden ${H}`);
  if (p.biasIh.shape[0] !== 3 * H || p.biasHh.shape[0] !== 3 * H) throw new Error(`gruCell: biases [${p.biasIh.shape}], [${p.biasHh.shape}] do not fit hidden ${H}`);
  const m = addonOps();
  const G = 3 * H;
  const where = device === 'cpu' ? {} : { device, workspace: workspaceFor(key) };
  const op = tf.customGrad((xt, ht, wih, whh, bih, bhh, save) => {
    const tagOf = (t: unknown, from: tf.Tensor[] | undefined, part: string) =>
      from ? derivedTag(from, `${sources!.recipe}/${part}`) : contentTag(t as tf.Tensor);
    const tags = device === 'cpu' ? {} : {
      wIhTag: tagOf(wih, sources?.wIh, 'wIh'), wHhTag: tagOf(whh, sources?.wHh, 'wHh'),
      bIhTag: tagOf(bih, sources?.bIh, 'bIh'), bHhTag: tagOf(bhh, sources?.bHh, 'bHh'),
    };
    const biases = { bIh: f32(bih as tf.Tensor), bHh: f32(bhh as tf.Tensor) };
    // on a GPU x, h and the gates stay there for the backward call (which recomputes the gates
    // from the biases if another forward took their place)
    const { y, gates, kept } = m.gruCell({
      x: f32(xt as tf.Tensor), h: f32(ht as tf.Tensor), wIh: f32(wih as tf.Tensor), wHh: f32(whh as tf.Tensor),
      ...biases, N, I, H, ...where, ...tags, ...(device !== 'cpu' && { keep: true }),
    });
    const fromForward = device === 'cpu' ? { gates: gates! } : { kept, ...biases };
    (save as tf.GradSaveFunc)([xt as tf.Tensor, ht as tf.Tensor, wih as tf.Tensor, whh as tf.Tensor]);
    return {
      value: tf.tensor2d(y, [N, H]),
      gradFunc: (dy: tf.Tensor, saved: tf.Tensor[]) => {
        const needParams = paramGradsEnabled();
        const g = m.gruCellBackward({
          x: f32(saved[0]), h: f32(saved[1]), wIh: f32(saved[2]), wHh: f32(saved[3]), ...fromForward, dy: f32(dy), N, I, H, needParams, ...where, ...tags,
        });
        const grads: tf.Tensor[] = [tf.tensor2d(g.dx, [N, I]), tf.tensor2d(g.dh, [N, H])];
        if (!needParams) grads.push(tf.zeros([G, I]), tf.zeros([G, H]), tf.zeros([G]), tf.zeros([G]));
        else grads.push(tf.tensor2d(g.dwIh!, [G, I]), tf.tensor2d(g.dwHh!, [G, H]), tf.tensor1d(g.dbIh!), tf.tensor1d(g.dbHh!));
        return grads;
      },
    };
  });
  return op(x, h, p.weightIh, p.weightHh, p.biasIh, p.biasHh) as tf.Tensor2D;
}

/** dualGruCell (lib/ops/nn.ts): the two GRUs as gruCell with nn.GRU's row layout. */
export function dualGruCell(x: tf.Tensor2D, h1: tf.Tensor2D, h2: tf.Tensor2D, p: DualGruWeights, device: StageDevice = 'cpu'): [tf.Tensor2D, tf.Tensor2D] {
  const [bir1, biu1, bir2, biu2] = tf.split(p.biasIh, 4);
  const [bhr1, bhu1, bhr2, bhu2] = tf.split(p.biasHh, 4);
  const [bin1, bin2] = tf.split(p.biasIn, 2);
  const [bhn1, bhn2] = tf.split(p.biasHn, 2);
  // the workspace is keyed by the cell's own input weights, and the weight tags come from the
  // parameters the cell's tensors are cut from: the concatenations are new every call
  const cell = (n: number, h: tf.Tensor2D, wih: tf.Tensor2D, win: tf.Tensor2D, whh: tf.Tensor2D, whn: tf.Tensor2D, bs: tf.Tensor[], cs: tf.Tensor[]) =>
    gruCell(x, h, {
      weightIh: tf.concat([wih, win], 0) as tf.Tensor2D,
      weightHh: tf.concat([whh, whn], 0) as tf.Tensor2D,
      biasIh: tf.concat(bs, 0) as tf.Tensor1D,
      biasHh: tf.concat(cs, 0) as tf.Tensor1D,
    }, device, wih, {
      recipe: `dualGru${n}`, wIh: [wih, win], wHh: [whh, whn], bIh: [p.biasIh, p.biasIn], bHh: [p.biasHh, p.biasHn],
    });
  return [
    cell(1, h1, p.weightIh1, p.weightIn1, p.weightHh1, p.weightHn1, [bir1, biu1, bin1], [bhr1, bhu1, bhn1]),
    cell(2, h2, p.weightIh2, p.weightIn2, p.weightHh2, p.weightHn2, [bir2, biu2, bin2], [bhr2, bhu2, bhn2]),
  ];
}
