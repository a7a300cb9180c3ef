/**
 * The Node (V8) flags that training and evaluation processes start with.
 *
 * A training step allocates tens of MB of typed arrays (tensors, the addon's outputs) against a
 * JavaScript heap of ~20 MB, and V8 counts array buffers toward the old generation's limit: with
 * its default initial limit nearly every step ended in a Mark-Compact. A larger initial old space
 * spaces them out. Measured on the Tetrominoes config at batch 32 (CPU path, 2 cores, 10 steps):
 * 10 Mark-Compacts became 4, and the host's time per step went from 45.6 ms to 36.6 ms (three
 * runs each, alternated) for ~20 MiB more peak RSS; 256 MB was no better than 128.
 *
 * bin/emorl-train.ts and bin/emorl-eval.ts carry them in their `#!` line (a test checks that it
 * matches), so `npx emorl-train` and the `--gpus` / `--ranks` workers (forked with the parent's
 * flags) get them; `node dist/bin/emorl-train.js` and Node programs using the library pass them
 * to node themselves.
 */
export const TRAINING_NODE_FLAGS: readonly string[] = ['--initial-old-space-size=128'];

/** The `#!` line of a training entry point: node with TRAINING_NODE_FLAGS. */
export const TRAINING_SHEBANG = `#!/usr/bin/env -S node ${TRAINING_NODE_FLAGS.join(' ')}`;

/** Whether this process (its `execArgv`) was started with every one of TRAINING_NODE_FLAGS. */
export function hasTrainingNodeFlags(execArgv: readonly string[] = process.execArgv): boolean {
  return TRAINING_NODE_FLAGS.every((f) => execArgv.includes(f));
}
