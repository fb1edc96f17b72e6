//! Keep masks: which context KV pairs survive a prune, per (layer, kv-head, context position).

use crate::CacheError;

/// Which context pairs to keep, for every layer and KV head.
///
/// Indexing is `[layer][head][position]` where `position` runs over the *context* span only
/// (`0..n_ctx`, i.e. absolute positions `n_sys..n_sys + n_ctx`). The system prompt and
/// everything after the context are never evicted and are not represented here.
/// A layer set to `None` is not evictable (e.g. Gemma3 sliding-window layers) and keeps all pairs.
///
/// Masks normally come from `kvzip_score::select` (and its siblings), which keep an exact
/// number of pairs; they are consumed by [`crate::KvCache::compact`] (evict) and
/// [`crate::KvCache::compacted_view`] (retain).
///
/// ```
/// use kvzip_cache::{KeepMask, LayerKeep};
///
/// // 2 layers x 2 KV heads x 3 context positions; layer 1 is not evictable.
/// let mut mask = KeepMask::keep_all(3, &[Some(2), None]);
/// mask.layer_mut(0).unwrap().bits[1 * 3 + 2] = false; // evict (layer 0, head 1, position 2)
/// assert!(!mask.is_kept(0, 1, 2));
/// assert!(mask.is_kept(1, 0, 2)); // non-evictable layers keep everything
/// assert_eq!(mask.counts(), (5, 6));
///
/// // The same mask from explicit bits (head-major `bits[h * n_ctx + pos]`).
/// let bits = vec![true, true, true, true, true, false];
/// let same = KeepMask::from_layers(3, vec![Some(LayerKeep { n_heads: 2, bits }), None])?;
/// assert_eq!(same, mask);
/// assert!(KeepMask::from_layers(3, vec![Some(LayerKeep { n_heads: 2, bits: vec![true; 5] })]).is_err());
/// # Ok::<(), kvzip_cache::CacheError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeepMask {
    n_ctx: usize,
    layers: Vec<Option<LayerKeep>>,
}

/// The keep bits of one layer: `heads` rows of `n_ctx` booleans, head-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerKeep {
    /// Number of KV heads in this layer.
    pub n_heads: usize,
    /// `n_heads * n_ctx` flags, head-major (`bits[h * n_ctx + pos]`).
    pub bits: Vec<bool>,
}

impl KeepMask {
    /// A mask keeping everything over `n_ctx` context positions, for `n_heads[l]` KV heads per
    /// layer (`None` = not evictable).
    pub fn keep_all(n_ctx: usize, n_heads: &[Option<usize>]) -> Self {
        let layers = n_heads
            .iter()
            .map(|h| {
                h.map(|n_heads| LayerKeep {
                    n_heads,
                    bits: vec![true; n_heads * n_ctx],
                })
            })
            .collect();
        Self { n_ctx, layers }
    }

    /// Builds a mask over `n_ctx` context positions from per-layer bit vectors (`None` = not
    /// evictable); errors with [`CacheError::Shape`] unless every layer has `n_heads * n_ctx`
    /// bits.
    pub fn from_layers(n_ctx: usize, layers: Vec<Option<LayerKeep>>) -> Result<Self, CacheError> {
        for (l, layer) in layers.iter().enumerate() {
            if let Some(layer) = layer {
                if layer.bits.len() != layer.n_heads * n_ctx {
                    return Err(CacheError::Shape(format!(
                        "keep mask layer {l}: {} bits, expected n_heads {} x n_ctx {n_ctx}",
                        layer.bits.len(),
                        layer.n_heads
                    )));
                }
            }
        }
        Ok(Self { n_ctx, layers })
    }

    /// Number of context positions covered by the mask.
    pub fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    /// Number of layers.
    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }

    /// The keep bits of layer `l` (`None` if the layer is not evictable or out of range).
    pub fn layer(&self, l: usize) -> Option<&LayerKeep> {
        self.layers.get(l).and_then(|x| x.as_ref())
    }

    /// Mutable keep bits of layer `l` (`None` if the layer is not evictable or out of range).
    pub fn layer_mut(&mut self, l: usize) -> Option<&mut LayerKeep> {
        self.layers.get_mut(l).and_then(|x| x.as_mut())
    }

    /// Whether pair (`layer`, `head`, context `pos`) is kept (non-evictable layers: always).
    /// `pos` is relative to the context start; `head < n_heads` and `pos < n_ctx` are the
    /// caller's to ensure (out-of-range indices of an evictable layer may panic).
    pub fn is_kept(&self, layer: usize, head: usize, pos: usize) -> bool {
        match self.layer(layer) {
            Some(lk) => lk.bits[head * self.n_ctx + pos],
            None => true,
        }
    }

    /// `(kept, total)` context pairs over the evictable layers.
    pub fn counts(&self) -> (usize, usize) {
        self.layers.iter().flatten().fold((0, 0), |(k, t), lk| {
            (
                k + lk.bits.iter().filter(|b| **b).count(),
                t + lk.bits.len(),
            )
        })
    }

    /// Fraction of evictable context pairs kept (1.0 for an empty mask).
    pub fn kept_fraction(&self) -> f64 {
        let (k, t) = self.counts();
        if t == 0 {
            1.0
        } else {
            k as f64 / t as f64
        }
    }
}
