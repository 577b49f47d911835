// Builds the package (dist/: ESM, the SDK and React left to the app) and the
// browser test page used by tests/integration/test_client_kit.py (dist-test/).
import { build } from 'esbuild';
import { execFileSync } from 'node:child_process';
import { rmSync } from 'node:fs';

rmSync('dist', { recursive: true, force: true });
await build({
  entryPoints: ['src/index.ts', 'src/react.ts'],
  outdir: 'dist',
  bundle: true,
  splitting: true,
  format: 'esm',
  target: 'es2020',
  platform: 'neutral',
  external: ['centrifuge', 'react'],
  logLevel: 'warning',
});
execFileSync(process.execPath, ['node_modules/typescript/bin/tsc', '-p', 'tsconfig.json'], { stdio: 'inherit' });
await build({
  entryPoints: ['test/page/app.ts'],
  outfile: 'dist-test/page.js',
  bundle: true,
  format: 'iife',
  target: 'es2020',
  platform: 'browser',
  define: { 'process.env.NODE_ENV': '"production"' },
  logLevel: 'warning',
});
