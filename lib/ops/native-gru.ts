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
 *
 * When a GPU device keeps a GRU's weights with their optimizer (DeviceParams of stage 'gru'), its
 * calls take them there (each cell's rows assembled on the device) and leave their gradients there,
 * summed over the pass's calls; those tensors are not the op's inputs (the group's anchor is).
 */
import { tf } from '../tf';
import { f32 } from './arrays';
import { multiOutputOp } from './multi-output';
import { addonOps, contentTag, derivedTag, workspaceFor, type GruCellGrads, type StageDevice } from './addon';
import { DeviceParams } from './device-params';
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

/** One cell's arrays: weights [3H, I], [3H, H] and biases [3H] in nn.GRU's row layout. */
interface GruArrays {
  wIh: Float32Array;
  wHh: Float32Array;
  bIh: Float32Array;
  bHh: Float32Array;
}

/**
 * One GRU step on arrays: h' now, and the backward for later (from dh', its gradients). On a GPU
 * device the weights are cached there under `tags`, and the forward's x, h and gates stay there
 * for the backward call (which recomputes the gates from the biases if another forward took their
 * place).
 */
function gruStep(x: Float32Array, h: Float32Array, w: GruArrays, N: number, I: number, H: number, device: StageDevice, key: object,
  tags: () => { wIhTag: number; wHhTag: number; bIhTag: number; bHhTag: number }): GruStep {
  const m = addonOps();
  const where = device === 'cpu' ? {} : { device, workspace: workspaceFor(key), ...tags() };
  const biases = { bIh: w.bIh, bHh: w.bHh };
  const { y, gates, kept } = m.gruCell({ x, h, wIh: w.wIh, wHh: w.wHh, ...biases, N, I, H, ...where, ...(device !== 'cpu' && { keep: true }) });
  const fromForward = device === 'cpu' ? { gates: gates! } : { kept, ...biases };
  return {
    y,
    backward: (dy, needParams) => m.gruCellBackward({ x, h, wIh: w.wIh, wHh: w.wHh, ...fromForward, dy, N, I, H, needParams, ...where }),
  };
}

/**
 * A GRU step whose weights a GPU device keeps (DeviceParams of stage 'gru': cell `cell` of them),
 * assembled there; the backward with needParams adds the parameters' gradients there (the
 * result's are null), or sets them when `first` (see withKeptGrads).
 */
function residentGruStep(x: Float32Array, h: Float32Array, group: DeviceParams, cell: number, N: number, I: number, H: number): GruStep {
  const m = addonOps();
  const where = { device: group.device, workspace: group.workspace };
  const { y, kept } = m.gruCell({ x, h, N, I, H, ...where, keep: true, resident: group.residentWeights(cell) });
  return {
    y,
    backward: (dy, needParams, first = false) =>
      m.gruCellBackward({ x, h, kept, dy, N, I, H, needParams, ...where, resident: { ...group.residentWeights(cell), keepGrads: needParams, first } }),
  };
}

interface GruStep {
  y: Float32Array;
  /** first: a resident step's gradients are the pass's first (they set the device's rather than add to them) */
  backward: (dy: Float32Array, needParams: boolean, first?: boolean) => GruCellGrads;
}

/**
 * The backward of one call of a GRU op (one cell, or the DualGRU's two): `run(first)` with the
 * parameters' gradients kept on the device by `group` when it keeps them and they are wanted (one
 * contribution to the pass's sum, however many cells it has), else as they are.
 */
function withKeptGrads<R>(group: DeviceParams | undefined, needParams: boolean, run: (first: boolean) => R): R {
  return group && needParams ? group.addGradients(run) : run(false);
}

/** The group that keeps `t` on `device`, if any (its GRU calls then take the weights there). */
function residentGroup(t: tf.Tensor, device: StageDevice): DeviceParams | undefined {
  const group = DeviceParams.of(t);
  return group && group.device === device && group.stage === 'gru' ? group : undefined;
}

export function gruCell(x: tf.Tensor2D, h: tf.Tensor2D, p: GruWeights, device: StageDevice = 'cpu', key: object = p.weightIh,
  sources?: GruSources): tf.Tensor2D {
  const [N, I] = x.shape;
  const H = h.shape[1];
  if (h.shape[0] !== N) throw new Error(`gruCell: input has ${N} rows, hidden state [${h.shape}]`);
  if (p.weightIh.shape[0] !== 3 * H || p.weightIh.shape[1] !== I) throw new Error(`gruCell: weight_ih [${p.weightIh.shape}] does not fit input ${I}, hidden ${H}`);
  if (p.weightHh.shape[0] !== 3 * H || p.weightHh.shape[1] !== H) throw new Error(`gruCell: weight_hh [${p.weightHh.shape}] does not fit hidden ${H}`);
  if (p.biasIh.shape[0] !== 3 * H || p.biasHh.shape[0] !== 3 * H) throw new Error(`gruCell: biases [${p.biasIh.shape}], [${p.biasHh.shape}] do not fit hidden ${H}`);
  const G = 3 * H;
  const group = sources ? undefined : residentGroup(p.weightIh, device);
  // weights a device keeps are not the op's inputs (their gradients stay there); their anchor is
  const inputs = group ? [x, h, group.anchor] : [x, h, p.weightIh, p.weightHh, p.biasIh, p.biasHh];
  const op = tf.customGrad((...args: unknown[]) => {
    const [xt, ht, wih, whh, bih, bhh] = args as tf.Tensor[];
    const tagOf = (t: unknown, from: tf.Tensor[] | undefined, part: string) =>
      from ? derivedTag(from, `${sources!.recipe}/${part}`) : contentTag(t as tf.Tensor);
    const step = group
      ? residentGruStep(f32(xt as tf.Tensor), f32(ht as tf.Tensor), group, 0, N, I, H)
      : gruStep(f32(xt as tf.Tensor), f32(ht as tf.Tensor),
        { wIh: f32(wih as tf.Tensor), wHh: f32(whh as tf.Tensor), bIh: f32(bih as tf.Tensor), bHh: f32(bhh as tf.Tensor) }, N, I, H, device, key, () => ({
          wIhTag: tagOf(wih, sources?.wIh, 'wIh'), wHhTag: tagOf(whh, sources?.wHh, 'wHh'),
          bIhTag: tagOf(bih, sources?.bIh, 'bIh'), bHhTag: tagOf(bhh, sources?.bHh, 'bHh'),
        }));
    return {
      value: tf.tensor2d(step.y, [N, H]),
      gradFunc: (dy: tf.Tensor) => {
        const needParams = paramGradsEnabled();
        const g = withKeptGrads(group, needParams, (first) => step.backward(f32(dy), needParams, first));
        const grads: tf.Tensor[] = [tf.tensor2d(g.dx, [N, I]), tf.tensor2d(g.dh, [N, H])];
        if (group) grads.push(tf.scalar(0));
        else if (!needParams) grads.push(tf.zeros([G, I]), tf.zeros([G, H]), tf.zeros([G]), tf.zeros([G]));
        else grads.push(tf.tensor2d(g.dwIh!, [G, I]), tf.tensor2d(g.dwHh!, [G, H]), tf.tensor1d(g.dbIh!), tf.tensor1d(g.dbHh!));
        return grads;
      },
    };
  });
  return (op as (...t: tf.Tensor[]) => tf.Tensor)(...inputs) as tf.Tensor2D;
}

/** rows [r0, r1) of a row-major matrix with `cols` columns, then rows [s0, s1) of another: one new array */
function joinRows(a: Float32Array, r0: number, r1: number, b: Float32Array, s0: number, s1: number, cols: number): Float32Array {
  const out = new Float32Array((r1 - r0 + s1 - s0) * cols);
  out.set(a.subarray(r0 * cols, r1 * cols));
  out.set(b.subarray(s0 * cols, s1 * cols), (r1 - r0) * cols);
  return out;
}

/**
 * dualGruCell (lib/ops/nn.ts) as one op each way: the two GRUs as gruStep with nn.GRU's row
 * layout, their weights and biases joined from the original's tensors in plain arrays and their
 * gradients cut back the same way (as tfjs' concat and split ops would, the same values; dx sums
 * the two cells' parts, as tfjs' accumulation would), instead of ~40 tfjs ops each way.
 */
export function dualGruCell(x: tf.Tensor2D, h1: tf.Tensor2D, h2: tf.Tensor2D, p: DualGruWeights, device: StageDevice = 'cpu'): [tf.Tensor2D, tf.Tensor2D] {
  const [N, I] = x.shape;
  const H = h1.shape[1];
  const want: [string, tf.Tensor, number[]][] = [
    ['h1', h1, [N, H]], ['h2', h2, [N, H]],
    ['weight_ih_1', p.weightIh1, [2 * H, I]], ['weight_in_1', p.weightIn1, [H, I]], ['weight_hh_1', p.weightHh1, [2 * H, H]], ['weight_hn_1', p.weightHn1, [H, H]],
    ['weight_ih_2', p.weightIh2, [2 * H, I]], ['weight_in_2', p.weightIn2, [H, I]], ['weight_hh_2', p.weightHh2, [2 * H, H]], ['weight_hn_2', p.weightHn2, [H, H]],
    ['bias_ih', p.biasIh, [4 * H]], ['bias_hh', p.biasHh, [4 * H]], ['bias_in', p.biasIn, [2 * H]], ['bias_hn', p.biasHn, [2 * H]],
  ];
  for (const [name, t, shape] of want) {
    if (t.shape.length !== shape.length || t.shape.some((d, i) => d !== shape[i])) throw new Error(`dualGruCell: ${name} is [${t.shape}], input [${x.shape}] and hidden ${H} need [${shape}]`);
  }
  const group = residentGroup(p.weightIh1, device);
  // weights a device keeps are not the op's inputs (their gradients stay there); their anchor is
  const inputs = group
    ? [x, h1, h2, group.anchor]
    : [x, h1, h2, p.weightIh1, p.weightIn1, p.weightHh1, p.weightHn1, p.weightIh2, p.weightIn2, p.weightHh2, p.weightHn2, p.biasIh, p.biasHh, p.biasIn, p.biasHn];
  const [y1, y2] = multiOutputOp('dualGruCell', inputs, (...t) => {
    // the device assembles each cell's weights from the original's tensors it keeps (the same rows as below)
    const residentSteps = (xv: Float32Array, h1v: Float32Array, h2v: Float32Array) =>
      [residentGruStep(xv, h1v, group!, 0, N, I, H), residentGruStep(xv, h2v, group!, 1, N, I, H)];
    const hostSteps = () => {
      const [xv, h1v, h2v, wih1, win1, whh1, whn1, wih2, win2, whh2, whn2, bih, bhh, bin, bhn] = t.map(f32);
      // cell n: weight rows (reset, update) of weight_i·_n then (new) of weight_·n_n; biases: the
      // n-th (reset, update) pair of bias_ih / bias_hh, then the n-th half of bias_in / bias_hn
      const cell = (n: 1 | 2, h: Float32Array, wih: Float32Array, win: Float32Array, whh: Float32Array, whn: Float32Array) => {
        const b0 = (n - 1) * 2 * H, c0 = (n - 1) * H;
        const arrays = {
          wIh: joinRows(wih, 0, 2 * H, win, 0, H, I),
          wHh: joinRows(whh, 0, 2 * H, whn, 0, H, H),
          bIh: joinRows(bih, b0, b0 + 2 * H, bin, c0, c0 + H, 1),
          bHh: joinRows(bhh, b0, b0 + 2 * H, bhn, c0, c0 + H, 1),
        };
        const [wi, wn, wh, wq] = n === 1 ? [t[3], t[4], t[5], t[6]] : [t[7], t[8], t[9], t[10]];
        return gruStep(xv, h, arrays, N, I, H, device, wi, () => ({
          wIhTag: derivedTag([wi, wn], `dualGru${n}/wIh`), wHhTag: derivedTag([wh, wq], `dualGru${n}/wHh`),
          bIhTag: derivedTag([t[11], t[13]], `dualGru${n}/bIh`), bHhTag: derivedTag([t[12], t[14]], `dualGru${n}/bHh`),
        }));
      };
      return [cell(1, h1v, wih1, win1, whh1, whn1), cell(2, h2v, wih2, win2, whh2, whn2)];
    };
    const [s1, s2] = group ? residentSteps(f32(t[0]), f32(t[1]), f32(t[2])) : hostSteps();
    return {
      values: [tf.tensor2d(s1.y, [N, H]), tf.tensor2d(s2.y, [N, H])],
      gradFunc: (dys) => {
        const needParams = paramGradsEnabled();
        const [dy1, dy2] = dys.map(f32);
        const [g1, g2] = withKeptGrads(group, needParams, (first) => [s1.backward(dy1, needParams, first), s2.backward(dy2, needParams, first)]);
        const dx = new Float32Array(N * I);
        for (let i = 0; i < dx.length; i++) dx[i] = g2.dx[i] + g1.dx[i];
        const grads: tf.Tensor[] = [tf.tensor2d(dx, [N, I]), tf.tensor2d(g1.dh, [N, H]), tf.tensor2d(g2.dh, [N, H])];
        if (group) return [...grads, tf.scalar(0)];
        if (!needParams) {
          for (const w of inputs.slice(3)) grads.push(tf.zeros(w.shape));
          return grads;
        }
        const rows = (a: Float32Array, r0: number, r1: number, cols: number) => a.slice(r0 * cols, r1 * cols);
        for (const g of [g1, g2]) {
          grads.push(tf.tensor2d(rows(g.dwIh!, 0, 2 * H, I), [2 * H, I]), tf.tensor2d(rows(g.dwIh!, 2 * H, 3 * H, I), [H, I]));
          grads.push(tf.tensor2d(rows(g.dwHh!, 0, 2 * H, H), [2 * H, H]), tf.tensor2d(rows(g.dwHh!, 2 * H, 3 * H, H), [H, H]));
        }
        // bias_ih = (r1, u1, r2, u2), bias_in = (n1, n2); likewise the hidden ones
        const join = (a: Float32Array, b: Float32Array, len: number) => joinRows(a, 0, len, b, 0, len, 1);
        grads.push(tf.tensor1d(join(g1.dbIh!, g2.dbIh!, 2 * H)), tf.tensor1d(join(g1.dbHh!, g2.dbHh!, 2 * H)));
        grads.push(tf.tensor1d(joinRows(g1.dbIh!, 2 * H, 3 * H, g2.dbIh!, 2 * H, 3 * H, 1)));
        grads.push(tf.tensor1d(joinRows(g1.dbHh!, 2 * H, 3 * H, g2.dbHh!, 2 * H, 3 * H, 1)));
        return grads;
      },
    };
  });
  return [y1 as tf.Tensor2D, y2 as tf.Tensor2D];
}
