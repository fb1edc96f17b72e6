//! Fused KVzip reconstruction score of one chunk (KVZIP-SPEC §1.2), `csrc/score.cu`.
//!
//! Same function as `kvzip_score::score_chunk_reference`: per KV head the key set is
//! `[system rows 0..n_sys | the chunk's rows | the scoring input's own last n_in rows (causal)]`,
//! logits `q·k·scale`, softmax in f32, and the score of a chunk key is the max of its probability
//! over the group's query heads and all `n_in` input rows. Two launches, nothing of size
//! rows × keys materialised: pass 1 writes each query row's log-sum-exp, pass 2 recomputes the
//! chunk logits and takes the column max of `exp(logit − lse)`. Both run on tensor cores
//! (`mma.sync` m16n8k16 bf16, f32 accumulation).

use cudarc::driver::LaunchConfig;

use super::params::KvzScoreParams;
use super::{bf16, check_len, dptr, dptr_mut, CudaBackend, CudaError, CudaResult};
use super::{DevicePtr, DevicePtrMut};

/// Warps per CTA of both passes (must match `SC_WARPS` in `score.cu`).
const WARPS: usize = 8;
/// Query rows per pass-1 CTA / chunk keys per pass-2 CTA.
const PER_CTA: usize = WARPS * 16;
/// Keys (pass 1) or query rows (pass 2) per shared-memory tile.
const TILE: usize = 64;

pub use crate::device::ScoreChunkShape;

impl CudaBackend {
    /// KVzip score of one chunk for every KV head of a layer (two launches, no sync).
    ///
    /// * `q`: `[n_in, n_kv_heads * group, head_dim]` bf16, the rotated queries of the scoring input.
    /// * `k`: the layer's key rows `[rows, head_dim]` bf16; KV head `h` owns rows
    ///   `offsets[h] .. offsets[h] + lens[h]` (device `i64` / `i32`, `n_kv_heads` each), which
    ///   must satisfy [`ScoreChunkShape::check_segments`] (the unpruned cache after appending the
    ///   scoring input).
    /// * `row_lse`: scratch of [`ScoreChunkShape::lse_len`] f32 (overwritten).
    /// * `scores`: `[n_kv_heads, score_stride]` f32 indexed by context position;
    ///   `scores[h * score_stride + chunk_start - n_sys + c]` becomes the max of its previous
    ///   value and the chunk key's score. Zero it once before scoring the first chunk (any
    ///   negative value is overwritten too).
    #[allow(clippy::too_many_arguments)]
    pub fn score_chunk(
        &self,
        q: &impl DevicePtr<bf16>,
        k: &impl DevicePtr<bf16>,
        offsets: &impl DevicePtr<i64>,
        lens: &impl DevicePtr<i32>,
        shape: &ScoreChunkShape,
        row_lse: &mut impl DevicePtrMut<f32>,
        scores: &mut impl DevicePtrMut<f32>,
    ) -> CudaResult<()> {
        shape
            .validate()
            .map_err(|e| CudaError::Shape(e.to_string()))?;
        if !matches!(shape.head_dim, 64 | 128 | 256) {
            return Err(CudaError::Shape(format!(
                "score: head_dim {} unsupported on CUDA (64, 128 or 256)",
                shape.head_dim
            )));
        }
        let too_big = [
            shape.rows_per_head(),
            shape.chunk_start + shape.chunk_len + shape.n_in,
        ]
        .iter()
        .any(|&v| v > i32::MAX as usize / 2);
        if too_big {
            return Err(CudaError::Shape("score: row counts exceed i32".into()));
        }
        let s = shape;
        let d = s.head_dim;
        check_len("score q", q.len(), s.n_in * s.n_kv_heads * s.group * d)?;
        check_len(
            "score k",
            k.len(),
            (s.chunk_start + s.chunk_len + s.n_in) * d,
        )?;
        check_len("score offsets", offsets.len(), s.n_kv_heads)?;
        check_len("score lens", lens.len(), s.n_kv_heads)?;
        check_len("score row_lse", row_lse.len(), s.lse_len())?;
        check_len("score scores", scores.len(), s.n_kv_heads * s.score_stride)?;
        if s.chunk_len == 0 || s.n_kv_heads == 0 {
            return Ok(());
        }
        let st = self.stream();
        let p = KvzScoreParams {
            q: dptr(q, st) as _,
            k: dptr(k, st) as _,
            offsets: dptr(offsets, st) as _,
            lens: dptr(lens, st) as _,
            row_lse: dptr_mut(row_lse, st) as _,
            scores: dptr_mut(scores, st) as _,
            score_stride: s.score_stride as i64,
            n_in: s.n_in as i32,
            n_kv_heads: s.n_kv_heads as i32,
            group: s.group as i32,
            head_dim: d as i32,
            n_sys: s.n_sys as i32,
            chunk_start: s.chunk_start as i32,
            chunk_len: s.chunk_len as i32,
            scale: s.scale,
        };
        let rows = s.rows_per_head();
        let tile_bytes = 2 * TILE * (d + 8) * std::mem::size_of::<bf16>();
        let lse_cfg = LaunchConfig {
            grid_dim: (rows.div_ceil(PER_CTA) as u32, s.n_kv_heads as u32, 1),
            block_dim: ((WARPS * 32) as u32, 1, 1),
            shared_mem_bytes: tile_bytes as u32,
        };
        // Pass 2: enough row splits for ~4 CTAs per SM, at most one per 64-row tile.
        let key_blocks = s.chunk_len.div_ceil(PER_CTA);
        let row_tiles = rows.div_ceil(TILE);
        let splits = (4 * self.n_sms)
            .div_ceil(key_blocks * s.n_kv_heads)
            .clamp(1, row_tiles);
        let max_cfg = LaunchConfig {
            grid_dim: (key_blocks as u32, splits as u32, s.n_kv_heads as u32),
            block_dim: ((WARPS * 32) as u32, 1, 1),
            shared_mem_bytes: (tile_bytes + 2 * TILE * 4) as u32,
        };
        // SAFETY: buffer lengths checked above; the head segments are the caller's contract
        // (documented, checkable with `ScoreChunkShape::check_segments`).
        unsafe {
            self.launch(&format!("kvz_score_lse_d{d}"), lse_cfg, &p)?;
            self.launch(&format!("kvz_score_max_d{d}"), max_cfg, &p)
        }
    }
}
