//! Choosing the compute device: Burn's wgpu backend on a real GPU, else the flex CPU
//! backend with a rayon pool of the requested size.

use burn::tensor::Device;
use serde::{Deserialize, Serialize};
use tether_shared::model::ops::cpu_conv;
use thiserror::Error;

/// What the user asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// wgpu on a discrete or integrated GPU; the CPU otherwise (software adapters
    /// such as lavapipe or SwiftShader count as "no GPU").
    Auto,
    /// The flex CPU backend.
    Cpu,
    /// wgpu on whatever adapter exists, software ones included.
    Wgpu,
}

impl std::str::FromStr for BackendChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "wgpu" => Ok(Self::Wgpu),
            other => Err(format!(
                "unknown backend {other:?} (expected auto, cpu or wgpu)"
            )),
        }
    }
}

/// Why no device could be set up.
#[derive(Debug, Error)]
pub enum BackendError {
    /// `--backend wgpu` on a machine with no wgpu adapter at all.
    #[error(
        "--backend wgpu: no wgpu adapter found (install a Vulkan driver, e.g. mesa-vulkan-drivers, or use --backend cpu)"
    )]
    NoAdapter,
    /// `--backend wgpu` with a binary built without the `wgpu` feature.
    #[error("--backend wgpu: this binary was built without the `wgpu` feature")]
    NotCompiled,
    /// The rayon pool could not be built (e.g. asked twice with different sizes).
    #[error("cannot set up {threads} CPU threads: {message}")]
    Threads {
        /// Threads asked for.
        threads: usize,
        /// What rayon said.
        message: String,
    },
}

/// The device chosen and how to describe it.
#[derive(Clone, Debug)]
pub struct Selected {
    /// The plain (non-autodiff) device.
    pub device: Device,
    /// "cpu" or "wgpu".
    pub backend: &'static str,
    /// Human description: adapter name and API, or CPU threads.
    pub description: String,
}

/// A wgpu adapter as wgpu reports it.
#[derive(Clone, Debug)]
pub struct Adapter {
    /// Adapter name, e.g. "NVIDIA H100 80GB HBM3" or "llvmpipe (LLVM 15.0.6, 256 bits)".
    pub name: String,
    /// Graphics API, e.g. "Vulkan".
    pub api: String,
    /// True for discrete and integrated GPUs, false for CPU / virtual / other adapters.
    pub is_gpu: bool,
    /// Burn's selector for this adapter.
    kind: burn::tensor::DeviceKind,
}

/// Lists the wgpu adapters of this machine (empty without the `wgpu` feature).
#[cfg(feature = "wgpu")]
pub fn adapters() -> Vec<Adapter> {
    use burn::tensor::DeviceKind;
    use burn::tensor::wgpu::wgpu;
    let instance =
        wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    // Vulkan / Metal / DX12 / browser WebGPU only: the GL backend adds a second entry
    // for the same adapter and complains on headless machines.
    let found = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::PRIMARY));
    let (mut discrete, mut integrated, mut virt) = (0, 0, 0);
    found
        .iter()
        .map(|a| {
            let info = a.get_info();
            let (is_gpu, kind) = match info.device_type {
                wgpu::DeviceType::DiscreteGpu => {
                    (true, DeviceKind::DiscreteGpu(post_inc(&mut discrete)))
                }
                wgpu::DeviceType::IntegratedGpu => {
                    (true, DeviceKind::IntegratedGpu(post_inc(&mut integrated)))
                }
                wgpu::DeviceType::VirtualGpu => {
                    (false, DeviceKind::VirtualGpu(post_inc(&mut virt)))
                }
                _ => (false, DeviceKind::Cpu),
            };
            Adapter {
                name: info.name,
                api: format!("{:?}", info.backend),
                is_gpu,
                kind,
            }
        })
        .collect()
}

#[cfg(feature = "wgpu")]
fn post_inc(n: &mut usize) -> usize {
    *n += 1;
    *n - 1
}

/// Lists the wgpu adapters of this machine (empty without the `wgpu` feature).
#[cfg(not(feature = "wgpu"))]
pub fn adapters() -> Vec<Adapter> {
    Vec::new()
}

/// Sets up the device for `choice`. `threads` sizes the CPU backend's rayon pool
/// (`None`: one per core); it applies once per process.
pub fn select(choice: BackendChoice, threads: Option<usize>) -> Result<Selected, BackendError> {
    // Only look for adapters when they matter: probing Vulkan costs time and noise.
    let adapters = if choice == BackendChoice::Cpu {
        Vec::new()
    } else {
        adapters()
    };
    let pick = match choice {
        BackendChoice::Cpu => None,
        BackendChoice::Auto => adapters.iter().find(|a| a.is_gpu),
        BackendChoice::Wgpu => {
            if !cfg!(feature = "wgpu") {
                return Err(BackendError::NotCompiled);
            }
            Some(
                adapters
                    .iter()
                    .find(|a| a.is_gpu)
                    .or(adapters.first())
                    .ok_or(BackendError::NoAdapter)?,
            )
        }
    };
    if let Some(adapter) = pick {
        return Ok(wgpu_device(adapter));
    }
    if choice == BackendChoice::Auto {
        let seen: Vec<&str> = adapters.iter().map(|a| a.name.as_str()).collect();
        tracing::info!(?seen, "no GPU adapter: training on the CPU");
    }
    let threads = cpu_threads(threads)?;
    Ok(Selected {
        device: Device::flex(),
        backend: "cpu",
        description: format!("cpu (flex, {threads} threads, {})", cpu_conv().0),
    })
}

#[cfg(feature = "wgpu")]
fn wgpu_device(adapter: &Adapter) -> Selected {
    Selected {
        device: Device::wgpu(adapter.kind.clone()),
        backend: "wgpu",
        description: format!("wgpu: {} ({})", adapter.name, adapter.api),
    }
}

#[cfg(not(feature = "wgpu"))]
fn wgpu_device(_: &Adapter) -> Selected {
    unreachable!("no adapters are listed without the wgpu feature")
}

/// Builds rayon's global pool (which Burn's CPU backend uses) with `threads`
/// threads, once; returns the pool's size.
pub fn cpu_threads(threads: Option<usize>) -> Result<usize, BackendError> {
    if let Some(n) = threads {
        let built = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global();
        if let Err(e) = built
            && rayon::current_num_threads() != n
        {
            return Err(BackendError::Threads {
                threads: n,
                message: e.to_string(),
            });
        }
    }
    Ok(rayon::current_num_threads())
}
