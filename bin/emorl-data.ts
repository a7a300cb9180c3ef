#!/usr/bin/env node
/** `emorl-data`: generate synthetic datasets in the original processed .h5 layout, and inspect files. */
import { Command } from 'commander';
import { integerOption } from '../lib/cli/args';
import { describeDataFile, generateCommand } from '../lib/cli/data';


const program = new Command('emorl-data').description('datasets for emorl in the original EfficientMORL .h5 layout');

program
  .command('generate')
  .argument('<name>', 'generator: tetrominoes or multi_dsprites')
  .requiredOption('--out <file>', 'output .h5 file')
  .option('--train <n>', 'training examples (default: the paper split)', integerOption('--train', 0))
  .option('--test <n>', 'test examples (default: the paper split)', integerOption('--test', 0))
  .option('--seed <n>', 'random seed', integerOption('--seed', 0), 1)
  .option('--no-progress', 'no progress bar')
  .description('generate a dataset with no download')
  .action(async (name: string, opts: { out: string; train?: number; test?: number; seed: number; progress: boolean }) => {
    await generateCommand(name, opts);
  });

program
  .command('info')
  .argument('<file>', 'a processed .h5 dataset')
  .description('print the splits, shapes and attributes of a dataset file')
  .action(async (file: string) => {
    process.stdout.write(await describeDataFile(file));
  });

program.parseAsync(process.argv).catch((err: Error) => {
  process.stderr.write(`emorl-data: ${err.message}\n`);
  process.exit(1);
});
