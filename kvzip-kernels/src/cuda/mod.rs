//! CUDA backend (feature `cuda`): bf16 storage, f32 accumulation, hand-written kernels for
//! everything but large GEMMs (cuBLAS; decode batches of 1-2 rows use our GEMV, [`gemm`]).
//!
//! - [`CudaBackend`] owns the context, one stream, the cuBLAS handle and the kernels of the
//!   embedded cubins (sm_90a for Hopper, sm_80 for Ampere/Ada; built by `build.rs` with nvcc).
//! - Kernel parameter structs ([`params`]) come from `csrc/kvzip_params.h` through bindgen, so the
//!   C and Rust layouts cannot drift.
//! - Ops ([`ops`], [`attention`], [`score`], [`cache`]) validate buffer lengths, fill the
//!   parameter struct and launch on the backend's stream; they do not synchronise.
//!
//! Buffers are cudarc [`CudaSlice`]s (or views of them). The backend disables cudarc's per-buffer
//! event tracking: everything runs on one stream, in order.
//!
//! Running on a machine without a GPU or driver gives [`CudaError::NoDevice`], never a panic.

pub mod attention;
pub mod cache;
pub mod decode_plan;
pub mod gemm;
pub mod ops;
pub mod score;

use std::collections::HashMap;
use std::sync::Arc;

pub use cudarc::driver::{
    CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DriverError,
};
pub use half::bf16;

use cudarc::driver::{CudaContext, CudaFunction, DeviceRepr, LaunchConfig, PushKernelArg};

/// Kernel parameter structs generated from `csrc/kvzip_params.h`.
#[allow(
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    dead_code,
    missing_docs,
    clippy::all
)]
pub mod params {
    include!(concat!(env!("OUT_DIR"), "/params.rs"));
}

#[allow(clippy::type_complexity)]
mod cubins {
    include!(concat!(env!("OUT_DIR"), "/cubins.rs"));
}

macro_rules! device_repr {
    ($($t:ty),* $(,)?) => { $(
        // SAFETY: plain `#[repr(C)]` structs of scalars and device pointers, laid out by bindgen
        // from the same header the kernels are compiled with.
        unsafe impl DeviceRepr for $t {}
    )* };
}
device_repr!(
    params::KvzRmsNormParams,
    params::KvzRopeParams,
    params::KvzActMulParams,
    params::KvzEmbeddingParams,
    params::KvzAddParams,
    params::KvzSampleParams,
    params::KvzSoftcapParams,
    params::KvzAppendParams,
    params::KvzCompactParams,
    params::KvzAttentionParams,
    params::KvzDecodeParams,
    params::KvzDecodeSegment,
    params::KvzScoreParams,
    params::KvzGemvParams,
);

/// Errors of the CUDA backend.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// No usable GPU: driver library missing, no device, or a bad ordinal.
    #[error("no CUDA device available ({0}); run without --device cuda or check the driver")]
    NoDevice(String),
    /// The GPU's architecture has no embedded kernel image.
    #[error(
        "GPU compute capability {major}.{minor} has no kernel image (built for sm_90a and sm_80)"
    )]
    UnsupportedArch {
        /// Major compute capability.
        major: i32,
        /// Minor compute capability.
        minor: i32,
    },
    /// A CUDA driver call failed.
    #[error("CUDA driver: {0}")]
    Driver(#[from] cudarc::driver::DriverError),
    /// A device allocation did not fit.
    #[error(
        "out of GPU memory: asked for {asked} bytes ({:.2} GiB), {free} of {total} bytes free; \
         use a smaller context, batch or --kv-budget, or another GPU",
        *asked as f64 / (1u64 << 30) as f64
    )]
    OutOfMemory {
        /// Bytes requested.
        asked: u64,
        /// Bytes free on the device when it failed.
        free: u64,
        /// Device memory in all.
        total: u64,
    },
    /// A cuBLAS call failed.
    #[error("cuBLAS: {0}")]
    Blas(#[from] cudarc::cublas::result::CublasError),
    /// A kernel named by the code is missing from the cubins (build mismatch).
    #[error("kernel {0} not found in the embedded cubins")]
    MissingKernel(String),
    /// Buffer sizes disagree with the op's shape arguments.
    #[error("shape: {0}")]
    Shape(String),
}

/// Result type of the CUDA backend.
pub type CudaResult<T> = std::result::Result<T, CudaError>;

/// One GPU: context, stream, cuBLAS handle and the loaded kernels.
pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: cudarc::cublas::CudaBlas,
    functions: HashMap<String, CudaFunction>,
    /// Compute capability (major, minor).
    pub compute_capability: (i32, i32),
    /// Number of streaming multiprocessors.
    pub n_sms: usize,
    /// Largest opt-in dynamic shared memory per block, bytes.
    pub max_smem_per_block: usize,
    /// Persistent partial buffers and plan staging of the decode kernels.
    decode_scratch: std::sync::Mutex<decode_plan::DecodeScratch>,
    /// Resident blocks per SM of a kernel at a dynamic shared-memory size (queried once).
    occupancy: std::sync::Mutex<HashMap<(&'static str, u32), u32>>,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend")
            .field("compute_capability", &self.compute_capability)
            .field("n_sms", &self.n_sms)
            .finish_non_exhaustive()
    }
}

impl CudaBackend {
    /// Opens GPU `ordinal`, loads every kernel and creates the cuBLAS handle.
    ///
    /// Errors: [`CudaError::NoDevice`] when the driver cannot be loaded or the device does not
    /// exist; [`CudaError::UnsupportedArch`] when no embedded cubin fits the GPU.
    pub fn new(ordinal: usize) -> CudaResult<Self> {
        // cudarc's dynamic loader panics when libcuda is absent; turn that into an error.
        let opened = std::panic::catch_unwind(|| CudaContext::new(ordinal));
        let ctx = match opened {
            Ok(Ok(ctx)) => ctx,
            Ok(Err(e)) => return Err(CudaError::NoDevice(format!("device {ordinal}: {e}"))),
            Err(_) => {
                return Err(CudaError::NoDevice(
                    "the CUDA driver library (libcuda.so) could not be loaded".into(),
                ))
            }
        };
        // SAFETY: the backend uses a single stream; no buffer crosses streams.
        unsafe { ctx.disable_event_tracking() };
        let (major, minor) = ctx.compute_capability()?;
        let use_sm90a = match (major, minor) {
            (9, 0) => true,
            (8, _) => false,
            _ => return Err(CudaError::UnsupportedArch { major, minor }),
        };
        use cudarc::driver::sys::CUdevice_attribute as A;
        let n_sms = ctx.attribute(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as usize;
        let max_smem_per_block =
            ctx.attribute(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)? as usize;
        let stream = ctx.default_stream();
        let mut functions = HashMap::new();
        for (_module, sm90a, sm80, kernels) in cubins::CUBINS {
            let image = if use_sm90a { *sm90a } else { *sm80 };
            let module = ctx.load_module(cudarc::nvrtc::Ptx::from_binary(image.to_vec()))?;
            for name in *kernels {
                let f = module
                    .load_function(name)
                    .map_err(|_| CudaError::MissingKernel((*name).to_string()))?;
                functions.insert((*name).to_string(), f);
            }
        }
        let blas = cudarc::cublas::CudaBlas::new(stream.clone())?;
        Ok(Self {
            ctx,
            stream,
            blas,
            functions,
            compute_capability: (major, minor),
            n_sms,
            max_smem_per_block,
            decode_scratch: Default::default(),
            occupancy: Default::default(),
        })
    }

    /// The stream every op of this backend is queued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The CUDA context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The cuBLAS handle (bound to [`Self::stream`]).
    pub fn blas(&self) -> &cudarc::cublas::CudaBlas {
        &self.blas
    }

    /// Blocks until all queued work finished; surfaces asynchronous kernel faults.
    pub fn synchronize(&self) -> CudaResult<()> {
        self.stream.synchronize()?;
        Ok(())
    }

    /// Uninitialised device buffer of `n` elements (every op writes before it reads).
    pub fn alloc<T: DeviceRepr>(&self, n: usize) -> CudaResult<CudaSlice<T>> {
        // SAFETY: callers treat the contents as undefined until an op writes them.
        unsafe { self.stream.alloc::<T>(n) }.map_err(|e| self.alloc_err::<T>(n, e))
    }

    /// Free and total device memory in bytes.
    pub fn memory_info(&self) -> CudaResult<(u64, u64)> {
        let (free, total) = self.ctx.mem_get_info()?;
        Ok((free as u64, total as u64))
    }

    /// An allocation failure of `n` elements of `T` as [`CudaError::OutOfMemory`] when the
    /// device is full (so it reads as how much was asked and what is free), else as is.
    fn alloc_err<T>(&self, n: usize, e: cudarc::driver::DriverError) -> CudaError {
        use cudarc::driver::sys::CUresult;
        if e.0 == CUresult::CUDA_ERROR_OUT_OF_MEMORY {
            let (free, total) = self.memory_info().unwrap_or((0, 0));
            CudaError::OutOfMemory {
                asked: (n as u64).saturating_mul(std::mem::size_of::<T>() as u64),
                free,
                total,
            }
        } else {
            CudaError::Driver(e)
        }
    }

    /// Zero-filled device buffer of `n` elements.
    pub fn zeros<T: DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        n: usize,
    ) -> CudaResult<CudaSlice<T>> {
        self.stream
            .alloc_zeros::<T>(n)
            .map_err(|e| self.alloc_err::<T>(n, e))
    }

    /// Copies a host slice to a new device buffer.
    pub fn upload<T: DeviceRepr>(&self, host: &[T]) -> CudaResult<CudaSlice<T>> {
        self.stream
            .clone_htod(host)
            .map_err(|e| self.alloc_err::<T>(host.len(), e))
    }

    /// Copies f32 host data to a new bf16 device buffer (round to nearest even).
    pub fn upload_bf16(&self, host: &[f32]) -> CudaResult<CudaSlice<bf16>> {
        let v: Vec<bf16> = host.iter().map(|&x| bf16::from_f32(x)).collect();
        self.upload(&v)
    }

    /// Copies a device buffer (or view) back to the host; synchronises.
    pub fn download<T: DeviceRepr + Default + Clone>(
        &self,
        dev: &impl DevicePtr<T>,
    ) -> CudaResult<Vec<T>> {
        Ok(self.stream.clone_dtoh(dev)?)
    }

    /// Copies a bf16 device buffer back to the host as f32; synchronises.
    pub fn download_f32(&self, dev: &impl DevicePtr<bf16>) -> CudaResult<Vec<f32>> {
        Ok(self.download(dev)?.into_iter().map(f32::from).collect())
    }

    /// The kernel `name` of the embedded cubins.
    pub(crate) fn function(&self, name: &str) -> CudaResult<&CudaFunction> {
        self.functions
            .get(name)
            .ok_or_else(|| CudaError::MissingKernel(name.to_string()))
    }

    /// Blocks of `threads` threads and `smem` bytes of dynamic shared memory that one SM holds
    /// at once for kernel `name` (the driver's occupancy calculator, cached per size; at
    /// least 1).
    pub(crate) fn blocks_per_sm(
        &self,
        name: &'static str,
        threads: u32,
        smem: u32,
    ) -> CudaResult<u32> {
        let mut cache = self
            .occupancy
            .lock()
            .map_err(|_| CudaError::Shape("occupancy cache poisoned".into()))?;
        if let Some(&n) = cache.get(&(name, smem)) {
            return Ok(n);
        }
        let n = self
            .function(name)?
            .occupancy_max_active_blocks_per_multiprocessor(threads, smem as usize, None)?
            .max(1);
        cache.insert((name, smem), n);
        Ok(n)
    }

    /// Launches kernel `name` with one parameter struct.
    ///
    /// # Safety
    /// Every device pointer in `params` must be valid for the accesses the kernel makes under
    /// the struct's shape fields (the safe op wrappers check this).
    pub(crate) unsafe fn launch<P: DeviceRepr>(
        &self,
        name: &str,
        cfg: LaunchConfig,
        params: &P,
    ) -> CudaResult<()> {
        let f = self.function(name)?;
        if cfg.shared_mem_bytes > 48 * 1024 {
            f.set_attribute(
                cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                cfg.shared_mem_bytes as i32,
            )?;
        }
        let mut b = self.stream.launch_builder(f);
        b.arg(params);
        b.launch(cfg)?;
        Ok(())
    }
}

/// Raw device address of a buffer for a parameter struct (event tracking is off, so the guard
/// cudarc returns is a no-op).
pub(crate) fn dptr<T>(buf: &(impl DevicePtr<T> + ?Sized), stream: &CudaStream) -> u64 {
    let (p, _guard) = buf.device_ptr(stream);
    p
}

/// Raw mutable device address of a buffer for a parameter struct.
pub(crate) fn dptr_mut<T>(buf: &mut (impl DevicePtrMut<T> + ?Sized), stream: &CudaStream) -> u64 {
    let (p, _guard) = buf.device_ptr_mut(stream);
    p
}

/// Checks that `len >= need`, naming the buffer.
pub(crate) fn check_len(what: &str, len: usize, need: usize) -> CudaResult<()> {
    if len < need {
        return Err(CudaError::Shape(format!(
            "{what} holds {len} elements, the op needs {need}"
        )));
    }
    Ok(())
}

/// Grid of `ceil(n / per_block)` blocks (at least one).
pub(crate) fn blocks(n: usize, per_block: usize) -> u32 {
    n.div_ceil(per_block).max(1) as u32
}
