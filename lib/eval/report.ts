/**
 * A self-contained HTML report of an evaluation: metrics, loss curves of a training run's
 * log.jsonl (inline SVG), and image grids embedded as data: URIs. A small inline script sets
 * `data-images-loaded` on <body> once every <img> has decoded (naturalWidth > 0).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { imageGrid } from '../util/image-grid';
import { encodePng } from '../util/png';
import type { EvalSummary, VizSample } from './run';

export interface ReportInput {
  summary: EvalSummary;
  checkpoint: string;
  data: string;
  /** a training run folder with log.jsonl */
  run?: string;
}

function esc(s: string): string {
  return s.replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' })[c]!);
}

function pngUri(images: Float32Array, rows: number, cols: number, H: number, W: number): string {
  const g = imageGrid(images, rows, cols, 3, H, W);
  return `data:image/png;base64,${encodePng(g.data, g.height, g.width, 3).toString('base64')}`;
}

/** A [C,H,W] (C = 1 or 3) image as 3 channels. */
function rgb(src: Float32Array, C: number, P: number): Float32Array {
  if (C === 3) return src;
  const out = new Float32Array(3 * P);
  for (let c = 0; c < 3; c++) out.set(src.subarray(0, P), c * P);
  return out;
}

function img(uri: string, alt: string, scale: number): string {
  return `<img src="${uri}" alt="${esc(alt)}" style="image-rendering: pixelated; width: ${scale}px">`;
}

/** Rows: samples; columns: input, final reconstruction, K masks, K components. */
function overviewGrid(samples: VizSample[]): { uri: string; width: number } {
  const { C, H, W, K } = samples[0];
  const P = H * W;
  const cols = 2 + 2 * K;
  const data = new Float32Array(samples.length * cols * 3 * P);
  let o = 0;
  const put = (a: Float32Array) => {
    data.set(a, o);
    o += 3 * P;
  };
  for (const s of samples) {
    const last = s.stages[s.stages.length - 1];
    put(rgb(s.image, C, P));
    put(rgb(last.recons, C, P));
    for (let k = 0; k < K; k++) put(rgb(last.masks.subarray(k * P, (k + 1) * P), 1, P));
    for (let k = 0; k < K; k++) put(rgb(last.components.subarray(k * C * P, (k + 1) * C * P), C, P));
  }
  return { uri: pngUri(data, samples.length, cols, H, W), width: cols * (W + 1) + 1 };
}

/** Rows: the stages of one sample; columns: reconstruction, K masks, K components. */
function stageGrid(s: VizSample): { uri: string; width: number } {
  const { C, H, W, K } = s;
  const P = H * W;
  const cols = 1 + 2 * K;
  const data = new Float32Array(s.stages.length * cols * 3 * P);
  let o = 0;
  const put = (a: Float32Array) => {
    data.set(a, o);
    o += 3 * P;
  };
  for (const st of s.stages) {
    put(rgb(st.recons, C, P));
    for (let k = 0; k < K; k++) put(rgb(st.masks.subarray(k * P, (k + 1) * P), 1, P));
    for (let k = 0; k < K; k++) put(rgb(st.components.subarray(k * C * P, (k + 1) * C * P), C, P));
  }
  return { uri: pngUri(data, s.stages.length, cols, H, W), width: cols * (W + 1) + 1 };
}

/** A line chart of y against x as inline SVG. */
export function svgChart(title: string, xs: number[], ys: number[], width = 420, height = 200): string {
  const pts = xs.map((x, i) => [x, ys[i]]).filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y));
  if (pts.length === 0) return '';
  const pad = { l: 60, r: 10, t: 24, b: 28 };
  const x0 = Math.min(...pts.map((p) => p[0]));
  const x1 = Math.max(...pts.map((p) => p[0]));
  const y0 = Math.min(...pts.map((p) => p[1]));
  const y1 = Math.max(...pts.map((p) => p[1]));
  const sx = (x: number) => pad.l + ((x - x0) / (x1 - x0 || 1)) * (width - pad.l - pad.r);
  const sy = (y: number) => height - pad.b - ((y - y0) / (y1 - y0 || 1)) * (height - pad.t - pad.b);
  const line = pts.map(([x, y]) => `${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join(' ');
  const fmt = (v: number) => (Math.abs(v) >= 1e4 || (Math.abs(v) < 1e-2 && v !== 0) ? v.toExponential(2) : v.toFixed(2));
  return (
    `<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}">` +
    `<text x="${width / 2}" y="16" text-anchor="middle" font-size="13">${esc(title)}</text>` +
    `<rect x="${pad.l}" y="${pad.t}" width="${width - pad.l - pad.r}" height="${height - pad.t - pad.b}" fill="none" stroke="#ccc"/>` +
    `<text x="${pad.l - 4}" y="${pad.t + 10}" text-anchor="end" font-size="10">${fmt(y1)}</text>` +
    `<text x="${pad.l - 4}" y="${height - pad.b}" text-anchor="end" font-size="10">${fmt(y0)}</text>` +
    `<text x="${pad.l}" y="${height - 8}" font-size="10">step ${x0}</text>` +
    `<text x="${width - pad.r}" y="${height - 8}" text-anchor="end" font-size="10">${x1}</text>` +
    (pts.length === 1
      ? `<circle cx="${sx(pts[0][0])}" cy="${sy(pts[0][1])}" r="3" fill="#1f77b4"/>`
      : `<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" points="${line}"/>`) +
    `</svg>`
  );
}

/** Loss curves from a run's log.jsonl. */
function curves(run: string): string {
  const file = path.join(run, 'log.jsonl');
  const rows = fs
    .readFileSync(file, 'utf8')
    .split('\n')
    .filter((l) => l.trim())
    .map((l) => {
      try {
        return JSON.parse(l) as Record<string, unknown>;
      } catch {
        return undefined;
      }
    })
    .filter((r): r is Record<string, unknown> => r !== undefined && typeof r.step === 'number');
  const charts = [
    ['total_loss', 'total loss'],
    ['nll', 'NLL (last stage)'],
    ['kl', 'KL (last stage)'],
    ['heldout_fg_ari', 'held-out FG-ARI'],
  ]
    .map(([key, title]) => {
      const rs = rows.filter((r) => typeof r[key] === 'number');
      return svgChart(title, rs.map((r) => r.step as number), rs.map((r) => r[key] as number));
    })
    .filter(Boolean);
  return `<h2>Training curves</h2><p>${esc(file)} (${rows.length} entries)</p><div class="charts">${charts.join('\n')}</div>`;
}

function fmtMs(m: { mean: number; std: number }, digits = 4): string {
  const f = (v: number) => (Math.abs(v) < 1e-2 && v !== 0 ? v.toExponential(3) : v.toFixed(digits));
  return `${f(m.mean)} ± ${f(m.std)}`;
}

export function renderReport(input: ReportInput): string {
  const { summary } = input;
  const parts: string[] = [];
  const modelName = summary.model === 'SlotAttention' ? 'Slot Attention' : 'EfficientMORL';
  parts.push(`<h1>${modelName} evaluation: ${esc(summary.type)}</h1>`);
  parts.push(
    `<table class="info"><tr><th>checkpoint</th><td>${esc(input.checkpoint)}</td></tr><tr><th>data</th><td>${esc(input.data)}</td></tr>` +
      `<tr><th>images</th><td>${summary.images}</td></tr><tr><th>generated</th><td>${new Date().toISOString()}</td></tr></table>`,
  );
  const r = summary.results;
  if (r) {
    parts.push('<h2>Metrics</h2>');
    parts.push(
      `<table id="metrics" class="metrics"><tr><th>metric</th><th>mean ± std</th></tr>` +
        `<tr><td>FG-ARI</td><td data-metric="fg_ari">${fmtMs(r.fg_ari)}</td></tr>` +
        `<tr><td>ARI (with background)</td><td data-metric="ari_with_bg">${fmtMs(r.ari_with_bg)}</td></tr>` +
        `<tr><td>MSE</td><td data-metric="mse">${fmtMs(r.mse)}</td></tr>` +
        // the KL only for a model with one (Slot Attention has none)
        (r.kl ? `<tr><td>KL</td><td data-metric="kl">${fmtMs(r.kl, 2)} <small>(std over ${r.kl.std_over})</small></td></tr>` : '') +
        '</table>',
    );
    if (r.stages.length > 1) {
      parts.push(
        `<h3>Per stage</h3><table class="metrics"><tr><th>stage t</th><th>FG-ARI</th><th>ARI (with bg)</th><th>MSE</th></tr>` +
          r.stages.map((s) => `<tr><td>${s.t}</td><td>${fmtMs(s.fg_ari)}</td><td>${fmtMs(s.ari_with_bg)}</td><td>${fmtMs(s.mse)}</td></tr>`).join('') +
          '</table>',
      );
    }
  }
  if (input.run) parts.push(curves(input.run));
  if (summary.samples.length) {
    const ov = overviewGrid(summary.samples);
    const K = summary.samples[0].K;
    const scale = (w: number) => Math.min(1200, Math.max(w, w * Math.floor(1000 / w)));
    parts.push(`<h2>Decompositions</h2><p>Per row: input, reconstruction, ${K} masks, ${K} per-slot components (final stage).</p>`);
    parts.push(img(ov.uri, 'inputs, reconstructions, masks and components', scale(ov.width)));
    if (summary.samples[0].stages.length > 1) {
      parts.push(`<h2>Per-stage refinement</h2><p>Per row: one inference stage t (HVAE layers, then refinement steps): reconstruction, ${K} masks, ${K} components.</p>`);
      summary.samples.forEach((s, i) => {
        const g = stageGrid(s);
        parts.push(`<h3>Image ${i}</h3>` + img(g.uri, `stages of image ${i}`, scale(g.width)));
      });
    }
  }
  const script =
    `<script>(function(){function check(){var imgs=Array.prototype.slice.call(document.images);` +
    `var ok=imgs.every(function(i){return i.complete&&i.naturalWidth>0;});` +
    `document.body.setAttribute('data-images-loaded',ok?'true':'false');document.body.setAttribute('data-image-count',String(imgs.length));}` +
    `if(document.readyState==='complete')check();else window.addEventListener('load',check);})();</script>`;
  return (
    `<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>${modelName} evaluation</title>` +
    `<style>body{font-family:sans-serif;margin:2em;max-width:1300px}table{border-collapse:collapse;margin:0.5em 0}` +
    `td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}.charts{display:flex;flex-wrap:wrap;gap:8px}img{display:block;margin:0.5em 0}</style>` +
    `</head><body data-images-loaded="pending">\n${parts.join('\n')}\n${script}\n</body></html>\n`
  );
}

export function writeReport(file: string, input: ReportInput): void {
  fs.mkdirSync(path.dirname(path.resolve(file)), { recursive: true });
  fs.writeFileSync(file, renderReport(input));
}
