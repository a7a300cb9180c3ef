/**
 * `npm run bench`: runs each benchmark in its own process (so each peak RSS is its own) and
 * prints their reports. Extra arguments pass through: `npm run bench -- data --train 10000`.
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';

const suites = ['data', 'model', 'native', 'model-native'];
const wanted = process.argv.slice(2).filter((a) => suites.includes(a));
const passThrough = process.argv.slice(2).filter((a) => !suites.includes(a));
let failed = false;
for (const name of wanted.length ? wanted : suites) {
  const script = path.join(__dirname, `${name}.js`);
  if (!fs.existsSync(script)) continue;
  console.log(`\n== bench ${name} ==`);
  const r = spawnSync(process.execPath, [script, ...passThrough], { stdio: 'inherit' });
  if (r.status !== 0) failed = true;
}
process.exit(failed ? 1 : 0);
