// The "lend this tab" panel, on the dashboard and on /volunteer: starts the browser
// workers, each in its own Web Worker (one per lent CPU core, or one on a GPU),
// shows what they do together, and stops them all with one Leave. State is also
// exposed as `window.tetherVolunteer` for the browser tests.
import { pickBackend } from './backend.js';

const fmt = (v, digits = 0) => (v === undefined || v === null || Number.isNaN(v) ? '–' : Number(v).toFixed(digits));

/// A name the tab's workers share, so the dashboard shows them as one volunteer.
function groupName() {
  const bytes = crypto.getRandomValues(new Uint8Array(4));
  return `tab ${Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('')}`;
}

export function mountVolunteer(root, { needsToken = false } = {}) {
  const cores = Math.max(1, navigator.hardwareConcurrency || 1);
  // `?shard-memory=MiB` in the page's address: how much of its shard each worker
  // keeps in memory (256 MiB unless said); a larger shard stays in the Cache API
  // and is read a block at a time.
  const shardMiB = Number(new URLSearchParams(window.location.search).get('shard-memory'));
  const shardBytes = shardMiB > 0 ? Math.floor(shardMiB * 1048576) : null;
  // `?wasm=simd128`: the plain SIMD128 build even where relaxed SIMD is there (to
  // compare the two, or to step around an engine's bug).
  const wasm = new URLSearchParams(window.location.search).get('wasm') === 'simd128' ? 'simd128' : 'auto';
  // Half the cores by default: the volunteer keeps a usable machine.
  const lend = Math.max(1, Math.floor(cores / 2));
  root.innerHTML = `
    <div class="volunteer-controls">
      <button id="join" class="primary">Join with this tab</button>
      <button id="leave" hidden>Leave</button>
      <label class="check">backend <select id="backend-choice">
        <option value="auto" selected>auto</option><option value="webgpu">WebGPU</option><option value="cpu">CPU</option>
      </select></label>
      <label class="check" title="each core is one worker with its own shard (on a GPU, one worker)">CPU cores
        <input id="worker-count" type="number" min="1" max="${cores}" value="${lend}"></label>
      <input id="worker-token" type="password" placeholder="worker token" autocomplete="off" ${needsToken ? '' : 'hidden'}>
    </div>
    <dl class="volunteer-stats">
      <div><dt>state</dt><dd id="v-state">idle</dd></div>
      <div><dt>backend</dt><dd id="v-backend">–</dd></div>
      <div><dt>workers</dt><dd id="v-worker">–</dd></div>
      <div><dt>steps</dt><dd id="v-steps">0</dd></div>
      <div><dt>local loss</dt><dd id="v-loss">–</dd></div>
      <div><dt>syncs</dt><dd id="v-syncs">0</dd></div>
      <div><dt>samples/s</dt><dd id="v-speed">–</dd></div>
    </dl>
    <p id="v-message" class="muted"></p>`;
  const $ = (id) => root.querySelector(`#${id}`);
  const state = {
    running: false, backend: null, device: null, why: null, group: null,
    workerIds: [], steps: 0, syncs: 0, blocksRead: 0, error: null,
  };
  window.tetherVolunteer = state;
  // One entry per Web Worker: its thread and what it last reported.
  let crew = [];

  const show = (id, text) => { $(id).textContent = text; };
  const setRunning = (running) => {
    state.running = running;
    $('join').hidden = running;
    $('leave').hidden = !running;
    $('worker-count').disabled = running;
  };
  const sum = (key) => crew.reduce((a, w) => a + (w[key] || 0), 0);
  function refresh() {
    state.workerIds = crew.filter((w) => w.id !== undefined).map((w) => w.id);
    state.steps = sum('steps');
    state.syncs = sum('syncs');
    state.blocksRead = sum('blocks');
    show('v-steps', String(state.steps));
    show('v-syncs', String(state.syncs));
    const speeds = crew.filter((w) => w.speed !== undefined);
    show('v-speed', speeds.length ? fmt(sum('speed')) : '–');
    const losses = crew.filter((w) => Number.isFinite(w.loss));
    show('v-loss', losses.length ? fmt(losses.reduce((a, w) => a + w.loss, 0) / losses.length, 4) : '–');
    const ids = state.workerIds.map((id) => `#${id}`).join(', ');
    show('v-worker', `${crew.length} running${ids ? ` (${ids})` : ''}${state.group ? ` · ${state.group}` : ''}`);
  }

  $('join').addEventListener('click', async () => {
    if (crew.length || state.running) return;
    state.error = null;
    setRunning(true);
    show('v-state', 'starting');
    // A server with relays below it sends volunteers to the least loaded one: the
    // tab opens that relay's page, which joins at once with the same choices.
    const sent = await fetch('/api/relay').then((r) => (r.ok ? r.json() : {})).catch(() => ({}));
    if (sent.relay) {
      show('v-message', `this run trains through relays: joining ${sent.relay}`);
      const wish = `${$('worker-count').value},${$('backend-choice').value}`;
      const kept = new URLSearchParams();
      if (shardBytes) kept.set('shard-memory', shardMiB);
      if (wasm !== 'auto') kept.set('wasm', wasm);
      const keep = kept.size ? `?${kept}` : '';
      window.location.assign(`${sent.relay}/volunteer${keep}#join=${encodeURIComponent(wish)}`);
      return;
    }
    // The backend is chosen once for the tab: a GPU takes one worker, the CPU one per core.
    const { gpu, why } = await pickBackend($('backend-choice').value);
    const wanted = Math.min(cores, Math.max(1, Math.floor(Number($('worker-count').value) || 1)));
    const count = gpu ? 1 : wanted;
    state.why = gpu && wanted > 1 ? `${why} (one worker: the tab's workers would share one GPU)` : why;
    state.group = groupName();
    show('v-message', state.why);
    const token = $('worker-token').value || null;
    crew = Array.from({ length: count }, (_, index) => {
      const thread = new Worker('/web/worker.js', { type: 'module' });
      const member = { thread, index, steps: 0, syncs: 0 };
      thread.onmessage = (e) => handle(member, e.data);
      thread.onerror = (e) => handle(member, { type: 'error', message: e.message || 'the worker failed to load' });
      thread.postMessage({ type: 'start', backend: gpu ? 'webgpu' : 'cpu', group: state.group, token, shardBytes, build: wasm });
      return member;
    });
    refresh();
  });
  $('leave').addEventListener('click', () => {
    if (!crew.length) return;
    for (const w of crew) w.thread.postMessage({ type: 'stop' });
    show('v-state', 'leaving after this sync');
  });
  // Sent here by the server above this one (see Join): join with the choices made there.
  const wish = /^#join=(.*)$/.exec(window.location.hash);
  if (wish) {
    const [count, backend] = decodeURIComponent(wish[1]).split(',');
    if (Number(count) >= 1) $('worker-count').value = String(Math.min(cores, Math.floor(Number(count))));
    if (['auto', 'webgpu', 'cpu'].includes(backend)) $('backend-choice').value = backend;
    history.replaceState(null, '', window.location.pathname);
    if (!needsToken) $('join').click();
  }
  // A closing tab cannot finish a sync; the browser closes the sockets, and the
  // server drops the workers at once (or by its timeouts if the network vanished).
  window.addEventListener('pagehide', () => crew.forEach((w) => w.thread.postMessage({ type: 'stop' })));

  function handle(member, msg) {
    switch (msg.type) {
      case 'status':
        show('v-message', crew.length > 1 ? `worker ${member.index + 1}: ${msg.text}` : msg.text);
        break;
      case 'backend':
        state.backend = msg.backend;
        state.device = msg.device;
        show('v-backend', `${msg.backend} · ${msg.device}${crew.length > 1 ? ` × ${crew.length}` : ''}`);
        $('v-backend').title = state.why;
        break;
      case 'joined':
        member.id = msg.worker_id;
        member.shard = `${msg.shard_index + 1}/${msg.shard_count}`;
        show('v-state', `training (${msg.algorithm}, τ ${msg.tau})`);
        break;
      case 'step':
        member.steps = msg.steps;
        break;
      case 'synced':
        member.syncs = msg.syncs;
        member.loss = msg.loss;
        member.speed = msg.samples_per_s;
        member.blocks = msg.blocks_read;
        show('v-state', `training (center v${msg.center_version}, τ ${msg.tau})`);
        break;
      case 'stopped':
        drop(member);
        break;
      case 'error':
        state.error = msg.message;
        show('v-message', `worker ${member.index + 1} stopped: ${msg.message}`);
        drop(member);
        break;
      default:
        break;
    }
    refresh();
  }

  function drop(member) {
    member.thread.terminate();
    crew = crew.filter((w) => w !== member);
    if (!crew.length) {
      show('v-state', state.error ? `stopped: ${state.error}` : 'left the run');
      setRunning(false);
    }
  }
  return state;
}
