//! Compute backends for kvzip-rs.
//!
//! All tensors are row-major, contiguous `f32` slices; every op documents its shapes as `[dims]`.
//!
//! - [`cpu`]: fast paths (rayon parallelism plus the `gemm` crate's SIMD GEMM).
//! - [`reference`]: plain single-threaded loops with the same signatures as [`cpu`]; the oracle
//!   that the fast paths (and later the CUDA kernels behind the `cuda` feature) are tested against.
//! - [`rope`]: RoPE parameter math (inverse frequencies, attention factor) matching HF transformers.
//! - [`sampling`]: argmax, a seeded RNG and temperature / top-k / top-p sampling.
//!
//! Shape errors are reported as [`KernelError::Shape`] naming the offending argument; no op panics
//! on bad sizes.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod error;
mod kv;
pub mod reference;
pub mod rope;
pub mod sampling;
mod validate;

pub use error::KernelError;
pub use kv::KvSegments;

/// Result type of every fallible kernel.
pub type Result<T> = std::result::Result<T, KernelError>;
