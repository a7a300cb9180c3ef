/**
 * The one place that loads TensorFlow.js. Everything else imports `tf` from here.
 *
 * tfjs-core registers no gradient functions by itself, and its per-op gradient modules are ESM
 * files with extensionless imports that plain Node cannot load. The `@tensorflow/tfjs` bundle
 * (pinned to the same version, so npm keeps a single copy of tfjs-core) registers all of them
 * against that one tfjs-core when it is loaded; we load it for that side effect only.
 */
import * as tf from '@tensorflow/tfjs-core';
import '@tensorflow/tfjs-backend-cpu';
import '@tensorflow/tfjs';
import { installFastCpuKernels } from './cpu-kernels';

export { tf };

export type BackendName = 'cpu';

/**
 * Selects the backend explicitly (other packages may register higher-priority ones) and waits
 * for it. Idempotent.
 */
export async function initBackend(name: BackendName = 'cpu'): Promise<void> {
  if (tf.getBackend() !== name) {
    const ok = await tf.setBackend(name);
    if (!ok) throw new Error(`tfjs backend '${name}' could not be initialised`);
  }
  await tf.ready();
  // The cpu backend prints a "use tfjs-node" banner on first use; tfjs-node cannot be installed
  // here (it downloads libtensorflow) and our native addon plays that role, so mute it.
  const backend = tf.backend() as unknown as { firstUse?: boolean };
  if ('firstUse' in backend) backend.firstUse = false;
  installFastCpuKernels();
}
