/**
 * Optimal linear assignment, equal to scipy.optimize.linear_sum_assignment: the shortest
 * augmenting path method (Crouse 2016, as scipy implements it), O(n^3), in float64, for
 * rectangular matrices. It follows scipy's choices so that ties resolve the same way:
 * - a tall matrix (more rows than columns) is solved transposed and the result sorted by row;
 * - `maximize` negates the costs;
 * - columns are scanned in reverse order (a constant matrix gives the identity), and among
 *   equally short paths an unassigned column (a sink) is preferred;
 * - NaN, or -inf after the negation for `maximize` (+inf with `maximize`), is an invalid matrix;
 *   +inf entries are forbidden pairings, and a matrix with no finite complete assignment is
 *   infeasible. Both are errors, with scipy's messages.
 * Returns `rowInd` (increasing) and `colInd`, min(rows, cols) pairs each, and the total cost of
 * those pairs in the original matrix.
 */
import { MetricsError } from './ari';

/** A cost matrix: nested rows, or flat row-major data with its `[rows, cols]` shape. */
export type CostMatrix =
  | ReadonlyArray<ArrayLike<number>>
  | { data: ArrayLike<number>; shape: readonly number[] };

export interface Assignment {
  rowInd: Int32Array;
  colInd: Int32Array;
  /** Sum of the chosen entries of the input matrix. */
  cost: number;
}

export interface AssignmentOptions {
  /** Maximise the total instead of minimising it (scipy's `maximize=True`). */
  maximize?: boolean;
}

function toFlat(cost: CostMatrix): { data: Float64Array; rows: number; cols: number } {
  if (Array.isArray(cost)) {
    const rows = cost.length;
    const cols = rows > 0 ? (cost[0] as ArrayLike<number>).length : 0;
    const data = new Float64Array(rows * cols);
    for (let i = 0; i < rows; i++) {
      const row = cost[i] as ArrayLike<number>;
      if (!row || row.length !== cols) {
        throw new MetricsError(
          `linearSumAssignment: row ${i} has ${row ? row.length : 'no'} entries, row 0 has ${cols} (ragged matrix)`,
        );
      }
      for (let j = 0; j < cols; j++) data[i * cols + j] = row[j];
    }
    return { data, rows, cols };
  }
  const m = cost as { data: ArrayLike<number>; shape: readonly number[] };
  if (!m.shape || m.shape.length !== 2 || m.shape.some((d) => !Number.isInteger(d) || d < 0)) {
    throw new MetricsError(`linearSumAssignment: expected a matrix of shape [rows, cols], got [${m.shape ?? ''}]`);
  }
  const [rows, cols] = m.shape;
  if (m.data.length !== rows * cols) {
    throw new MetricsError(`linearSumAssignment: data has ${m.data.length} values, shape [${rows},${cols}] needs ${rows * cols}`);
  }
  return { data: Float64Array.from(m.data), rows, cols };
}

/** Solves the assignment problem; see the module comment. */
export function linearSumAssignment(cost: CostMatrix, options: AssignmentOptions = {}): Assignment {
  const { data: input, rows, cols } = toFlat(cost);
  const maximize = options.maximize === true;
  if (rows === 0 || cols === 0) return { rowInd: new Int32Array(0), colInd: new Int32Array(0), cost: 0 };

  const transpose = cols < rows;
  const nr = transpose ? cols : rows;
  const nc = transpose ? rows : cols;
  const c = new Float64Array(nr * nc);
  if (transpose) {
    for (let i = 0; i < rows; i++) for (let j = 0; j < cols; j++) c[j * rows + i] = input[i * cols + j];
  } else {
    c.set(input);
  }
  if (maximize) for (let i = 0; i < c.length; i++) c[i] = -c[i];
  for (let i = 0; i < c.length; i++) {
    const v = c[i];
    if (v !== v || v === -Infinity) throw new MetricsError('linearSumAssignment: matrix contains invalid numeric entries');
  }

  const u = new Float64Array(nr);
  const v = new Float64Array(nc);
  const shortest = new Float64Array(nc);
  const path = new Int32Array(nc).fill(-1);
  const col4row = new Int32Array(nr).fill(-1);
  const row4col = new Int32Array(nc).fill(-1);
  const SR = new Uint8Array(nr);
  const SC = new Uint8Array(nc);
  const remaining = new Int32Array(nc);

  for (let curRow = 0; curRow < nr; curRow++) {
    // Shortest augmenting path from curRow (Dijkstra over reduced costs).
    let minVal = 0;
    let numRemaining = nc;
    for (let it = 0; it < nc; it++) remaining[it] = nc - it - 1;
    SR.fill(0);
    SC.fill(0);
    shortest.fill(Infinity);
    let sink = -1;
    let i = curRow;
    while (sink === -1) {
      let index = -1;
      let lowest = Infinity;
      SR[i] = 1;
      const rowOff = i * nc;
      const ui = u[i];
      for (let it = 0; it < numRemaining; it++) {
        const j = remaining[it];
        const r = minVal + c[rowOff + j] - ui - v[j];
        if (r < shortest[j]) {
          path[j] = i;
          shortest[j] = r;
        }
        if (shortest[j] < lowest || (shortest[j] === lowest && row4col[j] === -1)) {
          lowest = shortest[j];
          index = it;
        }
      }
      minVal = lowest;
      if (minVal === Infinity) throw new MetricsError('linearSumAssignment: cost matrix is infeasible');
      const j = remaining[index];
      if (row4col[j] === -1) sink = j;
      else i = row4col[j];
      SC[j] = 1;
      remaining[index] = remaining[--numRemaining];
    }

    // Update the dual variables.
    u[curRow] += minVal;
    for (let r = 0; r < nr; r++) {
      if (SR[r] && r !== curRow) u[r] += minVal - shortest[col4row[r]];
    }
    for (let j = 0; j < nc; j++) {
      if (SC[j]) v[j] -= minVal - shortest[j];
    }

    // Augment along the path.
    let j = sink;
    for (;;) {
      const r = path[j];
      row4col[j] = r;
      const prev = col4row[r];
      col4row[r] = j;
      j = prev;
      if (r === curRow) break;
    }
  }

  const n = nr;
  const rowInd = new Int32Array(n);
  const colInd = new Int32Array(n);
  if (transpose) {
    // Solved C^T: col4row maps original columns to original rows; sort the pairs by row.
    const order = Array.from({ length: n }, (_, k) => k).sort((p, q) => col4row[p] - col4row[q]);
    for (let k = 0; k < n; k++) {
      rowInd[k] = col4row[order[k]];
      colInd[k] = order[k];
    }
  } else {
    for (let k = 0; k < n; k++) {
      rowInd[k] = k;
      colInd[k] = col4row[k];
    }
  }
  let total = 0;
  for (let k = 0; k < n; k++) total += input[rowInd[k] * cols + colInd[k]];
  return { rowInd, colInd, cost: total };
}
