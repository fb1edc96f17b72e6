//! Where a cache's rows live: the [`KvStorage`] trait and its implementation over
//! `kvzip-kernels` devices ([`DeviceKv`]: host memory or CUDA buffers).
//!
//! The cache ([`crate::KvCache`]) owns the layout (offsets, capacities, lengths, positions,
//! marks, plans) and calls the storage only to allocate layer buffers, move rows between them
//! (one [`GatherPlan`] covers growth, compaction, retain views and window trims), write a
//! step's new rows, and read/write packed rows for the cache file. A downstream engine with its
//! own memory (another GPU runtime, a paged pool, a quantized format) implements this trait and
//! gets every cache operation for free.

use kvzip_kernels::{DType, Device, GatherPlan, HostData, KvLayoutMirror, Tensor, View};

use crate::CacheError;

/// Where a step's new rows go in one layer: head `h`'s `t` rows are written to rows
/// `offsets[h] + lens_before[h] ..` (each head has room: `lens_before[h] + t <= caps[h]`).
#[derive(Debug, Clone, Copy)]
pub struct AppendAt<'a> {
    /// First row of each head's segment.
    pub offsets: &'a [usize],
    /// Valid rows of each head before the step.
    pub lens_before: &'a [usize],
    /// Rows reserved per head.
    pub caps: &'a [usize],
    /// Tokens of the step.
    pub t: usize,
    /// Elements per row.
    pub head_dim: usize,
}

/// Backing memory of a [`crate::KvCache`]: one K and one V buffer of `[rows, head_dim]` per
/// layer, plus whatever device-side copy of the layout its kernels need.
pub trait KvStorage {
    /// One layer's K and V memory.
    type Layer;
    /// Device copies of the layout that the storage's kernels read (`()` when none).
    type Meta;
    /// A step's new K or V rows, `[t, n_kv_heads, head_dim]` token-major.
    type Rows<'a>;

    /// Bytes per stored element (4 for f32, 2 for bf16).
    fn elem_bytes(&self) -> usize;

    /// A layer of `rows` rows of `head_dim` elements for K and for V (contents unspecified).
    fn alloc_layer(&self, rows: usize, head_dim: usize) -> Result<Self::Layer, CacheError>;

    /// Copies rows of `src` into `dst` as `plan` says (different buffers).
    fn gather(
        &self,
        src: &Self::Layer,
        dst: &mut Self::Layer,
        plan: &GatherPlan,
        head_dim: usize,
    ) -> Result<(), CacheError>;

    /// Writes a step's rows into layer `index` (see [`AppendAt`]); `meta` was synced with the
    /// lengths after the step and `appended = at.t`.
    fn write_step(
        &self,
        meta: &Self::Meta,
        index: usize,
        layer: &mut Self::Layer,
        at: AppendAt<'_>,
        k: Self::Rows<'_>,
        v: Self::Rows<'_>,
    ) -> Result<(), CacheError>;

    /// Copies rows of a step's input (`k` / `v`: `[rows, head_dim]`, any row count) into the
    /// layer as `plan` says (source rows index the input): appends to some heads only.
    fn scatter_step(
        &self,
        layer: &mut Self::Layer,
        plan: &GatherPlan,
        k: Self::Rows<'_>,
        v: Self::Rows<'_>,
        head_dim: usize,
    ) -> Result<(), CacheError>;

    /// Host copies of the rows `plan` selects (packed head after head, destination offsets
    /// ignored), in the storage's element type: what a cache file stores.
    fn read_packed(
        &self,
        layer: &Self::Layer,
        plan: &GatherPlan,
        head_dim: usize,
    ) -> Result<(HostData, HostData), CacheError>;

    /// Writes `k` / `v` (whole rows, any float type, converted) at rows `first_row..`.
    fn write_packed(
        &self,
        layer: &mut Self::Layer,
        first_row: usize,
        k: &HostData,
        v: &HostData,
        head_dim: usize,
    ) -> Result<(), CacheError>;

    /// Empty layout copies for layers of `heads[l]` KV heads.
    fn new_meta(&self, heads: &[usize]) -> Result<Self::Meta, CacheError>;

    /// Refreshes the layout copies: `lens` (flat over (layer, head)) after the current step,
    /// `appended` rows of which belong to the step, and, when they changed, the offsets.
    fn sync_meta(
        &self,
        meta: &mut Self::Meta,
        lens: &[usize],
        appended: usize,
        offsets: Option<&[usize]>,
    ) -> Result<(), CacheError>;
}

/// The storage over a `kvzip-kernels` [`Device`]: host vectors or CUDA buffers of one element
/// type (f32 on the CPU and bf16 on CUDA by default).
#[derive(Debug, Clone)]
pub struct DeviceKv {
    device: Device,
    dtype: DType,
}

/// One layer's K and V tensors of a [`DeviceKv`] cache.
#[derive(Debug)]
pub struct KvBuffers {
    /// Keys `[rows, head_dim]`.
    pub k: Tensor,
    /// Values `[rows, head_dim]`.
    pub v: Tensor,
}

impl DeviceKv {
    /// Storage on `device` in its compute type ([`Device::float_dtype`]).
    pub fn new(device: Device) -> Self {
        let dtype = device.float_dtype();
        Self { device, dtype }
    }

    /// Host f32 storage.
    pub fn host() -> Self {
        Self::new(Device::Cpu)
    }

    /// The device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The element type of the stored rows.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
}

impl From<kvzip_kernels::KernelError> for CacheError {
    fn from(e: kvzip_kernels::KernelError) -> Self {
        CacheError::Device(e.to_string())
    }
}

impl KvStorage for DeviceKv {
    type Layer = KvBuffers;
    type Meta = KvLayoutMirror;
    type Rows<'a> = View<'a>;

    fn elem_bytes(&self) -> usize {
        self.dtype.size()
    }

    fn alloc_layer(&self, rows: usize, head_dim: usize) -> Result<KvBuffers, CacheError> {
        let n = rows
            .checked_mul(head_dim)
            .ok_or_else(|| CacheError::Shape(format!("{rows} rows x {head_dim} overflow usize")))?;
        // Zeroed, not merely allocated: kernels load whole tiles and mask rows past a head's
        // length, so spare capacity is read (never used); zeros keep those reads defined
        // (compute-sanitizer initcheck) at the cost of one memset per allocation.
        Ok(KvBuffers {
            k: self.device.zeros(self.dtype, n)?,
            v: self.device.zeros(self.dtype, n)?,
        })
    }

    fn gather(
        &self,
        src: &KvBuffers,
        dst: &mut KvBuffers,
        plan: &GatherPlan,
        head_dim: usize,
    ) -> Result<(), CacheError> {
        self.device.gather_rows(
            (&src.k.view(), &src.v.view()),
            (&mut dst.k.view_mut(), &mut dst.v.view_mut()),
            plan,
            head_dim,
        )?;
        Ok(())
    }

    fn write_step(
        &self,
        meta: &KvLayoutMirror,
        index: usize,
        layer: &mut KvBuffers,
        at: AppendAt<'_>,
        k: View<'_>,
        v: View<'_>,
    ) -> Result<(), CacheError> {
        self.device.append_kv(
            &k,
            &v,
            &mut layer.k.view_mut(),
            &mut layer.v.view_mut(),
            (at.offsets, at.lens_before, at.caps),
            Some((meta, index)),
            at.t,
            at.head_dim,
        )?;
        Ok(())
    }

    fn scatter_step(
        &self,
        layer: &mut KvBuffers,
        plan: &GatherPlan,
        k: View<'_>,
        v: View<'_>,
        head_dim: usize,
    ) -> Result<(), CacheError> {
        self.device.gather_rows(
            (&k, &v),
            (&mut layer.k.view_mut(), &mut layer.v.view_mut()),
            plan,
            head_dim,
        )?;
        Ok(())
    }

    fn read_packed(
        &self,
        layer: &KvBuffers,
        plan: &GatherPlan,
        head_dim: usize,
    ) -> Result<(HostData, HostData), CacheError> {
        let rows = plan.total_rows();
        let mut packed = self.alloc_layer(rows, head_dim)?;
        let mut counts = plan.head_counts().into_iter();
        let mut dst_offsets = Vec::with_capacity(plan.n_heads());
        let mut at = 0;
        for _ in 0..plan.n_heads() {
            dst_offsets.push(at as i64);
            at += counts.next().unwrap_or(0);
        }
        let packed_plan = GatherPlan {
            src_rows: plan.src_rows.clone(),
            row_starts: plan.row_starts.clone(),
            dst_offsets,
        };
        self.gather(layer, &mut packed, &packed_plan, head_dim)?;
        Ok((
            self.device.to_host_raw(&packed.k.view())?,
            self.device.to_host_raw(&packed.v.view())?,
        ))
    }

    fn write_packed(
        &self,
        layer: &mut KvBuffers,
        first_row: usize,
        k: &HostData,
        v: &HostData,
        head_dim: usize,
    ) -> Result<(), CacheError> {
        let a = first_row * head_dim;
        let (nk, nv) = (k.len(), v.len());
        self.device
            .write_host(&mut layer.k.slice_mut(a..a + nk)?, k)?;
        self.device
            .write_host(&mut layer.v.slice_mut(a..a + nv)?, v)?;
        Ok(())
    }

    fn new_meta(&self, heads: &[usize]) -> Result<KvLayoutMirror, CacheError> {
        Ok(self.device.kv_layout_mirror(heads)?)
    }

    fn sync_meta(
        &self,
        meta: &mut KvLayoutMirror,
        lens: &[usize],
        appended: usize,
        offsets: Option<&[usize]>,
    ) -> Result<(), CacheError> {
        if let Some(o) = offsets {
            self.device.sync_kv_offsets(meta, o)?;
        }
        self.device.sync_kv_lens(meta, lens, appended)?;
        Ok(())
    }
}
