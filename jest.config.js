/** jest runs the TypeScript sources directly through ts-jest (CommonJS output).
 *  h5wasm is ESM-only and reached through a real dynamic import(), which jest supports only
 *  under `node --experimental-vm-modules` (see the `test` script). */
module.exports = {
  testEnvironment: 'node',
  roots: ['<rootDir>/test'],
  testMatch: ['**/*.test.ts'],
  transform: { '^.+\\.ts$': ['ts-jest', { tsconfig: 'tsconfig.test.json' }] },
  testTimeout: 120000,
};
