/** Runs the README's library example against the built package (dist/), as a user would. */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

const root = path.join(__dirname, '..');
const entry = path.join(root, 'dist', 'lib', 'index.js');
const built = fs.existsSync(entry);

function readmeExample(): string {
  const readme = fs.readFileSync(path.join(root, 'README.md'), 'utf8');
  const marker = readme.indexOf('<!-- example:library');
  if (marker < 0) throw new Error('README.md has no <!-- example:library --> block');
  const start = readme.indexOf('```js\n', marker);
  const end = readme.indexOf('\n```', start + 6);
  return readme.slice(start + 6, end);
}

(built ? test : test.skip)('the README library example runs and prints its results', () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'emorl-readme-'));
  try {
    const code = readmeExample().replace("require('emorl')", `require(${JSON.stringify(entry)})`);
    fs.writeFileSync(path.join(dir, 'example.js'), code);
    const r = spawnSync(process.execPath, ['example.js'], { cwd: dir, encoding: 'utf8', timeout: 540000 });
    expect(r.stderr).not.toMatch(/Error/);
    expect(r.status).toBe(0);
    expect(r.stdout).toMatch(/step 0: loss -?\d/);
    expect(r.stdout).toMatch(/step 1: loss -?\d/);
    expect(r.stdout).toMatch(/masks \[2,4,1,35,35\], reconstructions \[2,3,35,35\], nll -?\d/);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}, 600000);

if (!built) test.skip('README example needs `npm run build` (dist/lib/index.js is missing)', () => undefined);
