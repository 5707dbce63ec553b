// A volunteer who opens the root's page is sent to a relay: press Join on the
// root's /volunteer page (one CPU core), the tab must land on the relay's
// /volunteer page, join there at once, and train (the relay's status shows a
// browser worker with two syncs). Prints one line per step; exits non-zero on
// failure.
//
// node relay-handoff.mjs --root http://127.0.0.1:P --relay http://127.0.0.1:Q --out DIR
import { chromium } from 'playwright-core';

const args = Object.fromEntries(process.argv.slice(2).reduce((acc, a, i, all) => {
  if (a.startsWith('--')) acc.push([a.slice(2), all[i + 1]]);
  return acc;
}, []));
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--disable-quic'],
});
const errors = [];
try {
  const page = await browser.newPage();
  page.on('console', (m) => { if (m.type() === 'error') errors.push(m.text()); });
  await page.goto(`${args.root}/volunteer`);
  await page.locator('#worker-count').fill('1');
  await page.selectOption('#backend-choice', 'cpu');
  await page.click('#join');
  await page.waitForURL(`${args.relay}/volunteer`, { timeout: 30000 });
  console.log(`[handoff] the root sent the tab to ${page.url()}`);
  const t0 = Date.now();
  for (;;) {
    const s = await (await fetch(`${args.relay}/api/status`)).json();
    const b = s.workers.find((w) => w.kind === 'browser');
    if (b && b.syncs >= 2) {
      console.log(`[handoff] browser worker #${b.id} trains at the relay: ${b.syncs} syncs, ${b.device}`);
      break;
    }
    if (Date.now() - t0 > 120000) throw new Error('no browser worker with two syncs at the relay');
    await new Promise((r) => setTimeout(r, 500));
  }
  if (args.out) await page.screenshot({ path: `${args.out}/relay-volunteer.png` });
  if (errors.length) throw new Error(`console errors: ${errors.join(' | ')}`);
} catch (err) {
  console.log(`[handoff] FAILED: ${err.message}`);
  process.exitCode = 1;
} finally {
  await browser.close();
}
