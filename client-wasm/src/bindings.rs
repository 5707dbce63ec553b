//! The wasm-bindgen surface of the browser worker. `web/worker.js` owns the socket
//! and the fetches; everything it sends or reads goes through here.

use std::cell::RefCell;
use std::rc::Rc;

use burn::tensor::Device;
use burn::tensor::wgpu::WgpuBackend;
use js_sys::{Promise, Uint8Array};
use tether_shared::data::ImagesHead;
use tether_shared::model::ops::cpu_conv;
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::future_to_promise;

use crate::volunteer::Volunteer;

fn js_error(e: impl std::fmt::Display) -> JsValue {
    JsError::new(&e.to_string()).into()
}

#[wasm_bindgen(start)]
fn on_load() {
    std::panic::set_hook(Box::new(|info| {
        let message = format!("tether wasm panicked: {info}");
        web_log(&message);
    }));
}

#[wasm_bindgen]
extern "C" {
    #[wasm_bindgen(js_namespace = console, js_name = error)]
    fn web_log(s: &str);
}

/// Sets up the device: the browser's WebGPU when `gpu` is given (the page found an
/// adapter; `gpu` describes it), else Burn's CPU backend. Resolves to a
/// [`BrowserWorker`]; a WebGPU setup that fails falls back to the CPU.
#[wasm_bindgen]
pub async fn create_worker(gpu: Option<String>) -> BrowserWorker {
    let webgpu = match gpu {
        Some(description) => Device::wgpu_options()
            .graphics_api(WgpuBackend::WebGpu)
            .init_async()
            .await
            .map(|device| (device, description))
            .map_err(|e| web_log(&format!("WebGPU setup failed, using the CPU: {e}")))
            .ok(),
        None => None,
    };
    let inner = match webgpu {
        Some((device, description)) => Volunteer::new(device, "webgpu", &description),
        None => Volunteer::new(
            Device::flex(),
            "cpu",
            &format!("cpu (wasm, 1 thread, {})", cpu_conv().0),
        ),
    };
    BrowserWorker {
        inner: Rc::new(RefCell::new(inner)),
    }
}

/// Bytes at the start of a shard download that [`shard_head_bytes`] reads.
#[wasm_bindgen]
pub fn shard_header_bytes() -> u32 {
    ImagesHead::FIXED as u32
}

/// Bytes of a shard download's head (header and labels), from its first
/// [`shard_header_bytes`] bytes: what [`BrowserWorker::start_blocks`] takes.
#[wasm_bindgen]
pub fn shard_head_bytes(prefix: &[u8]) -> Result<f64, JsValue> {
    ImagesHead::size("shard download", prefix)
        .map(|bytes| bytes as f64)
        .map_err(js_error)
}

/// The browser worker as JavaScript sees it. Calls must not overlap (the Web
/// Worker's loop awaits each one).
#[wasm_bindgen]
pub struct BrowserWorker {
    inner: Rc<RefCell<Volunteer>>,
}

#[wasm_bindgen]
impl BrowserWorker {
    /// "webgpu" or "cpu".
    #[wasm_bindgen(getter)]
    pub fn backend(&self) -> String {
        self.inner.borrow().backend.clone()
    }

    /// The device in words.
    #[wasm_bindgen(getter)]
    pub fn device(&self) -> String {
        self.inner.borrow().device.clone()
    }

    /// τ now.
    #[wasm_bindgen(getter)]
    pub fn tau(&self) -> u32 {
        self.inner.borrow().tau()
    }

    /// Names the group this worker joins with (a tab's workers share one), from
    /// the next hello on.
    pub fn set_group(&self, group: &str) {
        self.inner.borrow_mut().group = Some(group.to_string());
    }

    /// The hello frame, carrying the join ticket.
    pub fn hello(&self, ticket: &str) -> Vec<u8> {
        self.inner.borrow_mut().hello(ticket)
    }

    /// Reads a server frame; returns its meaning as JSON (see `Event`).
    pub fn receive(&self, bytes: &[u8]) -> Result<String, JsValue> {
        let event = self.inner.borrow_mut().receive(bytes).map_err(js_error)?;
        serde_json::to_string(&event).map_err(js_error)
    }

    /// Starts training on the downloaded shard.
    pub fn start(&self, shard: &[u8]) -> Result<(), JsValue> {
        self.inner.borrow_mut().start(shard).map_err(js_error)
    }

    /// Starts training on a shard larger than `budget` bytes, read a block at a
    /// time from the download of `total` bytes whose head is `head`.
    pub fn start_blocks(&self, head: &[u8], total: f64, budget: f64) -> Result<(), JsValue> {
        self.inner
            .borrow_mut()
            .start_blocks(head, total as u64, budget as u64)
            .map_err(js_error)
    }

    /// The blocks to read from the download before (or while) the next step runs,
    /// as JSON: `[{block, start, end}]`.
    pub fn wanted(&self) -> String {
        serde_json::to_string(&self.inner.borrow().wanted()).unwrap_or_default()
    }

    /// Whether the next step's images are in memory.
    pub fn ready(&self) -> bool {
        self.inner.borrow().ready()
    }

    /// Takes the bytes of a block [`BrowserWorker::wanted`] named.
    pub fn supply(&self, block: u32, bytes: Vec<u8>) -> Result<(), JsValue> {
        self.inner
            .borrow_mut()
            .supply(block as usize, bytes)
            .map_err(js_error)
    }

    /// Runs `steps` local steps (queued on the GPU with WebGPU; nothing is read).
    pub fn step(&self, steps: u32) -> Result<(), JsValue> {
        self.inner.borrow_mut().step(steps).map_err(js_error)
    }

    /// Records the last sync's wait in seconds.
    pub fn set_wait(&self, seconds: f64) {
        self.inner.borrow_mut().set_wait(seconds);
    }

    /// Resolves to the sync frame (a `Uint8Array`) once xⁱ is read back;
    /// `started_ms` (`Date.now()` when the τ steps began) times the steps.
    pub fn sync_frame(&self, started_ms: f64) -> Promise {
        let inner = self.inner.clone();
        #[allow(clippy::await_holding_refcell_ref)]
        future_to_promise(async move {
            // Single-threaded and the loop awaits this call: the borrow is exclusive.
            let mut v = inner.borrow_mut();
            let trained = v.read_back().await;
            let seconds = (js_sys::Date::now() - started_ms) / 1000.0;
            let frame = v.sync_frame(trained, seconds).map_err(js_error)?;
            Ok(Uint8Array::from(frame.as_slice()).into())
        })
    }

    /// Steps, samples, syncs, loss and samples/s so far, as JSON.
    pub fn progress(&self) -> String {
        serde_json::to_string(&self.inner.borrow().progress).unwrap_or_default()
    }

    /// A heartbeat frame.
    pub fn heartbeat(&self) -> Vec<u8> {
        self.inner.borrow().heartbeat()
    }

    /// The goodbye frame.
    pub fn leave(&self) -> Vec<u8> {
        self.inner.borrow().leave()
    }
}
