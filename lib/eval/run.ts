/**
 * `emorl-eval`: the original eval.py's evaluations on a trained EfficientMORL or Slot Attention
 * model (test.model; see eval-model.ts for what differs), batched, over a split of a processed
 * .h5 dataset.
 *
 * Like the original, EfficientMORL runs at training step geco_warm_start + 1 with β = 1 and (when
 * `test.use_geco`) the GECO form of the loss, whose gradient feeds the refinement network; the
 * GECO state (C_ema, β) is the one stored with the weights. Slot Attention has one stage and no
 * KL: its ARI_MSE_KL writes ARI.txt and MSE.txt only, as the original's does.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { SingleBar, Presets } from 'cli-progress';
import { H5ImageDataset, DatasetError } from '../data/dataset';
import { H5File } from '../io/h5';
import type { NetConfig } from '../config/net';
import { opsForBackend } from '../ops/native';
import { aModel, loadModel, ModelKindError, type LoadedModel, type ModelKind } from '../load';
import { Geco } from '../model/geco';
import type { PassOptions } from '../model/efficient-morl';
import { tf, initBackend } from '../tf';
import { imageGrid } from '../util/image-grid';
import { encodePng } from '../util/png';
import { loadTestConfigFile, SUPPORTED_EVAL_TYPES, type EvalType, type TestConfig } from './config';
import { ariMse, meanStd, type MeanStd } from './metrics';
import { writeReport } from './report';
import { activeness, disentanglementViz, makeGifs, preprocessing, DISENTANGLEMENT_IMAGES, type DisentangleContext } from './disentangle';
import { dci } from './dci';
import { evalModel, type EvalModel, type EvalStage } from './eval-model';

export interface EvalOptions {
  checkpoint: string;
  /** test config file (configs/test/<dataset>/<type>/EMORL.json or SlotAttention*.json) */
  config: string;
  data: string;
  /** default: the config's test.eval_type */
  type?: string;
  out: string;
  /** images to evaluate (default: the config's test.num_images_to_process, at most the split's size) */
  images?: number;
  /** default: the config's test.batch_size */
  batchSize?: number;
  /** write an HTML report here */
  report?: string;
  /** a training run folder whose log.jsonl gives the report's loss curves */
  run?: string;
  progress?: boolean;
  /** 'native' (the addon), 'js' (pure TypeScript) or 'auto' (default: native when built) */
  backend?: string;
  /** where the decoding stages, the encoder and the GRU cells run: 'cpu' (default) or 'cuda:N' (see nativeOpsOn) */
  device?: string;
  /** 'fp32' (default) or 'bf16': the CPU convolutions' products (see ConvPrecision) */
  precision?: string;
  log?: (m: string) => void;
}

export interface StageMetrics {
  t: number;
  fg_ari: MeanStd;
  ari_with_bg: MeanStd;
  mse: MeanStd;
}

export interface AriMseKlResults {
  type: 'ARI_MSE_KL';
  model: ModelKind;
  checkpoint: string;
  data: string;
  split: string;
  images: number;
  batch_size: number;
  /** the stage the headline values come from (the last: stochastic_layers − 1 + refinement_iters; 0 for Slot Attention) */
  final_stage: number;
  fg_ari: MeanStd;
  ari_with_bg: MeanStd;
  mse: MeanStd;
  /**
   * the top-level KL; the model gives it per batch, so its std is over batches unless batch_size
   * is 1. Absent for Slot Attention (no KL term).
   */
  kl?: MeanStd & { std_over: 'images' | 'batches' };
  stages: StageMetrics[];
  per_image: { fg_ari: number[]; ari_with_bg: number[]; mse: number[] };
}

/** What the report shows of a few images (values in [0,1], NCHW). */
export interface VizSample {
  C: number;
  H: number;
  W: number;
  K: number;
  /** [C,H,W] */
  image: Float32Array;
  /** per stage t: recons [C,H,W], masks [K,H,W], components [K,C,H,W] */
  stages: { t: number; recons: Float32Array; masks: Float32Array; components: Float32Array }[];
}

export interface EvalSummary {
  type: EvalType;
  model: ModelKind;
  out: string;
  images: number;
  results?: AriMseKlResults;
  samples: VizSample[];
  files: string[];
  report?: string;
}

export class EvalError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'EvalError';
  }
}

const REPORT_SAMPLES = 4;

function checkFile(file: string, what: string): void {
  if (!file) throw new EvalError(`${what}: no file given`);
  if (!fs.existsSync(file)) throw new EvalError(`${file}: no such ${what}`);
  if (!fs.statSync(file).isFile()) throw new EvalError(`${file}: the ${what} is not a file`);
}

/** Everything checked before any work: files, config, type, model against data. */
async function prepare(opts: EvalOptions): Promise<{ config: TestConfig; type: EvalType; model: EvalModel; ds: H5ImageDataset; n: number; batchSize: number }> {
  checkFile(opts.config, 'config file');
  checkFile(opts.checkpoint, 'checkpoint');
  checkFile(opts.data, 'data file');
  if (opts.run !== undefined && !fs.existsSync(path.join(opts.run, 'log.jsonl'))) throw new EvalError(`${opts.run}: no log.jsonl in this run folder`);
  const config = loadTestConfigFile(opts.config);
  const type = (opts.type ?? config.test.eval_type) as EvalType;
  if (!SUPPORTED_EVAL_TYPES.includes(type)) {
    throw new EvalError(`eval type ${JSON.stringify(type)} is not supported (supported: ${SUPPORTED_EVAL_TYPES.join(', ')})`);
  }
  const batchSize = opts.batchSize ?? config.test.batch_size;
  if (!Number.isInteger(batchSize) || batchSize < 1) throw new EvalError(`batch size must be an integer >= 1, got ${batchSize}`);
  if (opts.images !== undefined && (!Number.isInteger(opts.images) || opts.images < 1)) throw new EvalError(`images must be an integer >= 1, got ${opts.images}`);

  // Does the data have masks? ARI needs them; sample_viz stores them when present.
  const split = config.test.mode;
  const probe = await H5File.open(opts.data, 'r');
  let hasMasks: boolean;
  let hasFactors: boolean;
  try {
    if (!probe.isGroup(split)) throw new EvalError(`${opts.data}: no '${split}' split (test.mode); groups: ${probe.keys().join(', ')}`);
    hasMasks = probe.has(`${split}/masks`);
    hasFactors = probe.has(`${split}/factors`);
  } finally {
    probe.close();
  }
  const isDci = type === 'dci' || type === 'dci_clevr';
  if ((type === 'ARI_MSE_KL' || isDci) && !hasMasks) throw new EvalError(`${opts.data}: the '${split}' split has no masks ('${split}/masks'); ${type} needs ground-truth masks`);
  if (isDci && !hasFactors) throw new EvalError(`${opts.data}: the '${split}' split has no factors ('${split}/factors'); ${type} needs ground-truth factors`);
  let ds: H5ImageDataset;
  try {
    ds = await H5ImageDataset.open(opts.data, { split, masks: hasMasks, factors: isDci, preprocess: config.dataset.clevr_preprocess_style });
  } catch (err) {
    if (err instanceof DatasetError) throw new EvalError(err.message);
    throw err;
  }
  const wanted: ModelKind = config.test.model;
  let loaded: LoadedModel;
  try {
    loaded = loadModel(opts.checkpoint, config.Net, { seed: config.seed, model: wanted, ops: opsForBackend(opts.backend ?? 'auto', opts.device ?? 'cpu', opts.precision ?? 'fp32') });
  } catch (err) {
    ds.close();
    if (err instanceof ModelKindError) {
      throw new EvalError(
        `${opts.checkpoint} holds ${aModel(err.found)} model but ${opts.config} is a test config for ${err.expected} (test.model ${JSON.stringify(err.expected)}); ` +
          `use a ${err.found} test config (configs/test/<dataset>/<type>/${err.found === 'SlotAttention' ? 'SlotAttention*.json' : 'EMORL*.json'})`,
      );
    }
    const msg = (err as Error).message;
    const pth = !msg.startsWith(opts.checkpoint) && !/\.emorl$/i.test(opts.checkpoint);
    throw new EvalError(pth ? `${opts.checkpoint}: ${msg} (a .pth file carries no config: its weights must fit the Net section of ${opts.config})` : msg);
  }
  const model = evalModel(loaded, passOptions(loaded.config, config));
  // Slot Attention reads K, z_size, input_size and image_decoder only
  const keys: (keyof NetConfig)[] = model.kind === 'SlotAttention' ? ['K', 'z_size', 'input_size', 'image_decoder'] : (Object.keys(model.cfg) as (keyof NetConfig)[]);
  const differing = keys.filter((k) => JSON.stringify(model.cfg[k]) !== JSON.stringify(config.Net[k]));
  if (differing.length) {
    (opts.log ?? ((m: string) => process.stderr.write(`${m}\n`)))(
      `note: the checkpoint's Net config differs from ${opts.config} in ${differing.map((k) => `${k} (${JSON.stringify(model.cfg[k])} vs ${JSON.stringify(config.Net[k])})`).join(', ')}; using the checkpoint's`,
    );
  }
  const [C, H, W] = model.cfg.input_size;
  const { channels, height, width } = ds.info;
  if (C !== channels || H !== height || W !== width) {
    ds.close();
    model.dispose();
    throw new EvalError(
      `${opts.checkpoint}: the model expects ${C}×${H}×${W} images (Net.input_size [${C},${H},${W}]) but ${opts.data} ` +
        `('${split}'${config.dataset.clevr_preprocess_style ? `, ${config.dataset.clevr_preprocess_style}` : ''}) has ${channels}×${height}×${width}`,
    );
  }
  const n = Math.min(opts.images ?? config.test.num_images_to_process, ds.length);
  if (n < 1) {
    ds.close();
    model.dispose();
    throw new EvalError(`${opts.data}: the '${split}' split is empty`);
  }
  return { config, type, model, ds, n, batchSize };
}

function passOptions(cfg: NetConfig, config: TestConfig): PassOptions {
  const [C, H, W] = cfg.input_size;
  if (!config.test.use_geco) return { klBeta: 1, globalStep: cfg.geco_warm_start + 1 };
  const geco = new Geco({
    target: config.test.geco_reconstruction_target * C * H * W,
    alpha: config.test.geco_ema_alpha,
    stepSizeAcceleration: config.test.geco_step_size_acceleration,
  });
  return { klBeta: 1, globalStep: cfg.geco_warm_start + 1, geco };
}

function f32(t: tf.Tensor): Float32Array {
  return t.dataSync() as Float32Array;
}

/** The stage's arrays for image b as plain values: recons [C,H,W], masks [K,H,W], means [K,C,H,W]. */
function stageArrays(s: EvalStage, b: number, K: number, C: number, H: number, W: number) {
  const P = H * W;
  const recons = f32(s.recons).slice(b * C * P, (b + 1) * C * P);
  const logMasks = f32(s.masks).slice(b * K * P, (b + 1) * K * P);
  const masks = logMasks.map(Math.exp);
  const means = f32(s.means).slice(b * K * C * P, (b + 1) * K * C * P);
  const components = new Float32Array(K * C * P);
  for (let k = 0; k < K; k++)
    for (let c = 0; c < C; c++)
      for (let p = 0; p < P; p++) {
        const m = masks[k * P + p];
        components[(k * C + c) * P + p] = m * means[(k * C + c) * P + p] + (1 - m);
      }
  return { recons, masks, logMasks, components };
}

/** Nearest-neighbour resize of planes [N,h,w] to [N,H,W] (for attention maps of another size). */
function nearest(planes: Float32Array, n: number, h: number, w: number, H: number, W: number): Float32Array {
  if (h === H && w === W) return planes;
  const out = new Float32Array(n * H * W);
  for (let i = 0; i < n; i++)
    for (let y = 0; y < H; y++)
      for (let x = 0; x < W; x++) out[(i * H + y) * W + x] = planes[(i * h + Math.floor((y * h) / H)) * w + Math.floor((x * w) / W)];
  return out;
}

/** NCHW [B,C,H,W] → NHWC for image b. */
function toHwc(src: Float32Array, C: number, P: number): Float32Array {
  const out = new Float32Array(C * P);
  for (let c = 0; c < C; c++) for (let p = 0; p < P; p++) out[p * C + c] = src[c * P + p];
  return out;
}

function writePng(file: string, images: Float32Array, rows: number, cols: number, C: number, H: number, W: number): void {
  const g = imageGrid(images, rows, cols, C, H, W);
  fs.writeFileSync(file, encodePng(g.data, g.height, g.width, g.channels));
}

/** One row of [input | recon | K masks | K components | K attention] per stage, as 3-channel images. */
export function sampleRows(image: Float32Array, stages: { recons: Float32Array; masks: Float32Array; components: Float32Array; attn?: Float32Array }[], K: number, C: number, H: number, W: number): { data: Float32Array; rows: number; cols: number } {
  const P = H * W;
  const withAttn = stages.every((s) => s.attn);
  const cols = 2 + 2 * K + (withAttn ? K : 0);
  const data = new Float32Array(stages.length * cols * 3 * P);
  let o = 0;
  const put = (src: Float32Array, ch: number) => {
    for (let c = 0; c < 3; c++) data.set(src.subarray((ch === 1 ? 0 : c) * P, (ch === 1 ? 1 : c + 1) * P), o + c * P);
    o += 3 * P;
  };
  for (const s of stages) {
    put(image, C);
    put(s.recons, C);
    for (let k = 0; k < K; k++) put(s.masks.subarray(k * P, (k + 1) * P), 1);
    for (let k = 0; k < K; k++) put(s.components.subarray(k * C * P, (k + 1) * C * P), C);
    if (withAttn) for (let k = 0; k < K; k++) put(s.attn!.subarray(k * P, (k + 1) * P), 1);
  }
  return { data, rows: stages.length, cols };
}

export async function runEval(opts: EvalOptions): Promise<EvalSummary> {
  const log = opts.log ?? ((m: string) => process.stderr.write(`${m}\n`));
  await initBackend('cpu');
  const { config, type, model, ds, n, batchSize } = await prepare(opts);
  const files: string[] = [];
  const samples: VizSample[] = [];
  let h5: H5File | undefined;
  let bar: SingleBar | undefined;
  try {
    fs.mkdirSync(opts.out, { recursive: true });
    const [C, H, W] = model.cfg.input_size;
    const P = H * W;
    const { K } = model;
    const { numEntities: O, maskHeight: Hm, maskWidth: Wm } = ds.info;
    log(`${type}: ${n} '${config.test.mode}' images of ${opts.data}, batches of ${batchSize}, ${model.kind} checkpoint ${opts.checkpoint}`);
    bar = opts.progress && process.stderr.isTTY ? new SingleBar({ format: `${type} [{bar}] {value}/{total} images | {eta_formatted} left`, stream: process.stderr }, Presets.shades_classic) : undefined;
    bar?.start(type === 'make_gifs' ? model.cfg.K : type === 'disentanglement_preprocessing' || type === 'activeness' ? Math.min(n, DISENTANGLEMENT_IMAGES) : n, 0);

    if (type === 'disentanglement_preprocessing' || type === 'activeness' || type === 'disentanglement_viz' || type === 'make_gifs' || type === 'dci' || type === 'dci_clevr') {
      const ctx: DisentangleContext = {
        model,
        ds,
        batchSize,
        n,
        seed: config.seed,
        out: opts.out,
        slot: config.test.disentangle_slot,
        onProgress: (done) => bar?.update(done),
        log,
      };
      const run = type === 'disentanglement_preprocessing' ? preprocessing : type === 'activeness' ? activeness : type === 'make_gifs' ? makeGifs : type === 'dci' || type === 'dci_clevr' ? dci : disentanglementViz;
      files.push(...(await run(ctx)));
      bar?.stop();
      bar = undefined;
      const summary: EvalSummary = { type, model: model.kind, out: opts.out, images: n, samples, files };
      if (opts.report) {
        writeReport(opts.report, { summary, checkpoint: opts.checkpoint, data: opts.data, run: opts.run });
        summary.report = opts.report;
        files.push(opts.report);
      }
      log(`wrote ${files.length} files under ${opts.out}`);
      return summary;
    }

    const perImage = { fg_ari: [] as number[], ari_with_bg: [] as number[], mse: [] as number[] };
    const perStage = new Map<number, { fg: number[]; bg: number[]; mse: number[] }>();
    const kls: number[] = [];
    let finalStage = -1;
    const vizDir = path.join(opts.out, 'sample_viz');
    if (type === 'sample_viz') {
      fs.mkdirSync(vizDir, { recursive: true });
      const file = path.join(opts.out, 'sample_viz.h5');
      h5 = await H5File.open(file, 'w');
      files.push(file);
    }

    for (let start = 0; start < n; start += batchSize) {
      const B = Math.min(batchSize, n - start);
      const indices = Array.from({ length: B }, (_, i) => start + i);
      const batch = await ds.readBatch(indices);
      const images01 = batch.images.map((v) => (v + 1) / 2);
      const x = tf.tensor4d(batch.images, [B, C, H, W]);
      const result = model.run(x);
      try {
        const stages = result.stages;
        const last = stages[stages.length - 1];
        finalStage = last.t;
        if (type === 'ARI_MSE_KL') {
          if (result.kl !== undefined) kls.push(result.kl);
          for (const s of stages) {
            const v = ariMse({
              trueMasks: batch.masks!,
              numEntities: O,
              maskHeight: Hm,
              maskWidth: Wm,
              predMasks: f32(s.masks).map(Math.exp),
              K,
              images: images01,
              recons: f32(s.recons),
              batch: B,
              channels: C,
              height: H,
              width: W,
            });
            const acc = perStage.get(s.t) ?? { fg: [], bg: [], mse: [] };
            acc.fg.push(...v.fgAri);
            acc.bg.push(...v.ari);
            acc.mse.push(...v.mse);
            perStage.set(s.t, acc);
            if (s === last) {
              perImage.fg_ari.push(...v.fgAri);
              perImage.ari_with_bg.push(...v.ari);
              perImage.mse.push(...v.mse);
            }
          }
        }
        const needViz = type === 'sample_viz' || samples.length < REPORT_SAMPLES;
        if (needViz) {
          const T = stages.length;
          // the attention shown for each stage (EfficientMORL: the HVAE layer's for t < L, else the
          // last layer's, as the original; Slot Attention: the last iteration's)
          const hasAttn = stages.every((s) => s.attention);
          const ah = hasAttn ? stages[0].attention!.shape[3]! : H;
          const aw = hasAttn ? stages[0].attention!.shape[4]! : W;
          for (let b = 0; b < B; b++) {
            const image = images01.slice(b * C * P, (b + 1) * C * P);
            const st = stages.map((s) => ({ t: s.t, ...stageArrays(s, b, K, C, H, W) }));
            const attnOf = (i: number): Float32Array | undefined => {
              if (!hasAttn) return undefined;
              return f32(stages[i].attention!).slice(b * K * ah * aw, (b + 1) * K * ah * aw);
            };
            if (samples.length < REPORT_SAMPLES) samples.push({ C, H, W, K, image, stages: st.map(({ t, recons, masks, components }) => ({ t, recons, masks, components })) });
            if (type === 'sample_viz' && h5) {
              const idx = start + b;
              if (idx === 0) {
                h5.createRowDataset('image', [H, W, C], 'float32');
                h5.createRowDataset('recons', [T, H, W, C], 'float32');
                h5.createRowDataset('pred_mask', [T, K, H, W, 1], 'float32');
                h5.createRowDataset('pred_mask_logits', [T, K, H, W, 1], 'float32');
                h5.createRowDataset('components', [T, K, H, W, C], 'float32');
                if (hasAttn) h5.createRowDataset('attention', [T, K, ah, aw, 1], 'float32');
                if (batch.masks) h5.createRowDataset('true_mask', [O, 1, Hm, Wm], 'uint8');
                h5.setAttr('', 'stages', st.map((s) => s.t));
                h5.setAttr('', 'layout', 'image [N,H,W,C] in [0,1]; recons [N,T,H,W,C]; pred_mask / pred_mask_logits (log-probabilities) / attention [N,T,K,H,W,1]; components [N,T,K,H,W,C] = m*mean + (1-m); true_mask [N,O,1,Hm,Wm]');
              }
              h5.appendRows('image', toHwc(image, C, P));
              const rec = new Float32Array(T * C * P);
              const pm = new Float32Array(T * K * P);
              const pl = new Float32Array(T * K * P);
              const comp = new Float32Array(T * K * C * P);
              const at = new Float32Array(T * K * ah * aw);
              st.forEach((s, i) => {
                rec.set(toHwc(s.recons, C, P), i * C * P);
                pm.set(s.masks, i * K * P);
                pl.set(s.logMasks, i * K * P);
                for (let k = 0; k < K; k++) comp.set(toHwc(s.components.subarray(k * C * P, (k + 1) * C * P), C, P), (i * K + k) * C * P);
                const a = attnOf(i);
                if (a) at.set(a, i * K * ah * aw);
              });
              h5.appendRows('recons', rec);
              h5.appendRows('pred_mask', pm);
              h5.appendRows('pred_mask_logits', pl);
              h5.appendRows('components', comp);
              if (hasAttn) h5.appendRows('attention', at);
              if (batch.masks) h5.appendRows('true_mask', batch.masks.subarray(b * O * Hm * Wm, (b + 1) * O * Hm * Wm));
              const grid = sampleRows(
                image,
                st.map((s, i) => ({ ...s, attn: attnOf(i) && nearest(attnOf(i)!, K, ah, aw, H, W) })),
                K,
                C,
                H,
                W,
              );
              const png = path.join(vizDir, `image_${String(idx).padStart(4, '0')}.png`);
              writePng(png, grid.data, grid.rows, grid.cols, 3, H, W);
              files.push(png);
            }
          }
        }
      } finally {
        result.dispose();
        x.dispose();
      }
      bar?.update(start + B);
    }
    bar?.stop();
    bar = undefined;

    let results: AriMseKlResults | undefined;
    if (type === 'ARI_MSE_KL') {
      results = {
        type,
        model: model.kind,
        checkpoint: opts.checkpoint,
        data: opts.data,
        split: config.test.mode,
        images: n,
        batch_size: batchSize,
        final_stage: finalStage,
        fg_ari: meanStd(perImage.fg_ari),
        ari_with_bg: meanStd(perImage.ari_with_bg),
        mse: meanStd(perImage.mse),
        // with unequal batches the mean over batches is weighted by their sizes
        kl: model.hasKl ? { ...meanStd(kls), mean: weightedKlMean(kls, n, batchSize), n: n, std_over: batchSize === 1 ? 'images' : 'batches' } : undefined,
        stages: [...perStage.entries()].sort((a, b) => a[0] - b[0]).map(([t, v]) => ({ t, fg_ari: meanStd(v.fg), ari_with_bg: meanStd(v.bg), mse: meanStd(v.mse) })),
        per_image: perImage,
      };
      // the original's files (appended to, as eval.py does): "mean,std" lines
      // (the original writes KL.txt for EfficientMORL only)
      const ariTxt = path.join(opts.out, 'ARI.txt');
      const mseTxt = path.join(opts.out, 'MSE.txt');
      fs.appendFileSync(ariTxt, `${results.fg_ari.mean.toFixed(3)},${results.fg_ari.std.toFixed(3)}\n`);
      fs.appendFileSync(mseTxt, `${results.mse.mean},${results.mse.std}\n`);
      files.push(ariTxt, mseTxt);
      if (results.kl) {
        const klTxt = path.join(opts.out, 'KL.txt');
        fs.appendFileSync(klTxt, `${results.kl.mean},${results.kl.std}\n`);
        files.push(klTxt);
      }
      const json = path.join(opts.out, 'results.json');
      fs.writeFileSync(json, JSON.stringify(results, null, 2));
      files.push(json);
      log(
        `FG-ARI ${results.fg_ari.mean.toFixed(4)} ± ${results.fg_ari.std.toFixed(4)}, ARI (with background) ${results.ari_with_bg.mean.toFixed(4)}, ` +
          `MSE ${results.mse.mean.toExponential(4)} ± ${results.mse.std.toExponential(4)}` +
          (results.kl ? `, KL ${results.kl.mean.toFixed(2)}` : '') +
          ` (${model.kind === 'SlotAttention' ? 'Slot Attention' : `stage ${finalStage}`})`,
      );
    }
    if (h5) {
      h5.close();
      h5 = undefined;
    }
    const summary: EvalSummary = { type, model: model.kind, out: opts.out, images: n, results, samples, files };
    if (opts.report) {
      writeReport(opts.report, { summary, checkpoint: opts.checkpoint, data: opts.data, run: opts.run });
      summary.report = opts.report;
      files.push(opts.report);
    }
    log(`wrote ${files.length} files under ${opts.out}${opts.report ? ` and the report ${opts.report}` : ''}`);
    return summary;
  } finally {
    bar?.stop();
    h5?.close();
    ds.close();
    model.dispose();
  }
}

/** The mean KL over images from per-batch means (all batches full but perhaps the last). */
function weightedKlMean(kls: number[], n: number, batchSize: number): number {
  let s = 0;
  kls.forEach((kl, i) => (s += kl * Math.min(batchSize, n - i * batchSize)));
  return s / n;
}
