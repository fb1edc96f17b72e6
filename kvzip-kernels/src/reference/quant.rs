//! Reference linear / embedding over quantized matrices: rows dequantized with the scalar
//! decoders of [`crate::quant::format`], then the f64-accumulating reference ops.

use crate::quant::QuantMatrix;
use crate::{KernelError, Result};

fn rows_f32(m: &QuantMatrix, rows: std::ops::Range<usize>) -> Result<Vec<f32>> {
    let cols = m.cols();
    let mut out = vec![0.0f32; rows.len() * cols];
    for (i, r) in rows.enumerate() {
        m.dequantize_row_reference(r, &mut out[i * cols..(i + 1) * cols])
            .map_err(|e| KernelError::Shape(e.to_string()))?;
    }
    Ok(out)
}

/// See [`crate::cpu::linear_quant`].
#[allow(clippy::too_many_arguments)]
pub fn linear_quant(
    x: &[f32],
    m: &QuantMatrix,
    first_row: usize,
    bias: Option<&[f32]>,
    rows: usize,
    in_dim: usize,
    out_dim: usize,
    y: &mut [f32],
) -> Result<()> {
    crate::validate::quant_rows(m.rows(), m.cols(), first_row, out_dim, in_dim)?;
    let w = rows_f32(m, first_row..first_row + out_dim)?;
    super::linear(x, &w, bias, rows, in_dim, out_dim, y)
}

/// See [`crate::cpu::embedding_quant`].
pub fn embedding_quant(
    ids: &[u32],
    table: &QuantMatrix,
    dim: usize,
    scale: f32,
    out: &mut [f32],
) -> Result<()> {
    if table.cols() != dim {
        return Err(KernelError::Shape(format!(
            "embedding_quant: table has {} columns, dim is {dim}",
            table.cols()
        )));
    }
    let w = rows_f32(table, 0..table.rows())?;
    super::embedding(ids, &w, dim, scale, out)
}

/// See [`crate::cpu::dequantize_matrix`].
pub fn dequantize_matrix(m: &QuantMatrix) -> Vec<f32> {
    rows_f32(m, 0..m.rows()).unwrap_or_else(|_| vec![f32::NAN; m.len()])
}
