//! Attention over per-KV-head segments on the GPU: flash-attention prefill
//! (`csrc/attention_prefill.cu`) and the split-K varlen decode with its plan/run split
//! (`csrc/attention_decode.cu`); both share the tensor-core core in `csrc/attention_core.cuh`.
//!
//! Semantics are exactly [`crate::cpu::attention`]: `q`, `out` are
//! `[q_len, n_kv_heads * group, head_dim]` bf16 (query head `h * group + g`); KV head `h` owns rows
//! `offsets[h] .. offsets[h] + lens[h]` of `k` and `v` (`[rows, head_dim]` bf16, `offsets` i64 and
//! `lens` i32 on the device); bottom-right causal alignment (query `t` sits at key index
//! `lens[h] - q_len + t`), optional sliding window, optional logit softcap, f32 softmax.
//!
//! Not checked on the host (device data): that `offsets[h] + lens[h]` rows fit in `k` / `v`, and,
//! for prefill, that `lens[h] >= q_len` (a query row that sees no key is written as zeros). The
//! decode plan checks `lens[h] >= q_len` on its host copy of the lengths; the device `lens` passed
//! to [`CudaBackend::attention_decode`] must equal the plan's.

use cudarc::driver::LaunchConfig;

pub use super::decode_plan::{DecodePlan, KeyPiece};
use super::decode_plan::{PiecesLayout, DECODE_TILE_KEYS};
use super::params::{KvzAttentionParams, KvzDecodeParams};
use super::{bf16, check_len, dptr, dptr_mut, CudaBackend, CudaError, CudaResult};
use super::{DevicePtr, DevicePtrMut};

/// Threads per CTA of every attention kernel (4 warps).
const THREADS: u32 = 128;
/// Packed query rows per prefill CTA for head dims 64 and 128 (4 warps x 2 groups of 16 rows).
const PREFILL_ROWS: usize = 128;
/// Packed query rows per prefill CTA for head dim 256 (4 warps x 16).
const PREFILL_ROWS_D256: usize = 64;
/// Largest `q_len` for which [`CudaBackend::attention`] picks the decode path.
pub const DECODE_MAX_Q_LEN: usize = 16;
pub use crate::device::AttentionShape;

fn shape_err(e: crate::KernelError) -> CudaError {
    CudaError::Shape(e.to_string())
}

/// The device-independent checks plus what the CUDA kernels support: head dims 64 / 128 / 256
/// and sizes within i32.
fn validate_for_cuda(shape: &AttentionShape) -> CudaResult<()> {
    shape.validate().map_err(shape_err)?;
    if !matches!(shape.head_dim, 64 | 128 | 256) {
        return Err(CudaError::Shape(format!(
            "attention head_dim {} is not supported on CUDA (64, 128 or 256)",
            shape.head_dim
        )));
    }
    to_i32(
        "q_len * n_kv_heads * group",
        shape.q_len * shape.n_kv_heads * shape.group,
    )?;
    to_i32("window", shape.window.unwrap_or(0))?;
    Ok(())
}

pub(super) fn to_i32(what: &str, v: usize) -> CudaResult<i32> {
    i32::try_from(v).map_err(|_| CudaError::Shape(format!("attention {what} = {v} exceeds i32")))
}

/// Dynamic shared memory of a CTA: Q `[rows][d]` + 2 stages of K and V `[tile][d]`, bf16
/// (mirrors `kvzattn::Cfg::SMEM`).
fn smem_bytes(rows: usize, tile_keys: usize, head_dim: usize) -> u32 {
    ((rows * head_dim + 4 * tile_keys * head_dim) * 2) as u32
}

impl CudaBackend {
    #[allow(clippy::too_many_arguments)]
    fn attention_params(
        &self,
        q: &impl DevicePtr<bf16>,
        k: &impl DevicePtr<bf16>,
        v: &impl DevicePtr<bf16>,
        offsets: &impl DevicePtr<i64>,
        lens: &impl DevicePtr<i32>,
        shape: &AttentionShape,
        out: &mut impl DevicePtrMut<bf16>,
    ) -> CudaResult<KvzAttentionParams> {
        validate_for_cuda(shape)?;
        let n = shape.q_elems();
        check_len("attention q", q.len(), n)?;
        check_len("attention out", out.len(), n)?;
        check_len("attention offsets", offsets.len(), shape.n_kv_heads)?;
        check_len("attention lens", lens.len(), shape.n_kv_heads)?;
        if k.len() % shape.head_dim != 0 || v.len() != k.len() {
            return Err(CudaError::Shape(format!(
                "attention k/v hold {} / {} elements; both must be the same whole number of \
                 {}-element rows",
                k.len(),
                v.len(),
                shape.head_dim
            )));
        }
        let s = self.stream();
        Ok(KvzAttentionParams {
            q: dptr(q, s) as _,
            k: dptr(k, s) as _,
            v: dptr(v, s) as _,
            out: dptr_mut(out, s) as _,
            offsets: dptr(offsets, s) as _,
            lens: dptr(lens, s) as _,
            q_len: to_i32("q_len", shape.q_len)?,
            n_kv_heads: to_i32("n_kv_heads", shape.n_kv_heads)?,
            group: to_i32("group", shape.group)?,
            head_dim: shape.head_dim as i32,
            scale: shape.scale,
            softcap: shape.softcap.unwrap_or(0.0),
            window: shape.window.unwrap_or(0) as i32,
        })
    }

    /// Flash-attention prefill of `shape.q_len` query tokens over the per-head segments
    /// (any `q_len >= 1`, typically many tokens over an existing cache whose last `q_len` rows
    /// per head are the new tokens' keys).
    ///
    /// `q`, `out`: `[q_len, n_kv_heads * group, head_dim]` bf16; `k`, `v`: `[rows, head_dim]` bf16;
    /// `offsets`: `[n_kv_heads]` i64; `lens`: `[n_kv_heads]` i32 (device). One CTA per
    /// (KV head, 128 packed query rows; 64 for head dim 256); tensor cores; fully masked key
    /// tiles are skipped.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_prefill(
        &self,
        q: &impl DevicePtr<bf16>,
        k: &impl DevicePtr<bf16>,
        v: &impl DevicePtr<bf16>,
        offsets: &impl DevicePtr<i64>,
        lens: &impl DevicePtr<i32>,
        shape: &AttentionShape,
        out: &mut impl DevicePtrMut<bf16>,
    ) -> CudaResult<()> {
        let p = self.attention_params(q, k, v, offsets, lens, shape, out)?;
        if shape.q_len == 0 || shape.n_kv_heads == 0 {
            return Ok(());
        }
        let (name, rows, tile) = match shape.head_dim {
            64 => ("kvz_attn_prefill_d64", PREFILL_ROWS, 64),
            128 => ("kvz_attn_prefill_d128", PREFILL_ROWS, 64),
            _ => ("kvz_attn_prefill_d256", PREFILL_ROWS_D256, 32),
        };
        let cfg = LaunchConfig {
            grid_dim: (
                shape.rows_per_head().div_ceil(rows) as u32,
                shape.n_kv_heads as u32,
                1,
            ),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: smem_bytes(rows, tile, shape.head_dim),
        };
        // SAFETY: q/out/offsets/lens lengths checked; k/v extents are the documented contract.
        unsafe { self.launch(name, cfg, &p) }
    }

    /// Split-K decode of `shape.q_len` (small, `== plan.q_len()`) query tokens: one CTA per
    /// work item of `plan` holding the whole GQA group, then an LSE combine of the heads that
    /// were split. Buffers as in [`Self::attention_prefill`]; `lens` must hold the plan's lengths.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_decode(
        &self,
        plan: &DecodePlan,
        q: &impl DevicePtr<bf16>,
        k: &impl DevicePtr<bf16>,
        v: &impl DevicePtr<bf16>,
        offsets: &impl DevicePtr<i64>,
        lens: &impl DevicePtr<i32>,
        shape: &AttentionShape,
        out: &mut impl DevicePtrMut<bf16>,
    ) -> CudaResult<()> {
        if shape.q_len != plan.q_len || shape.n_kv_heads != plan.lens.len() {
            return Err(CudaError::Shape(format!(
                "attention_decode: shape has q_len {} and {} KV heads, the plan was built for \
                 q_len {} and {} heads",
                shape.q_len,
                shape.n_kv_heads,
                plan.q_len,
                plan.lens.len()
            )));
        }
        let attn = self.attention_params(q, k, v, offsets, lens, shape, out)?;
        if plan.n_items == 0 {
            return Ok(());
        }
        let (po, pl) =
            self.partial_workspace(plan.n_partials, shape.rows_per_head(), shape.head_dim)?;
        let (items, head_partials) = plan.item_ptrs(self)?;
        let p = KvzDecodeParams {
            attn,
            items: items as _,
            segments: std::ptr::null(),
            n_items: plan.n_items as i32,
            head_partials: head_partials as _,
            partial_out: po as _,
            partial_lse: pl as _,
        };
        self.launch_decode(plan.n_items, plan.n_partials, &p, shape)
    }

    /// Run kernel (+ combine when heads were split) of a decode plan with its parameters.
    fn launch_decode(
        &self,
        n_items: usize,
        n_partials: usize,
        p: &KvzDecodeParams,
        shape: &AttentionShape,
    ) -> CudaResult<()> {
        let rows = shape.rows_per_head();
        let d = shape.head_dim;
        let row_block = match rows {
            0..=16 => 16,
            17..=32 => 32,
            _ => 64,
        };
        let name = format!("kvz_attn_decode_d{d}_r{row_block}");
        let cfg = LaunchConfig {
            grid_dim: (n_items as u32, rows.div_ceil(row_block) as u32, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: smem_bytes(row_block, DECODE_TILE_KEYS, d),
        };
        // SAFETY: item key ranges lie within the plan's lengths (>= q_len, checked by the plan);
        // partial buffers hold n_partials * rows (* d) floats; other lengths checked above.
        unsafe { self.launch(&name, cfg, p)? };
        if n_partials > 0 {
            let cfg = LaunchConfig {
                grid_dim: (shape.n_kv_heads as u32, rows as u32, 1),
                block_dim: ((d / 4) as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: as above; the combine reads the slots the run kernel wrote.
            unsafe { self.launch("kvz_attn_decode_combine", cfg, p)? };
        }
        Ok(())
    }

    /// Decode attention of `shape.q_len` query tokens over keys that live in pieces of any
    /// buffers (a plan from [`DecodePlan::for_pieces`]): one launch for a whole batch of
    /// sequences, each a virtual KV head per (sequence, KV head) whose keys are, e.g., a shared
    /// context cache followed by a private suffix. `q`, `out`: `[q_len, n_virtual_heads *
    /// group, head_dim]` bf16; `shape.n_kv_heads` is the number of virtual heads.
    pub fn attention_pieces(
        &self,
        plan: &DecodePlan,
        q: &impl DevicePtr<bf16>,
        shape: &AttentionShape,
        out: &mut impl DevicePtrMut<bf16>,
    ) -> CudaResult<()> {
        validate_for_cuda(shape)?;
        let (Some(segments), Some(lens)) = (&plan.segments, &plan.lens_dev) else {
            return Err(CudaError::Shape(
                "attention_pieces needs a plan built by DecodePlan::for_pieces".into(),
            ));
        };
        if shape.q_len != plan.q_len || shape.n_kv_heads != plan.lens.len() {
            return Err(CudaError::Shape(format!(
                "attention_pieces: shape has q_len {} and {} heads, the plan {} and {}",
                shape.q_len,
                shape.n_kv_heads,
                plan.q_len,
                plan.lens.len()
            )));
        }
        let s = self.stream();
        let (items, head_partials) = plan.item_ptrs(self)?;
        let ptrs = PiecesPointers {
            items,
            segments: dptr(segments, s),
            head_partials,
            lens: dptr(lens, s),
        };
        self.launch_pieces(plan.n_items, plan.n_partials, ptrs, q, shape, out)
    }

    /// [`Self::attention_pieces`] with a plan made for this one call: built on the host and
    /// copied into the backend's staging buffer (no device allocation, no upload of its own).
    /// The way to attend over pieces whose addresses change from layer to layer and step to
    /// step, as a batched decode's do. Errors as [`DecodePlan::for_pieces`].
    pub fn attention_pieces_staged(
        &self,
        pieces: &[KeyPiece],
        lens: &[usize],
        chunk_keys: Option<usize>,
        q: &impl DevicePtr<bf16>,
        shape: &AttentionShape,
        out: &mut impl DevicePtrMut<bf16>,
    ) -> CudaResult<()> {
        validate_for_cuda(shape)?;
        if shape.n_kv_heads != lens.len() {
            return Err(CudaError::Shape(format!(
                "attention_pieces: shape has {} heads, lens {}",
                shape.n_kv_heads,
                lens.len()
            )));
        }
        let layout = PiecesLayout::build(self, pieces, lens, shape.q_len, chunk_keys)?;
        let (bytes, at) = layout.pack();
        let base = self.stage_bytes(&bytes)?;
        let ptrs = PiecesPointers {
            items: base + at.items as u64,
            segments: base + at.segments as u64,
            head_partials: base + at.head_partials as u64,
            lens: base + at.lens as u64,
        };
        self.launch_pieces(layout.n_items, layout.n_partials, ptrs, q, shape, out)
    }

    /// Run (+ combine) of a plan over pieces whose arrays are at the given device addresses.
    fn launch_pieces(
        &self,
        n_items: usize,
        n_partials: usize,
        ptrs: PiecesPointers,
        q: &impl DevicePtr<bf16>,
        shape: &AttentionShape,
        out: &mut impl DevicePtrMut<bf16>,
    ) -> CudaResult<()> {
        let n = shape.q_elems();
        check_len("attention q", q.len(), n)?;
        check_len("attention out", out.len(), n)?;
        if n_items == 0 {
            return Ok(());
        }
        let (po, pl) = self.partial_workspace(n_partials, shape.rows_per_head(), shape.head_dim)?;
        let s = self.stream();
        let attn = KvzAttentionParams {
            q: dptr(q, s) as _,
            // Unused with segments: every item reads its own piece.
            k: std::ptr::null(),
            v: std::ptr::null(),
            out: dptr_mut(out, s) as _,
            offsets: std::ptr::null(),
            lens: ptrs.lens as _,
            q_len: to_i32("q_len", shape.q_len)?,
            n_kv_heads: to_i32("n_kv_heads", shape.n_kv_heads)?,
            group: to_i32("group", shape.group)?,
            head_dim: shape.head_dim as i32,
            scale: shape.scale,
            softcap: shape.softcap.unwrap_or(0.0),
            window: shape.window.unwrap_or(0) as i32,
        };
        let p = KvzDecodeParams {
            attn,
            items: ptrs.items as _,
            segments: ptrs.segments as _,
            n_items: n_items as i32,
            head_partials: ptrs.head_partials as _,
            partial_out: po as _,
            partial_lse: pl as _,
        };
        self.launch_decode(n_items, n_partials, &p, shape)
    }

    /// Attention of `shape.q_len` tokens choosing the kernel: decode (a fresh [`DecodePlan`]
    /// with automatic chunking) when `q_len <= DECODE_MAX_Q_LEN`, prefill otherwise.
    /// `lens_host` must equal the device `lens`. Callers decoding many layers with the same
    /// lengths should build one plan and call [`Self::attention_decode`] instead.
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        &self,
        q: &impl DevicePtr<bf16>,
        k: &impl DevicePtr<bf16>,
        v: &impl DevicePtr<bf16>,
        offsets: &impl DevicePtr<i64>,
        lens: &impl DevicePtr<i32>,
        lens_host: &[usize],
        shape: &AttentionShape,
        out: &mut impl DevicePtrMut<bf16>,
    ) -> CudaResult<()> {
        if shape.q_len == 0 || shape.n_kv_heads == 0 {
            return self.attention_prefill(q, k, v, offsets, lens, shape, out);
        }
        if shape.q_len <= DECODE_MAX_Q_LEN {
            let plan = DecodePlan::new(self, lens_host, shape.q_len, None)?;
            self.attention_decode(&plan, q, k, v, offsets, lens, shape, out)
        } else {
            self.attention_prefill(q, k, v, offsets, lens, shape, out)
        }
    }
}

/// Device addresses of a pieces plan's arrays (its own buffers or the staging buffer).
struct PiecesPointers {
    items: u64,
    segments: u64,
    head_partials: u64,
    lens: u64,
}
