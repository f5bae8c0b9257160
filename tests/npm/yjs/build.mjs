// Bundle entry.js (yjs + y-webrtc) for the browser: node build.mjs
import * as esbuild from 'esbuild'

await esbuild.build({
  entryPoints: ['entry.js'],
  bundle: true,
  format: 'iife',
  outfile: 'bundle.js',
  logLevel: 'warning'
})
