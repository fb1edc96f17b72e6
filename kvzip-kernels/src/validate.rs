//! Shape validation shared by every backend, so that all backends report the same errors.

use crate::{KernelError, KvSegments, Result};

fn shape(msg: String) -> KernelError {
    KernelError::Shape(msg)
}

/// `a * b` without overflow, or a shape error naming `what`.
pub(crate) fn mul(what: &str, a: usize, b: usize) -> Result<usize> {
    a.checked_mul(b)
        .ok_or_else(|| shape(format!("{what}: size {a} x {b} overflows usize")))
}

/// Checks `len == expected`.
pub(crate) fn len(name: &str, actual: usize, expected: usize, dims: &str) -> Result<()> {
    if actual != expected {
        return Err(shape(format!(
            "`{name}` has {actual} elements, expected {expected} ({dims})"
        )));
    }
    Ok(())
}

/// Checks a positive dimension.
pub(crate) fn positive(name: &str, value: usize) -> Result<()> {
    if value == 0 {
        return Err(shape(format!("`{name}` must be > 0")));
    }
    Ok(())
}

/// Checks `x.len()` is a whole number of rows of `dim` and returns the row count.
pub(crate) fn rows_of(name: &str, actual: usize, dim: usize) -> Result<usize> {
    positive("dim", dim)?;
    if actual % dim != 0 {
        return Err(shape(format!(
            "`{name}` has {actual} elements, not a multiple of dim = {dim}"
        )));
    }
    Ok(actual / dim)
}

/// Checks that rows `first_row..first_row + out_dim` exist in a `[rows, cols]` quantized
/// matrix and that its columns are the product's `in_dim` (both `linear_quant` backends).
pub(crate) fn quant_rows(
    rows: usize,
    cols: usize,
    first_row: usize,
    out_dim: usize,
    in_dim: usize,
) -> Result<()> {
    if cols != in_dim || first_row.checked_add(out_dim).is_none_or(|e| e > rows) {
        return Err(KernelError::Shape(format!(
            "linear_quant: rows {first_row}..{} of a [{rows}, {cols}] quantized matrix with \
             in_dim {in_dim}",
            first_row.saturating_add(out_dim),
        )));
    }
    Ok(())
}

/// Validates `linear`.
pub(crate) fn linear(
    x: usize,
    w: usize,
    bias: Option<usize>,
    rows: usize,
    in_dim: usize,
    out_dim: usize,
    y: usize,
) -> Result<()> {
    len("x", x, mul("x", rows, in_dim)?, "[rows, in_dim]")?;
    len("w", w, mul("w", out_dim, in_dim)?, "[out_dim, in_dim]")?;
    if let Some(b) = bias {
        len("bias", b, out_dim, "[out_dim]")?;
    }
    len("y", y, mul("y", rows, out_dim)?, "[rows, out_dim]")
}

/// Validates `matmul`.
pub(crate) fn matmul(a: usize, b: usize, m: usize, k: usize, n: usize, c: usize) -> Result<()> {
    len("a", a, mul("a", m, k)?, "[m, k]")?;
    len("b", b, mul("b", k, n)?, "[k, n] or [n, k]")?;
    len("c", c, mul("c", m, n)?, "[m, n]")
}

/// Validates `rms_norm`; returns the row count.
pub(crate) fn rms_norm(x: usize, w: usize, eps: f32, dim: usize, out: usize) -> Result<usize> {
    let rows = rows_of("x", x, dim)?;
    len("w", w, dim, "[dim]")?;
    len("out", out, x, "same as x")?;
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(KernelError::InvalidArgument(format!(
            "`eps` must be finite and >= 0, got {eps}"
        )));
    }
    Ok(rows)
}

/// Validates element-wise binary ops writing `out`.
pub(crate) fn binary(a_name: &str, a: usize, b_name: &str, b: usize, out: usize) -> Result<()> {
    len(b_name, b, a, &format!("same as {a_name}"))?;
    len("out", out, a, &format!("same as {a_name}"))
}

/// Validates `embedding`; returns the vocabulary size. Ids are checked by the op itself.
pub(crate) fn embedding(ids: usize, table: usize, dim: usize, out: usize) -> Result<usize> {
    let vocab = rows_of("table", table, dim)?;
    len("out", out, mul("out", ids, dim)?, "[ids.len(), dim]")?;
    Ok(vocab)
}

/// Validates `rope_inplace`; returns the number of rotated dims.
pub(crate) fn rope(
    x: usize,
    positions: usize,
    n_heads: usize,
    head_dim: usize,
    inv_freq: usize,
) -> Result<usize> {
    positive("n_heads", n_heads)?;
    positive("head_dim", head_dim)?;
    let row = mul("x", n_heads, head_dim)?;
    len(
        "x",
        x,
        mul("x", positions, row)?,
        "[positions.len(), n_heads, head_dim]",
    )?;
    let rot = mul("inv_freq", inv_freq, 2)?;
    if rot > head_dim {
        return Err(shape(format!(
            "`inv_freq` has {inv_freq} entries, so 2 * {inv_freq} rotated dims exceed head_dim = {head_dim}"
        )));
    }
    Ok(rot)
}

/// Validates `attention`; returns the number of KV heads.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention(
    q: usize,
    seg: &KvSegments<'_>,
    q_len: usize,
    group: usize,
    head_dim: usize,
    scale: f32,
    window: Option<usize>,
    softcap: Option<f32>,
    out: usize,
) -> Result<usize> {
    positive("head_dim", head_dim)?;
    positive("group", group)?;
    if seg.head_dim != head_dim {
        return Err(shape(format!(
            "`seg.head_dim` = {} differs from head_dim = {head_dim}",
            seg.head_dim
        )));
    }
    let n_kv = seg.lens.len();
    if seg.offsets.len() != n_kv {
        return Err(shape(format!(
            "`seg.offsets` has {} entries but `seg.lens` has {n_kv} (one per KV head)",
            seg.offsets.len()
        )));
    }
    let q_elems = mul("q", mul("q", q_len, n_kv)?, mul("q", group, head_dim)?)?;
    len("q", q, q_elems, "[q_len, n_kv_heads * group, head_dim]")?;
    len("out", out, q, "same as q")?;
    let k_rows = rows_of("seg.k", seg.k.len(), head_dim)?;
    let v_rows = rows_of("seg.v", seg.v.len(), head_dim)?;
    for (h, (&off, &n)) in seg.offsets.iter().zip(seg.lens).enumerate() {
        let end = off
            .checked_add(n)
            .ok_or_else(|| shape(format!("KV head {h}: offset + len overflows")))?;
        if end > k_rows || end > v_rows {
            return Err(shape(format!(
                "KV head {h}: rows {off}..{end} exceed `seg.k` ({k_rows} rows) or `seg.v` ({v_rows} rows)"
            )));
        }
        if n < q_len {
            return Err(shape(format!(
                "KV head {h} holds {n} keys, fewer than q_len = {q_len} (the new queries must already be in the cache)"
            )));
        }
    }
    if window == Some(0) {
        return Err(KernelError::InvalidArgument(
            "`window` must be >= 1 (None disables the sliding window)".into(),
        ));
    }
    if !scale.is_finite() {
        return Err(KernelError::InvalidArgument(format!(
            "`scale` must be finite, got {scale}"
        )));
    }
    if let Some(c) = softcap {
        if !(c.is_finite() && c > 0.0) {
            return Err(KernelError::InvalidArgument(format!(
                "`softcap` must be finite and > 0, got {c}"
            )));
        }
    }
    Ok(n_kv)
}

/// First key index (inclusive) visible to a query at key index `i` under `window`.
pub(crate) fn window_start(i: usize, window: Option<usize>) -> usize {
    match window {
        Some(w) => (i + 1).saturating_sub(w),
        None => 0,
    }
}
