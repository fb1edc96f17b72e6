//! The per-head variable-length KV cache on the GPU.
//!
//! Per layer, K and V are one bf16 buffer each, `[rows, head_dim]`; KV head `h` owns rows
//! `offsets[h] .. offsets[h] + caps[h]`, of which the first `lens[h]` are valid. Lengths live
//! on the host (the engine plans kernels from them) and are mirrored to the device once per
//! step for all layers at once (`lens` after the step and `lens_before` for the append).
//! Appending never recopies the cache: heads have capacity, and growing a layer copies each
//! head's segment once (amortised O(1) per token).

use kvzip_cache::KeepMask;
use kvzip_kernels::cuda::cache::CompactPlan;
use kvzip_kernels::cuda::{bf16, CudaBackend, CudaSlice, CudaView};

use crate::error::{ModelError, Result};

/// One layer's K/V storage and per-head bookkeeping.
pub struct GpuLayerKv {
    /// Keys `[rows, head_dim]`.
    pub k: CudaSlice<bf16>,
    /// Values `[rows, head_dim]`.
    pub v: CudaSlice<bf16>,
    /// First row of each head's segment.
    pub offsets: Vec<usize>,
    /// Rows reserved per head.
    pub caps: Vec<usize>,
    /// Valid rows per head.
    pub lens: Vec<usize>,
}

/// A saved state of [`GpuKvCache`] lengths (`update_cache = false` slices back to it).
#[derive(Debug, Clone)]
pub struct GpuCacheMark {
    lens: Vec<Vec<usize>>,
    seen_tokens: usize,
}

/// The KV cache of every layer on the GPU.
pub struct GpuKvCache {
    /// KV heads per layer.
    pub n_kv: usize,
    /// Elements per K or V row.
    pub head_dim: usize,
    /// Per-layer storage.
    pub layers: Vec<GpuLayerKv>,
    /// Tokens the model has seen (next position).
    pub seen_tokens: usize,
    /// `[n_layers * n_kv]` i32: lengths after the current step.
    lens_dev: CudaSlice<i32>,
    /// `[n_layers * n_kv]` i32: lengths before the current step (append base).
    lens_before_dev: CudaSlice<i32>,
    /// `[n_layers * n_kv]` i64: segment offsets.
    offsets_dev: CudaSlice<i64>,
}

/// Extra rows reserved per head when a layer grows or is compacted (queries and answers).
pub const HEAD_SLACK: usize = 256;

impl GpuKvCache {
    /// Empty cache with `capacity` rows reserved per head.
    pub fn new(
        gpu: &CudaBackend,
        n_layers: usize,
        n_kv: usize,
        head_dim: usize,
        capacity: usize,
    ) -> Result<Self> {
        let layers = (0..n_layers)
            .map(|_| new_layer(gpu, n_kv, head_dim, &vec![0; n_kv], &vec![capacity; n_kv]))
            .collect::<Result<Vec<_>>>()?;
        let mut cache = Self {
            n_kv,
            head_dim,
            layers,
            seen_tokens: 0,
            lens_dev: gpu.zeros(n_layers * n_kv)?,
            lens_before_dev: gpu.zeros(n_layers * n_kv)?,
            offsets_dev: gpu.zeros(n_layers * n_kv)?,
        };
        cache.sync_offsets(gpu)?;
        cache.sync_lens(gpu, 0)?;
        Ok(cache)
    }

    /// Number of layers.
    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }

    /// Grows every head that lacks room for `extra` more rows (capacity ×1.5, at least
    /// `len + extra + HEAD_SLACK`), copying each head segment once.
    pub fn reserve(&mut self, gpu: &CudaBackend, extra: usize) -> Result<()> {
        let mut grew = false;
        for layer in &mut self.layers {
            if layer
                .lens
                .iter()
                .zip(&layer.caps)
                .all(|(l, c)| l + extra <= *c)
            {
                continue;
            }
            let caps: Vec<usize> = layer
                .lens
                .iter()
                .zip(&layer.caps)
                .map(|(&l, &c)| {
                    if l + extra <= c {
                        c
                    } else {
                        (c + c / 2).max(l + extra + HEAD_SLACK)
                    }
                })
                .collect();
            let mut grown = new_layer(gpu, self.n_kv, self.head_dim, &layer.lens, &caps)?;
            let d = self.head_dim;
            for h in 0..self.n_kv {
                let n = layer.lens[h] * d;
                if n == 0 {
                    continue;
                }
                let (src, dst) = (layer.offsets[h] * d, grown.offsets[h] * d);
                gpu.stream()
                    .memcpy_dtod(
                        &layer.k.slice(src..src + n),
                        &mut grown.k.slice_mut(dst..dst + n),
                    )
                    .map_err(cuda_err)?;
                gpu.stream()
                    .memcpy_dtod(
                        &layer.v.slice(src..src + n),
                        &mut grown.v.slice_mut(dst..dst + n),
                    )
                    .map_err(cuda_err)?;
            }
            *layer = grown;
            grew = true;
        }
        if grew {
            self.sync_offsets(gpu)?;
        }
        Ok(())
    }

    /// Starts a step of `t` tokens: reserves room, advances every head's length by `t` on the
    /// host and uploads the lengths (before/after) of all layers in one go each (offsets are
    /// uploaded only when a layer was reallocated).
    pub fn begin_step(&mut self, gpu: &CudaBackend, t: usize) -> Result<()> {
        self.reserve(gpu, t)?;
        for layer in &mut self.layers {
            layer.lens.iter_mut().for_each(|l| *l += t);
        }
        self.sync_lens(gpu, t)
    }

    /// Uploads the segment offsets of every layer (after allocation or reallocation).
    fn sync_offsets(&mut self, gpu: &CudaBackend) -> Result<()> {
        let offsets: Vec<i64> = self
            .layers
            .iter()
            .flat_map(|l| l.offsets.iter().map(|&x| x as i64))
            .collect();
        gpu.stream()
            .memcpy_htod(&offsets, &mut self.offsets_dev)
            .map_err(cuda_err)
    }

    /// Uploads lengths (after, and after − `t` as "before").
    fn sync_lens(&mut self, gpu: &CudaBackend, t: usize) -> Result<()> {
        let lens: Vec<i32> = self
            .layers
            .iter()
            .flat_map(|l| l.lens.iter().map(|&x| x as i32))
            .collect();
        let before: Vec<i32> = lens.iter().map(|&x| x - t as i32).collect();
        let s = gpu.stream();
        s.memcpy_htod(&lens, &mut self.lens_dev).map_err(cuda_err)?;
        s.memcpy_htod(&before, &mut self.lens_before_dev)
            .map_err(cuda_err)?;
        Ok(())
    }

    /// Device views of layer `l`: (lens after the step, lens before it, offsets), `[n_kv]` each.
    pub fn layer_meta(
        &self,
        l: usize,
    ) -> (CudaView<'_, i32>, CudaView<'_, i32>, CudaView<'_, i64>) {
        let r = l * self.n_kv..(l + 1) * self.n_kv;
        (
            self.lens_dev.slice(r.clone()),
            self.lens_before_dev.slice(r.clone()),
            self.offsets_dev.slice(r),
        )
    }

    /// Layer `l`'s storage with its device lengths before the step and offsets, for the append.
    pub fn layer_for_append(
        &mut self,
        l: usize,
    ) -> (&mut GpuLayerKv, CudaView<'_, i32>, CudaView<'_, i64>) {
        let r = l * self.n_kv..(l + 1) * self.n_kv;
        (
            &mut self.layers[l],
            self.lens_before_dev.slice(r.clone()),
            self.offsets_dev.slice(r),
        )
    }

    /// Benchmarks: sets every head's valid length (`lens[layer][head]`, each within capacity)
    /// and the next position, without touching the data.
    pub fn set_lens(
        &mut self,
        gpu: &CudaBackend,
        lens: &[Vec<usize>],
        seen_tokens: usize,
    ) -> Result<()> {
        if lens.len() != self.layers.len() {
            return Err(ModelError::Input(format!(
                "set_lens: {} layers given, cache has {}",
                lens.len(),
                self.layers.len()
            )));
        }
        for (l, (layer, want)) in self.layers.iter_mut().zip(lens).enumerate() {
            if want.len() != self.n_kv || want.iter().zip(&layer.caps).any(|(w, c)| w > c) {
                return Err(ModelError::Input(format!(
                    "set_lens: layer {l} lengths {want:?} exceed capacity or head count"
                )));
            }
            layer.lens.clone_from(want);
        }
        self.seen_tokens = seen_tokens;
        self.sync_lens(gpu, 0)
    }

    /// Benchmarks: fills every K/V buffer with seeded random bf16 values in [-1, 1) (one random
    /// block uploaded per layer, tiled on the device): decode speed does not depend on values,
    /// but zeros can run faster than real data.
    pub fn fill_random(&mut self, gpu: &CudaBackend, seed: u64) -> Result<()> {
        const BLOCK: usize = 1 << 24;
        for (l, layer) in self.layers.iter_mut().enumerate() {
            for (i, buf) in [&mut layer.k, &mut layer.v].into_iter().enumerate() {
                let n = buf.len();
                let b = BLOCK.min(n);
                let block =
                    super::model::random_bf16(b, seed ^ ((l * 2 + i) as u64) << 20, -1.0, 1.0);
                let dev = gpu.upload(&block)?;
                let mut at = 0;
                while at < n {
                    let m = b.min(n - at);
                    gpu.stream()
                        .memcpy_dtod(&dev.slice(..m), &mut buf.slice_mut(at..at + m))
                        .map_err(cuda_err)?;
                    at += m;
                }
            }
        }
        Ok(())
    }

    /// Current lengths (host).
    pub fn mark(&self) -> GpuCacheMark {
        GpuCacheMark {
            lens: self.layers.iter().map(|l| l.lens.clone()).collect(),
            seen_tokens: self.seen_tokens,
        }
    }

    /// Slices every head back to `mark` (no data moves; growing a layer keeps each head's rows
    /// in order, so a mark survives it). Errors if a head is shorter than the mark.
    pub fn rollback(&mut self, gpu: &CudaBackend, mark: &GpuCacheMark) -> Result<()> {
        for (layer, lens) in self.layers.iter_mut().zip(&mark.lens) {
            if lens.iter().zip(&layer.lens).any(|(m, l)| m > l) {
                return Err(ModelError::Input(
                    "rollback to a mark longer than the cache; take the mark before the query"
                        .into(),
                ));
            }
            layer.lens.clone_from(lens);
        }
        self.seen_tokens = mark.seen_tokens;
        self.sync_lens(gpu, 0)
    }

    /// Valid K+V bytes of the cache (bf16), all layers.
    pub fn kv_bytes(&self) -> usize {
        let rows: usize = self.layers.iter().flat_map(|l| l.lens.iter()).sum();
        rows * self.head_dim * 2 * 2
    }

    /// A compacted copy: per layer with a keep entry, head `h` keeps rows `0..n_sys`, the
    /// context rows `n_sys + p` with `keep[h][p]`, and every row after the context (kept
    /// turns); layers without an entry (Gemma's sliding layers) are copied whole. The source
    /// must hold the context at rows `n_sys..n_sys + n_ctx` of every head (an unpruned cache).
    pub fn compacted(&self, gpu: &CudaBackend, keep: &KeepMask, n_sys: usize) -> Result<Self> {
        let n_ctx = keep.n_ctx();
        let mut layers = Vec::with_capacity(self.layers.len());
        for (l, src) in self.layers.iter().enumerate() {
            let mut rows_per_head: Vec<Vec<usize>> = Vec::with_capacity(self.n_kv);
            for h in 0..self.n_kv {
                let len = src.lens[h];
                let rows: Vec<usize> = match keep.layer(l) {
                    Some(lk) => {
                        if len < n_sys + n_ctx {
                            return Err(ModelError::Input(format!(
                                "layer {l} head {h} holds {len} rows, fewer than system + context ({}); prune an unpruned cache",
                                n_sys + n_ctx
                            )));
                        }
                        let bits = &lk.bits[h * n_ctx..(h + 1) * n_ctx];
                        (0..n_sys)
                            .chain((0..n_ctx).filter(|&p| bits[p]).map(|p| n_sys + p))
                            .chain(n_sys + n_ctx..len)
                            .collect()
                    }
                    None => (0..len).collect(),
                };
                rows_per_head.push(rows);
            }
            let lens: Vec<usize> = rows_per_head.iter().map(Vec::len).collect();
            let caps: Vec<usize> = lens.iter().map(|&n| n + HEAD_SLACK).collect();
            let mut dst = new_layer(gpu, self.n_kv, self.head_dim, &lens, &caps)?;
            let src_rows: Vec<i64> = rows_per_head
                .iter()
                .enumerate()
                .flat_map(|(h, rows)| rows.iter().map(move |&r| (src.offsets[h] + r) as i64))
                .collect();
            let mut row_starts = vec![0i64];
            for rows in &rows_per_head {
                row_starts.push(row_starts.last().copied().unwrap_or(0) + rows.len() as i64);
            }
            let dst_offsets: Vec<i64> = dst.offsets.iter().map(|&o| o as i64).collect();
            let plan = gpu.upload_compact_plan(&CompactPlan {
                src_rows,
                row_starts,
                dst_offsets,
            })?;
            gpu.compact(&src.k, &src.v, &mut dst.k, &mut dst.v, &plan, self.head_dim)?;
            layers.push(dst);
        }
        let n = self.layers.len() * self.n_kv;
        let mut out = Self {
            n_kv: self.n_kv,
            head_dim: self.head_dim,
            layers,
            seen_tokens: self.seen_tokens,
            lens_dev: gpu.zeros(n)?,
            lens_before_dev: gpu.zeros(n)?,
            offsets_dev: gpu.zeros(n)?,
        };
        out.sync_offsets(gpu)?;
        out.sync_lens(gpu, 0)?;
        Ok(out)
    }
}

fn new_layer(
    gpu: &CudaBackend,
    n_kv: usize,
    head_dim: usize,
    lens: &[usize],
    caps: &[usize],
) -> Result<GpuLayerKv> {
    let mut offsets = Vec::with_capacity(n_kv);
    let mut total = 0;
    for &c in caps {
        offsets.push(total);
        total += c;
    }
    let rows = total.max(1);
    Ok(GpuLayerKv {
        k: gpu.alloc(rows * head_dim)?,
        v: gpu.alloc(rows * head_dim)?,
        offsets,
        caps: caps.to_vec(),
        lens: lens.to_vec(),
    })
}

fn cuda_err(e: kvzip_kernels::cuda::DriverError) -> ModelError {
    ModelError::Cuda(e.into())
}
