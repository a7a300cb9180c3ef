#!/usr/bin/env -S node --initial-old-space-size=128
/** `emorl-eval`: evaluate a trained EfficientMORL or Slot Attention model as the original eval.py does. */
import { Command, Option } from 'commander';
import { integerOption } from '../lib/cli/args';
import { evalCommand } from '../lib/cli/eval';
import { SUPPORTED_EVAL_TYPES } from '../lib/eval/config';


const program = new Command('emorl-eval')
  .description('Evaluate a trained EfficientMORL or Slot Attention model on a processed .h5 dataset (the original eval.py\'s evaluations).')
  .requiredOption('--checkpoint <file>', 'an emorl checkpoint (.emorl) or the original\'s PyTorch checkpoint (.pth, needs the config\'s Net section)')
  .requiredOption('--config <file>', 'test config in the original JSON format, e.g. configs/test/tetrominoes/ARI_MSE_KL/EMORL.json')
  .requiredOption('--data <file>', 'processed .h5 dataset (the config\'s test.mode split is used)')
  .addOption(new Option('--type <type>', 'what to evaluate (default: the config\'s test.eval_type)').choices([...SUPPORTED_EVAL_TYPES]))
  .requiredOption('--out <dir>', 'output folder')
  .option('--images <n>', 'images to evaluate (default: the config\'s test.num_images_to_process)', integerOption('--images', 1))
  .option('--batch-size <n>', 'images per forward pass (default: the config\'s test.batch_size)', integerOption('--batch-size', 1))
  .option('--report <file.html>', 'also write a self-contained HTML report')
  .option('--run <dir>', 'a training run folder: the report plots the loss curves of its log.jsonl')
  .option('--no-progress', 'no progress bar')
  .option('--device <name>', 'where the GPU-capable ops run (the decoding stages, the encoder and the GRU cells, forward and backward): cpu, or cuda:N with an addon built with EMORL_CUDA=1')
  .addOption(new Option('--precision <p>', "the CPU convolutions' products: fp32, or bf16 (bfloat16 operands, fp32 sums; faster on CPUs with AVX512_BF16)").choices(['fp32', 'bf16']))
  .addOption(new Option('--backend <name>', 'compute backend: native (the C++ addon), js (pure TypeScript) or auto (native when built)').choices(['native', 'js', 'auto']).default('auto'))
  .addHelpText(
    'after',
    `
Types:
  ARI_MSE_KL  foreground ARI, ARI with background, MSE and KL of the final stage (mean, std; per
              stage in results.json): ARI.txt, MSE.txt, KL.txt, results.json (Slot Attention:
              no KL, so no KL.txt; use the SlotAttention*.json test configs)
  sample_viz  every stage's reconstruction, masks, mask log-probabilities, per-slot components
              and attention: sample_viz.h5 and sample_viz/image_NNNN.png
  disentanglement_preprocessing
              per latent dimension, min and max of final-posterior samples over the
              slots of (at most) 100 images: z_range.txt
  activeness  per image (at most 100) and a random slot, the mean pixel variance of the
              decoded image as each dimension sweeps z_range: activeness.h5, activeness.csv
  disentanglement_viz
              test.disentangle_slot's dimensions swept over 8 values each:
              disentanglement.h5 and disentanglement/slot_S_image_NNNN.png
  make_gifs   preprocessing and activeness, then per slot one looping GIF per most
              active dimension (top 10) of the last image: gifs/slot_S_row_R.gif, gifs.json
  dci, dci_clevr
              slots matched to objects by IoU, then disentanglement, completeness and
              informativeness from gradient-boosted trees per factor: dci.txt, dci.json
  (activeness and disentanglement_viz run disentanglement_preprocessing first when
  --out has no z_range.txt)

Examples:
  npx emorl-eval --checkpoint runs/try/checkpoints/checkpoint-00001000.emorl \\
      --config configs/test/tetrominoes/ARI_MSE_KL/EMORL.json --data data/tetrominoes.h5 \\
      --out results/tetrominoes --batch-size 16 --report results/tetrominoes/report.html --run runs/try
  npx emorl-eval --checkpoint model.pth --config configs/test/tetrominoes/sample_viz/EMORL.json \\
      --data tetrominoes_test.h5 --out results/viz`,
  )
  .action(async (opts) => {
    await evalCommand(opts);
  });

program.parseAsync(process.argv).catch((err: Error) => {
  process.stderr.write(`emorl-eval: ${err.message}\n`);
  process.exit(1);
});
