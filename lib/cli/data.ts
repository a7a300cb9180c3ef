/** What the `emorl-data` command does, kept out of bin/ so that it can be tested and reused. */
import { SingleBar, Presets } from 'cli-progress';
import { defaultSplits, generateDataset } from '../data/generators';
import { withH5File } from '../io/h5';

export interface GenerateCliOptions {
  out: string;
  train?: number;
  test?: number;
  seed: number;
  progress: boolean;
}

export async function generateCommand(name: string, opts: GenerateCliOptions): Promise<void> {
  const splits = defaultSplits(name); // validates the name before any work
  const train = opts.train ?? splits.train;
  const test = opts.test ?? splits.test;
  const bar = opts.progress && process.stderr.isTTY ? new SingleBar({ format: `${name} [{bar}] {value}/{total} images | {eta_formatted} left`, stream: process.stderr }, Presets.shades_classic) : undefined;
  const t0 = Date.now();
  bar?.start(train + test, 0);
  try {
    await generateDataset(name, { out: opts.out, train, test, seed: opts.seed, onProgress: (done) => bar?.update(done) });
  } finally {
    bar?.stop();
  }
  process.stderr.write(`wrote ${opts.out}: ${train} train + ${test} test ${name} images (seed ${opts.seed}) in ${((Date.now() - t0) / 1000).toFixed(1)} s\n`);
}

/** A human-readable listing of a dataset file's groups, datasets and root attributes. */
export async function describeDataFile(file: string): Promise<string> {
  return withH5File(file, 'r', (f) => {
    const lines = [file];
    for (const group of f.keys()) {
      if (!f.isGroup(group)) continue;
      lines.push(`  ${group}/`);
      for (const key of f.keys(group)) {
        const full = `${group}/${key}`;
        if (f.isGroup(full)) continue;
        const { shape, dtype } = f.info(full);
        lines.push(`    ${key.padEnd(8)} [${shape.join(', ')}] ${dtype}`);
      }
    }
    for (const name of f.attrNames('')) lines.push(`  @${name}: ${String(f.attr('', name)).slice(0, 300)}`);
    return lines.join('\n') + '\n';
  });
}
