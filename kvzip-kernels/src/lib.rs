//! Compute backends for kvzip-rs, behind one device interface.
//!
//! - [`Device`]: the CPU or one CUDA GPU, with every op an engine needs ([`device`]): tensors
//!   and views ([`Tensor`], [`View`], [`ViewMut`]), norms, projections, RoPE, activations,
//!   attention over the per-head variable-length KV layout ([`KvView`]), the KVzip score,
//!   cache appends and row gathers ([`GatherPlan`]), sampling and memory. Engines are written
//!   once against it. Without the `cuda` feature [`Device::cuda`] returns
//!   [`KernelError::NoCuda`]; callers need no `cfg`.
//! - [`host`]: the host implementation of every op (f32, row-major contiguous slices): the fast
//!   paths of [`cpu`] (rayon + the `gemm` crate's SIMD GEMM, feature `cpu-fast`, on by
//!   default) or, without that feature, the plain loops of [`reference`].
//! - [`reference`]: single-threaded loops with the same signatures as [`cpu`]; the oracle the
//!   fast paths and the CUDA kernels are tested against.
//! - `cuda` (feature `cuda`): the CUDA backend (hand-written kernels, cuBLAS GEMMs).
//! - [`recon`]: the KVzip reconstruction score op on host memory; [`colstats`]: the causal
//!   softmax column statistics it (and the H2O / SnapKV baselines) is built on.
//! - [`rope`]: RoPE parameter math (inverse frequencies, attention factor) matching HF.
//! - [`sampling`]: argmax, a seeded RNG and temperature / top-k / top-p sampling.
//!
//! Shape errors are reported as [`KernelError::Shape`] naming the offending argument; no op
//! panics on bad sizes.

pub mod colstats;
#[cfg(feature = "cpu-fast")]
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod device;
pub mod error;
mod kv;
pub mod pieces;
pub mod quant;
pub mod recon;
pub mod reference;
pub mod rope;
pub mod sampling;
mod validate;

pub use device::{
    greedy_rows, Activation, AttentionPlan, AttentionShape, DType, Device, GatherPlan, HostData,
    KvLayoutMirror, KvPiece, KvPieces, KvView, LinearStore, PreNorm, ScoreChunkShape, Tensor,
    TokenSampler, View, ViewMut, Weight,
};
pub use error::KernelError;
pub use half::bf16;
pub use kv::KvSegments;

/// Result type of every fallible kernel.
pub type Result<T> = std::result::Result<T, KernelError>;

/// The host implementation of every op: [`cpu`] with the `cpu-fast` feature (default),
/// [`reference`] without it. Same signatures either way.
pub mod host {
    #[cfg(feature = "cpu-fast")]
    use crate::cpu as imp;
    #[cfg(not(feature = "cpu-fast"))]
    use crate::reference as imp;

    pub use imp::{
        act_mul_rows, add_assign, attention, attention_pieces, column_stats, dequantize_matrix,
        embedding, embedding_bf16, embedding_quant, gelu_tanh_mul, linear, linear_bf16,
        linear_quant, matmul, max_value, rms_norm, rope_inplace, silu_mul, softcap_inplace,
        softmax_rows, sum_exp_shifted,
    };
}
