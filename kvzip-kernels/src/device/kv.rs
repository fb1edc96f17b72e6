//! Ops over the per-head variable-length KV layout: attention (prefill and planned decode), the
//! KVzip score, appending a step's rows and gathering rows (growth, compaction, trimming).
//!
//! Layout (what `kvzip-cache` maintains): one layer's keys and values are `[rows, head_dim]`
//! each; KV head `h` owns rows `offsets[h] .. offsets[h] + caps[h]`, of which the first
//! `lens[h]` are valid. The host always has `offsets` / `lens`; CUDA kernels read device
//! copies kept in a [`KvLayoutMirror`] (one upload per step for all layers).

use super::tensor::wrong;
use super::{AttentionShape, Device, ScoreChunkShape, View, ViewMut};
use crate::{host, KernelError, KvSegments, Result};

#[cfg(feature = "cuda")]
use super::{cuda_err, drv};
#[cfg(feature = "cuda")]
use cudarc::driver::{CudaSlice, CudaView};

/// Borrowed view of one layer's cache for attention and scoring.
pub struct KvView<'a> {
    /// Keys `[rows, head_dim]`.
    pub k: View<'a>,
    /// Values `[rows, head_dim]`.
    pub v: View<'a>,
    /// First row of each KV head's segment (`[n_kv_heads]`).
    pub offsets: &'a [usize],
    /// Valid rows of each KV head (`[n_kv_heads]`).
    pub lens: &'a [usize],
    /// Elements per row.
    pub head_dim: usize,
    /// Device copies of `offsets` / `lens` (CUDA).
    pub(crate) mirror: Option<MirrorLayer<'a>>,
}

impl<'a> KvView<'a> {
    /// A view without device copies of the layout (enough for host memory).
    pub fn new(
        k: View<'a>,
        v: View<'a>,
        offsets: &'a [usize],
        lens: &'a [usize],
        head_dim: usize,
    ) -> Self {
        Self {
            k,
            v,
            offsets,
            lens,
            head_dim,
            mirror: None,
        }
    }

    /// Attaches the device copies of layer `layer`'s layout (required on CUDA). The mirror
    /// must have been synced with `offsets` / `lens` (see [`Device::sync_kv_lens`]).
    pub fn with_mirror(mut self, mirror: &'a KvLayoutMirror, layer: usize) -> Self {
        self.mirror = mirror.layer(layer);
        self
    }

    /// Number of KV heads.
    pub fn n_kv_heads(&self) -> usize {
        self.lens.len()
    }

    /// Host keys of KV head `h` (`[lens[h], head_dim]`), or an error on device memory.
    pub fn host_keys(&self, h: usize) -> Result<&'a [f32]> {
        let k = self.k.host_f32("keys")?;
        let (a, b) = self.head_rows(h)?;
        Ok(&k[a * self.head_dim..b * self.head_dim])
    }

    fn head_rows(&self, h: usize) -> Result<(usize, usize)> {
        match (self.offsets.get(h), self.lens.get(h)) {
            (Some(&o), Some(&l)) => Ok((o, o + l)),
            _ => Err(KernelError::Shape(format!(
                "KV head {h} out of range ({} heads)",
                self.lens.len()
            ))),
        }
    }

    pub(crate) fn segments(&self) -> Result<KvSegments<'a>> {
        Ok(KvSegments {
            k: self.k.host_f32("attention k")?,
            v: self.v.host_f32("attention v")?,
            offsets: self.offsets,
            lens: self.lens,
            head_dim: self.head_dim,
        })
    }
}

/// Device copies of one layer's layout.
pub(crate) struct MirrorLayer<'a> {
    #[cfg(feature = "cuda")]
    lens: CudaView<'a, i32>,
    #[cfg(feature = "cuda")]
    lens_before: CudaView<'a, i32>,
    #[cfg(feature = "cuda")]
    offsets: CudaView<'a, i64>,
    #[cfg(not(feature = "cuda"))]
    _never: std::marker::PhantomData<&'a ()>,
}

/// Device copies of the layout of every layer of a cache: per (layer, head) the valid rows
/// after the current step, before it (where the step's rows are appended), and the segment
/// offsets. Empty on the host (the host layout is read directly).
pub struct KvLayoutMirror {
    /// First flat index of each layer (`[n_layers + 1]`, prefix sums of head counts).
    starts: Vec<usize>,
    #[cfg(feature = "cuda")]
    dev: Option<MirrorBuffers>,
}

#[cfg(feature = "cuda")]
struct MirrorBuffers {
    lens: CudaSlice<i32>,
    lens_before: CudaSlice<i32>,
    offsets: CudaSlice<i64>,
}

impl KvLayoutMirror {
    fn layer(&self, l: usize) -> Option<MirrorLayer<'_>> {
        let _ = self.starts.get(l + 1)?;
        #[cfg(feature = "cuda")]
        {
            let d = self.dev.as_ref()?;
            let r = self.starts[l]..self.starts[l + 1];
            Some(MirrorLayer {
                lens: d.lens.slice(r.clone()),
                lens_before: d.lens_before.slice(r.clone()),
                offsets: d.offsets.slice(r),
            })
        }
        #[cfg(not(feature = "cuda"))]
        {
            None
        }
    }

    /// Total (layer, head) entries.
    pub fn len(&self) -> usize {
        self.starts.last().copied().unwrap_or(0)
    }

    /// Whether the mirror covers no head.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A decode plan for attention with few query tokens (FlashInfer-style plan/run split on
/// CUDA; nothing on the host). Built once per step from the host lengths, reusable by every
/// layer with the same lengths.
pub struct AttentionPlan {
    #[cfg(feature = "cuda")]
    pub(crate) decode: crate::cuda::attention::DecodePlan,
}

impl AttentionPlan {
    /// Keys per work item (CUDA decode plans).
    pub fn chunk_keys(&self) -> usize {
        #[cfg(feature = "cuda")]
        {
            self.decode.chunk_keys()
        }
        #[cfg(not(feature = "cuda"))]
        {
            0
        }
    }
}

/// A row gather between two layer buffers: for every destination head segment, the source rows
/// (absolute row indices of the source buffer) copied, in order, to consecutive destination rows
/// starting at the segment's offset. Growth re-layouts, compaction after pruning, retain views
/// and sliding-window trims are all gathers.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GatherPlan {
    /// Source row of every copied row, head after head (`[total]`).
    pub src_rows: Vec<i64>,
    /// Rows of head `h` are `src_rows[row_starts[h] .. row_starts[h + 1]]` (`[n_heads + 1]`).
    pub row_starts: Vec<i64>,
    /// First destination row of each head (`[n_heads]`).
    pub dst_offsets: Vec<i64>,
}

impl GatherPlan {
    /// A plan from per-head source row lists and destination offsets.
    pub fn from_rows(rows: &[Vec<usize>], dst_offsets: &[usize]) -> Result<Self> {
        if rows.len() != dst_offsets.len() {
            return Err(KernelError::Shape(format!(
                "gather plan: {} row lists for {} destination offsets",
                rows.len(),
                dst_offsets.len()
            )));
        }
        let mut src_rows = Vec::with_capacity(rows.iter().map(Vec::len).sum());
        let mut row_starts = Vec::with_capacity(rows.len() + 1);
        row_starts.push(0);
        for r in rows {
            src_rows.extend(r.iter().map(|&x| x as i64));
            row_starts.push(src_rows.len() as i64);
        }
        Ok(Self {
            src_rows,
            row_starts,
            dst_offsets: dst_offsets.iter().map(|&o| o as i64).collect(),
        })
    }

    /// Number of destination heads.
    pub fn n_heads(&self) -> usize {
        self.dst_offsets.len()
    }

    /// Total copied rows.
    pub fn total_rows(&self) -> usize {
        self.src_rows.len()
    }

    /// Copied rows per head.
    pub fn head_counts(&self) -> Vec<usize> {
        self.row_starts
            .windows(2)
            .map(|w| (w[1] - w[0]) as usize)
            .collect()
    }

    /// Maximal runs `(src_row, dst_row, n_rows)` of consecutive rows.
    pub fn runs(&self) -> Vec<(usize, usize, usize)> {
        let mut out: Vec<(usize, usize, usize)> = Vec::new();
        for h in 0..self.n_heads() {
            let (a, b) = (self.row_starts[h] as usize, self.row_starts[h + 1] as usize);
            let first = self.dst_offsets[h] as usize;
            for (dst, &src) in (first..).zip(&self.src_rows[a..b]) {
                let src = src as usize;
                match out.last_mut() {
                    Some((s, d, n)) if *s + *n == src && *d + *n == dst => *n += 1,
                    _ => out.push((src, dst, 1)),
                }
            }
        }
        out
    }

    /// Checks the plan against buffers of `src_rows` and `dst_rows` rows: well-formed starts,
    /// every source row inside the source, destination ranges inside the destination and not
    /// overlapping.
    pub fn validate(&self, src_rows: usize, dst_rows: usize) -> Result<()> {
        let n = self.n_heads();
        if self.row_starts.len() != n + 1
            || self.row_starts.first() != Some(&0)
            || self.row_starts.windows(2).any(|w| w[1] < w[0])
            || self.row_starts.last().copied() != Some(self.src_rows.len() as i64)
        {
            return Err(KernelError::Shape(format!(
                "gather plan: row_starts {:?} do not partition {} rows into {n} heads",
                self.row_starts,
                self.src_rows.len()
            )));
        }
        if let Some(&bad) = self
            .src_rows
            .iter()
            .find(|&&r| r < 0 || r as usize >= src_rows)
        {
            return Err(KernelError::Shape(format!(
                "gather plan: source row {bad} outside the {src_rows} source rows"
            )));
        }
        let counts = self.head_counts();
        let mut spans: Vec<(i64, i64)> = (0..n)
            .map(|h| (self.dst_offsets[h], self.dst_offsets[h] + counts[h] as i64))
            .filter(|(a, b)| a < b)
            .collect();
        spans.sort_unstable();
        if spans.iter().any(|&(a, b)| a < 0 || b as usize > dst_rows)
            || spans.windows(2).any(|w| w[0].1 > w[1].0)
        {
            return Err(KernelError::Shape(format!(
                "gather plan: destination ranges overlap or exceed the {dst_rows} destination rows"
            )));
        }
        Ok(())
    }
}

fn rows_of(what: &str, len: usize, d: usize) -> Result<usize> {
    if d == 0 || len % d != 0 {
        return Err(KernelError::Shape(format!(
            "`{what}` holds {len} elements, not whole rows of {d}"
        )));
    }
    Ok(len / d)
}

impl Device {
    /// An empty layout mirror for layers with `heads[l]` KV heads.
    pub fn kv_layout_mirror(&self, heads: &[usize]) -> Result<KvLayoutMirror> {
        let mut starts = Vec::with_capacity(heads.len() + 1);
        starts.push(0);
        for &h in heads {
            starts.push(starts.last().copied().unwrap_or(0) + h);
        }
        match self {
            Device::Cpu => Ok(KvLayoutMirror {
                starts,
                #[cfg(feature = "cuda")]
                dev: None,
            }),
            #[cfg(feature = "cuda")]
            Device::Cuda(g) => {
                let n = starts.last().copied().unwrap_or(0).max(1);
                Ok(KvLayoutMirror {
                    starts,
                    dev: Some(MirrorBuffers {
                        lens: g.zeros(n).map_err(cuda_err)?,
                        lens_before: g.zeros(n).map_err(cuda_err)?,
                        offsets: g.zeros(n).map_err(cuda_err)?,
                    }),
                })
            }
        }
    }

    /// Uploads every layer's lengths (`lens`: flat `[(layer, head)]`, after the current step)
    /// and, as the append base, `lens - appended` (a no-op on the host).
    pub fn sync_kv_lens(
        &self,
        mirror: &mut KvLayoutMirror,
        lens: &[usize],
        appended: usize,
    ) -> Result<()> {
        if lens.len() != mirror.len() {
            return Err(KernelError::Shape(format!(
                "layout mirror: {} lengths for {} (layer, head) entries",
                lens.len(),
                mirror.len()
            )));
        }
        match self {
            Device::Cpu => {
                let _ = appended;
                Ok(())
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(g) => {
                let Some(d) = mirror.dev.as_mut() else {
                    return Err(KernelError::Device(
                        "the layout mirror was made for the host".into(),
                    ));
                };
                if lens.is_empty() {
                    return Ok(());
                }
                let after: Vec<i32> = lens.iter().map(|&x| x as i32).collect();
                let before: Vec<i32> = lens
                    .iter()
                    .map(|&x| x.saturating_sub(appended) as i32)
                    .collect();
                let s = g.stream();
                s.memcpy_htod(&after, &mut d.lens.slice_mut(..after.len()))
                    .map_err(drv)?;
                s.memcpy_htod(&before, &mut d.lens_before.slice_mut(..before.len()))
                    .map_err(drv)?;
                Ok(())
            }
        }
    }

    /// Uploads every layer's segment offsets (flat `[(layer, head)]`; after an allocation).
    pub fn sync_kv_offsets(&self, mirror: &mut KvLayoutMirror, offsets: &[usize]) -> Result<()> {
        if offsets.len() != mirror.len() {
            return Err(KernelError::Shape(format!(
                "layout mirror: {} offsets for {} (layer, head) entries",
                offsets.len(),
                mirror.len()
            )));
        }
        match self {
            Device::Cpu => Ok(()),
            #[cfg(feature = "cuda")]
            Device::Cuda(g) => {
                let Some(d) = mirror.dev.as_mut() else {
                    return Err(KernelError::Device(
                        "the layout mirror was made for the host".into(),
                    ));
                };
                if offsets.is_empty() {
                    return Ok(());
                }
                let o: Vec<i64> = offsets.iter().map(|&x| x as i64).collect();
                g.stream()
                    .memcpy_htod(&o, &mut d.offsets.slice_mut(..o.len()))
                    .map_err(drv)
            }
        }
    }

    /// A decode plan for `q_len` query tokens over heads of `lens` keys, or `None` when the
    /// device needs none (the host) or `q_len` is too large for the decode kernel (prefill).
    /// `chunk_keys`: keys per work item (`None`: the planner's default).
    pub fn attention_plan(
        &self,
        lens: &[usize],
        q_len: usize,
        chunk_keys: Option<usize>,
    ) -> Result<Option<AttentionPlan>> {
        match self {
            Device::Cpu => {
                let _ = (lens, q_len, chunk_keys);
                Ok(None)
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(g) => {
                if q_len == 0 || q_len > crate::cuda::attention::DECODE_MAX_Q_LEN {
                    return Ok(None);
                }
                Ok(Some(AttentionPlan {
                    decode: crate::cuda::attention::DecodePlan::new(g, lens, q_len, chunk_keys)
                        .map_err(cuda_err)?,
                }))
            }
        }
    }

    /// Decode plans of one step for every layer (`lens[l]`: layer `l`'s keys per KV head), or
    /// `None`s as [`Device::attention_plan`] gives them. On CUDA all layers' plans are written
    /// with one copy into a persistent device buffer (no allocation); they are valid until the
    /// next call (using one after that is an error).
    pub fn attention_plans(
        &self,
        lens: &[&[usize]],
        q_len: usize,
        chunk_keys: Option<usize>,
    ) -> Result<Vec<Option<AttentionPlan>>> {
        match self {
            Device::Cpu => {
                let _ = (q_len, chunk_keys);
                Ok(lens.iter().map(|_| None).collect())
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(g) => {
                if q_len == 0 || q_len > crate::cuda::attention::DECODE_MAX_Q_LEN {
                    return Ok(lens.iter().map(|_| None).collect());
                }
                let plans = crate::cuda::attention::DecodePlan::staged_for_layers(
                    g, lens, q_len, chunk_keys,
                )
                .map_err(cuda_err)?;
                Ok(plans
                    .into_iter()
                    .map(|decode| Some(AttentionPlan { decode }))
                    .collect())
            }
        }
    }

    /// Attention of `shape.q_len` query tokens over one layer's per-head segments (see
    /// [`AttentionShape`]); the new tokens' keys must already be the last `q_len` rows of every
    /// head. `plan` (from [`Device::attention_plan`] with the same lengths) selects the decode
    /// kernel on CUDA; without one CUDA runs the prefill kernel. `q`, `out`:
    /// `[q_len, n_kv_heads * group, head_dim]`.
    pub fn attention(
        &self,
        q: &View<'_>,
        kv: &KvView<'_>,
        shape: &AttentionShape,
        plan: Option<&AttentionPlan>,
        out: &mut ViewMut<'_>,
    ) -> Result<()> {
        shape.validate()?;
        let n = shape.q_elems();
        if q.len() < n || out.len() < n {
            return Err(KernelError::Shape(format!(
                "attention: q ({}) and out ({}) need {n} elements",
                q.len(),
                out.len()
            )));
        }
        if kv.lens.len() != shape.n_kv_heads || kv.head_dim != shape.head_dim {
            return Err(KernelError::Shape(format!(
                "attention: the cache layer has {} heads of dim {}, the shape says {} of {}",
                kv.lens.len(),
                kv.head_dim,
                shape.n_kv_heads,
                shape.head_dim
            )));
        }
        match self {
            Device::Cpu => {
                let _ = plan;
                host::attention(
                    &q.host_f32("attention q")?[..n],
                    &kv.segments()?,
                    shape.q_len,
                    shape.group,
                    shape.head_dim,
                    shape.scale,
                    shape.window,
                    shape.softcap,
                    &mut out.host_f32("attention out")?[..n],
                )
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(g) => {
                let m = kv.mirror.as_ref().ok_or_else(|| {
                    KernelError::Device(
                        "attention on CUDA needs the device layout (KvView::with_mirror)".into(),
                    )
                })?;
                let (qv, kk, vv) = (
                    q.cuda_bf16("attention q")?,
                    kv.k.cuda_bf16("attention k")?,
                    kv.v.cuda_bf16("attention v")?,
                );
                let o = out.cuda_bf16("attention out")?;
                match plan {
                    Some(p) => {
                        g.attention_decode(&p.decode, &qv, &kk, &vv, &m.offsets, &m.lens, shape, o)
                    }
                    None => g.attention_prefill(&qv, &kk, &vv, &m.offsets, &m.lens, shape, o),
                }
                .map_err(cuda_err)
            }
        }
    }

    /// KVzip reconstruction score of one chunk for every KV head of a layer: per head the key
    /// set is `[rows 0..n_sys | the chunk's rows | the scoring input's own last n_in rows
    /// (causal)]`, softmax in f32, and `scores[h * score_stride + chunk_start - n_sys + c]`
    /// becomes the max of its previous value and the max probability of chunk key `c` over the
    /// group's query heads and the `n_in` input rows. `q`: `[n_in, n_kv_heads * group,
    /// head_dim]`; `kv`: the unpruned layer after appending the scoring input; `row_lse`:
    /// scratch of [`ScoreChunkShape::lse_len`] f32 (CUDA; unused on the host); `scores`:
    /// `[n_kv_heads, score_stride]` f32, zeroed before the first chunk.
    pub fn score_chunk(
        &self,
        q: &View<'_>,
        kv: &KvView<'_>,
        shape: &ScoreChunkShape,
        row_lse: &mut ViewMut<'_>,
        scores: &mut ViewMut<'_>,
    ) -> Result<()> {
        check_score_call(shape, kv, scores.len())?;
        if shape.chunk_len == 0 || shape.n_kv_heads == 0 {
            return Ok(());
        }
        match self {
            Device::Cpu => {
                let _ = row_lse;
                let d = shape.head_dim;
                let nq = shape.n_in * shape.n_kv_heads * shape.group * d;
                let qh = &q.host_f32("score q")?[..nq];
                let keys = kv.k.host_f32("score k")?;
                // Every head of the unpruned cache holds the same rows; the score op reads the
                // first `chunk_start + chunk_len + n_in`... of them: all live rows.
                let head_keys = |h: usize| -> &[f32] {
                    let (o, l) = (kv.offsets[h], kv.lens[h]);
                    &keys[o * d..(o + l) * d]
                };
                let op = crate::recon::ScoreShape {
                    q_len: shape.n_in,
                    n_kv_heads: shape.n_kv_heads,
                    group: shape.group,
                    head_dim: d,
                    n_sys: shape.n_sys,
                };
                let start = shape.chunk_start - shape.n_sys;
                let chunk = start..start + shape.chunk_len;
                let mut out = vec![0.0f32; shape.n_kv_heads * shape.chunk_len];
                crate::recon::score_chunk_scaled(&op, qh, head_keys, chunk, shape.scale, &mut out)?;
                merge_chunk_scores(shape, &out, scores.host_f32("score scores")?);
                Ok(())
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(g) => {
                let m = kv.mirror.as_ref().ok_or_else(|| {
                    KernelError::Device(
                        "scoring on CUDA needs the device layout (KvView::with_mirror)".into(),
                    )
                })?;
                g.score_chunk(
                    &q.cuda_bf16("score q")?,
                    &kv.k.cuda_bf16("score k")?,
                    &m.offsets,
                    &m.lens,
                    shape,
                    row_lse.cuda_f32("score row_lse")?,
                    scores.cuda_f32("score scores")?,
                )
                .map_err(cuda_err)
            }
        }
    }

    /// Appends `t` token-major rows per KV head: `k[offsets[h] + lens_before[h] + i] =
    /// k_new[i, h]` (same for `v`). `k_new`, `v_new`: `[t, n_kv_heads, head_dim]`; `k`, `v`: the
    /// layer buffers; `caps`: rows reserved per head (checked: `lens_before + t <= caps`).
    /// On CUDA the kernel reads the mirror's offsets and append bases of layer `layer`, which
    /// must equal `offsets` / `lens_before` (synced with `appended = t`).
    #[allow(clippy::too_many_arguments)]
    pub fn append_kv(
        &self,
        k_new: &View<'_>,
        v_new: &View<'_>,
        k: &mut ViewMut<'_>,
        v: &mut ViewMut<'_>,
        layout: (&[usize], &[usize], &[usize]),
        mirror: Option<(&KvLayoutMirror, usize)>,
        t: usize,
        head_dim: usize,
    ) -> Result<()> {
        let (offsets, lens_before, caps) = layout;
        let n_kv = offsets.len();
        if lens_before.len() != n_kv || caps.len() != n_kv {
            return Err(KernelError::Shape(format!(
                "append: {n_kv} offsets, {} lengths, {} capacities",
                lens_before.len(),
                caps.len()
            )));
        }
        let n = t * n_kv * head_dim;
        if k_new.len() < n || v_new.len() < n {
            return Err(KernelError::Shape(format!(
                "append: k_new / v_new hold {} / {} elements, [t {t}, heads {n_kv}, dim \
                 {head_dim}] needs {n}",
                k_new.len(),
                v_new.len()
            )));
        }
        let rows =
            rows_of("append k", k.len(), head_dim)?.min(rows_of("append v", v.len(), head_dim)?);
        for h in 0..n_kv {
            if lens_before[h] + t > caps[h] || offsets[h] + caps[h] > rows {
                return Err(KernelError::Shape(format!(
                    "append: head {h} holds {} of {} rows at offset {}, {t} more do not fit in \
                     a buffer of {rows} rows (reserve capacity first)",
                    lens_before[h], caps[h], offsets[h]
                )));
            }
        }
        if n == 0 {
            return Ok(());
        }
        match self {
            Device::Cpu => {
                let _ = mirror;
                let (kn, vn) = (
                    k_new.host_f32("append k_new")?,
                    v_new.host_f32("append v_new")?,
                );
                let (kd, vd) = (k.host_f32("append k")?, v.host_f32("append v")?);
                let d = head_dim;
                for h in 0..n_kv {
                    let base = offsets[h] + lens_before[h];
                    for i in 0..t {
                        let src = (i * n_kv + h) * d;
                        let dst = (base + i) * d;
                        kd[dst..dst + d].copy_from_slice(&kn[src..src + d]);
                        vd[dst..dst + d].copy_from_slice(&vn[src..src + d]);
                    }
                }
                Ok(())
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(g) => {
                let (m, l) = mirror.ok_or_else(|| {
                    KernelError::Device("append on CUDA needs the layout mirror".into())
                })?;
                let ml = m.layer(l).ok_or_else(|| {
                    KernelError::Device(format!("layout mirror has no layer {l}"))
                })?;
                // SAFETY: every head's capacity and extent were checked above against the host
                // layout, which the mirror holds (the caller syncs it before the step).
                unsafe {
                    g.append_rows(
                        &k_new.cuda_bf16("append k_new")?,
                        &v_new.cuda_bf16("append v_new")?,
                        k.cuda_bf16("append k")?,
                        v.cuda_bf16("append v")?,
                        &ml.offsets,
                        &ml.lens_before,
                        t,
                        n_kv,
                        head_dim,
                    )
                }
                .map_err(cuda_err)
            }
        }
    }

    /// Copies rows of `src_k` / `src_v` into `dst_k` / `dst_v` as `plan` says (all
    /// `[rows, head_dim]`; source and destination are different buffers).
    pub fn gather_rows(
        &self,
        src: (&View<'_>, &View<'_>),
        dst: (&mut ViewMut<'_>, &mut ViewMut<'_>),
        plan: &GatherPlan,
        head_dim: usize,
    ) -> Result<()> {
        let (sk, sv) = src;
        let (dk, dv) = dst;
        let src_rows = rows_of("gather source k", sk.len(), head_dim)?.min(rows_of(
            "gather source v",
            sv.len(),
            head_dim,
        )?);
        let dst_rows = rows_of("gather destination k", dk.len(), head_dim)?.min(rows_of(
            "gather destination v",
            dv.len(),
            head_dim,
        )?);
        plan.validate(src_rows, dst_rows)?;
        if plan.total_rows() == 0 {
            return Ok(());
        }
        let d = head_dim;
        match self {
            Device::Cpu => {
                if sk.dtype() != dk.dtype() {
                    return Err(wrong(
                        "gather destination",
                        "of the source's type",
                        dk.dtype(),
                        false,
                    ));
                }
                match sk.dtype() {
                    super::DType::Bf16 => {
                        let (a, b) = (sk.host_bf16("gather k")?, sv.host_bf16("gather v")?);
                        let (x, y) = (dk.host_bf16("gather k")?, dv.host_bf16("gather v")?);
                        for (s, t, n) in plan.runs() {
                            x[t * d..(t + n) * d].copy_from_slice(&a[s * d..(s + n) * d]);
                            y[t * d..(t + n) * d].copy_from_slice(&b[s * d..(s + n) * d]);
                        }
                    }
                    _ => {
                        let (a, b) = (sk.host_f32("gather k")?, sv.host_f32("gather v")?);
                        let (x, y) = (dk.host_f32("gather k")?, dv.host_f32("gather v")?);
                        for (s, t, n) in plan.runs() {
                            x[t * d..(t + n) * d].copy_from_slice(&a[s * d..(s + n) * d]);
                            y[t * d..(t + n) * d].copy_from_slice(&b[s * d..(s + n) * d]);
                        }
                    }
                }
                Ok(())
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(g) => {
                let (a, b) = (sk.cuda_bf16("gather k")?, sv.cuda_bf16("gather v")?);
                let (x, y) = (dk.cuda_bf16("gather k")?, dv.cuda_bf16("gather v")?);
                let runs = plan.runs();
                // A handful of runs (growth or trims of one sequence's heads): one copy per
                // run; more (compaction, a batch step writing one row per (sequence, head)):
                // the gather kernel, one launch whatever the count.
                if runs.len() <= 16 {
                    let st = g.stream();
                    for (s, t, n) in runs {
                        st.memcpy_dtod(
                            &a.slice(s * d..(s + n) * d),
                            &mut x.slice_mut(t * d..(t + n) * d),
                        )
                        .map_err(drv)?;
                        st.memcpy_dtod(
                            &b.slice(s * d..(s + n) * d),
                            &mut y.slice_mut(t * d..(t + n) * d),
                        )
                        .map_err(drv)?;
                    }
                    return Ok(());
                }
                let dev_plan = g.upload_gather_plan(plan).map_err(cuda_err)?;
                g.compact(&a, &b, x, y, &dev_plan, d).map_err(cuda_err)
            }
        }
    }
}

/// One piece of a virtual head's keys: `k`, `v` are exactly the piece's `[n, head_dim]` rows,
/// holding key indices `key_start .. key_start + n` of virtual head `head`.
pub struct KvPiece<'a> {
    /// Virtual head (e.g. `sequence * n_kv_heads + kv_head`).
    pub head: usize,
    /// Key rows.
    pub k: View<'a>,
    /// Value rows.
    pub v: View<'a>,
    /// Key index of the first row in the head's sequence of keys.
    pub key_start: usize,
}

/// The keys of a batch of virtual heads, in pieces of any buffers of one device: what a
/// decode step of many sequences attends to when each sequence's keys are a shared context
/// cache followed by its own suffix (see [`Device::attention_pieces`]).
pub struct KvPieces<'a> {
    /// Elements per row.
    pub head_dim: usize,
    /// Total keys of each virtual head (`>= q_len`).
    pub lens: Vec<usize>,
    /// Pieces sorted by head, then key; each head's pieces tile `0..lens[head]`.
    pub pieces: Vec<KvPiece<'a>>,
}

impl Device {
    /// Attention of `shape.q_len` query tokens of every virtual head over its key pieces, in one
    /// launch on CUDA (a decode plan over the pieces: items never cross a piece) and in parallel
    /// over heads on the host. `q`, `out`: `[q_len, n_virtual_heads * group, head_dim]`;
    /// `shape.n_kv_heads` = number of virtual heads; bottom-right causal alignment, window and
    /// softcap as in [`Device::attention`]. `chunk_keys`: keys per CUDA work item (`None`: the
    /// planner's default).
    pub fn attention_pieces(
        &self,
        q: &View<'_>,
        kv: &KvPieces<'_>,
        shape: &AttentionShape,
        chunk_keys: Option<usize>,
        out: &mut ViewMut<'_>,
    ) -> Result<()> {
        shape.validate()?;
        if kv.lens.len() != shape.n_kv_heads || kv.head_dim != shape.head_dim {
            return Err(KernelError::Shape(format!(
                "attention_pieces: {} virtual heads of dim {}, the shape says {} of {}",
                kv.lens.len(),
                kv.head_dim,
                shape.n_kv_heads,
                shape.head_dim
            )));
        }
        let n = shape.q_elems();
        if q.len() < n || out.len() < n {
            return Err(KernelError::Shape(format!(
                "attention_pieces: q ({}) and out ({}) need {n} elements",
                q.len(),
                out.len()
            )));
        }
        match self {
            Device::Cpu => {
                let _ = chunk_keys;
                let pieces = kv
                    .pieces
                    .iter()
                    .map(|p| {
                        Ok(crate::pieces::HostPiece {
                            head: p.head,
                            k: p.k.host_f32("piece k")?,
                            v: p.v.host_f32("piece v")?,
                            key_start: p.key_start,
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                let args = crate::pieces::PiecesArgs {
                    q_len: shape.q_len,
                    group: shape.group,
                    head_dim: shape.head_dim,
                    scale: shape.scale,
                    window: shape.window,
                    softcap: shape.softcap,
                };
                host::attention_pieces(
                    &q.host_f32("attention q")?[..n],
                    &pieces,
                    &kv.lens,
                    &args,
                    &mut out.host_f32("attention out")?[..n],
                )
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(g) => {
                let d = shape.head_dim;
                let st = g.stream();
                let mut pieces = Vec::with_capacity(kv.pieces.len());
                for p in &kv.pieces {
                    let (k, v) = (p.k.cuda_bf16("piece k")?, p.v.cuda_bf16("piece v")?);
                    if k.len() % d != 0 || v.len() != k.len() {
                        return Err(KernelError::Shape(format!(
                            "piece of head {}: {} / {} elements are not the same whole rows",
                            p.head,
                            k.len(),
                            v.len()
                        )));
                    }
                    pieces.push(crate::cuda::attention::KeyPiece {
                        head: p.head,
                        k: crate::cuda::dptr(&k, st),
                        v: crate::cuda::dptr(&v, st),
                        key_start: p.key_start,
                        n_keys: k.len() / d,
                    });
                }
                // A plan for this call only, staged in the backend's persistent buffer: the
                // pieces' addresses change from layer to layer and step to step.
                g.attention_pieces_staged(
                    &pieces,
                    &kv.lens,
                    chunk_keys,
                    &q.cuda_bf16("attention q")?,
                    shape,
                    out.cuda_bf16("attention out")?,
                )
                .map_err(cuda_err)
            }
        }
    }
}

/// The checks of a score call shared by [`Device::score_chunk`] and
/// [`Device::attention_scored`]: the shape (chunk inside the score stride), the cache layer's
/// segments, and a `scores` buffer of `[n_kv_heads, score_stride]`.
pub(crate) fn check_score_call(
    shape: &ScoreChunkShape,
    kv: &KvView<'_>,
    scores_len: usize,
) -> Result<()> {
    shape.validate()?;
    let k_rows = rows_of("score k", kv.k.len(), shape.head_dim)?;
    shape.check_segments(kv.offsets, kv.lens, k_rows)?;
    let need = shape.n_kv_heads * shape.score_stride;
    if scores_len < need {
        return Err(KernelError::Shape(format!(
            "score: `scores` holds {scores_len} values, {need} needed"
        )));
    }
    Ok(())
}

/// `scores[h * score_stride + chunk_start - n_sys + c] = max(itself, chunk[h * chunk_len + c])`
/// for every KV head: a host chunk result merged into the layer's score buffer.
pub(crate) fn merge_chunk_scores(shape: &ScoreChunkShape, chunk: &[f32], scores: &mut [f32]) {
    let (stride, len) = (shape.score_stride, shape.chunk_len);
    let start = shape.chunk_start - shape.n_sys;
    for (h, src) in chunk.chunks_exact(len).enumerate().take(shape.n_kv_heads) {
        let dst = &mut scores[h * stride + start..][..len];
        dst.iter_mut().zip(src).for_each(|(a, &b)| *a = a.max(b));
    }
}
