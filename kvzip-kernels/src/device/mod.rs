//! One device interface over every backend.
//!
//! [`Device`] is the CPU or one CUDA GPU. Every op an engine needs (norms, projections, RoPE,
//! activations, attention over the per-head variable-length cache, the KVzip score, cache
//! appends and row gathers, sampling, memory) is a method of `Device` taking [`View`] /
//! [`ViewMut`] arguments; the method checks that its arguments live on that device and
//! dispatches to the host code ([`crate::host`]: f32) or the CUDA kernels (`crate::cuda`:
//! bf16 storage, f32 accumulation). Engines are written once against this interface.
//!
//! Without the `cuda` feature the CUDA variant does not exist: [`Device::cuda`] returns
//! [`KernelError::NoCuda`] ("built without CUDA"), so callers need no `cfg`.

mod kv;
mod ops;
mod sampler;
mod scored;
mod tensor;
mod weight;

pub use kv::{AttentionPlan, GatherPlan, KvLayoutMirror, KvPiece, KvPieces, KvView};
pub use ops::{Activation, AttentionShape, ScoreChunkShape};
pub use sampler::{greedy_rows, TokenSampler};
pub use tensor::{DType, Tensor, View, ViewMut};
pub use weight::{LinearStore, PreNorm, Weight};

use std::sync::Arc;

use half::bf16;

use crate::{KernelError, Result};

#[cfg(feature = "cuda")]
use crate::cuda::CudaBackend;

/// Where tensors live and ops run.
#[derive(Clone)]
#[non_exhaustive]
pub enum Device {
    /// Host memory and CPU threads (f32 compute).
    Cpu,
    /// One CUDA GPU (bf16 storage, f32 accumulation; feature `cuda`).
    #[cfg(feature = "cuda")]
    Cuda(Arc<CudaBackend>),
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

impl PartialEq for Device {
    /// Same backend instance (two `Device::cuda(0)` calls give two different devices).
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Device::Cpu, Device::Cpu) => true,
            #[cfg(feature = "cuda")]
            (Device::Cuda(a), Device::Cuda(b)) => Arc::ptr_eq(a, b),
            #[cfg(feature = "cuda")]
            _ => false,
        }
    }
}

/// Converts a CUDA backend error into a kernel error (kept as text so that `KernelError`
/// stays `Clone` and comparable).
#[cfg(feature = "cuda")]
pub(crate) fn cuda_err(e: crate::cuda::CudaError) -> KernelError {
    KernelError::Cuda(e.to_string())
}

#[cfg(feature = "cuda")]
pub(crate) fn drv(e: cudarc::driver::DriverError) -> KernelError {
    KernelError::Cuda(format!("CUDA driver: {e}"))
}

impl Device {
    /// Opens CUDA GPU `ordinal` (loads every kernel, creates the cuBLAS handle).
    ///
    /// Errors: [`KernelError::NoCuda`] when this build has no `cuda` feature;
    /// [`KernelError::Cuda`] when there is no driver, no such device, or no kernel image for it.
    pub fn cuda(ordinal: usize) -> Result<Device> {
        #[cfg(feature = "cuda")]
        {
            Ok(Device::Cuda(Arc::new(
                CudaBackend::new(ordinal).map_err(cuda_err)?,
            )))
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (ordinal, Arc::new(()));
            Err(KernelError::NoCuda)
        }
    }

    /// Parses `cpu`, `cuda` (GPU 0) or `cuda:N` and opens that device.
    pub fn parse(spec: &str) -> Result<Device> {
        match spec {
            "cpu" => Ok(Device::Cpu),
            "cuda" | "gpu" => Device::cuda(0),
            other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Device::cuda(n),
                _ => Err(KernelError::InvalidArgument(format!(
                    "device {other:?}: expected cpu, cuda or cuda:N"
                ))),
            },
        }
    }

    /// `cpu` or `cuda:N`-like name.
    pub fn name(&self) -> String {
        match self {
            Device::Cpu => "cpu".into(),
            #[cfg(feature = "cuda")]
            Device::Cuda(g) => format!(
                "cuda (sm_{}{})",
                g.compute_capability.0, g.compute_capability.1
            ),
        }
    }

    /// Bytes of memory available for new allocations: `MemAvailable` of `/proc/meminfo` on the
    /// CPU (`None` where the OS has no such file), free device memory on CUDA.
    pub fn memory_available(&self) -> Option<u64> {
        match self {
            Device::Cpu => {
                let info = std::fs::read_to_string("/proc/meminfo").ok()?;
                let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
                let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
                Some(kb * 1024)
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(g) => g.memory_info().ok().map(|(free, _)| free),
        }
    }

    /// Whether this is a CUDA device.
    pub fn is_cuda(&self) -> bool {
        !matches!(self, Device::Cpu)
    }

    /// The element type activations, weights and the KV cache use on this device: f32 on the
    /// CPU, bf16 on CUDA.
    pub fn float_dtype(&self) -> DType {
        match self {
            Device::Cpu => DType::F32,
            #[cfg(feature = "cuda")]
            Device::Cuda(_) => DType::Bf16,
        }
    }

    /// The CUDA backend (feature `cuda`), for kernel-level code and benchmarks.
    #[cfg(feature = "cuda")]
    pub fn cuda_backend(&self) -> Option<&Arc<CudaBackend>> {
        match self {
            Device::Cuda(g) => Some(g),
            Device::Cpu => None,
        }
    }

    /// Waits for all queued work (a no-op on the CPU); surfaces asynchronous CUDA faults.
    pub fn synchronize(&self) -> Result<()> {
        match self {
            Device::Cpu => Ok(()),
            #[cfg(feature = "cuda")]
            Device::Cuda(g) => g.synchronize().map_err(cuda_err),
        }
    }

    /// Checks that `t` lives on this device.
    pub fn check_on(&self, what: &str, cuda: bool) -> Result<()> {
        if cuda != self.is_cuda() {
            return Err(KernelError::Device(format!(
                "`{what}` lives on {}, the op runs on {}",
                if cuda { "a CUDA GPU" } else { "the host" },
                self.name()
            )));
        }
        Ok(())
    }

    /// A tensor of `n` elements of `dtype` whose contents are unspecified until written (zeros
    /// on the host).
    pub fn alloc(&self, dtype: DType, n: usize) -> Result<Tensor> {
        self.new_tensor(dtype, n, false)
    }

    /// A zero-filled tensor of `n` elements of `dtype`.
    pub fn zeros(&self, dtype: DType, n: usize) -> Result<Tensor> {
        self.new_tensor(dtype, n, true)
    }

    fn new_tensor(&self, dtype: DType, n: usize, zeroed: bool) -> Result<Tensor> {
        match self {
            Device::Cpu => {
                let _ = zeroed;
                Ok(host_zeros(dtype, n))
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(g) => {
                use tensor::Repr;
                // cudarc rejects zero-length allocations; keep one element.
                let m = n.max(1);
                macro_rules! buf {
                    ($t:ty) => {
                        if zeroed {
                            g.zeros::<$t>(m)
                        } else {
                            g.alloc::<$t>(m)
                        }
                        .map_err(cuda_err)?
                    };
                }
                let repr = match dtype {
                    DType::F32 => Repr::CudaF32(buf!(f32)),
                    DType::Bf16 => Repr::CudaBf16(buf!(bf16)),
                    DType::U32 => Repr::CudaU32(buf!(u32)),
                    DType::I32 => Repr::CudaI32(buf!(i32)),
                };
                Ok(Tensor { repr, len: n })
            }
        }
    }

    /// Copies host f32 values into a new tensor of this device's [`float_dtype`](Self::float_dtype)
    /// (rounded to bf16 on CUDA).
    pub fn upload_f32(&self, host: &[f32]) -> Result<Tensor> {
        let mut t = self.alloc(self.float_dtype(), host.len())?;
        self.write_f32(&mut t.view_mut(), host)?;
        Ok(t)
    }

    /// Copies host bf16 values into a new tensor of this device's float type (exact on CUDA,
    /// widened to f32 on the CPU).
    pub fn upload_bf16(&self, host: &[bf16]) -> Result<Tensor> {
        match self {
            Device::Cpu => Ok(Tensor::from_f32(host.iter().map(|x| x.to_f32()).collect())),
            #[cfg(feature = "cuda")]
            Device::Cuda(g) => {
                let mut t = self.alloc(DType::Bf16, host.len())?;
                if !host.is_empty() {
                    let mut v = t.view_mut();
                    let dst = v.cuda_bf16("upload")?;
                    g.stream().memcpy_htod(host, dst).map_err(drv)?;
                }
                Ok(t)
            }
        }
    }

    /// Writes host data of either float type into a float view of this device (converted to
    /// the view's element type: bf16 rounded, f32 widened).
    pub fn write_host(&self, dst: &mut ViewMut<'_>, src: &HostData) -> Result<()> {
        match (src, dst.dtype()) {
            (HostData::Bf16(v), DType::Bf16) => {
                self.check_on("write destination", dst.is_cuda())?;
                if dst.len() != v.len() {
                    return Err(KernelError::Shape(format!(
                        "write: {} values into a view of {}",
                        v.len(),
                        dst.len()
                    )));
                }
                match self {
                    Device::Cpu => dst.host_bf16("write")?.copy_from_slice(v),
                    #[cfg(feature = "cuda")]
                    Device::Cuda(g) => {
                        if !v.is_empty() {
                            g.stream()
                                .memcpy_htod(v.as_slice(), dst.cuda_bf16("write")?)
                                .map_err(drv)?;
                        }
                    }
                }
                Ok(())
            }
            (HostData::Bf16(v), _) => {
                let wide: Vec<f32> = v.iter().map(|x| x.to_f32()).collect();
                self.write_f32(dst, &wide)
            }
            (HostData::F32(v), _) => self.write_f32(dst, v),
        }
    }

    /// Copies host u32 values (token ids) into a new u32 tensor.
    pub fn upload_u32(&self, host: &[u32]) -> Result<Tensor> {
        let mut t = self.alloc(DType::U32, host.len())?;
        self.write_u32(&mut t.view_mut(), host)?;
        Ok(t)
    }

    /// Copies host i32 values (positions) into a new i32 tensor.
    pub fn upload_i32(&self, host: &[i32]) -> Result<Tensor> {
        match self {
            Device::Cpu => Ok(Tensor::from_i32(host.to_vec())),
            #[cfg(feature = "cuda")]
            Device::Cuda(g) => {
                let mut t = self.alloc(DType::I32, host.len())?;
                if !host.is_empty() {
                    self.write_i32(&mut t.view_mut(), host)?;
                    let _ = g;
                }
                Ok(t)
            }
        }
    }

    /// Writes host f32 values into `dst` (a float view of this device; `host.len()` must equal
    /// `dst.len()`; rounded to bf16 for bf16 views).
    pub fn write_f32(&self, dst: &mut ViewMut<'_>, host: &[f32]) -> Result<()> {
        self.check_on("write destination", dst.is_cuda())?;
        if dst.len() != host.len() {
            return Err(KernelError::Shape(format!(
                "write: {} values into a view of {}",
                host.len(),
                dst.len()
            )));
        }
        match self {
            Device::Cpu => match dst.dtype() {
                DType::F32 => dst.host_f32("write")?.copy_from_slice(host),
                DType::Bf16 => dst
                    .host_bf16("write")?
                    .iter_mut()
                    .zip(host)
                    .for_each(|(d, &s)| *d = bf16::from_f32(s)),
                d => return Err(tensor::wrong("write", "a float tensor", d, false)),
            },
            #[cfg(feature = "cuda")]
            Device::Cuda(g) => {
                if host.is_empty() {
                    return Ok(());
                }
                match dst.dtype() {
                    DType::F32 => g
                        .stream()
                        .memcpy_htod(host, dst.cuda_f32("write")?)
                        .map_err(drv)?,
                    DType::Bf16 => {
                        let v: Vec<bf16> = host.iter().map(|&x| bf16::from_f32(x)).collect();
                        g.stream()
                            .memcpy_htod(&v, dst.cuda_bf16("write")?)
                            .map_err(drv)?
                    }
                    d => return Err(tensor::wrong("write", "a float tensor", d, true)),
                }
            }
        }
        Ok(())
    }

    /// Writes host u32 values into a u32 view of this device.
    pub fn write_u32(&self, dst: &mut ViewMut<'_>, host: &[u32]) -> Result<()> {
        self.check_on("write destination", dst.is_cuda())?;
        if dst.len() != host.len() {
            return Err(KernelError::Shape(format!(
                "write: {} ids into a view of {}",
                host.len(),
                dst.len()
            )));
        }
        match self {
            Device::Cpu => dst.host_u32("write")?.copy_from_slice(host),
            #[cfg(feature = "cuda")]
            Device::Cuda(g) => {
                if !host.is_empty() {
                    g.stream()
                        .memcpy_htod(host, dst.cuda_u32("write")?)
                        .map_err(drv)?;
                }
            }
        }
        Ok(())
    }

    /// Writes host i32 values into an i32 view of this device.
    pub fn write_i32(&self, dst: &mut ViewMut<'_>, host: &[i32]) -> Result<()> {
        self.check_on("write destination", dst.is_cuda())?;
        if dst.len() != host.len() {
            return Err(KernelError::Shape(format!(
                "write: {} positions into a view of {}",
                host.len(),
                dst.len()
            )));
        }
        match self {
            Device::Cpu => match &mut dst.repr {
                tensor::ViewMutRepr::I32(v) => v.copy_from_slice(host),
                _ => return Err(tensor::wrong("write", "an i32 tensor", dst.dtype(), false)),
            },
            #[cfg(feature = "cuda")]
            Device::Cuda(g) => {
                if host.is_empty() {
                    return Ok(());
                }
                let dtype = dst.dtype();
                match &mut dst.repr {
                    tensor::ViewMutRepr::CudaI32(v) => {
                        g.stream().memcpy_htod(host, v).map_err(drv)?
                    }
                    _ => return Err(tensor::wrong("write", "an i32 tensor", dtype, true)),
                }
            }
        }
        Ok(())
    }

    /// Copies a float view to the host as f32 (widening bf16); synchronises on CUDA.
    pub fn to_host_f32(&self, src: &View<'_>) -> Result<Vec<f32>> {
        self.check_on("download source", src.is_cuda())?;
        match self {
            Device::Cpu => match src.dtype() {
                DType::F32 => Ok(src.host_f32("download")?.to_vec()),
                DType::Bf16 => Ok(src
                    .host_bf16("download")?
                    .iter()
                    .map(|x| x.to_f32())
                    .collect()),
                d => Err(tensor::wrong("download", "a float tensor", d, false)),
            },
            #[cfg(feature = "cuda")]
            Device::Cuda(g) => {
                if src.is_empty() {
                    return Ok(Vec::new());
                }
                match src.dtype() {
                    DType::F32 => g.download(&src.cuda_f32("download")?).map_err(cuda_err),
                    DType::Bf16 => g
                        .download_f32(&src.cuda_bf16("download")?)
                        .map_err(cuda_err),
                    d => Err(tensor::wrong("download", "a float tensor", d, true)),
                }
            }
        }
    }

    /// A float view as host f32 without copying when it already is host f32 (CPU), downloaded
    /// otherwise.
    pub fn host_f32_cow<'a>(&self, src: &View<'a>) -> Result<std::borrow::Cow<'a, [f32]>> {
        if src.dtype() == DType::F32 && !src.is_cuda() {
            return Ok(std::borrow::Cow::Borrowed(src.host_f32("source")?));
        }
        Ok(std::borrow::Cow::Owned(self.to_host_f32(src)?))
    }

    /// Copies a float view to the host in its own element type (bf16 stays bf16): the bytes
    /// a cache file stores.
    pub fn to_host_raw(&self, src: &View<'_>) -> Result<HostData> {
        self.check_on("download source", src.is_cuda())?;
        match src.dtype() {
            DType::Bf16 => match self {
                Device::Cpu => Ok(HostData::Bf16(src.host_bf16("download")?.to_vec())),
                #[cfg(feature = "cuda")]
                Device::Cuda(g) => {
                    if src.is_empty() {
                        return Ok(HostData::Bf16(Vec::new()));
                    }
                    Ok(HostData::Bf16(
                        g.download(&src.cuda_bf16("download")?).map_err(cuda_err)?,
                    ))
                }
            },
            _ => Ok(HostData::F32(self.to_host_f32(src)?)),
        }
    }

    /// Downloads a u32 view (synchronises on CUDA).
    pub fn to_host_u32(&self, src: &View<'_>) -> Result<Vec<u32>> {
        self.check_on("download source", src.is_cuda())?;
        match self {
            Device::Cpu => Ok(src.host_u32("download")?.to_vec()),
            #[cfg(feature = "cuda")]
            Device::Cuda(g) => {
                if src.is_empty() {
                    return Ok(Vec::new());
                }
                g.download(&src.cuda_u32("download")?).map_err(cuda_err)
            }
        }
    }

    /// Copies `src` into `dst` (same device, same element type, same length).
    pub fn copy(&self, src: &View<'_>, dst: &mut ViewMut<'_>) -> Result<()> {
        self.check_on("copy source", src.is_cuda())?;
        self.check_on("copy destination", dst.is_cuda())?;
        if src.len() != dst.len() || src.dtype() != dst.dtype() {
            return Err(KernelError::Shape(format!(
                "copy: {} {} elements into {} {} elements",
                src.len(),
                src.dtype(),
                dst.len(),
                dst.dtype()
            )));
        }
        if src.is_empty() {
            return Ok(());
        }
        match self {
            Device::Cpu => match src.dtype() {
                DType::F32 => dst.host_f32("copy")?.copy_from_slice(src.host_f32("copy")?),
                DType::Bf16 => dst
                    .host_bf16("copy")?
                    .copy_from_slice(src.host_bf16("copy")?),
                DType::U32 => dst.host_u32("copy")?.copy_from_slice(src.host_u32("copy")?),
                DType::I32 => match &mut dst.repr {
                    tensor::ViewMutRepr::I32(d) => d.copy_from_slice(src.host_i32("copy")?),
                    _ => unreachable!("dtype checked above"),
                },
            },
            #[cfg(feature = "cuda")]
            Device::Cuda(g) => {
                let s = g.stream();
                match src.dtype() {
                    DType::F32 => s
                        .memcpy_dtod(&src.cuda_f32("copy")?, dst.cuda_f32("copy")?)
                        .map_err(drv)?,
                    DType::Bf16 => s
                        .memcpy_dtod(&src.cuda_bf16("copy")?, dst.cuda_bf16("copy")?)
                        .map_err(drv)?,
                    DType::U32 => s
                        .memcpy_dtod(&src.cuda_u32("copy")?, dst.cuda_u32("copy")?)
                        .map_err(drv)?,
                    DType::I32 => match &mut dst.repr {
                        tensor::ViewMutRepr::CudaI32(d) => {
                            s.memcpy_dtod(&src.cuda_i32("copy")?, d).map_err(drv)?
                        }
                        _ => unreachable!("dtype checked above"),
                    },
                }
            }
        }
        Ok(())
    }

    /// Fills a float view with seeded uniform values in `[lo, hi)` (benchmarks and random
    /// weights: speed does not depend on values, but zeros can run faster than real data).
    /// The values depend only on `seed` and the length, not on the device.
    pub fn fill_uniform(&self, dst: &mut ViewMut<'_>, seed: u64, lo: f32, hi: f32) -> Result<()> {
        self.check_on("fill destination", dst.is_cuda())?;
        let n = dst.len();
        match (self, dst.dtype()) {
            (Device::Cpu, DType::F32) => {
                let out = dst.host_f32("fill")?;
                uniform_blocks(n, seed, lo, hi, |at, block| {
                    out[at..at + block.len()]
                        .iter_mut()
                        .zip(block)
                        .for_each(|(o, b)| *o = b.to_f32())
                });
                Ok(())
            }
            (Device::Cpu, DType::Bf16) => {
                let out = dst.host_bf16("fill")?;
                uniform_blocks(n, seed, lo, hi, |at, block| {
                    out[at..at + block.len()].copy_from_slice(block)
                });
                Ok(())
            }
            #[cfg(feature = "cuda")]
            (Device::Cuda(g), DType::Bf16) => {
                // One random block uploaded, then tiled on the device (filling gigabytes of
                // benchmark KV from the host would dominate the run).
                const BLOCK: usize = 1 << 24;
                let b = BLOCK.min(n);
                if b == 0 {
                    return Ok(());
                }
                let mut block = Vec::with_capacity(b);
                uniform_blocks(b, seed, lo, hi, |_, x| block.extend_from_slice(x));
                let dev = g.upload(&block).map_err(cuda_err)?;
                let out = dst.cuda_bf16("fill")?;
                let mut at = 0;
                while at < n {
                    let m = b.min(n - at);
                    g.stream()
                        .memcpy_dtod(&dev.slice(..m), &mut out.slice_mut(at..at + m))
                        .map_err(drv)?;
                    at += m;
                }
                Ok(())
            }
            (_, d) => Err(tensor::wrong("fill", "a float tensor", d, self.is_cuda())),
        }
    }
}

/// Host data in the element type it was stored with (see [`Device::to_host_raw`]).
#[derive(Debug, Clone, PartialEq)]
pub enum HostData {
    /// 32-bit floats.
    F32(Vec<f32>),
    /// bfloat16 values.
    Bf16(Vec<bf16>),
}

impl HostData {
    /// Number of values.
    pub fn len(&self) -> usize {
        match self {
            HostData::F32(v) => v.len(),
            HostData::Bf16(v) => v.len(),
        }
    }

    /// Whether there are no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The values as f32 (widening bf16).
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            HostData::F32(v) => v.clone(),
            HostData::Bf16(v) => v.iter().map(|x| x.to_f32()).collect(),
        }
    }

    /// A host view of the values.
    pub fn view(&self) -> View<'_> {
        match self {
            HostData::F32(v) => View::f32(v),
            HostData::Bf16(v) => View::bf16(v),
        }
    }
}

fn host_zeros(dtype: DType, n: usize) -> Tensor {
    match dtype {
        DType::F32 => Tensor::from_f32(vec![0.0; n]),
        DType::Bf16 => Tensor::from_bf16(vec![bf16::ZERO; n]),
        DType::U32 => Tensor::from_u32(vec![0; n]),
        DType::I32 => Tensor::from_i32(vec![0; n]),
    }
}

/// Seeded uniform bf16 values in `[lo, hi)` from a counter-based hash, produced in blocks of
/// 64 Ki values (in parallel with `cpu-fast`); `sink(offset, block)` receives each block in order.
pub(crate) fn uniform_blocks(
    n: usize,
    seed: u64,
    lo: f32,
    hi: f32,
    mut sink: impl FnMut(usize, &[bf16]),
) {
    const CHUNK: usize = 1 << 16;
    let gen = |c: usize, len: usize| -> Vec<bf16> {
        let mut z = seed ^ (c as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
        (0..len)
            .map(|_| {
                z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut y = z;
                y = (y ^ (y >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                y = (y ^ (y >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                y ^= y >> 31;
                let u = (y >> 40) as f32 / (1u64 << 24) as f32;
                bf16::from_f32(lo + (hi - lo) * u)
            })
            .collect()
    };
    let n_chunks = n.div_ceil(CHUNK);
    #[cfg(feature = "cpu-fast")]
    {
        use rayon::prelude::*;
        // Bounded batches keep the memory of pending blocks small.
        let batch = 64;
        let mut c0 = 0;
        while c0 < n_chunks {
            let c1 = (c0 + batch).min(n_chunks);
            let blocks: Vec<Vec<bf16>> = (c0..c1)
                .into_par_iter()
                .map(|c| gen(c, CHUNK.min(n - c * CHUNK)))
                .collect();
            for (i, b) in blocks.iter().enumerate() {
                sink((c0 + i) * CHUNK, b);
            }
            c0 = c1;
        }
    }
    #[cfg(not(feature = "cpu-fast"))]
    for c in 0..n_chunks {
        let b = gen(c, CHUNK.min(n - c * CHUNK));
        sink(c * CHUNK, &b);
    }
}
