//! GEMM-based ops (`linear`, `matmul`) and the safe wrapper around the `gemm` crate.

use crate::{validate, KernelError, Result};
use gemm::Parallelism;
use rayon::prelude::*;

/// A strided read-only matrix view: element `(r, c)` is `data[r * row_stride + c * col_stride]`.
#[derive(Clone, Copy)]
pub(crate) struct MatRef<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl MatRef<'_> {
    /// Largest index touched plus one (0 for an empty matrix).
    fn span(&self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            return 0;
        }
        (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride + 1
    }
}

/// `dst[m, n] (row stride dst_rs, unit column stride) = beta * lhs · rhs + (alpha * dst if accumulate)`.
///
/// Bounds are checked against every slice, so the unsafe call below never reads or writes out of
/// range. `accumulate = None` overwrites `dst` (old contents, even NaN, are ignored).
pub(crate) fn gemm_into(
    dst: &mut [f32],
    dst_rs: usize,
    lhs: MatRef<'_>,
    rhs: MatRef<'_>,
    accumulate: Option<f32>,
    beta: f32,
    parallelism: Parallelism,
) -> Result<()> {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    if rhs.rows != k {
        return Err(KernelError::Shape(format!(
            "gemm: lhs is {m}x{k} but rhs is {}x{n}",
            rhs.rows
        )));
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    let dst_span = (m - 1) * dst_rs + n;
    if dst_span > dst.len() || lhs.span() > lhs.data.len() || rhs.span() > rhs.data.len() {
        return Err(KernelError::Shape(format!(
            "gemm: views out of bounds (dst {dst_span}/{}, lhs {}/{}, rhs {}/{})",
            dst.len(),
            lhs.span(),
            lhs.data.len(),
            rhs.span(),
            rhs.data.len()
        )));
    }
    if k == 0 {
        for r in 0..m {
            let row = &mut dst[r * dst_rs..r * dst_rs + n];
            match accumulate {
                Some(a) => row.iter_mut().for_each(|v| *v *= a),
                None => row.fill(0.0),
            }
        }
        return Ok(());
    }
    let to_isize = |v: usize| {
        isize::try_from(v).map_err(|_| KernelError::Shape(format!("gemm: stride {v} too large")))
    };
    // SAFETY: all three views were checked above to lie inside their slices for the given
    // dimensions and strides; `dst` is borrowed mutably and cannot alias `lhs` / `rhs`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            to_isize(dst_rs)?,
            accumulate.is_some(),
            lhs.data.as_ptr(),
            to_isize(lhs.col_stride)?,
            to_isize(lhs.row_stride)?,
            rhs.data.as_ptr(),
            to_isize(rhs.col_stride)?,
            to_isize(rhs.row_stride)?,
            accumulate.unwrap_or(0.0),
            beta,
            false,
            false,
            false,
            parallelism,
        );
    }
    Ok(())
}

/// Rows at or below which `linear` uses a parallel dot-product kernel instead of GEMM
/// (decode: the weight matrix is streamed once, split over threads by output features).
const GEMV_MAX_ROWS: usize = 2;

/// `y[rows, out_dim] = x[rows, in_dim] · w[out_dim, in_dim]^T (+ bias[out_dim])`.
///
/// Uses the `gemm` crate with rayon parallelism; for `rows <= 2` a rayon-parallel dot-product
/// kernel that streams `w` once.
pub fn linear(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    rows: usize,
    in_dim: usize,
    out_dim: usize,
    y: &mut [f32],
) -> Result<()> {
    validate::linear(
        x.len(),
        w.len(),
        bias.map(<[f32]>::len),
        rows,
        in_dim,
        out_dim,
        y.len(),
    )?;
    if rows == 0 || out_dim == 0 {
        return Ok(());
    }
    if rows <= GEMV_MAX_ROWS {
        for r in 0..rows {
            let xr = &x[r * in_dim..(r + 1) * in_dim];
            let yr = &mut y[r * out_dim..(r + 1) * out_dim];
            const CHUNK: usize = 64;
            yr.par_chunks_mut(CHUNK).enumerate().for_each(|(c, yc)| {
                for (i, yv) in yc.iter_mut().enumerate() {
                    let o = c * CHUNK + i;
                    let b = bias.map_or(0.0, |b| b[o]);
                    *yv = super::math::dot(xr, &w[o * in_dim..(o + 1) * in_dim]) + b;
                }
            });
        }
        return Ok(());
    }
    let accumulate = match bias {
        Some(b) => {
            for yr in y.chunks_exact_mut(out_dim) {
                yr.copy_from_slice(b);
            }
            Some(1.0)
        }
        None => None,
    };
    let lhs = MatRef {
        data: x,
        rows,
        cols: in_dim,
        row_stride: in_dim,
        col_stride: 1,
    };
    // rhs = w^T: element (kk, o) = w[o * in_dim + kk].
    let rhs = MatRef {
        data: w,
        rows: in_dim,
        cols: out_dim,
        row_stride: 1,
        col_stride: in_dim,
    };
    gemm_into(y, out_dim, lhs, rhs, accumulate, 1.0, Parallelism::Rayon(0))
}

/// `c[m, n] = alpha * a[m, k] · b + beta * c`, with `b` `[k, n]` or, if `trans_b`, `[n, k]`.
/// With `beta == 0` the old contents of `c` are ignored (NaN in `c` does not propagate).
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    a: &[f32],
    b: &[f32],
    m: usize,
    k: usize,
    n: usize,
    trans_b: bool,
    alpha: f32,
    beta: f32,
    c: &mut [f32],
) -> Result<()> {
    validate::matmul(a.len(), b.len(), m, k, n, c.len())?;
    let lhs = MatRef {
        data: a,
        rows: m,
        cols: k,
        row_stride: k,
        col_stride: 1,
    };
    let rhs = if trans_b {
        MatRef {
            data: b,
            rows: k,
            cols: n,
            row_stride: 1,
            col_stride: k,
        }
    } else {
        MatRef {
            data: b,
            rows: k,
            cols: n,
            row_stride: n,
            col_stride: 1,
        }
    };
    let accumulate = (beta != 0.0).then_some(beta);
    gemm_into(c, n, lhs, rhs, accumulate, alpha, Parallelism::Rayon(0))
}
