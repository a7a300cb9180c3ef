#!/usr/bin/env node
/** `emorl-export`: write a checkpoint's weights as a PyTorch .pth the original code loads. */
import { Command, Option } from 'commander';
import { exportCommand } from '../lib/cli/export';

const program = new Command('emorl-export')
  .description("Export an emorl training checkpoint's weights for the original PyTorch code")
  .requiredOption('--checkpoint <file>', 'an emorl checkpoint (.emorl)')
  .requiredOption('--out <file>', 'the file to write')
  .addOption(new Option('--to <format>', 'output format').choices(['pth']).default('pth'))
  .addOption(
    new Option('--layout <layout>', "'checkpoint': {step, kl_beta, model, model_opt} as train.py saves it (loads in eval.py); 'state_dict': the bare weights")
      .choices(['checkpoint', 'state_dict'])
      .default('checkpoint'),
  )
  .action((opts) => {
    process.stderr.write(`${exportCommand(opts)}\n`);
  });

try {
  program.parse(process.argv);
} catch (err) {
  process.stderr.write(`emorl-export: ${(err as Error).message}\n`);
  process.exit(1);
}
