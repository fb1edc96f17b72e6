//! Conveniences of the default storage ([`DeviceKv`]): host constructors, host slices of the
//! rows (for engines with their own CPU attention), and the [`KvView`] the device kernels read.

use std::borrow::Cow;

use kvzip_kernels::{Device, KvSegments, KvView, View};

use crate::cache::check_head;
use crate::layer::LayerCache;
use crate::storage::{DeviceKv, KvBuffers};
use crate::{CacheError, KvCache};

impl KvCache<DeviceKv> {
    /// An empty host (f32) cache with one layer per `(n_kv_heads, head_dim)` entry.
    pub fn new(layer_shapes: &[(usize, usize)]) -> Result<Self, CacheError> {
        Self::new_in(DeviceKv::host(), layer_shapes)
    }

    /// An empty host cache of `n_layers` identical layers.
    pub fn uniform(
        n_layers: usize,
        n_kv_heads: usize,
        head_dim: usize,
    ) -> Result<Self, CacheError> {
        Self::new(&vec![(n_kv_heads, head_dim); n_layers])
    }

    /// An empty cache on `device` (its compute element type) with `rows_per_head` rows reserved.
    pub fn on_device(
        device: &Device,
        layer_shapes: &[(usize, usize)],
        rows_per_head: usize,
    ) -> Result<Self, CacheError> {
        Self::with_capacity_in(DeviceKv::new(device.clone()), layer_shapes, rows_per_head)
    }

    /// The device the rows live on.
    pub fn device(&self) -> &Device {
        self.storage.device()
    }

    /// Appends host rows to `layer` (see [`KvCache::append_rows`]); `k_new` / `v_new` are
    /// `[t, n_kv_heads, head_dim]` f32 (converted to the storage's type).
    pub fn append(
        &mut self,
        layer: usize,
        k_new: &[f32],
        v_new: &[f32],
        positions: &[u32],
    ) -> Result<(), CacheError> {
        if self.device().is_cuda() {
            let dev = self.device().clone();
            let (k, v) = (dev.upload_f32(k_new)?, dev.upload_f32(v_new)?);
            return self.append_rows(layer, k.view(), v.view(), positions);
        }
        let (nh, hd) = {
            let lc = self.layer_checked(layer)?;
            (lc.n_kv_heads, lc.head_dim)
        };
        let t = positions.len();
        if k_new.len() != t * nh * hd || v_new.len() != t * nh * hd {
            return Err(CacheError::Shape(format!(
                "layer {layer}: append: k_new has {} f32 and v_new {} f32, expected t {t} x \
                 n_kv_heads {nh} x head_dim {hd} = {} (token-major [t, n_kv_heads, head_dim])",
                k_new.len(),
                v_new.len(),
                t * nh * hd
            )));
        }
        self.append_rows(layer, View::f32(k_new), View::f32(v_new), positions)
    }

    /// The view of `layer` the device kernels read (attention, scoring), with the device
    /// copies of its layout.
    pub fn kv_view(&self, layer: usize) -> Result<KvView<'_>, CacheError> {
        let lc = self.layer_checked(layer)?;
        Ok(KvView::new(
            lc.data.k.view(),
            lc.data.v.view(),
            &lc.offsets,
            &lc.lens,
            lc.head_dim,
        )
        .with_mirror(&self.meta, layer))
    }

    /// Borrowed varlen view of host `layer` for the CPU attention kernels.
    pub fn segments(&self, layer: usize) -> Result<KvSegments<'_>, CacheError> {
        self.layer_checked(layer)?.segments()
    }

    /// Live K rows of (`layer`, head `h`): `[len, head_dim]` f32 (host f32 storage only).
    pub fn head_keys(&self, layer: usize, h: usize) -> Result<&[f32], CacheError> {
        let lc = self.layer_checked(layer)?;
        check_head(lc.n_kv_heads, layer, h)?;
        lc.head_keys(h)
    }

    /// Live V rows of (`layer`, head `h`): `[len, head_dim]` f32 (host f32 storage only).
    pub fn head_values(&self, layer: usize, h: usize) -> Result<&[f32], CacheError> {
        let lc = self.layer_checked(layer)?;
        check_head(lc.n_kv_heads, layer, h)?;
        lc.head_values(h)
    }

    /// Live K rows of (`layer`, head `h`) as host f32, borrowed from host f32 storage and
    /// downloaded (widened) otherwise.
    pub fn head_keys_host(&self, layer: usize, h: usize) -> Result<Cow<'_, [f32]>, CacheError> {
        let lc = self.layer_checked(layer)?;
        check_head(lc.n_kv_heads, layer, h)?;
        let (a, b) = lc.head_range(h);
        let d = lc.head_dim;
        let view = lc.data.k.slice(a * d..b * d)?;
        Ok(self.device().host_f32_cow(&view)?)
    }
}

impl PartialEq for KvCache<DeviceKv> {
    /// Logical equality: same spans, `seen_tokens`, and per head the same live K, V and
    /// positions in every layer (compared on the host; capacity is ignored).
    fn eq(&self, other: &Self) -> bool {
        self.n_sys() == other.n_sys()
            && self.n_ctx() == other.n_ctx()
            && self.seen_tokens() == other.seen_tokens()
            && self.layers.len() == other.layers.len()
            && self.layers.iter().zip(&other.layers).all(|(a, b)| {
                a.logical_eq(self.device(), b, other.device())
                    .unwrap_or(false)
            })
    }
}

impl PartialEq for LayerCache<KvBuffers> {
    /// Logical equality of two host layers: same geometry and, per head, the same live K, V and
    /// positions (capacity and slack are ignored). Layers in device memory compare unequal; use
    /// [`KvCache`]'s equality, which downloads.
    fn eq(&self, other: &Self) -> bool {
        self.logical_eq(&Device::Cpu, other, &Device::Cpu)
            .unwrap_or(false)
    }
}

impl LayerCache<KvBuffers> {
    /// Live K rows of head `h`: `[lens[h], head_dim]` f32 (host f32 storage only).
    pub fn head_keys(&self, h: usize) -> Result<&[f32], CacheError> {
        check_head(self.n_kv_heads, 0, h)?;
        let (a, b) = self.head_range(h);
        Ok(&self.data.k.host_f32("keys")?[a * self.head_dim..b * self.head_dim])
    }

    /// Live V rows of head `h`: `[lens[h], head_dim]` f32 (host f32 storage only).
    pub fn head_values(&self, h: usize) -> Result<&[f32], CacheError> {
        check_head(self.n_kv_heads, 0, h)?;
        let (a, b) = self.head_range(h);
        Ok(&self.data.v.host_f32("values")?[a * self.head_dim..b * self.head_dim])
    }

    /// Borrowed view for the CPU attention kernels: whole K/V storage, per-head row offsets
    /// and live lengths (host f32 storage only).
    pub fn segments(&self) -> Result<KvSegments<'_>, CacheError> {
        Ok(KvSegments {
            k: self.data.k.host_f32("keys")?,
            v: self.data.v.host_f32("values")?,
            offsets: &self.offsets,
            lens: &self.lens,
            head_dim: self.head_dim,
        })
    }

    /// Allocated K+V bytes of this layer (free capacity included).
    pub fn bytes(&self) -> usize {
        self.data.k.bytes() + self.data.v.bytes()
    }

    fn logical_eq(
        &self,
        dev: &Device,
        other: &Self,
        other_dev: &Device,
    ) -> Result<bool, CacheError> {
        if self.n_kv_heads != other.n_kv_heads
            || self.head_dim != other.head_dim
            || self.lens != other.lens
        {
            return Ok(false);
        }
        let d = self.head_dim;
        for h in 0..self.n_kv_heads {
            if self.head_positions(h) != other.head_positions(h) {
                return Ok(false);
            }
            let (a, b) = self.head_range(h);
            let (c, e) = other.head_range(h);
            for (x, y) in [(&self.data.k, &other.data.k), (&self.data.v, &other.data.v)] {
                let xs = dev.to_host_f32(&x.slice(a * d..b * d)?)?;
                let ys = other_dev.to_host_f32(&y.slice(c * d..e * d)?)?;
                if xs != ys {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }
}
