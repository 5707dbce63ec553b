// tether dashboard: a live view of the run, pushed by the server over /api/events
// (one message a second; nothing is polled), drawn with the vendored uPlot.
import { mountVolunteer } from '/web/volunteer.js';

const $ = (id) => document.getElementById(id);
const MAX_TICKS = 3600;
const COLORS = ['#2563eb', '#dc2626', '#16a34a', '#9333ea', '#ea580c', '#0891b2', '#be185d', '#4d7c0f', '#7c3aed', '#b45309'];

const state = { ticks: [], evals: [], changes: [], resumes: [], status: null, connected: false, volunteerMounted: false };
const charts = {};

// ---------- formatting ----------
const fmt = (v, d = 0) => (v === null || v === undefined || Number.isNaN(v) ? '–' : Number(v).toFixed(d));
function human(n) {
  if (n === null || n === undefined) return '–';
  const units = ['', 'k', 'M', 'G', 'T'];
  let i = 0;
  while (Math.abs(n) >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return `${n.toFixed(i ? 1 : 0)}${units[i]}`;
}
function duration(s) {
  s = Math.floor(s);
  const h = Math.floor(s / 3600), m = Math.floor(s / 60) % 60, sec = s % 60;
  return h ? `${h}h ${m}m` : m ? `${m}m ${sec}s` : `${sec}s`;
}
const esc = (s) => String(s).replace(/[&<>"]/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;' }[c]));

// ---------- charts ----------
/// Dashed vertical lines where the operator changed τ, α or η, solid ones where the
/// run was resumed from a checkpoint.
const changeMarkers = () => ({
  hooks: {
    draw: [(u) => {
      if (u.scales.x.time !== false || u.series[0].label !== 'time') return;
      const { ctx, bbox } = u;
      const line = (time, label, dy) => {
        const x = u.valToPos(time, 'x', true);
        if (x < bbox.left || x > bbox.left + bbox.width) return;
        ctx.beginPath();
        ctx.moveTo(x, bbox.top);
        ctx.lineTo(x, bbox.top + bbox.height);
        ctx.stroke();
        ctx.fillText(label, x + 4 * devicePixelRatio, bbox.top + dy * devicePixelRatio);
      };
      ctx.save();
      ctx.lineWidth = devicePixelRatio;
      ctx.font = `${11 * devicePixelRatio}px system-ui, sans-serif`;
      ctx.strokeStyle = ctx.fillStyle = '#b45309';
      ctx.setLineDash([5, 4]);
      for (const c of state.changes) line(c.time_s, `τ${c.after.tau} α${c.after.alpha} η${c.after.lr}`, 12);
      ctx.strokeStyle = ctx.fillStyle = '#6d28d9';
      ctx.setLineDash([]);
      for (const r of state.resumes) line(r.time_s, `resumed v${r.version}`, 26);
      ctx.restore();
    }],
  },
});

function size(el) {
  const width = Math.max(240, el.clientWidth || 300);
  return { width, height: Math.round(Math.min(260, Math.max(180, width * 0.5))) };
}

function makeChart(id, series, axes, data, xLabel = 'time') {
  const el = $(id);
  if (charts[id]) charts[id].destroy();
  el.textContent = '';
  const opts = {
    ...size(el),
    scales: { x: { time: false } },
    series: [{ label: xLabel, value: (u, v) => (v === null ? '–' : xLabel === 'time' ? `${fmt(v)} s` : human(v)) }, ...series],
    axes: [{ label: xLabel === 'time' ? 'run time (s)' : 'training samples', values: (u, vals) => vals.map(human) }, ...axes],
    legend: { live: true },
    cursor: { drag: { x: true, y: false } },
    plugins: [changeMarkers()],
  };
  charts[id] = new uPlot(opts, data, el);
  charts[id].workerIds = series.workerIds;
  return charts[id];
}

function accuracyData() {
  return [state.evals.map((e) => e.time_s), state.evals.map((e) => e.accuracy * 100), state.evals.map((e) => e.loss)];
}
function samplesData() {
  return [state.evals.map((e) => e.samples), state.evals.map((e) => e.accuracy * 100)];
}
/// Per-second rates from consecutive ticks' totals.
function rates(field) {
  const out = [];
  for (let i = 0; i < state.ticks.length; i++) {
    const a = state.ticks[i - 1], b = state.ticks[i];
    out.push(a ? Math.max(0, (b[field] - a[field]) / Math.max(1e-3, b.time_s - a.time_s)) : null);
  }
  return out;
}
function workerIds() {
  const ids = new Set();
  for (const t of state.ticks) for (const [id] of t.workers) ids.add(id);
  return [...ids].sort((a, b) => a - b);
}
/// A relay's device cell: the workers below it, and its own page (its dashboard
/// shows its subtree).
function relayCell(w) {
  const page = w.url ? ` · <a href="${esc(w.url)}/" rel="noopener">${esc(w.url)}</a>` : '';
  return `<td class="device" title="${esc(w.device)}">${w.members} worker${w.members === 1 ? '' : 's'} below${page}</td>`;
}

/// The workers table: a tab's workers (one group) together under one line with their
/// sum, the others one row each, in id order.
function workerRows(workers) {
  const row = (w, grouped) => `
    <tr data-kind="${esc(w.kind)}" data-backend="${esc(w.backend)}"${grouped ? ' class="member"' : ''}>
      <td>#${w.id}</td>
      <td><span class="tag ${w.kind === 'browser' || w.kind === 'relay' ? w.kind : ''}">${esc(w.kind)}</span></td>
      <td>${esc(w.backend)}</td>
      ${w.kind === 'relay' ? relayCell(w) : `<td class="device" title="${esc(w.device)}">${esc(w.device)}</td>`}
      <td>${w.syncs}</td>
      <td>${fmt(w.samples_per_s)}</td>
      <td>${fmt(w.distance, 3)}</td>
      <td>${w.staleness}</td>
      <td>${fmt(w.last_seen_s, 1)} s ago</td>
    </tr>`;
  const groups = new Map();
  for (const w of workers) {
    if (w.group) groups.set(w.group, [...(groups.get(w.group) || []), w]);
  }
  const shown = new Set();
  return workers.map((w) => {
    if (!w.group) return row(w, false);
    if (shown.has(w.group)) return '';
    shown.add(w.group);
    const members = groups.get(w.group);
    const speed = members.reduce((a, m) => a + m.samples_per_s, 0);
    const syncs = members.reduce((a, m) => a + m.syncs, 0);
    return `
    <tr class="group" data-group="${esc(w.group)}"><td colspan="9">${esc(w.group)} · ${members.length} worker${members.length === 1 ? '' : 's'} · ${fmt(speed)} samples/s · ${syncs} syncs</td></tr>` +
      members.map((m) => row(m, true)).join('');
  }).join('');
}

function perWorker(ids, index) {
  const cols = ids.map(() => []);
  for (const t of state.ticks) {
    const row = new Map(t.workers.map((w) => [w[0], w[index]]));
    ids.forEach((id, k) => cols[k].push(row.has(id) ? row.get(id) : null));
  }
  return [state.ticks.map((t) => t.time_s), ...cols];
}

function buildCharts() {
  const pct = { label: '%', scale: '%', values: (u, v) => v.map((x) => fmt(x, 0)) };
  makeChart('chart-accuracy',
    [{ label: 'accuracy %', stroke: COLORS[0], width: 2, scale: '%', value: (u, v) => fmt(v, 2) },
      { label: 'loss', stroke: COLORS[1], width: 2, scale: 'loss', value: (u, v) => fmt(v, 4) }],
    [pct, { label: 'loss', scale: 'loss', side: 1, grid: { show: false } }], accuracyData());
  makeChart('chart-samples',
    [{ label: 'accuracy %', stroke: COLORS[0], width: 2, scale: '%', value: (u, v) => fmt(v, 2) }],
    [pct], samplesData(), 'samples');
  buildWorkerCharts();
  makeChart('chart-bytes',
    [{ label: 'in B/s', stroke: COLORS[2], width: 2, value: (u, v) => human(v) },
      { label: 'out B/s', stroke: COLORS[3], width: 2, value: (u, v) => human(v) }],
    [{ values: (u, v) => v.map(human) }], [state.ticks.map((t) => t.time_s), rates('bytes_in'), rates('bytes_out')]);
  makeChart('chart-syncs',
    [{ label: 'syncs/s', stroke: COLORS[0], width: 2, value: (u, v) => fmt(v, 2) },
      { label: 'rejects/s', stroke: COLORS[1], width: 2, value: (u, v) => fmt(v, 2) }],
    [{}], [state.ticks.map((t) => t.time_s), rates('syncs'), rates('rejects')]);
}

function buildWorkerCharts() {
  const ids = workerIds();
  const series = (unit, digits) => Object.assign(ids.map((id, k) => ({
    label: `#${id}`, stroke: COLORS[k % COLORS.length], width: 2, spanGaps: false, value: (u, v) => fmt(v, digits),
  })), { workerIds: ids.join(',') });
  makeChart('chart-speed', series('samples/s', 0), [{ values: (u, v) => v.map(human) }], perWorker(ids, 1));
  makeChart('chart-distance', series('‖xⁱ − x̃‖', 3), [{}], perWorker(ids, 2));
}

function refreshCharts() {
  const ids = workerIds().join(',');
  if (charts['chart-speed'].workerIds !== ids) buildWorkerCharts();
  else {
    const list = workerIds();
    charts['chart-speed'].setData(perWorker(list, 1));
    charts['chart-distance'].setData(perWorker(list, 2));
  }
  charts['chart-accuracy'].setData(accuracyData());
  charts['chart-samples'].setData(samplesData());
  charts['chart-bytes'].setData([state.ticks.map((t) => t.time_s), rates('bytes_in'), rates('bytes_out')]);
  charts['chart-syncs'].setData([state.ticks.map((t) => t.time_s), rates('syncs'), rates('rejects')]);
}

window.addEventListener('resize', () => {
  for (const id in charts) charts[id].setSize(size($(id)));
});

// ---------- status ----------
function renderStatus(s) {
  state.status = s;
  state.changes = s.changes || [];
  state.resumes = s.resumes || [];
  $('run-id').textContent = s.upstream ? `run ${s.run_id} · relay of ${s.upstream}` : `run ${s.run_id}`;
  const pill = $('run-state');
  const label = s.stopping ? 'stopping' : s.paused ? 'paused' : 'running';
  pill.textContent = label;
  pill.className = `pill ${s.stopping ? 'stopped' : label}`;
  const set = (id, text) => { $(id).textContent = text; };
  set('f-algorithm', s.settings.algorithm);
  set('f-model', s.network ? `${s.network.name} (${s.network.params.toLocaleString('en')} parameters)` : '–');
  set('f-tau', s.hyper.tau);
  set('f-alpha', fmt(s.hyper.alpha, 4));
  set('f-beta', fmt(s.effective_beta, 3));
  set('f-lr', s.hyper.lr);
  set('f-version', s.center_version);
  set('f-accuracy', s.evaluation ? `${fmt(s.evaluation.accuracy * 100, 2)} %` : 'not yet');
  set('f-samples', human(s.samples));
  const below = s.subtree_workers ?? s.workers.length;
  set('f-workers', below === s.workers.length ? s.workers.length : `${s.workers.length} (${below} in the tree)`);
  set('f-uptime', duration(s.uptime_s));
  const body = $('workers').tBodies[0];
  body.innerHTML = s.workers.length ? workerRows(s.workers) : '<tr><td colspan="9" class="muted">no workers yet</td></tr>';
  const rejects = (s.recent_rejects || []).slice().reverse();
  $('rejects').innerHTML = rejects.length ? rejects.map((r) => `
    <li><span class="muted">${fmt(r.time_s)} s</span> ${r.worker === null ? 'handshake' : `#${r.worker}`}
      <code>${esc(r.code)}</code> ${esc(r.reason)}</li>`).join('') : '<li class="muted">none</li>';
  $('admin-off').hidden = s.admin;
  $('admin').hidden = !s.admin;
  for (const [id, v] of [['set-tau', s.hyper.tau], ['set-alpha', s.hyper.alpha], ['set-lr', s.hyper.lr]]) {
    const input = $(id);
    if (document.activeElement !== input && !input.dataset.touched) input.value = v;
  }
  refreshClasses(s);
  if (!state.volunteerMounted) {
    state.volunteerMounted = true;
    mountVolunteer($('volunteer-panel'), { needsToken: s.needs_token });
  }
}

// ---------- classes ----------
// Names come from the data (folders, classes.txt); accuracy per class from the
// latest evaluation. Few classes are listed in label order, many by weakest first.
const CLASSES_SHOWN = 24;
async function refreshClasses(s) {
  const version = s.evaluation ? s.evaluation.version : -1;
  if (state.classesVersion === version) return;
  state.classesVersion = version;
  const many = s.network && s.network.classes > CLASSES_SHOWN;
  const query = many ? `order=worst&limit=${CLASSES_SHOWN}` : `limit=${CLASSES_SHOWN}`;
  let page;
  try {
    page = await (await fetch(`/api/classes?${query}`)).json();
  } catch {
    state.classesVersion = undefined; // try again with the next status
    return;
  }
  $('classes-count').textContent = `(${page.count})`;
  $('classes').innerHTML = page.classes.map((c) => {
    const pct = c.accuracy === null ? null : c.accuracy * 100;
    return `<li title="label ${c.label}${c.test_images ? ` · ${c.test_images} test images` : ''}">
      <span class="name">${esc(c.name)}</span>
      <span class="bar"><span style="width:${pct === null ? 0 : pct.toFixed(1)}%"></span></span>
      <span class="pct">${pct === null ? '–' : `${fmt(pct, 1)} %`}</span></li>`;
  }).join('');
  $('classes-note').textContent = page.version === null
    ? 'accuracy per class appears after the first evaluation'
    : `test accuracy per class, center v${page.version}` +
      (many ? ` · the ${CLASSES_SHOWN} weakest of ${page.count}; all at /api/classes` : '');
}

// ---------- the live feed ----------
let retry = 500;
function connect() {
  const proto = location.protocol === 'https:' ? 'wss:' : 'ws:';
  const feed = new WebSocket(`${proto}//${location.host}/api/events`);
  feed.onmessage = (e) => {
    const msg = JSON.parse(e.data);
    if (msg.type === 'hello') {
      state.ticks = msg.ticks;
      state.evals = msg.status.history;
      renderStatus(msg.status);
      buildCharts();
    } else if (msg.type === 'tick') {
      state.ticks.push(msg.tick);
      if (state.ticks.length > MAX_TICKS) state.ticks.shift();
      state.evals.push(...msg.evals);
      renderStatus(msg.status);
      refreshCharts();
    }
    state.connected = true;
    retry = 500;
  };
  feed.onclose = () => {
    state.connected = false;
    const pill = $('run-state');
    pill.textContent = 'offline: reconnecting';
    pill.className = 'pill offline';
    setTimeout(connect, retry);
    retry = Math.min(retry * 2, 10000);
  };
}
connect();

// ---------- operator controls ----------
const tokenInput = $('admin-token');
tokenInput.value = sessionStorage.getItem('tether-admin-token') || '';
tokenInput.addEventListener('change', () => sessionStorage.setItem('tether-admin-token', tokenInput.value));
for (const id of ['set-tau', 'set-alpha', 'set-lr']) $(id).addEventListener('input', (e) => { e.target.dataset.touched = '1'; });

async function admin(path, { method = 'POST', body } = {}) {
  const headers = { authorization: `Bearer ${tokenInput.value}` };
  if (body) headers['content-type'] = 'application/json';
  const r = await fetch(`/api/admin/${path}`, { method, headers, body: body && JSON.stringify(body) });
  if (!r.ok) {
    const err = await r.json().catch(() => ({ error: r.statusText }));
    throw new Error(err.error);
  }
  return r;
}
const report = (text) => { $('admin-result').textContent = text; };
const act = (fn) => async (e) => {
  e.preventDefault();
  try { report(await fn()); } catch (err) { report(`refused: ${err.message}`); }
};

$('admin').addEventListener('submit', act(async () => {
  const body = { tau: Number($('set-tau').value), alpha: Number($('set-alpha').value), lr: Number($('set-lr').value) };
  const change = await (await admin('hyper', { body })).json();
  for (const id of ['set-tau', 'set-alpha', 'set-lr']) delete $(id).dataset.touched;
  return `changed: τ ${change.after.tau}, α ${change.after.alpha}, η ${change.after.lr} (workers pick it up at their next sync)`;
}));
$('pause').addEventListener('click', act(async () => { await admin('pause'); return 'paused: workers wait at their next sync'; }));
$('resume').addEventListener('click', act(async () => { await admin('resume'); return 'resumed'; }));
$('checkpoint').addEventListener('click', act(async () => {
  const r = await (await admin('checkpoint')).json();
  return `checkpoint of version ${r.version} written: ${r.manifest}`;
}));
$('download').addEventListener('click', act(async () => {
  const r = await admin('center.safetensors', { method: 'GET' });
  const name = (r.headers.get('content-disposition') || '').match(/filename="([^"]+)"/)?.[1] || 'center.safetensors';
  const url = URL.createObjectURL(await r.blob());
  const a = Object.assign(document.createElement('a'), { href: url, download: name });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
  return `downloaded ${name}`;
}));

// For the browser tests and the curious: how much each chart holds.
window.tetherDashboard = {
  state,
  chartPoints: () => Object.fromEntries(Object.entries(charts).map(([id, u]) => [id, u.data[0].length])),
};
