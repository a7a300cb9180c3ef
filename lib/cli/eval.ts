/** What `emorl-eval` does, kept out of bin/ so that it can be tested and reused. */
import { runEval, type EvalSummary } from '../eval/run';

export interface EvalCliOptions {
  checkpoint: string;
  config: string;
  data: string;
  type?: string;
  out: string;
  images?: number;
  batchSize?: number;
  report?: string;
  run?: string;
  progress: boolean;
  backend?: string;
  /** 'cpu' (default) or 'cuda:N': where the decoding stages, the encoder and the GRU cells run */
  device?: string;
  /** 'fp32' (default) or 'bf16': the CPU convolutions' products */
  precision?: string;
}

export async function evalCommand(opts: EvalCliOptions, log: (m: string) => void = (m) => process.stderr.write(`${m}\n`)): Promise<EvalSummary> {
  return runEval({ ...opts, progress: opts.progress && Boolean(process.stderr.isTTY), log });
}
