// Which backend a browser worker trains on, shared by the Join panel (which decides
// how many workers to start) and the Web Worker (which opens the device).

/// Whether a WebGPU adapter is a software one (SwiftShader, lavapipe, llvmpipe):
/// those train about 100× slower than the CPU path, so `auto` does not use them.
function softwareAdapter(adapter, info) {
  if (info.isFallbackAdapter ?? adapter.isFallbackAdapter) return true;
  const name = [info.vendor, info.architecture, info.device, info.description].join(' ');
  return /swiftshader|lavapipe|llvmpipe|software/i.test(name);
}

/// Picks the backend: `choice` is `auto` (WebGPU on a hardware adapter, else the
/// CPU), `webgpu` (any adapter, software too) or `cpu`. Returns the adapter's name
/// for WebGPU (or null) and why, for the Join panel.
export async function pickBackend(choice) {
  if (choice === 'cpu') return { gpu: null, why: 'CPU, as chosen' };
  const gpu = globalThis.navigator && globalThis.navigator.gpu;
  if (!gpu) return { gpu: null, why: 'this browser offers no WebGPU: training on the CPU' };
  let adapter;
  try {
    adapter = await gpu.requestAdapter();
  } catch (err) {
    return { gpu: null, why: `no WebGPU adapter (${err}): training on the CPU` };
  }
  if (!adapter) return { gpu: null, why: 'no WebGPU adapter: training on the CPU' };
  const info = adapter.info || {};
  const name = [info.vendor, info.architecture, info.description].filter(Boolean).join(' ') || 'adapter';
  if (choice === 'auto' && softwareAdapter(adapter, info)) {
    return { gpu: null, why: `the WebGPU adapter (${name}) is a software one, far slower than the CPU: training on the CPU (choose WebGPU to use it anyway)` };
  }
  return { gpu: `webgpu: ${name}`, why: `WebGPU on ${name}` };
}
