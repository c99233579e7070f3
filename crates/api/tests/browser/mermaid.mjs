// Renders every ```mermaid block of the given Markdown files with mermaid (the library the forges use) in Debian's
// chromium, headless, so that a diagram with a syntax error fails before a reader sees "Unable to render".
//
//   node mermaid.mjs SCREENSHOT_DIR FILE.md...
//
// Prints one line per diagram (`ok FILE#N` or `FAILED FILE#N: why`), saves each rendered diagram as
// SCREENSHOT_DIR/mermaid-<file>-<n>.png, and exits 1 if any failed or none was found. CHROMIUM names the browser
// (default /usr/bin/chromium).
import { readFileSync } from 'node:fs';
import { basename, dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const [screenshots, ...files] = process.argv.slice(2);
const library = join(dirname(fileURLToPath(import.meta.url)), 'node_modules/mermaid/dist/mermaid.min.js');
const diagrams = files.flatMap((file) =>
  [...readFileSync(file, 'utf8').matchAll(/^```mermaid\n([\s\S]*?)^```$/gm)].map((found, index) => ({
    name: `${file}#${index + 1}`,
    shot: `mermaid-${basename(file, '.md')}-${index + 1}.png`,
    text: found[1],
  })));

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
let failed = 0;
try {
  const page = await browser.newPage({ viewport: { width: 1200, height: 800 } });
  await page.setContent('<!doctype html><html><body style="margin:0;background:#fff"><div id="out"></div></body></html>');
  await page.addScriptTag({ path: library });
  await page.evaluate(() => window.mermaid.initialize({ startOnLoad: false, securityLevel: 'strict' }));
  for (const [index, diagram] of diagrams.entries()) {
    const outcome = await page.evaluate(async ({ text, id }) => {
      try {
        const { svg } = await window.mermaid.render(id, text);
        document.getElementById('out').innerHTML = svg;
        return { ok: true };
      } catch (err) {
        return { ok: false, why: String(err && err.message ? err.message : err) };
      }
    }, { text: diagram.text, id: `diagram${index}` });
    if (outcome.ok) {
      await page.locator('#out svg').screenshot({ path: `${screenshots}/${diagram.shot}` });
      console.log(`ok ${diagram.name}`);
    } else {
      failed += 1;
      console.log(`FAILED ${diagram.name}: ${outcome.why}`);
    }
  }
} finally {
  await browser.close();
}
if (diagrams.length === 0) {
  console.log('no mermaid diagram found');
  process.exit(1);
}
process.exit(failed ? 1 : 0);
