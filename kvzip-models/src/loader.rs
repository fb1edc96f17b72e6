//! Weights onto a device: from a memory-mapped checkpoint (converted per tensor, never through a
//! whole-model host copy) or seeded random values at the same shapes (benchmarks).

use std::cell::Cell;

use std::sync::Arc;

use kvzip_kernels::quant::{QuantMatrix, QuantPart};
use kvzip_kernels::{DType, Device, HostData, Tensor, Weight};

use crate::error::{ModelError, Result};
use crate::weights::Weights;

/// Where weight values come from.
pub enum WeightSource {
    /// A safetensors checkpoint (single or sharded).
    Checkpoint(Weights),
    /// Seeded random values (speed does not depend on weight values).
    Random {
        /// Seed of the first tensor; later tensors derive theirs from it.
        seed: u64,
    },
}

/// What a tensor is, for random initialisation ranges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Init {
    /// A projection or embedding matrix: uniform in `±1/sqrt(in_dim)`.
    Matrix,
    /// An RMSNorm weight: uniform in `[0.9, 1.1)`.
    Norm,
    /// A bias: uniform in `±0.02`.
    Bias,
}

/// How weight matrices are held in host memory (CPU device).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HostWeights {
    /// As the checkpoint stores them where the CPU kernels compute on that form directly:
    /// ggml-quantized rows stay quantized (memory-mapped, decoded inside the GEMV/GEMM) and bf16
    /// matrices stay bf16 (widened on the fly, exactly); anything else becomes f32.
    /// Products with quantized rows use 8-bit activations (as llama.cpp does) when
    /// `KVZIP_ACTIVATIONS=q8` (see [`q8_activations_from_env`]).
    #[default]
    AsStored,
    /// [`HostWeights::AsStored`] with every product on f32 activations whatever
    /// `KVZIP_ACTIVATIONS` says: equal to the F32 path up to summation order.
    AsStoredExact,
    /// Every matrix widened to f32 at load (the reference path the compact one is tested
    /// against; `KVZIP_HOST_WEIGHTS=f32`).
    F32,
    /// Every matrix rounded to bf16 at load and kept as bf16 (quantized ones dequantized first):
    /// what older imports stored, and the weights the real-model transformers fixtures were
    /// made from (`KVZIP_HOST_WEIGHTS=bf16`).
    Bf16,
}

impl HostWeights {
    /// `KVZIP_HOST_WEIGHTS=f32` selects [`HostWeights::F32`], `bf16` [`HostWeights::Bf16`];
    /// unset or anything else [`HostWeights::AsStored`].
    pub fn from_env() -> Self {
        match std::env::var("KVZIP_HOST_WEIGHTS").as_deref() {
            Ok("f32") => HostWeights::F32,
            Ok("bf16") => HostWeights::Bf16,
            _ => HostWeights::AsStored,
        }
    }
}

/// `KVZIP_ACTIVATIONS=q8`: products with ggml-quantized weights run on activations quantized
/// to 8 bits per 32-element block, as llama.cpp's do (decode GEMVs use integer dot products;
/// prefill GEMMs get the same rounded activations, so a row's result does not depend on how
/// many rows share the product); faster decode, not bit-comparable with the f32 path. Unset or
/// anything else: f32 activations.
pub fn q8_activations_from_env() -> bool {
    std::env::var("KVZIP_ACTIVATIONS").as_deref() == Ok("q8")
}

/// Loads named tensors of a [`WeightSource`] into tensors of a device's compute type.
pub struct WeightLoader<'a> {
    device: &'a Device,
    source: &'a WeightSource,
    seed: Cell<u64>,
    host_weights: HostWeights,
}

impl<'a> WeightLoader<'a> {
    /// A loader onto `device`.
    pub fn new(device: &'a Device, source: &'a WeightSource) -> Self {
        let seed = match source {
            WeightSource::Random { seed } => *seed,
            WeightSource::Checkpoint(_) => 0,
        };
        Self {
            device,
            source,
            seed: Cell::new(seed),
            host_weights: HostWeights::default(),
        }
    }

    /// The same loader holding host weight matrices as `host_weights` says (CPU only; CUDA
    /// always computes on bf16).
    pub fn with_host_weights(mut self, host_weights: HostWeights) -> Self {
        self.host_weights = host_weights;
        self
    }

    /// Element type the tensors `parts` get on the device: the device's compute type, except
    /// that on the host bf16-stored matrices stay bf16 under [`HostWeights::AsStored`].
    fn dtype_for(&self, parts: &[(String, Vec<usize>)], init: Init) -> DType {
        let float = self.device.float_dtype();
        if self.device.is_cuda() || init != Init::Matrix {
            return float;
        }
        match self.host_weights {
            HostWeights::F32 => return float,
            HostWeights::Bf16 => return DType::Bf16,
            HostWeights::AsStored | HostWeights::AsStoredExact => {}
        }
        match self.source {
            WeightSource::Checkpoint(w) if parts.iter().all(|(n, _)| w.is_bf16(n)) => DType::Bf16,
            _ => float,
        }
    }

    /// The target device.
    pub fn device(&self) -> &Device {
        self.device
    }

    /// The checkpoint, if the source is one.
    pub fn checkpoint(&self) -> Option<&Weights> {
        match self.source {
            WeightSource::Checkpoint(w) => Some(w),
            WeightSource::Random { .. } => None,
        }
    }

    /// Whether the checkpoint has tensor `name` (random sources: `random_default`).
    pub fn contains(&self, name: &str, random_default: bool) -> bool {
        match self.source {
            WeightSource::Checkpoint(w) => w.contains(name),
            WeightSource::Random { .. } => random_default,
        }
    }

    fn next_seed(&self) -> u64 {
        let s = self.seed.get();
        self.seed.set(s.wrapping_add(0x9E37_79B9_7F4A_7C15));
        s
    }

    fn fill_random(&self, t: &mut Tensor, cols: usize, init: Init) -> Result<()> {
        let (lo, hi) = match init {
            Init::Matrix => {
                let a = 1.0 / (cols.max(1) as f32).sqrt();
                (-a, a)
            }
            Init::Norm => (0.9, 1.1),
            Init::Bias => (-0.02, 0.02),
        };
        let seed = self.next_seed();
        self.device.fill_uniform(&mut t.view_mut(), seed, lo, hi)?;
        Ok(())
    }

    /// The weight matrices `parts` (each `[rows_i, cols]`) stacked row-wise: kept quantized as
    /// stored (borrowed from the memory map, no copy) when the device is the CPU, host weights
    /// are [`HostWeights::AsStored`] and every part is quantized; otherwise a dense tensor as
    /// [`stacked`](Self::stacked) makes it.
    pub fn matrix(&self, parts: &[(String, Vec<usize>)]) -> Result<Weight> {
        let as_stored = matches!(
            self.host_weights,
            HostWeights::AsStored | HostWeights::AsStoredExact
        );
        if let (WeightSource::Checkpoint(w), false, true) =
            (self.source, self.device.is_cuda(), as_stored)
        {
            let quantized = !parts.is_empty()
                && parts
                    .iter()
                    .all(|(n, s)| s.len() == 2 && w.quant_type(n).is_some());
            let cols = parts.first().map_or(0, |(_, s)| s[s.len() - 1]);
            if quantized && parts.iter().all(|(_, s)| s[1] == cols) {
                let mut qparts = Vec::with_capacity(parts.len());
                for (name, shape) in parts {
                    let (ty, data) = w.quant_rows(name, shape)?;
                    qparts.push(QuantPart {
                        ty,
                        rows: shape[0],
                        data,
                    });
                }
                let label = parts.first().map_or("", |(n, _)| n.as_str());
                let m = QuantMatrix::new(cols, qparts, label).map_err(|e| ModelError::Weights {
                    path: Default::default(),
                    tensor: label.to_owned(),
                    msg: e.to_string(),
                })?;
                return Ok(Weight::Quant(Arc::new(m.with_q8_activations(
                    self.host_weights == HostWeights::AsStored && q8_activations_from_env(),
                ))));
            }
        }
        Ok(Weight::Dense(self.stacked(parts, Init::Matrix)?))
    }

    /// Weight matrix `name` of `shape` `[rows, cols]` (see [`matrix`](Self::matrix)).
    pub fn weight(&self, name: &str, shape: &[usize]) -> Result<Weight> {
        self.matrix(&[(name.to_owned(), shape.to_vec())])
    }

    /// Tensor `name` of `shape` (`[rows, cols]` or `[n]`) on the device.
    pub fn tensor(&self, name: &str, shape: &[usize], init: Init) -> Result<Tensor> {
        self.stacked(&[(name.to_owned(), shape.to_vec())], init)
    }

    /// The tensors `parts` (each `[rows_i, cols]`, or `[n_i]` for vectors) stacked row-wise into
    /// one device tensor, in order: one GEMM then computes all of them (q/k/v, gate/up).
    pub fn stacked(&self, parts: &[(String, Vec<usize>)], init: Init) -> Result<Tensor> {
        let numel = |s: &[usize]| s.iter().product::<usize>();
        let total: usize = parts.iter().map(|(_, s)| numel(s)).sum();
        let cols = parts
            .first()
            .and_then(|(_, s)| s.last().copied())
            .unwrap_or(1);
        let dtype = self.dtype_for(parts, init);
        let mut out = self.device.alloc(dtype, total)?;
        match self.source {
            WeightSource::Random { .. } => self.fill_random(&mut out, cols, init)?,
            WeightSource::Checkpoint(w) => {
                let mut at = 0;
                for (name, shape) in parts {
                    let n = numel(shape);
                    let mut dst = out.slice_mut(at..at + n)?;
                    if !self.device.is_cuda() && dtype == DType::Bf16 {
                        // Host bf16 kept as stored: copied bit for bit into place.
                        w.read_bf16_into(name, shape, dst.host_bf16("weights")?)?;
                    } else if !self.device.is_cuda() {
                        // Host f32: converted from the mapped bytes straight into place.
                        w.read_f32_into(name, shape, dst.host_f32("weights")?)?;
                    } else {
                        // Device: one bf16 staging copy of this tensor, uploaded.
                        let mut staging = vec![kvzip_kernels::bf16::ZERO; n];
                        w.read_bf16_into(name, shape, &mut staging)?;
                        self.device
                            .write_host(&mut dst, &HostData::Bf16(staging))
                            .map_err(|e| ModelError::Weights {
                                path: Default::default(),
                                tensor: name.clone(),
                                msg: e.to_string(),
                            })?;
                    }
                    w.release(name);
                    at += n;
                }
            }
        }
        Ok(out)
    }

    /// A small f32 tensor with the given host values (RoPE frequencies) on the device.
    pub fn f32_values(&self, values: &[f32]) -> Result<Tensor> {
        f32_tensor(self.device, values)
    }
}

/// `values` as an f32 tensor on `device` (f32 on both devices: RoPE frequencies, not weights).
pub fn f32_tensor(device: &Device, values: &[f32]) -> Result<Tensor> {
    let mut t = device.alloc(DType::F32, values.len())?;
    device.write_f32(&mut t.view_mut(), values)?;
    Ok(t)
}
