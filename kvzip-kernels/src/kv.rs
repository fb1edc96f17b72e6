//! Borrowed view of one layer's flattened per-head KV storage.

/// Borrowed view of one layer's flattened per-KV-head key/value storage.
///
/// `k` and `v` hold rows of `head_dim` floats. KV head `h` owns the `lens[h]` rows starting at row
/// `offsets[h]` (row index, not float index) of both `k` and `v`. Heads may be ragged (different
/// lengths) and segments may have unused capacity between them.
#[derive(Debug, Clone, Copy)]
pub struct KvSegments<'a> {
    /// Key rows, `[total_rows, head_dim]`.
    pub k: &'a [f32],
    /// Value rows, `[total_rows, head_dim]`.
    pub v: &'a [f32],
    /// First row of each KV head's segment, `[n_kv_heads]`.
    pub offsets: &'a [usize],
    /// Number of valid rows of each KV head's segment, `[n_kv_heads]`.
    pub lens: &'a [usize],
    /// Floats per key / value row.
    pub head_dim: usize,
}

impl KvSegments<'_> {
    /// Number of KV heads (`lens.len()`).
    pub fn n_kv_heads(&self) -> usize {
        self.lens.len()
    }

    /// Keys of KV head `h`, `[lens[h], head_dim]`. Call only after validation.
    pub(crate) fn keys(&self, h: usize) -> &[f32] {
        let start = self.offsets[h] * self.head_dim;
        &self.k[start..start + self.lens[h] * self.head_dim]
    }

    /// Values of KV head `h`, `[lens[h], head_dim]`. Call only after validation.
    pub(crate) fn values(&self, h: usize) -> &[f32] {
        let start = self.offsets[h] * self.head_dim;
        &self.v[start..start + self.lens[h] * self.head_dim]
    }
}
