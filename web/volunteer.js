// The "lend this tab" panel, on the dashboard and on /volunteer: starts the browser
// worker in a Web Worker and shows what it is doing. State is also exposed as
// `window.tetherVolunteer` for the browser tests.

const fmt = (v, digits = 0) => (v === undefined || v === null || Number.isNaN(v) ? '–' : Number(v).toFixed(digits));

export function mountVolunteer(root, { needsToken = false } = {}) {
  root.innerHTML = `
    <div class="volunteer-controls">
      <button id="join" class="primary">Join with this tab</button>
      <button id="leave" hidden>Leave</button>
      <label class="check">backend <select id="backend-choice">
        <option value="auto" selected>auto</option><option value="webgpu">WebGPU</option><option value="cpu">CPU</option>
      </select></label>
      <input id="worker-token" type="password" placeholder="worker token" autocomplete="off" ${needsToken ? '' : 'hidden'}>
    </div>
    <dl class="volunteer-stats">
      <div><dt>state</dt><dd id="v-state">idle</dd></div>
      <div><dt>backend</dt><dd id="v-backend">–</dd></div>
      <div><dt>worker</dt><dd id="v-worker">–</dd></div>
      <div><dt>steps</dt><dd id="v-steps">0</dd></div>
      <div><dt>local loss</dt><dd id="v-loss">–</dd></div>
      <div><dt>syncs</dt><dd id="v-syncs">0</dd></div>
      <div><dt>samples/s</dt><dd id="v-speed">–</dd></div>
    </dl>
    <p id="v-message" class="muted"></p>`;
  const $ = (id) => root.querySelector(`#${id}`);
  const state = { running: false, backend: null, device: null, why: null, workerId: null, steps: 0, syncs: 0, error: null };
  window.tetherVolunteer = state;
  let worker = null;

  const show = (id, text) => { $(id).textContent = text; };
  const setRunning = (running) => {
    state.running = running;
    $('join').hidden = running;
    $('leave').hidden = !running;
  };

  $('join').addEventListener('click', () => {
    if (worker) return;
    state.error = null;
    worker = new Worker('/web/worker.js', { type: 'module' });
    worker.onmessage = (e) => handle(e.data);
    worker.onerror = (e) => handle({ type: 'error', message: e.message || 'the worker failed to load' });
    worker.postMessage({ type: 'start', backend: $('backend-choice').value, token: $('worker-token').value || null });
    setRunning(true);
    show('v-state', 'starting');
  });
  $('leave').addEventListener('click', () => {
    if (!worker) return;
    worker.postMessage({ type: 'stop' });
    show('v-state', 'leaving after this sync');
  });
  // A closing tab cannot finish a sync; the browser closes the socket, and the
  // server drops the worker at once (or by its timeouts if the network vanished).
  window.addEventListener('pagehide', () => worker && worker.postMessage({ type: 'stop' }));

  function handle(msg) {
    switch (msg.type) {
      case 'status':
        show('v-message', msg.text);
        break;
      case 'backend':
        state.backend = msg.backend;
        state.device = msg.device;
        state.why = msg.why;
        show('v-backend', `${msg.backend} · ${msg.device}`);
        $('v-backend').title = msg.why;
        show('v-message', msg.why);
        break;
      case 'joined':
        state.workerId = msg.worker_id;
        show('v-worker', `#${msg.worker_id} · shard ${msg.shard_index + 1}/${msg.shard_count}`);
        show('v-state', `training (${msg.algorithm}, τ ${msg.tau})`);
        break;
      case 'step':
        state.steps = msg.steps;
        show('v-steps', String(msg.steps));
        break;
      case 'synced':
        state.syncs = msg.syncs;
        show('v-syncs', String(msg.syncs));
        show('v-loss', fmt(msg.loss, 4));
        show('v-speed', fmt(msg.samples_per_s));
        show('v-state', `training (center v${msg.center_version}, τ ${msg.tau})`);
        break;
      case 'stopped':
        finish('left the run');
        break;
      case 'error':
        state.error = msg.message;
        finish(`stopped: ${msg.message}`);
        break;
      default:
        break;
    }
  }

  function finish(text) {
    show('v-state', text);
    if (worker) worker.terminate();
    worker = null;
    setRunning(false);
  }
  return state;
}
