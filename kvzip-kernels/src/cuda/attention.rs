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

use std::sync::Mutex;

use cudarc::driver::{CudaSlice, LaunchConfig};

use super::params::{KvzAttentionParams, KvzDecodeParams, KvzDecodeSegment};
use super::{bf16, check_len, dptr, dptr_mut, CudaBackend, CudaError, CudaResult};
use super::{DevicePtr, DevicePtrMut};

/// Threads per CTA of every attention kernel (4 warps).
const THREADS: u32 = 128;
/// Packed query rows per prefill CTA for head dims 64 and 128 (4 warps x 2 groups of 16 rows).
const PREFILL_ROWS: usize = 128;
/// Packed query rows per prefill CTA for head dim 256 (4 warps x 16).
const PREFILL_ROWS_D256: usize = 64;
/// Keys per shared-memory tile of the decode kernels.
const DECODE_TILE_KEYS: usize = 64;
/// Largest `q_len` for which [`CudaBackend::attention`] picks the decode path.
pub const DECODE_MAX_Q_LEN: usize = 16;
/// Bounds of the automatic decode chunk (keys per work item).
const AUTO_CHUNK_RANGE: (usize, usize) = (512, 4096);

/// Automatic keys per decode work item: the power of two nearest to `total_keys / n_sms`
/// (about one item per SM), clamped to [`AUTO_CHUNK_RANGE`]. Measured on the H200 (bench/gpu,
/// chunk sweep at Llama-3.1-8B and Qwen2.5-7B shapes, 32K/128K, full and ragged caches): each
/// work item pays a partial write and a combine read, so fewer, longer items win until the grid
/// no longer covers the SMs; this rule picked the best or near-best size in every case.
fn auto_chunk(total_keys: usize, n_sms: usize) -> usize {
    let per_sm = (total_keys / n_sms.max(1)).max(1) as f64;
    let nearest = 2f64.powf(per_sm.log2().round()) as usize;
    nearest.clamp(AUTO_CHUNK_RANGE.0, AUTO_CHUNK_RANGE.1)
}

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

fn to_i32(what: &str, v: usize) -> CudaResult<i32> {
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
        let (po, pl) = self.partial_workspace(plan, shape)?;
        let s = self.stream();
        let p = KvzDecodeParams {
            attn,
            items: dptr(&plan.items, s) as _,
            segments: std::ptr::null(),
            n_items: plan.n_items as i32,
            head_partials: dptr(&plan.head_partials, s) as _,
            partial_out: po as _,
            partial_lse: pl as _,
        };
        self.launch_decode(plan, &p, shape)
    }

    /// Device addresses of the plan's partial outputs and LSEs (allocated on first use, grown
    /// when a call needs more); zeros when no head is split.
    fn partial_workspace(
        &self,
        plan: &DecodePlan,
        shape: &AttentionShape,
    ) -> CudaResult<(u64, u64)> {
        if plan.n_partials == 0 {
            return Ok((0, 0));
        }
        let (rows, d) = (shape.rows_per_head(), shape.head_dim);
        let mut ws = plan.workspace.lock().unwrap_or_else(|e| e.into_inner());
        let need = plan.n_partials * rows;
        let fits = ws
            .as_ref()
            .is_some_and(|(o, l)| o.len() >= need * d && l.len() >= need);
        if !fits {
            *ws = Some((self.alloc::<f32>(need * d)?, self.alloc::<f32>(need)?));
        }
        let s = self.stream();
        match ws.as_mut() {
            Some((o, l)) => Ok((dptr_mut(o, s), dptr_mut(l, s))),
            None => Err(CudaError::Shape("decode workspace missing".into())),
        }
    }

    /// Run kernel (+ combine when heads were split) of a decode plan with its parameters.
    fn launch_decode(
        &self,
        plan: &DecodePlan,
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
            grid_dim: (plan.n_items as u32, rows.div_ceil(row_block) as u32, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: smem_bytes(row_block, DECODE_TILE_KEYS, d),
        };
        // SAFETY: item key ranges lie within the plan's lengths (>= q_len, checked by the plan);
        // partial buffers hold n_partials * rows (* d) floats; other lengths checked above.
        unsafe { self.launch(&name, cfg, p)? };
        if plan.n_partials > 0 {
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
        let n = shape.q_elems();
        check_len("attention q", q.len(), n)?;
        check_len("attention out", out.len(), n)?;
        if plan.n_items == 0 {
            return Ok(());
        }
        let (po, pl) = self.partial_workspace(plan, shape)?;
        let s = self.stream();
        let attn = KvzAttentionParams {
            q: dptr(q, s) as _,
            // Unused with segments: every item reads its own piece.
            k: std::ptr::null(),
            v: std::ptr::null(),
            out: dptr_mut(out, s) as _,
            offsets: std::ptr::null(),
            lens: dptr(lens, s) as _,
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
            items: dptr(&plan.items, s) as _,
            segments: dptr(segments, s) as _,
            n_items: plan.n_items as i32,
            head_partials: dptr(&plan.head_partials, s) as _,
            partial_out: po as _,
            partial_lse: pl as _,
        };
        self.launch_decode(plan, &p, shape)
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

/// Work decomposition of a varlen decode step (FlashInfer-style plan): the keys of every KV
/// head are cut into chunks of a uniform size; each (head, chunk) is one work item, uploaded
/// once and reusable by every layer with the same lengths. Heads cut into several chunks get
/// consecutive partial slots that the combine kernel merges; single-chunk heads write `out`
/// directly.
#[derive(Debug)]
pub struct DecodePlan {
    lens: Vec<usize>,
    q_len: usize,
    chunk_keys: usize,
    n_items: usize,
    n_partials: usize,
    /// `[n_items, 4]` i32: head, key_start, key_end, partial slot (-1: direct) (= KvzDecodeWorkItem).
    items: CudaSlice<i32>,
    /// `[n_kv_heads + 1]` i32: slots of head h are `head_partials[h] .. head_partials[h + 1]`.
    head_partials: CudaSlice<i32>,
    /// Partial outputs `[n_partials, rows, head_dim]` f32 and LSEs `[n_partials, rows]` f32,
    /// allocated on first use (grown when a call needs more).
    workspace: Mutex<Option<(CudaSlice<f32>, CudaSlice<f32>)>>,
    /// Plans over pieces: one segment per item, and the virtual heads' lengths on the device.
    segments: Option<CudaSlice<KvzDecodeSegment>>,
    lens_dev: Option<CudaSlice<i32>>,
}

/// One piece of a virtual head's keys for [`DecodePlan::for_pieces`]: `n_keys` rows of
/// `[n_keys, head_dim]` bf16 K and V at device addresses `k` / `v`, holding key indices
/// `key_start .. key_start + n_keys` of virtual head `head`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyPiece {
    /// Virtual head (e.g. `sequence * n_kv_heads + kv_head`).
    pub head: usize,
    /// Device address of the piece's first K row.
    pub k: u64,
    /// Device address of the piece's first V row.
    pub v: u64,
    /// Key index of the first row within the head's sequence of keys.
    pub key_start: usize,
    /// Rows of the piece.
    pub n_keys: usize,
}

/// Checks decode lengths (`q_len >= 1`, every head at least `q_len` keys, lengths within
/// i32) and picks the keys per work item: `chunk_keys`, or the automatic size for the total.
fn plan_chunk(
    backend: &CudaBackend,
    lens: &[usize],
    q_len: usize,
    chunk_keys: Option<usize>,
    what: &str,
) -> CudaResult<usize> {
    if q_len == 0 {
        return Err(CudaError::Shape("DecodePlan: q_len must be >= 1".into()));
    }
    if let Some((h, &l)) = lens.iter().enumerate().find(|(_, &l)| l < q_len) {
        return Err(CudaError::Shape(format!(
            "DecodePlan: {what} {h} has {l} keys, fewer than q_len {q_len} (the new tokens' \
             keys must be appended first)"
        )));
    }
    to_i32("max head length", lens.iter().copied().max().unwrap_or(0))?;
    match chunk_keys {
        Some(0) => Err(CudaError::Shape(
            "DecodePlan: chunk_keys must be > 0".into(),
        )),
        Some(c) => Ok(c),
        None => Ok(auto_chunk(lens.iter().sum(), backend.n_sms).next_multiple_of(DECODE_TILE_KEYS)),
    }
}

impl DecodePlan {
    /// Plans a decode of `q_len >= 1` tokens over heads of lengths `lens` (host copy of the
    /// device lengths, keys per KV head, each `>= q_len`). `chunk_keys`: keys per work item;
    /// `None` picks the power of two nearest to `total_keys / n_sms`, within 512..=4096 (see
    /// `auto_chunk`).
    pub fn new(
        backend: &CudaBackend,
        lens: &[usize],
        q_len: usize,
        chunk_keys: Option<usize>,
    ) -> CudaResult<Self> {
        let chunk = plan_chunk(backend, lens, q_len, chunk_keys, "KV head")?;
        let mut items: Vec<i32> = Vec::new();
        let mut head_partials = Vec::with_capacity(lens.len() + 1);
        let mut n_partials = 0usize;
        for (h, &len) in lens.iter().enumerate() {
            head_partials.push(n_partials as i32);
            let n_chunks = len.div_ceil(chunk).max(1);
            for c in 0..n_chunks {
                let slot = if n_chunks == 1 {
                    -1
                } else {
                    (n_partials + c) as i32
                };
                let end = ((c + 1) * chunk).min(len);
                items.extend_from_slice(&[h as i32, (c * chunk) as i32, end as i32, slot]);
            }
            if n_chunks > 1 {
                n_partials += n_chunks;
            }
        }
        head_partials.push(n_partials as i32);
        let n_items = items.len() / 4;
        if n_items > i32::MAX as usize || n_partials > i32::MAX as usize {
            return Err(CudaError::Shape(format!(
                "DecodePlan: {n_items} work items exceed i32; use a larger chunk_keys"
            )));
        }
        // cudarc rejects empty uploads; keep one dummy entry.
        if items.is_empty() {
            items.extend_from_slice(&[0, 0, 0, -1]);
        }
        Ok(Self {
            lens: lens.to_vec(),
            q_len,
            chunk_keys: chunk,
            n_items,
            n_partials,
            items: backend.upload(&items)?,
            head_partials: backend.upload(&head_partials)?,
            workspace: Mutex::new(None),
            segments: None,
            lens_dev: None,
        })
    }

    /// Plans a decode of `q_len >= 1` tokens per virtual head over keys in pieces of any
    /// buffers. `lens[h]` is virtual head `h`'s total key count (each `>= q_len`); its pieces
    /// (sorted by head, then key) must tile `0..lens[h]` exactly. Pieces are cut into items of
    /// at most `chunk_keys` keys (default as in [`DecodePlan::new`]), never across pieces.
    pub fn for_pieces(
        backend: &CudaBackend,
        pieces: &[KeyPiece],
        lens: &[usize],
        q_len: usize,
        chunk_keys: Option<usize>,
    ) -> CudaResult<Self> {
        let chunk = plan_chunk(backend, lens, q_len, chunk_keys, "virtual head")?;
        // Pieces must tile every head's keys in order.
        let mut next = vec![0usize; lens.len()];
        let mut last_head = 0;
        for (i, p) in pieces.iter().enumerate() {
            if p.head >= lens.len() || p.head < last_head || p.key_start != next[p.head] {
                return Err(CudaError::Shape(format!(
                    "DecodePlan: piece {i} (head {}, keys {}..{}) does not continue its head's \
                     keys in order",
                    p.head,
                    p.key_start,
                    p.key_start + p.n_keys
                )));
            }
            next[p.head] += p.n_keys;
            last_head = p.head;
        }
        if let Some(h) = (0..lens.len()).find(|&h| next[h] != lens[h]) {
            return Err(CudaError::Shape(format!(
                "DecodePlan: the pieces of virtual head {h} hold {} keys, its length is {}",
                next[h], lens[h]
            )));
        }
        let mut items: Vec<i32> = Vec::new();
        let mut segments: Vec<KvzDecodeSegment> = Vec::new();
        let mut item_heads: Vec<usize> = Vec::new();
        for p in pieces {
            let mut k0 = p.key_start;
            let end = p.key_start + p.n_keys;
            while k0 < end {
                let k1 = (k0 + chunk).min(end);
                items.extend_from_slice(&[p.head as i32, k0 as i32, k1 as i32, -1]);
                segments.push(KvzDecodeSegment {
                    k: p.k as _,
                    v: p.v as _,
                    key_base: p.key_start as i64,
                });
                item_heads.push(p.head);
                k0 = k1;
            }
        }
        // Partial slots for heads with several items; direct writes otherwise.
        let mut head_partials = Vec::with_capacity(lens.len() + 1);
        let mut n_partials = 0usize;
        let mut first = 0usize;
        for h in 0..lens.len() {
            head_partials.push(n_partials as i32);
            let mut last = first;
            while last < item_heads.len() && item_heads[last] == h {
                last += 1;
            }
            if last - first > 1 {
                for (slot, it) in (first..last).enumerate() {
                    items[it * 4 + 3] = (n_partials + slot) as i32;
                }
                n_partials += last - first;
            }
            first = last;
        }
        head_partials.push(n_partials as i32);
        let n_items = items.len() / 4;
        if n_items > i32::MAX as usize {
            return Err(CudaError::Shape(format!(
                "DecodePlan: {n_items} work items exceed i32; use a larger chunk_keys"
            )));
        }
        if items.is_empty() {
            items.extend_from_slice(&[0, 0, 0, -1]);
            segments.push(KvzDecodeSegment {
                k: std::ptr::null(),
                v: std::ptr::null(),
                key_base: 0,
            });
        }
        let lens_i32: Vec<i32> = lens.iter().map(|&l| l as i32).collect();
        Ok(Self {
            lens: lens.to_vec(),
            q_len,
            chunk_keys: chunk,
            n_items,
            n_partials,
            items: backend.upload(&items)?,
            head_partials: backend.upload(&head_partials)?,
            workspace: Mutex::new(None),
            segments: Some(backend.upload(&segments)?),
            lens_dev: Some(backend.upload(if lens_i32.is_empty() { &[0] } else { &lens_i32 })?),
        })
    }

    /// Tokens per decode call this plan was built for.
    pub fn q_len(&self) -> usize {
        self.q_len
    }

    /// Keys per work item.
    pub fn chunk_keys(&self) -> usize {
        self.chunk_keys
    }

    /// Number of work items (CTAs per row block of the run kernel).
    pub fn n_items(&self) -> usize {
        self.n_items
    }

    /// Number of partial slots (items of heads that were split).
    pub fn n_partials(&self) -> usize {
        self.n_partials
    }

    /// Host copy of the key counts per KV head the plan was built for.
    pub fn lens(&self) -> &[usize] {
        &self.lens
    }
}
