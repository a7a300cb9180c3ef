/**
 * PyTorch checkpoints of the original EfficientMORL, read and written without Python.
 *
 * readPth reads both torch.save serialisations (zip, legacy; see pth-torch.ts) of either
 *  - a training checkpoint as the original train.py's save_checkpoint writes it:
 *    {'step', 'model': state_dict, 'model_opt': Adam state_dict, 'kl_beta'}, or
 *  - a bare state_dict (dict / OrderedDict of tensors), or {'state_dict': ...}.
 *
 * Parameter names are mapped as the original eval.py's rename_state does before
 * load_state_dict (see mapStateDictName), then the DistributedDataParallel 'module.' prefix is
 * stripped. A Slot Attention state_dict (recognised by its top-level 'init_slots') keeps its
 * top-level names: rename_state would move its encoder under 'hvae_networks.', where the
 * original SlotAttention has no such module. GECO's state is two entries of the state_dict ('geco_C_ema', 'geco_beta': nn.
 * Parameters with requires_grad=False), kept in `params` and also reported in `geco`.
 *
 * Optimizer mapping: torch.optim.Optimizer.state_dict() numbers the parameters 0..N-1 in the
 * order of param_groups[*]['params'], which for the original `Adam(model.parameters())` is the
 * order of model.parameters(). A module's state_dict lists, module by module in the same
 * pre-order, its parameters (then its buffers; EfficientMORL has none), so index i is the i-th
 * entry of the raw state_dict. readPth applies that mapping when the counts agree (buffers
 * named *.running_mean / *.running_var / *.num_batches_tracked are skipped if that makes them
 * agree) and every moment's shape matches its parameter; otherwise it reports the raw
 * per-index state only, with the reason in `optimizer.mappingNote`. Entries of dropped names
 * are dropped.
 */
import * as fs from 'node:fs';
import { PickleWriter, PyDict, PyGlobal, PyTuple, describe, type PickleOut, type PickleValue } from '../io/pickle';
import { encodeZip } from '../io/zip';
import { writeFileAtomic } from '../train/checkpoint';
import { PthError, TorchTensor, loadTorch, tensorScalar, tensorToFloat32 } from './pth-torch';

export { PthError } from './pth-torch';

export interface PthTensor {
  shape: number[];
  data: Float32Array;
}

export interface AdamParamState {
  step?: number;
  exp_avg?: PthTensor;
  exp_avg_sq?: PthTensor;
  max_exp_avg_sq?: PthTensor;
}

export interface AdamParamGroup {
  lr?: number;
  betas?: [number, number];
  eps?: number;
  weight_decay?: number;
  amsgrad?: boolean;
  /** Parameter indices (positions in the raw state_dict, see the file comment). */
  params: number[];
}

export interface PthOptimizer {
  paramGroups: AdamParamGroup[];
  /** Per parameter index, as stored. */
  state: Map<number, AdamParamState>;
  /** index -> mapped parameter name (null: a dropped name); absent when no mapping applies. */
  indexToName?: Array<string | null>;
  /** Per mapped parameter name (only parameters that have state). */
  byName: Map<string, AdamParamState>;
  mappingNote?: string;
}

/** The models whose state_dicts readPth names (the original's EfficientMORL and SlotAttention). */
export type PthModel = 'EfficientMORL' | 'SlotAttention';

export interface PthReadOptions {
  /** whose naming to apply (default: the model the state_dict looks like, see PthCheckpoint.model) */
  model?: PthModel;
}

export interface PthCheckpoint {
  format: 'zip' | 'legacy';
  /**
   * The model the state_dict looks like: 'SlotAttention' when it has a top-level 'init_slots'
   * (after the 'module.' prefix), else 'EfficientMORL'.
   */
  model: PthModel;
  step?: number;
  klBeta?: number;
  geco?: { C_ema?: number; beta?: number };
  /** Mapped name -> float32 tensor, in the state_dict's order. */
  params: Map<string, PthTensor>;
  optimizer?: PthOptimizer;
  /** [original key, mapped name] for every key whose name changed beyond the prefix. */
  renamed: Array<[string, string]>;
  /** Original keys dropped as obsolete. */
  dropped: string[];
}

/**
 * The name a state_dict key gets, or null when the original evaluation drops it. This is
 * eval.py's rename_state (which works on 'module.'-prefixed keys), followed by stripping
 * 'module.'; keys without the prefix are treated as if they had it:
 *  - 'module.pos_embed_projection*' -> 'hvae_networks.pos_embed_projection*'
 *  - 'module.encoder_pt*'           -> 'hvae_networks.encoder_pt*'
 *  - 'module.object_discovery_block*' -> 'hvae_networks*', unless dropped below
 *  - otherwise kept, unless dropped below;
 *  dropped (except in the first two cases): keys containing 'generation_relation' (a removed
 *  module) or 'gru.cell.zeros' (incl. 'zeros_n': the DualGRU's constant padding, no longer in
 *  the state_dict).
 */
export function mapStateDictName(key: string, model: PthModel = 'EfficientMORL'): string | null {
  if (model === 'SlotAttention') return mapSlotAttentionName(key);
  const k = key.startsWith('module.') ? key : `module.${key}`;
  const obsolete = k.includes('generation_relation') || k.includes('gru.cell.zeros');
  let out: string;
  if (k.includes('module.pos_embed_projection')) out = k.replace('module.pos_embed_projection', 'module.hvae_networks.pos_embed_projection');
  else if (k.includes('module.encoder_pt')) out = k.replace(/^module\./, 'module.hvae_networks.');
  else if (k.includes('module.object_discovery_block')) {
    if (obsolete) return null;
    out = k.replace('module.object_discovery_block', 'module.hvae_networks');
  } else {
    if (obsolete) return null;
    out = k;
  }
  return out.slice('module.'.length);
}

/**
 * A Slot Attention state_dict key's name: the 'module.' prefix stripped. Its modules sit at the
 * top level (lib/model.py SlotAttention), so rename_state's moves of 'encoder_pt*' and
 * 'pos_embed_projection*' under 'hvae_networks.' are not made (the original's strict
 * load_state_dict would reject them), and undone for a file that went through them.
 */
export function mapSlotAttentionName(key: string): string {
  const k = key.startsWith('module.') ? key.slice('module.'.length) : key;
  const m = /^hvae_networks\.((?:encoder_pt|pos_embed_projection).*)$/.exec(k);
  return m ? m[1] : k;
}

/** 'SlotAttention' when the state_dict has a top-level 'init_slots', else 'EfficientMORL'. */
export function stateDictModel(keys: Iterable<string>): PthModel {
  for (const k of keys) if (k === 'init_slots' || k === 'module.init_slots') return 'SlotAttention';
  return 'EfficientMORL';
}

function asNumber(v: PickleValue | undefined, key: string, source: string): number | undefined {
  if (v === undefined || v === null) return undefined;
  if (typeof v === 'number') return v;
  if (typeof v === 'bigint') return Number(v);
  if (typeof v === 'boolean') return v ? 1 : 0;
  if (v instanceof TorchTensor) return tensorScalar(v, key, source);
  throw new PthError(`${source}: '${key}' is a ${describe(v)}, not a number`);
}

function toTensor(v: PickleValue, key: string, source: string): PthTensor {
  if (!(v instanceof TorchTensor)) throw new PthError(`${source}: '${key}' is a ${describe(v)}, not a tensor`);
  return { shape: [...v.shape], data: tensorToFloat32(v, key, source) };
}

const BUFFER_SUFFIXES = ['.running_mean', '.running_var', '.num_batches_tracked'];

function readOptimizer(opt: PickleValue, rawKeys: string[], params: Map<string, PthTensor>, source: string, model: PthModel): PthOptimizer {
  if (!(opt instanceof PyDict)) throw new PthError(`${source}: 'model_opt' is a ${describe(opt)}, not a dict`);
  const groupsV = opt.get('param_groups');
  const stateV = opt.get('state');
  if (!Array.isArray(groupsV) || !(stateV instanceof PyDict)) {
    throw new PthError(`${source}: 'model_opt' has no 'param_groups' list and 'state' dict`);
  }
  const paramGroups: AdamParamGroup[] = groupsV.map((g, gi) => {
    if (!(g instanceof PyDict)) throw new PthError(`${source}: model_opt.param_groups[${gi}] is not a dict`);
    const ps = g.get('params');
    if (!Array.isArray(ps) || ps.some((x) => typeof x !== 'number' || !Number.isInteger(x))) {
      throw new PthError(`${source}: model_opt.param_groups[${gi}].params is not a list of indices`);
    }
    const out: AdamParamGroup = { params: ps as number[] };
    const num = (k: string) => asNumber(g.get(k), `model_opt.param_groups[${gi}].${k}`, source);
    out.lr = num('lr');
    out.eps = num('eps');
    out.weight_decay = num('weight_decay');
    const am = g.get('amsgrad');
    if (typeof am === 'boolean') out.amsgrad = am;
    const b = g.get('betas');
    if (b instanceof PyTuple && b.items.length === 2 && b.items.every((x) => typeof x === 'number')) out.betas = b.items as [number, number];
    return out;
  });
  const state = new Map<number, AdamParamState>();
  for (const [k, v] of stateV) {
    if (typeof k !== 'number' || !(v instanceof PyDict)) throw new PthError(`${source}: model_opt.state has a malformed entry (${describe(k)})`);
    const s: AdamParamState = {};
    for (const [name, x] of v) {
      const where = `model_opt.state[${k}].${String(name)}`;
      if (name === 'step') s.step = asNumber(x, where, source);
      else if (name === 'exp_avg' || name === 'exp_avg_sq' || name === 'max_exp_avg_sq') s[name] = toTensor(x, where, source);
      else throw new PthError(`${source}: ${where}: unknown Adam state entry`);
    }
    state.set(k, s);
  }
  const result: PthOptimizer = { paramGroups, state, byName: new Map() };
  const indices = paramGroups.flatMap((g) => g.params);
  let order = rawKeys;
  if (indices.length !== order.length) order = rawKeys.filter((k) => !BUFFER_SUFFIXES.some((s) => k.endsWith(s)));
  const sorted = [...indices].sort((a, b) => a - b);
  if (indices.length !== order.length) {
    result.mappingNote = `optimizer has ${indices.length} parameters, the state_dict ${rawKeys.length} entries; state left by index`;
    return result;
  }
  if (sorted.some((x, i) => x !== i)) {
    result.mappingNote = 'optimizer parameter indices are not 0..N-1; state left by index';
    return result;
  }
  const indexToName = order.map((k) => mapStateDictName(k, model));
  for (const [i, s] of state) {
    const name = i < indexToName.length ? indexToName[i] : undefined;
    if (name === undefined) {
      result.mappingNote = `optimizer state for index ${i} has no parameter; state left by index`;
      result.byName.clear();
      return result;
    }
    if (name === null) continue;
    const p = params.get(name);
    for (const m of [s.exp_avg, s.exp_avg_sq, s.max_exp_avg_sq]) {
      if (m && (!p || m.shape.join(',') !== p.shape.join(','))) {
        result.mappingNote = `optimizer state for index ${i} has shape [${m.shape}], parameter '${name}' [${p?.shape ?? ''}]; state left by index`;
        result.byName.clear();
        return result;
      }
    }
    result.byName.set(name, s);
  }
  result.indexToName = indexToName;
  return result;
}

/** Parses a checkpoint held in memory; `source` names it in errors. */
export function decodePth(buf: Uint8Array, source: string, opts: PthReadOptions = {}): PthCheckpoint {
  const { format, root } = loadTorch(buf, source);
  if (!(root instanceof PyDict)) throw new PthError(`${source}: the checkpoint is a ${describe(root)}, not a dict`);
  let stateDict: PyDict;
  let meta: PyDict | undefined;
  const model = root.get('model') ?? root.get('state_dict');
  if (model instanceof PyDict) {
    stateDict = model;
    meta = root;
  } else if ([...root.values()].every((v) => v instanceof TorchTensor)) {
    stateDict = root;
  } else {
    const keys = [...root.keys()].slice(0, 8).map(String).join(', ');
    throw new PthError(`${source}: no state_dict found (expected a 'model' entry or a dict of tensors; keys: ${keys})`);
  }
  const params = new Map<string, PthTensor>();
  const origin = new Map<string, string>();
  const renamed: Array<[string, string]> = [];
  const dropped: string[] = [];
  const rawKeys: string[] = [];
  for (const k of stateDict.keys()) {
    if (typeof k !== 'string') throw new PthError(`${source}: state_dict key ${describe(k)} is not a string`);
    rawKeys.push(k);
  }
  const looksLike = stateDictModel(rawKeys);
  const naming = opts.model ?? looksLike;
  for (const [key, v] of stateDict) {
    const k = key as string;
    const name = mapStateDictName(k, naming);
    if (name === null) {
      dropped.push(k);
      continue;
    }
    const prev = origin.get(name);
    if (prev !== undefined) throw new PthError(`${source}: state_dict keys '${prev}' and '${k}' both map to '${name}'`);
    origin.set(name, k);
    const stripped = k.startsWith('module.') ? k.slice('module.'.length) : k;
    if (stripped !== name) renamed.push([k, name]);
    params.set(name, toTensor(v, k, source));
  }
  const out: PthCheckpoint = { format, model: looksLike, params, renamed, dropped };
  if (meta) {
    out.step = asNumber(meta.get('step'), 'step', source);
    out.klBeta = asNumber(meta.get('kl_beta'), 'kl_beta', source);
    const opt = meta.get('model_opt');
    if (opt !== undefined && opt !== null) out.optimizer = readOptimizer(opt, rawKeys, params, source, naming);
  }
  const c = params.get('geco_C_ema');
  const b = params.get('geco_beta');
  if (c || b) {
    out.geco = {};
    if (c) out.geco.C_ema = c.data[0];
    if (b) out.geco.beta = b.data[0];
  }
  return out;
}

/** Reads a PyTorch checkpoint file (zip or legacy serialisation). */
export function readPth(file: string, opts: PthReadOptions = {}): PthCheckpoint {
  if (!fs.existsSync(file)) throw new PthError(`${file}: no such file`);
  return decodePth(fs.readFileSync(file), file, opts);
}

// ---------------------------------------------------------------------------------------------
// Export

export interface PthExportOptions {
  step?: number;
  kl_beta?: number;
  /**
   * 'checkpoint' (default): {'step', 'kl_beta', 'model': OrderedDict, 'model_opt'} as the
   * original train.py saves it (loadable by its --checkpoint and by eval.py), keys prefixed
   * with `prefix` (default 'module.', as the original's DistributedDataParallel model expects).
   * 'state_dict': the bare OrderedDict of tensors (prefix default ''); step/kl_beta not stored.
   */
  layout?: 'checkpoint' | 'state_dict';
  prefix?: string;
  /** The zip's folder name (torch.save uses the file's base name; any name loads). */
  archiveName?: string;
  /** Adam state for 'checkpoint': hyperparameters and per-parameter moments by name. */
  optimizer?: {
    lr?: number;
    betas?: [number, number];
    eps?: number;
    weight_decay?: number;
    state?: Map<string, { step: number; exp_avg: Float32Array; exp_avg_sq: Float32Array }>;
  };
}

function contiguousStride(shape: number[]): number[] {
  const s = new Array<number>(shape.length);
  let acc = 1;
  for (let d = shape.length - 1; d >= 0; d--) {
    s[d] = acc;
    acc *= shape[d];
  }
  return s;
}

/** Builds the bytes of a torch.save zip file (see PthExportOptions). */
export function encodePth(params: Map<string, PthTensor>, extras: PthExportOptions = {}): Buffer {
  const layout = extras.layout ?? 'checkpoint';
  const prefix = extras.prefix ?? (layout === 'checkpoint' ? 'module.' : '');
  const archive = extras.archiveName ?? 'archive';
  if (!/^[A-Za-z0-9_.-]+$/.test(archive)) throw new PthError(`encodePth: archive name '${archive}' is not a plain folder name`);
  const storages: Array<{ key: string; data: Float32Array }> = [];
  const rebuild = new PyGlobal('torch._utils', '_rebuild_tensor_v2');
  const floatStorage = new PyGlobal('torch', 'FloatStorage');
  const tensor = (name: string, shape: number[], data: Float32Array): PickleOut => {
    const n = shape.reduce((a, b) => a * b, 1);
    if (shape.some((d) => !Number.isInteger(d) || d < 0)) throw new PthError(`encodePth: '${name}' has a bad shape [${shape}]`);
    if (n !== data.length) throw new PthError(`encodePth: '${name}' has ${data.length} values, shape [${shape}] needs ${n}`);
    const key = String(storages.length);
    storages.push({ key, data });
    const pid: PickleOut = { persistentId: ['storage', floatStorage, key, 'cpu', n] };
    return {
      call: rebuild,
      args: [pid, 0, new PyTuple(shape), new PyTuple(contiguousStride(shape)), false, { ordered: [] }],
    };
  };
  const model: Array<[string, PickleOut]> = [];
  for (const [name, { shape, data }] of params) model.push([prefix + name, tensor(name, shape, data)]);
  let root: PickleOut;
  if (layout === 'state_dict') root = { ordered: model };
  else {
    const o = extras.optimizer ?? {};
    const names = [...params.keys()];
    const state = new PyDict();
    for (const [name, s] of o.state ?? new Map()) {
      const i = names.indexOf(name);
      if (i < 0) throw new PthError(`encodePth: optimizer state for unknown parameter '${name}'`);
      const shape = (params.get(name) as PthTensor).shape;
      const slot = new PyDict();
      slot.set('step', s.step);
      slot.set('exp_avg', tensor(`${name}.exp_avg`, shape, s.exp_avg) as never);
      slot.set('exp_avg_sq', tensor(`${name}.exp_avg_sq`, shape, s.exp_avg_sq) as never);
      state.set(i, slot);
    }
    const group = new PyDict();
    group.set('lr', { float: o.lr ?? 4e-4 } as never);
    const betas = o.betas ?? [0.9, 0.999];
    group.set('betas', new PyTuple([{ float: betas[0] } as never, { float: betas[1] } as never]));
    group.set('eps', { float: o.eps ?? 1e-8 } as never);
    group.set('weight_decay', o.weight_decay ?? 0);
    group.set('amsgrad', false);
    group.set('params', names.map((_, i) => i));
    const opt = new PyDict();
    opt.set('state', state);
    opt.set('param_groups', [group]);
    const top = new PyDict();
    top.set('step', extras.step ?? 0);
    top.set('kl_beta', extras.kl_beta === undefined ? 1 : ({ float: extras.kl_beta } as never));
    top.set('model', { ordered: model } as never);
    top.set('model_opt', opt);
    root = top;
  }
  const pkl = PickleWriter.dump(root);
  const entries = [
    { name: `${archive}/data.pkl`, data: pkl },
    { name: `${archive}/byteorder`, data: Buffer.from('little', 'ascii') },
  ];
  // torch.save writes the storages sorted by key (as strings).
  for (const s of [...storages].sort((a, b) => (a.key < b.key ? -1 : a.key > b.key ? 1 : 0))) {
    entries.push({ name: `${archive}/data/${s.key}`, data: new Uint8Array(s.data.buffer, s.data.byteOffset, s.data.byteLength) as Buffer });
  }
  entries.push({ name: `${archive}/version`, data: Buffer.from('3\n', 'ascii') });
  return encodeZip(entries);
}

/** Writes a PyTorch-loadable zip checkpoint atomically (see encodePth). */
export function writePth(file: string, params: Map<string, PthTensor>, extras: PthExportOptions = {}): void {
  writeFileAtomic(file, encodePth(params, extras));
}
