#!/usr/bin/env -S node --initial-old-space-size=128
/** `emorl-train`: train EfficientMORL from a config in the original JSON format. */
import { Command, Option } from 'commander';
import { integerOption } from '../lib/cli/args';
import { trainCommand, cacheDir, DEFAULT_CONFIG } from '../lib/cli/train';


const program = new Command('emorl-train')
  .description('Train EfficientMORL. With no options: generate the Tetrominoes dataset once (cached) and train the paper\'s Tetrominoes config.')
  .option('--config <file>', `config in the original JSON format (default: ${DEFAULT_CONFIG})`)
  .option('--data <file>', 'processed .h5 dataset (default: the config\'s dataset.data_path/h5_path, or a generated one for Tetrominoes / Multi-dSprites)')
  .option('--out <dir>', 'run folder for checkpoints, logs and TensorBoard events (default: runs/<name>-<time>)')
  .option('--steps <n>', 'total training steps (default: the config\'s training.iters + 1)', integerOption('--steps', 0))
  .option('--batch-size <n>', 'same as --set training.batch_size=N', integerOption('--batch-size', 1))
  .option('--seed <n>', 'same as --set seed=N', integerOption('--seed', 0))
  .option('--set <key=value>', 'override a config value, e.g. training.lr=1e-4 or Net.K=5 (repeatable)', (v: string, acc: string[]) => [...acc, v], [] as string[])
  .option('--resume [checkpoint]', 'continue a run: the newest checkpoint in --out, or the given file')
  .option('--init-from <file.pth>', "start from the weights of the original PyTorch code's checkpoint (.pth, zip or legacy format)")
  .option('--prefetch <n>', 'batches read ahead in a reader thread', integerOption('--prefetch', 0))
  .option('--ranks <n>', 'data parallel on CPU: N worker processes, each with batch_size/N images of every batch (gradients summed through this process)', integerOption('--ranks', 1))
  .option('--gpus <n>', 'data parallel on N GPUs: one worker per GPU, gradients summed with NCCL (addon built with EMORL_CUDA=1, libnccl.so.2)', integerOption('--gpus', 1))
  .option('--checksum-every <n>', 'data parallel: compare the ranks\' parameter checksums every N steps (0: at start and end only; default 100)', integerOption('--checksum-every', 0))
  .option('--no-progress', 'no progress bar')
  .option('--device <name>', 'where the GPU-capable ops run (the decoding stages, the encoder and the GRU cells, forward and backward): cpu, or cuda:N with an addon built with EMORL_CUDA=1')
  .addOption(new Option('--precision <p>', "the CPU convolutions' products: fp32, or bf16 (bfloat16 operands, fp32 sums: about 1.6x faster training steps on CPUs with AVX512_BF16)").choices(['fp32', 'bf16']))
  .addOption(new Option('--backend <name>', 'compute backend: native (the C++ addon), js (pure TypeScript) or auto (native when built)').choices(['native', 'js', 'auto']).default('auto'))
  .addHelpText(
    'after',
    `
Examples:
  npx emorl-train                                   # Tetrominoes, generated data, paper config
  npx emorl-train --steps 1000 --out runs/try       # a short run
  npx emorl-train --config configs/train/multi_dsprites/EMORL.json --set training.batch_size=16
  npx emorl-train --config configs/train/clevr6-96x96/EMORL.json --data clevr6_with_masks_train.h5
  npx emorl-train --out runs/try --resume           # continue from the newest checkpoint
  npx emorl-train --init-from emorl-tetrominoes-seed-1200-state-200000.pth --steps 1000
  npx emorl-train --ranks 4 --out runs/dp                  # 4 CPU worker processes, 8 images each of 32

Generated datasets are cached in ${cacheDir()} (set EMORL_CACHE_DIR to move it).
SIGINT / SIGTERM finish the current step, write a checkpoint and exit (codes 130 / 143).
With --ranks/--gpus, training.batch_size is the global batch (it must divide by N); rank 0
writes the checkpoints and logs; a rank that dies stops the job (resume with --resume).
Several nodes: EMORL_WORLD_SIZE (all ranks), EMORL_RANK (this node's first rank),
EMORL_MASTER_ADDR / EMORL_MASTER_PORT (rank 0's node) on every node; see the README.`,
  )
  .action(async (opts) => {
    const summary = await trainCommand({ ...opts, set: opts.set ?? [] });
    if (summary.stoppedBy === 'signal') process.exitCode = 130;
  });

program.parseAsync(process.argv).catch((err: Error) => {
  process.stderr.write(`emorl-train: ${err.message}\n`);
  process.exit(1);
});
