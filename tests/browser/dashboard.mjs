// Opens a real tether server's dashboard in Debian's Chromium, presses Join, and
// checks that the tab becomes a training browser worker: ≥ N syncs, the center
// moves, the charts have data, the page logs no errors. Optionally changes τ from
// the operator controls and waits for a native worker to train with it. Writes a
// JSON report and screenshots; exits non-zero with the reason on any failure.
//
// node dashboard.mjs --base http://127.0.0.1:PORT --backend webgpu|cpu --out DIR
//   [--min-syncs 5] [--timeout 240] [--admin-token T --tau N --batch B]
//   [--spki BASE64 --label NAME] [--choice auto|webgpu|cpu] [--adapter yes]
//   [--expect-why TEXT] [--expect-device TEXT] [--workers N] [--wasm simd128]
//
// --backend is what the worker must end up on; --choice is what the Join panel's
// backend menu is set to (default: webgpu for the WebGPU runs, else auto);
// --adapter yes offers Chromium's software WebGPU adapter even in a CPU run (auto
// must then refuse it, saying why: --expect-why checks the panel's reason).
// --workers N sets the panel's CPU cores: N Web Workers must join as one group,
// each train to --min-syncs, show under one line in the workers table, and all
// leave on one press of Leave. --wasm simd128 asks the page for the plain SIMD128
// build of the worker (else it loads the relaxed-SIMD one where Chromium has it).
//
// Over https://, --spki trusts the server's key in Chromium (its
// --ignore-certificate-errors-spki-list), and the page must be a secure context;
// Node's own status requests trust the certificate through NODE_EXTRA_CA_CERTS.
import { chromium } from 'playwright-core';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';

const args = Object.fromEntries(process.argv.slice(2).reduce((acc, a, i, all) => {
  if (a.startsWith('--')) acc.push([a.slice(2), all[i + 1]]);
  return acc;
}, []));
const base = args.base;
const backend = args.backend || 'cpu';
const label = args.label || backend;
const out = args.out || '.';
const minSyncs = Number(args['min-syncs'] || 5);
const choice = args.choice || (backend === 'webgpu' ? 'webgpu' : 'auto');
const timeoutMs = Number(args.timeout || 240) * 1000;
const workers = Number(args.workers || 1);
mkdirSync(out, { recursive: true });

const report = { backend, label, errors: [], steps: [] };
const log = (msg) => { report.steps.push(msg); console.log(`[${label}] ${msg}`); };
const status = async () => (await fetch(`${base}/api/status`)).json();
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
async function until(what, fn, limit = timeoutMs) {
  const t0 = Date.now();
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() - t0 > limit) throw new Error(`timed out after ${limit / 1000} s waiting for ${what}`);
    await sleep(250);
  }
}

// Chromium exposes WebGPU headless only with this flag (a SwiftShader adapter).
const flags = ['--no-first-run', '--disable-background-networking', '--disable-component-update',
  '--disable-sync', '--disable-quic'];
if (backend === 'webgpu' || args.adapter === 'yes') flags.push('--enable-unsafe-webgpu');
if (args.spki) flags.push(`--ignore-certificate-errors-spki-list=${args.spki}`);
const browser = await chromium.launch({ executablePath: process.env.CHROMIUM || '/usr/bin/chromium', args: flags });
let exitCode = 0;
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  page.on('console', (m) => { if (m.type() === 'error') report.errors.push(`console: ${m.text()}`); });
  page.on('pageerror', (e) => report.errors.push(`page error: ${e.message}`));
  page.on('requestfailed', (r) => {
    // The feed socket closing when the page goes away is not an error.
    if (!r.url().includes('/api/events')) report.errors.push(`request failed: ${r.url()} ${r.failure()?.errorText}`);
  });
  page.on('worker', (w) => log(`web worker started: ${w.url()}`));

  const before = await status();
  const t0 = Date.now();
  // --shard-memory MiB: each tab worker's budget; a larger shard is read in blocks.
  // --wasm simd128: the plain SIMD128 build even where the browser has relaxed SIMD.
  const query = new URLSearchParams();
  if (args['shard-memory']) query.set('shard-memory', args['shard-memory']);
  if (args.wasm) query.set('wasm', args.wasm);
  const page_url = query.size ? `${base}/?${query}` : base;
  await page.goto(page_url, { waitUntil: 'load' });
  await page.waitForFunction(() => window.tetherDashboard && Object.keys(window.tetherDashboard.chartPoints()).length === 6);
  report.first_chart_ms = Date.now() - t0;
  log(`dashboard up, charts drawn after ${report.first_chart_ms} ms`);
  report.protocol = await page.evaluate(() => location.protocol);
  report.secure_context = await page.evaluate(() => window.isSecureContext);
  log(`loaded over ${report.protocol}, secure context: ${report.secure_context}`);
  if (base.startsWith('https:') && !(report.protocol === 'https:' && report.secure_context)) {
    throw new Error('the page over https:// is not a secure context');
  }

  await page.selectOption('#backend-choice', choice);
  await page.fill('#worker-count', String(workers));
  await page.click('#join');
  log(`pressed Join (backend menu: ${choice}, ${workers} CPU core(s))`);
  const joined = await until(`${workers} browser worker(s) with ${minSyncs} syncs each`, async () => {
    const s = await status();
    const browsers = s.workers.filter((w) => w.kind === 'browser');
    if (report.errors.length) throw new Error(`page errors: ${report.errors.join(' | ')}`);
    const err = await page.evaluate(() => window.tetherVolunteer && window.tetherVolunteer.error);
    if (err) throw new Error(`browser worker stopped: ${err}`);
    const done = browsers.length === workers && browsers.every((w) => w.syncs >= minSyncs);
    return done ? { s, w: browsers[0], browsers } : null;
  });
  report.browser_worker = joined.w;
  report.browser_workers = joined.browsers;
  const group = await page.evaluate(() => window.tetherVolunteer.group);
  if (!group || joined.browsers.some((w) => w.group !== group)) {
    throw new Error(`the tab's workers should share the group ${group}: ${JSON.stringify(joined.browsers.map((w) => w.group))}`);
  }
  const shards = new Set(joined.browsers.map((w) => w.shard));
  if (shards.size !== workers) throw new Error(`each worker needs its own shard: ${[...shards]}`);
  log(`${workers} worker(s) in ${group}, shards ${[...shards].join(', ')}`);
  if (workers > 1) {
    const line = page.locator(`#workers tbody tr.group[data-group="${group}"]`);
    await line.waitFor({ timeout: 10000 });
    const text = await line.textContent();
    if (!text.includes(`${workers} workers`)) throw new Error(`the workers table's group line reads: ${text}`);
    log(`the workers table groups them: ${text.trim()}`);
  }
  report.center_version_before = before.center_version;
  report.center_version_after = joined.s.center_version;
  log(`browser worker #${joined.w.id} (${joined.w.backend}: ${joined.w.device}) has ${joined.w.syncs} syncs at ${joined.w.samples_per_s.toFixed(1)} samples/s`);
  if (joined.w.backend !== backend) throw new Error(`expected the ${backend} backend, the worker reports ${joined.w.backend}`);
  report.why = await page.evaluate(() => window.tetherVolunteer.why);
  log(`the panel says: ${report.why}`);
  if (args['expect-device'] && !String(joined.w.device).includes(args['expect-device'])) {
    throw new Error(`the worker's device should mention "${args['expect-device']}": ${joined.w.device}`);
  }
  if (args['expect-why'] && !String(report.why).includes(args['expect-why'])) {
    throw new Error(`the panel's reason should mention "${args['expect-why']}": ${report.why}`);
  }
  if (!(joined.s.center_version > before.center_version)) throw new Error('the center version did not advance');
  const shown = await page.locator('#workers tbody tr[data-kind="browser"] td:nth-child(3)').first().textContent();
  if (shown.trim() !== backend) throw new Error(`the workers table shows backend ${shown}`);
  // Speed side by side with the native workers of the same run (same model, batch).
  const natives = joined.s.workers.filter((w) => w.kind === 'native' && w.syncs > 0);
  report.native_samples_per_s = natives.map((w) => w.samples_per_s);
  if (natives.length) {
    const native = natives.reduce((a, w) => a + w.samples_per_s, 0) / natives.length;
    const browser = joined.browsers.reduce((a, w) => a + w.samples_per_s, 0) / workers;
    report.browser_vs_native = browser / native;
    log(`browser ${browser.toFixed(1)} (per worker) vs native ${native.toFixed(1)} samples/s: ratio ${report.browser_vs_native.toFixed(3)}`);
  }

  // Charts must hold data (at least two ticks and, where evaluated, an accuracy point).
  await page.waitForFunction(() => {
    const p = window.tetherDashboard.chartPoints();
    return p['chart-speed'] > 2 && p['chart-distance'] > 2 && p['chart-bytes'] > 2 && p['chart-syncs'] > 2;
  }, null, { timeout: 30000 });
  report.chart_points = await page.evaluate(() => window.tetherDashboard.chartPoints());
  log(`chart points: ${JSON.stringify(report.chart_points)}`);

  if (args['admin-token']) {
    const tau = Number(args.tau);
    await page.fill('#admin-token', args['admin-token']);
    await page.fill('#set-tau', String(tau));
    await page.click('#apply-hyper');
    await page.waitForFunction(() => document.querySelector('#admin-result').textContent.startsWith('changed'), null, { timeout: 10000 });
    log(`changed τ to ${tau} from the controls`);
    const want = tau * Number(args.batch);
    const native = await until(`a native worker syncing with τ ${tau}`, async () => {
      const s = await status();
      return s.workers.find((w) => w.kind === 'native' && w.last_samples === want);
    }, 120000);
    report.tau_change = { tau, native_worker: native.id, last_samples: native.last_samples };
    log(`native worker #${native.id} now syncs every ${native.last_samples} samples`);
    if ((await status()).hyper.tau !== tau) throw new Error('the run card τ did not change');
  }

  if (args['shard-memory']) {
    // The shard did not fit: it was read from the Cache API a block at a time.
    const reads = await page.evaluate(() => window.tetherVolunteer.blocksRead);
    const message = await page.locator('#v-message').textContent();
    report.blocks_read = reads;
    log(`blocks read: ${reads}; the panel says: ${message}`);
    if (!(reads >= 2)) throw new Error(`expected the shard read in several blocks, read ${reads}`);
  }

  if (args['expect-classes']) {
    // The classes card names the data's classes and, once scored, their accuracy.
    const want = args['expect-classes'].split(',');
    const names = await until(`the classes card to name ${want.join(', ')} with scores`, async () => {
      const rows = await page.locator('#classes li').evaluateAll((lis) => lis.map((li) => [
        li.querySelector('.name')?.textContent, li.querySelector('.pct')?.textContent]));
      const scored = rows.length === want.length && rows.every(([, pct]) => pct && pct.endsWith('%'));
      return scored ? rows : null;
    }, 60000);
    if (JSON.stringify(names.map(([n]) => n)) !== JSON.stringify(want)) {
      throw new Error(`the classes card reads ${JSON.stringify(names)}`);
    }
    report.classes_shown = names;
    log(`the classes card: ${names.map(([n, p]) => `${n} ${p}`).join(' · ')}`);
  }

  await page.screenshot({ path: join(out, `dashboard-${label}.png`), fullPage: true });
  await page.setViewportSize({ width: 390, height: 844 });
  await sleep(500);
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  report.phone_overflow_px = overflow;
  await page.screenshot({ path: join(out, `dashboard-${label}-phone.png`), fullPage: false });
  if (overflow > 1) throw new Error(`the page is ${overflow}px wider than a phone screen`);

  // Leave: the worker syncs once more, says goodbye, and the server drops it.
  await page.click('#leave');
  await until('every browser worker to leave', async () => !(await status()).workers.some((w) => w.kind === 'browser'), 60000);
  log('left cleanly');
  if (report.errors.length) throw new Error(`page errors: ${report.errors.join(' | ')}`);
  report.ok = true;
} catch (err) {
  report.ok = false;
  report.failure = String(err && err.message || err);
  console.error(`[${label}] FAILED: ${report.failure}`);
  exitCode = 1;
} finally {
  writeFileSync(join(out, `report-${label}.json`), JSON.stringify(report, null, 2));
  await browser.close();
}
process.exit(exitCode);
