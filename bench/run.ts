/**
 * `npm run bench`: runs each benchmark in its own process (so each peak RSS is its own) and
 * prints their reports. Extra arguments pass through: `npm run bench -- data --train 10000`.
 * `--json` (and the single-measurement options --config --batch --mode --backend --steps) go to
 * the step benchmark alone, whose output is then only JSON lines.
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';

const suites = ['data', 'native', 'step'];
// A suite name counts only in a position of its own, not as an option's value (`--backend native`).
const argv = process.argv.slice(2);
const flags = new Set(['--json', '--no-tfjs', '--tfjs-filter']);
const isSuite = (a: string, i: number) => suites.includes(a) && !(i > 0 && argv[i - 1].startsWith('--') && !flags.has(argv[i - 1]));
const wanted = argv.filter(isSuite);
const passThrough = argv.filter((a, i) => !isSuite(a, i));
const stepOnly = ['--json', '--config', '--batch', '--mode', '--backend', '--steps'].some((o) => passThrough.includes(o));
let failed = false;
for (const name of wanted.length ? wanted : stepOnly ? ['step'] : suites) {
  const script = path.join(__dirname, `${name}.js`);
  if (!fs.existsSync(script)) continue;
  if (!stepOnly) console.log(`\n== bench ${name} ==`);
  const r = spawnSync(process.execPath, [script, ...passThrough], { stdio: 'inherit' });
  if (r.status !== 0) failed = true;
}
process.exit(failed ? 1 : 0);
