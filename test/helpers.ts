import * as path from 'node:path';

/** The shared golden fixtures (read-only), overridable with EMORL_GOLDEN_DIR. */
export const FIXTURES_DIR = process.env.EMORL_GOLDEN_DIR ?? path.resolve(__dirname, '..', '..', 'shared', 'fixtures');

export function fixturePath(...parts: string[]): string {
  return path.join(FIXTURES_DIR, ...parts);
}
