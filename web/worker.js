// tether's browser worker, run as a dedicated module Web Worker so the page stays
// responsive; a tab lending several cores runs several, each its own elastic worker
// with its own shard and socket. It owns the socket and the downloads; the wasm
// module (the same Rust model, algorithms and frames as a native worker) does
// everything else.
import init, { create_worker } from './pkg/tether_client_wasm.js';
import { pickBackend } from './backend.js';

let stopping = false;
let volunteer = null;

self.onmessage = (event) => {
  const msg = event.data;
  if (msg.type === 'start') {
    run(msg).catch((err) => post('error', { message: String(err && err.message || err) }));
  } else if (msg.type === 'stop') {
    stopping = true;
  }
};

function post(type, data = {}) {
  self.postMessage({ ...data, type });
}

/// A connection problem: reconnect rather than give up.
class Lost extends Error {}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function run({ token, backend = 'auto', group = null }) {
  post('status', { text: 'loading the wasm module' });
  await init({ module_or_path: new URL('./pkg/tether_client_wasm_bg.wasm', import.meta.url) });
  // The panel chose the backend and says why; this opens the adapter it chose.
  const { gpu } = await pickBackend(backend);
  volunteer = await create_worker(gpu);
  if (group) volunteer.set_group(group);
  post('backend', { backend: volunteer.backend, device: volunteer.device });
  let failures = 0;
  while (!stopping) {
    let outcome;
    try {
      outcome = await session(token);
      failures = 0;
    } catch (err) {
      if (!(err instanceof Lost)) throw err;
      outcome = 'reconnect';
      failures += 1;
      post('status', { text: `connection lost (${err.message}); reconnecting` });
    }
    if (outcome === 'done') break;
    if (!stopping) await sleep(Math.min(10000, 250 * 2 ** Math.min(failures, 6)));
  }
  post('stopped');
}

function wsUrl() {
  const proto = self.location.protocol === 'https:' ? 'wss:' : 'ws:';
  return `${proto}//${self.location.host}/ws`;
}

/// Frames from the socket, read one at a time.
function inbox(ws) {
  const queue = [];
  let waiter = null;
  let closed = null;
  ws.onmessage = (e) => {
    const bytes = new Uint8Array(e.data);
    if (waiter) {
      const w = waiter;
      waiter = null;
      w.resolve(bytes);
    } else {
      queue.push(bytes);
    }
  };
  ws.onclose = (e) => {
    closed = `connection closed (${e.code})`;
    if (waiter) {
      waiter.reject(new Lost(closed));
      waiter = null;
    }
  };
  return {
    get closed() { return closed; },
    next(timeoutMs) {
      if (queue.length) return Promise.resolve(queue.shift());
      if (closed) return Promise.reject(new Lost(closed));
      return new Promise((resolve, reject) => {
        const timer = setTimeout(() => {
          if (waiter) { waiter = null; reject(new Lost(`no answer within ${timeoutMs / 1000} s`)); }
        }, timeoutMs);
        waiter = {
          resolve: (v) => { clearTimeout(timer); resolve(v); },
          reject: (e) => { clearTimeout(timer); reject(e); },
        };
      });
    },
  };
}

function open(url) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url);
    ws.binaryType = 'arraybuffer';
    ws.onopen = () => resolve(ws);
    ws.onerror = () => reject(new Lost('cannot reach the server'));
  });
}

/// The shard, from the Cache API when this tab (or an earlier one) has it.
// The server hands a shard only to the connected worker it was assigned to,
// named by its session.
async function fetchShard(url, session) {
  const cache = self.caches ? await self.caches.open('tether-shards').catch(() => null) : null;
  let response = cache ? await cache.match(url) : undefined;
  const cached = !!response;
  if (!response) {
    response = await fetch(url, { headers: { 'x-tether-session': session } });
    if (!response.ok) throw new Error(`shard download failed: ${response.status} ${await response.text()}`);
    if (cache) await cache.put(url, response.clone()).catch(() => {});
  }
  const bytes = new Uint8Array(await response.arrayBuffer());
  return { bytes, cached };
}

/// One session: ticket, hello, welcome, shard, then train-and-sync until it ends.
/// Returns 'done' (stop for good) or 'reconnect'; throws what no retry fixes.
async function session(token) {
  let joined;
  try {
    joined = await fetch('/api/join', { method: 'POST', headers: token ? { 'x-tether-token': token } : {} });
  } catch (err) {
    throw new Lost(`cannot reach the server: ${err}`);
  }
  if (!joined.ok) {
    const body = await joined.json().catch(() => ({ error: joined.statusText }));
    if (joined.status === 503) throw new Lost(body.error);
    throw new Error(body.error);
  }
  const { ticket, data } = await joined.json();
  const ws = await open(wsUrl());
  const frames = inbox(ws);
  try {
    ws.send(volunteer.hello(ticket));
    const welcome = JSON.parse(volunteer.receive(await frames.next(30000)));
    if (welcome.type === 'rejected') {
      if (welcome.remedy === 'give_up') throw new Error(welcome.reason);
      throw new Lost(welcome.reason);
    }
    if (welcome.type !== 'welcome') throw new Error(`expected a welcome, got ${welcome.type}`);
    post('joined', welcome);
    const url = `/api/shard?index=${welcome.shard_index}&count=${welcome.shard_count}` +
      `&seed=${welcome.shard_seed}&data=${data}`;
    post('status', { text: 'downloading the shard' });
    const shard = await fetchShard(url, welcome.session);
    volunteer.start(shard.bytes);
    post('status', { text: `training on ${shard.bytes.length} bytes of shard${shard.cached ? ' (cached)' : ''}` });
    let lastSent = performance.now();
    let steps = 0;
    for (;;) {
      if (stopping) {
        ws.send(volunteer.leave());
        ws.close(1000, 'leaving');
        return 'done';
      }
      const tau = volunteer.tau;
      const started = Date.now();
      for (let i = 0; i < tau && !stopping && !frames.closed; i++) {
        volunteer.step(1);
        steps += 1;
        if (performance.now() - lastSent > 10000) {
          ws.send(volunteer.heartbeat());
          lastSent = performance.now();
        }
        post('step', { steps });
        // Let the stop button and socket events in between steps.
        await sleep(0);
      }
      if (frames.closed) throw new Lost(frames.closed);
      const t0 = performance.now();
      const frame = await volunteer.sync_frame(started);
      ws.send(frame);
      lastSent = performance.now();
      const event = JSON.parse(volunteer.receive(await frames.next(300000)));
      volunteer.set_wait((performance.now() - t0) / 1000);
      if (event.type === 'synced') {
        post('synced', { ...event, ...JSON.parse(volunteer.progress()) });
      } else if (event.type === 'rejected') {
        post('status', { text: `rejected: ${event.reason}` });
        if (event.remedy === 'give_up') throw new Error(event.reason);
        ws.close();
        return 'reconnect';
      } else if (event.type === 'stop') {
        ws.close();
        return event.finished ? 'done' : 'reconnect';
      }
    }
  } finally {
    if (ws.readyState === WebSocket.OPEN && !stopping) ws.close();
  }
}
