// tether's browser worker, run as a dedicated module Web Worker so the page stays
// responsive; a tab lending several cores runs several, each its own elastic worker
// with its own shard and socket. It owns the socket and the downloads; the wasm
// module (the same Rust model, algorithms and frames as a native worker) does
// everything else.
/// The wasm build's exports, once loaded (`run` picks the build).
let wasm = null;
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

/// Bytes of shard a worker keeps in memory; a larger shard is read a block at a time.
let shardMemory = 256 * 1024 * 1024;

/// Whether this engine takes relaxed SIMD (`f32x4.relaxed_madd`, the CPU's FMA): a
/// module of one function, `relaxed_madd(0, 0, 0)`, that only such an engine validates.
function hasRelaxedSimd() {
  const zeros = () => [0xfd, 0x0c, ...new Array(16).fill(0)]; // v128.const 0
  const body = [0x00, ...zeros(), ...zeros(), ...zeros(), 0xfd, 0x85, 0x02, 0x0b];
  const bytes = [
    0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00, // \0asm, version 1
    0x01, 0x05, 0x01, 0x60, 0x00, 0x01, 0x7b, // types: () -> v128
    0x03, 0x02, 0x01, 0x00, // one function of that type
    0x0a, body.length + 2, 0x01, body.length, ...body, // its code
  ];
  try {
    return WebAssembly.validate(new Uint8Array(bytes));
  } catch {
    return false;
  }
}

async function run({ token, backend = 'auto', group = null, shardBytes = null, build = 'auto' }) {
  if (shardBytes > 0) shardMemory = shardBytes;
  // Two builds of one worker: with relaxed SIMD where the engine has it, else plain
  // SIMD128 (`?wasm=simd128` in the page's address asks for the plain one).
  // Each build has its own glue (wasm-bindgen names functions by their index).
  const relaxed = build !== 'simd128' && hasRelaxedSimd();
  const stem = relaxed ? 'tether_client_wasm_relaxed' : 'tether_client_wasm';
  post('status', { text: `loading the wasm module (${relaxed ? 'relaxed SIMD' : 'SIMD128'})` });
  wasm = await import(`./pkg/${stem}.js`);
  await wasm.default({ module_or_path: new URL(`./pkg/${stem}_bg.wasm`, import.meta.url) });
  // The panel chose the backend and says why; this opens the adapter it chose.
  const { gpu } = await pickBackend(backend);
  volunteer = await wasm.create_worker(gpu);
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

/// The shard as a Blob: from the Cache API when this tab (or an earlier one) has
/// it, where it stays on disk and is read in pieces; else downloaded into it.
// The server hands a shard only to the connected worker it was assigned to,
// named by its session.
async function openShard(url, session) {
  const cache = self.caches ? await self.caches.open('tether-shards').catch(() => null) : null;
  const cachedResponse = cache ? await cache.match(url) : undefined;
  if (cachedResponse) return { blob: await cachedResponse.blob(), cached: true };
  const download = () => fetch(url, { headers: { 'x-tether-session': session } }).then(async (r) => {
    if (!r.ok) throw new Error(`shard download failed: ${r.status} ${await r.text()}`);
    return r;
  });
  let response = await download();
  if (cache) {
    // Stored first, then read back: the stored copy is disk-backed, a tee'd one
    // would sit in memory whole.
    const stored = await cache.put(url, response).then(() => cache.match(url)).catch(() => null);
    if (stored) return { blob: await stored.blob(), cached: false };
    response = await download(); // the store failed (quota): the Blob API pages it
  }
  return { blob: await response.blob(), cached: false };
}

const bytesOf = async (blob, start, end) => new Uint8Array(await blob.slice(start, end).arrayBuffer());

/// Hands the worker its shard: whole when it fits `shardMemory`, else its head,
/// the rest to be read a block at a time by `feed`. Says which in the status.
async function startShard(shard, url) {
  const { blob, cached } = shard;
  const from = cached ? ' (cached)' : '';
  if (blob.size <= shardMemory) {
    volunteer.start(await bytesOf(blob, 0, blob.size));
    post('status', { text: `training on ${blob.size} bytes of shard${from}` });
    return null;
  }
  const headBytes = wasm.shard_head_bytes(await bytesOf(blob, 0, wasm.shard_header_bytes()));
  volunteer.start_blocks(await bytesOf(blob, 0, headBytes), blob.size, shardMemory);
  const mib = (v) => (v / 1048576).toFixed(1);
  post('status', { text: `training on ${mib(blob.size)} MiB of shard${from}, read from disk in blocks (memory budget ${mib(shardMemory)} MiB)` });
  return { blob, url, loading: new Map(), arrived: [], failed: null };
}

/// Before a step on a shard read in blocks: starts reading every block the next
/// two batches need, and waits only for those the next step needs.
async function feed(blocks) {
  for (;;) {
    for (const { block, bytes } of blocks.arrived.splice(0)) volunteer.supply(block, bytes);
    for (const want of JSON.parse(volunteer.wanted())) {
      if (blocks.loading.has(want.block)) continue;
      const read = bytesOf(blocks.blob, want.start, want.end).then(
        (bytes) => { blocks.arrived.push({ block: want.block, bytes }); },
        (err) => { blocks.failed = err; },
      ).finally(() => blocks.loading.delete(want.block));
      blocks.loading.set(want.block, read);
    }
    if (blocks.failed) {
      // The browser may evict or lose a cached shard: the next session downloads it again.
      await self.caches?.open('tether-shards').then((c) => c.delete(blocks.url)).catch(() => {});
      throw new Lost(`reading the stored shard failed (${blocks.failed})`);
    }
    if (volunteer.ready()) return;
    if (!blocks.loading.size && !blocks.arrived.length) throw new Error('the next block was never asked for');
    if (blocks.loading.size) await Promise.race(blocks.loading.values());
  }
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
    const blocks = await startShard(await openShard(url, welcome.session), url);
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
        if (blocks) await feed(blocks);
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
