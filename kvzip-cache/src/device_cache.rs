//! Conveniences of the default storage ([`DeviceKv`]): host constructors, host slices of the
//! rows (for engines with their own CPU attention), and the [`KvView`] the device kernels read.

use std::borrow::Cow;

use kvzip_kernels::{Device, KvSegments, KvView, View};

use crate::cache::check_head;
use crate::layer::LayerCache;
use crate::storage::{DeviceKv, KvBuffers};
use crate::{CacheError, KvCache};

impl KvCache<DeviceKv> {
    /// An empty host (f32) cache with one layer per `(n_kv_heads, head_dim)` entry (no
    /// capacity reserved; heads grow on demand). Errors if a layer has 0 heads or `head_dim` 0.
    pub fn new(layer_shapes: &[(usize, usize)]) -> Result<Self, CacheError> {
        Self::new_in(DeviceKv::host(), layer_shapes)
    }

    /// An empty host (f32) cache of `n_layers` identical layers of `n_kv_heads` KV heads with
    /// `head_dim` elements per row.
    pub fn uniform(
        n_layers: usize,
        n_kv_heads: usize,
        head_dim: usize,
    ) -> Result<Self, CacheError> {
        Self::new(&vec![(n_kv_heads, head_dim); n_layers])
    }

    /// An empty cache on `device` (in its compute element type: f32 on the CPU, bf16 on CUDA)
    /// with one layer per `(n_kv_heads, head_dim)` entry and `rows_per_head` rows reserved in
    /// every head (0: grow on demand).
    pub fn on_device(
        device: &Device,
        layer_shapes: &[(usize, usize)],
        rows_per_head: usize,
    ) -> Result<Self, CacheError> {
        Self::with_capacity_in(DeviceKv::new(device.clone()), layer_shapes, rows_per_head)
    }

    /// The device the rows live on (`Device::Cpu` for host caches).
    pub fn device(&self) -> &Device {
        self.storage.device()
    }

    /// Appends `t = positions.len()` tokens of host rows to every head of `layer`: `k_new` /
    /// `v_new` are `[t, n_kv_heads, head_dim]` f32, token-major (K after RoPE), converted to the
    /// storage's element type (uploaded for CUDA caches). `positions` are the tokens' absolute
    /// positions, normally [`KvCache::next_positions`]`(t)`; `seen_tokens` rises to
    /// `max(positions) + 1`. O(t) rows amortized (growth policy: [`KvCache::append_rows`]).
    ///
    /// Errors with [`CacheError::Shape`] (naming the layer and the expected sizes) if the
    /// layer does not exist or a slice has the wrong length; the cache is then unchanged.
    ///
    /// ```
    /// use kvzip_cache::KvCache;
    ///
    /// let (n_kv, d) = (2, 3);
    /// let mut cache = KvCache::uniform(1, n_kv, d)?;
    /// // Two tokens; row (token i, head h) holds 10 * i + h in every element.
    /// let k: Vec<f32> = (0..2)
    ///     .flat_map(|i| (0..n_kv).flat_map(move |h| [(10 * i + h) as f32; 3]))
    ///     .collect();
    /// let pos = cache.next_positions(2);
    /// cache.append(0, &k, &k, &pos)?;
    /// assert_eq!(cache.head_keys(0, 1)?, &[1.0, 1.0, 1.0, 11.0, 11.0, 11.0]);
    /// assert_eq!(cache.head_positions(0, 1)?, &[0, 1]);
    /// assert!(cache.append(0, &k[..5], &k, &pos).is_err()); // wrong length
    /// # Ok::<(), kvzip_cache::CacheError>(())
    /// ```
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

    /// The view of `layer` the `kvzip-kernels` device ops read (`Device::attention`,
    /// `Device::score_chunk`, e.g. through `kvzip_score::ScoreAccumulator::score_layer_view`),
    /// with the device copies of its layout. Works for host and CUDA caches.
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

    /// Borrowed varlen view of host `layer`: the whole K and V buffers (`[capacity_rows,
    /// head_dim]` f32) with per-head row `offsets` and live `lens` (`[n_kv_heads]`), the input
    /// of CPU varlen attention (yours, or `kvzip_kernels::host::attention`). Head `h`'s live
    /// keys are rows `offsets[h] .. offsets[h] + lens[h]`. Host f32 storage only.
    ///
    /// ```
    /// use kvzip_cache::KvCache;
    ///
    /// let (n_kv, d) = (2, 4);
    /// let mut cache = KvCache::uniform(1, n_kv, d)?;
    /// let pos = cache.next_positions(5);
    /// let kv: Vec<f32> = (0..5 * n_kv * d).map(|i| (i % 7) as f32 * 0.1).collect();
    /// cache.append(0, &kv, &kv, &pos)?;
    ///
    /// // One query vector per KV head; softmax(q.k / sqrt(d)) . v over the head's live rows.
    /// let seg = cache.segments(0)?;
    /// let q = [0.5f32; 4];
    /// for h in 0..seg.n_kv_heads() {
    ///     let rows = seg.offsets[h]..seg.offsets[h] + seg.lens[h];
    ///     let logits: Vec<f32> = rows.clone()
    ///         .map(|r| (0..d).map(|i| q[i] * seg.k[r * d + i]).sum::<f32>() / (d as f32).sqrt())
    ///         .collect();
    ///     let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    ///     let w: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
    ///     let sum: f32 = w.iter().sum();
    ///     let out: Vec<f32> = (0..d)
    ///         .map(|i| rows.clone().zip(&w).map(|(r, w)| w * seg.v[r * d + i]).sum::<f32>() / sum)
    ///         .collect();
    ///     assert_eq!(out.len(), d);
    /// }
    /// # Ok::<(), kvzip_cache::CacheError>(())
    /// ```
    pub fn segments(&self, layer: usize) -> Result<KvSegments<'_>, CacheError> {
        self.layer_checked(layer)?.segments()
    }

    /// Live K rows of (`layer`, head `h`): `[len, head_dim]` f32, in position order (host f32
    /// storage only; see [`head_keys_host`](Self::head_keys_host) for any device). On an
    /// unpruned cache filled from position 0, row `r` is position `r`: the `head_keys` input
    /// of `kvzip_score::ScoreAccumulator::score_layer_chunk`.
    pub fn head_keys(&self, layer: usize, h: usize) -> Result<&[f32], CacheError> {
        let lc = self.layer_checked(layer)?;
        check_head(lc.n_kv_heads, layer, h)?;
        lc.head_keys(h)
    }

    /// Live V rows of (`layer`, head `h`): `[len, head_dim]` f32, in position order (host f32
    /// storage only).
    pub fn head_values(&self, layer: usize, h: usize) -> Result<&[f32], CacheError> {
        let lc = self.layer_checked(layer)?;
        check_head(lc.n_kv_heads, layer, h)?;
        lc.head_values(h)
    }

    /// The live K and V rows of (`layer`, head `h`) as views (`[len, head_dim]` each), on any
    /// device: a piece for [`kvzip_kernels::Device::attention_pieces`].
    pub fn head_rows(&self, layer: usize, h: usize) -> Result<(View<'_>, View<'_>), CacheError> {
        let lc = self.layer_checked(layer)?;
        check_head(lc.n_kv_heads, layer, h)?;
        let (a, b) = lc.head_range(h);
        let d = lc.head_dim;
        Ok((
            lc.data.k.slice(a * d..b * d)?,
            lc.data.v.slice(a * d..b * d)?,
        ))
    }

    /// Live K rows of (`layer`, head `h`) as host f32, borrowed from host f32 storage and
    /// downloaded (widened) otherwise.
    pub fn head_keys_host(&self, layer: usize, h: usize) -> Result<Cow<'_, [f32]>, CacheError> {
        let (k, _) = self.head_rows(layer, h)?;
        Ok(self.device().host_f32_cow(&k)?)
    }

    /// Live V rows of (`layer`, head `h`) as host f32, like [`Self::head_keys_host`].
    pub fn head_values_host(&self, layer: usize, h: usize) -> Result<Cow<'_, [f32]>, CacheError> {
        let (_, v) = self.head_rows(layer, h)?;
        Ok(self.device().host_f32_cow(&v)?)
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
