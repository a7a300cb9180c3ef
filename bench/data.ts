/**
 * Data-layer benchmark: generating the paper's Tetrominoes split, reading random batches of 32
 * (in this thread, and through the prefetching iterator), and ARI on a batch. Prints times,
 * throughputs and the peak RSS.
 *
 *   node dist/bench/data.js [--train N] [--batches N] [--keep FILE]
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { generateDataset } from '../lib/data/generators';
import { H5ImageDataset } from '../lib/data/dataset';
import { BatchIterator, epochIndices } from '../lib/data/iterator';
import { adjustedRandIndices } from '../lib/metrics';
import { Rng } from '../lib/util/rng';

function arg(name: string, def: number): number {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? Number(process.argv[i + 1]) : def;
}

const peakRssMiB = (): number => process.resourceUsage().maxRSS / 1024;
const seconds = (t0: bigint): number => Number(process.hrtime.bigint() - t0) / 1e9;

async function main(): Promise<void> {
  const train = arg('train', 60000);
  const batches = arg('batches', 200);
  const B = 32;
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'emorl-bench-'));
  const file = path.join(dir, 'tetrominoes.h5');
  try {
    let t0 = process.hrtime.bigint();
    await generateDataset('tetrominoes', { out: file, train, test: 320, seed: 1 });
    const gen = seconds(t0);
    console.log(`generate tetrominoes ${train}+320: ${gen.toFixed(2)} s (${((train + 320) / gen).toFixed(0)} images/s), file ${(fs.statSync(file).size / 2 ** 20).toFixed(1)} MiB`);

    const ds = await H5ImageDataset.open(file, { masks: true });
    const order = epochIndices(ds.length, 0, { seed: 7 });
    t0 = process.hrtime.bigint();
    for (let b = 0; b < batches; b++) await ds.readBatch(order.subarray(b * B, (b + 1) * B));
    const direct = seconds(t0);
    console.log(`read ${batches} shuffled batches of ${B} (images+masks), this thread: ${((batches * B) / direct).toFixed(0)} images/s`);
    ds.close();

    const it = await BatchIterator.open(file, { masks: true }, { batchSize: B, seed: 7, prefetch: 4 });
    await it.next();
    t0 = process.hrtime.bigint();
    for (let b = 1; b < batches; b++) await it.next();
    const threaded = seconds(t0);
    console.log(`read ${batches - 1} batches through the prefetching iterator: ${(((batches - 1) * B) / threaded).toFixed(0)} images/s`);
    await it.close();

    // ARI for a CLEVR-sized batch: 32 images of 128×128, 7 slots, 7 entities.
    const rng = new Rng(1);
    const H = 128, K = 7, O = 7;
    const truth = new Uint8Array(B * O * H * H);
    for (let b = 0; b < B; b++) for (let p = 0; p < H * H; p++) truth[(b * O + rng.int(O)) * H * H + p] = 255;
    const pred = new Float32Array(B * K * H * H).map(() => rng.uniform());
    t0 = process.hrtime.bigint();
    const reps = 10;
    for (let r = 0; r < reps; r++) adjustedRandIndices({ data: truth, shape: [B, O, H, H] }, { data: pred, shape: [B, K, H, H] });
    console.log(`ARI (fg + with bg) for ${B}×${H}×${H}, K=${K}: ${((seconds(t0) / reps) * 1000).toFixed(1)} ms per batch`);
    console.log(`peak RSS ${peakRssMiB().toFixed(0)} MiB`);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
