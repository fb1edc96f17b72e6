//! Fast CPU backend: rayon parallelism over rows / heads plus the `gemm` crate's SIMD GEMM.
//!
//! Every op has the same signature and validation as its twin in [`crate::reference`].
//! Element-wise transcendental functions use a vectorisable polynomial `exp` (about 2 ulp),
//! so results match the reference to ~1e-6 relative, not bit for bit.

mod act;
mod attention;
mod bf16;
mod colstats;
#[cfg(target_arch = "x86_64")]
mod exp_avx;
mod gemm;
pub(crate) mod math;
mod norm;
mod pieces;
mod quant;
#[cfg(target_arch = "x86_64")]
mod quant_avx2;
mod rope;
pub(crate) mod simd;

pub use act::{act_mul_rows, add_assign, embedding, gelu_tanh_mul, silu_mul, softcap_inplace};
pub use attention::{
    attention, attention_scored, attention_tiled, AttentionArgs, AttentionTiling, ScoreTarget,
};
pub use bf16::{dot_bf16, dot_bf16_reference, embedding_bf16, linear_bf16};
pub use colstats::column_stats;
pub use gemm::{linear, matmul};
pub use math::{max_value, sum_exp_shifted};
pub use norm::{rms_norm, softmax_rows};
pub use pieces::attention_pieces;
pub use quant::{dequantize_matrix, embedding_quant, linear_quant};
pub use rope::rope_inplace;

/// Element count below which element-wise ops stay on the calling thread.
pub(crate) const PAR_MIN_ELEMS: usize = 1 << 15;
