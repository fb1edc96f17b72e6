//! Quantized weight matrices kept as stored (ggml block formats).
//!
//! - [`format`]: the ggml storage types ([`GgmlType`]) and the scalar dequantization reference.
//! - [`QuantMatrix`]: a `[rows, cols]` matrix of one or more row ranges, each in its own block
//!   type (a stacked q/k/v whose parts were quantized differently stays as stored), over bytes
//!   that are owned or borrowed from a memory map ([`SharedBytes`]).
//!
//! The CPU kernels ([`crate::cpu::linear_quant`]) multiply activations with such a matrix
//! without ever expanding it; CUDA takes dequantized bf16.

pub mod format;

use std::ops::Range;
use std::sync::Arc;

pub use format::{dequantize, dequantize_into, GgmlType, QK_K};

/// Errors of the quantized formats.
#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    /// A ggml type without a decoder here.
    #[error("tensor {tensor:?}: ggml type {type_name} is not supported (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K)")]
    Unsupported {
        /// Tensor name.
        tensor: String,
        /// ggml type name, e.g. `IQ2_XXS`.
        type_name: String,
    },
    /// Bytes that do not match the type and shape.
    #[error("tensor {tensor:?}: {what}")]
    BadData {
        /// Tensor name.
        tensor: String,
        /// What does not match.
        what: String,
    },
}

/// The block types the fused CPU kernels compute on directly.
pub const KERNEL_TYPES: [GgmlType; 7] = [
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q8_0,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

/// Whether `ty` is one of [`KERNEL_TYPES`].
pub fn is_kernel_type(ty: GgmlType) -> bool {
    KERNEL_TYPES.contains(&ty)
}

/// Bytes of one row of `cols` elements of `ty`, or `None` when `cols` is not a whole number of
/// blocks.
pub fn row_bytes(ty: GgmlType, cols: usize) -> Option<usize> {
    let (block, size) = ty.block_layout();
    let (block, size) = (block as usize, size as usize);
    (cols % block == 0).then(|| cols / block * size)
}

/// A byte range of a shared owner: a `Vec<u8>` or a read-only memory map of a model file.
#[derive(Clone)]
pub struct SharedBytes {
    owner: Arc<dyn AsRef<[u8]> + Send + Sync>,
    range: Range<usize>,
}

impl SharedBytes {
    /// Bytes `range` of `owner`; `None` when the range lies outside it.
    pub fn new(owner: Arc<dyn AsRef<[u8]> + Send + Sync>, range: Range<usize>) -> Option<Self> {
        let len = (*owner).as_ref().len();
        (range.start <= range.end && range.end <= len).then_some(Self { owner, range })
    }

    /// Owned bytes.
    pub fn owned(bytes: Vec<u8>) -> Self {
        let range = 0..bytes.len();
        Self {
            owner: Arc::new(bytes),
            range,
        }
    }

    /// The bytes.
    pub fn bytes(&self) -> &[u8] {
        &(*self.owner).as_ref()[self.range.clone()]
    }
}

impl std::fmt::Debug for SharedBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SharedBytes({} bytes)", self.range.len())
    }
}

/// `rows` consecutive rows of a [`QuantMatrix`], all of block type `ty`.
#[derive(Debug, Clone)]
pub struct QuantPart {
    /// Block type of these rows.
    pub ty: GgmlType,
    /// Number of rows.
    pub rows: usize,
    /// `rows * row_bytes(ty, cols)` bytes, row after row.
    pub data: SharedBytes,
}

/// A `[rows, cols]` weight matrix in ggml block formats: parts of consecutive rows, each of one
/// block type (rows are independent, so parts stack like dense rows do).
#[derive(Debug, Clone)]
pub struct QuantMatrix {
    cols: usize,
    rows: usize,
    parts: Vec<QuantPart>,
    q8_activations: bool,
}

impl QuantMatrix {
    /// A matrix of `cols` columns from `parts` (in row order). Checks every part's type is one of
    /// [`KERNEL_TYPES`], `cols` is a whole number of its blocks and its bytes hold exactly its
    /// rows; `name` labels errors.
    pub fn new(cols: usize, parts: Vec<QuantPart>, name: &str) -> Result<Self, QuantError> {
        let bad = |what: String| QuantError::BadData {
            tensor: name.to_string(),
            what,
        };
        let mut rows = 0usize;
        for p in &parts {
            if !is_kernel_type(p.ty) {
                return Err(QuantError::Unsupported {
                    tensor: name.to_string(),
                    type_name: p.ty.name().to_string(),
                });
            }
            let rb = row_bytes(p.ty, cols).ok_or_else(|| {
                bad(format!(
                    "{cols} columns are not a whole number of {} blocks",
                    p.ty.name()
                ))
            })?;
            if p.rows.checked_mul(rb) != Some(p.data.bytes().len()) {
                return Err(bad(format!(
                    "{} rows of {} need {} bytes but {} are stored",
                    p.rows,
                    p.ty.name(),
                    p.rows.saturating_mul(rb),
                    p.data.bytes().len()
                )));
            }
            rows = rows
                .checked_add(p.rows)
                .ok_or_else(|| bad("row count overflows".into()))?;
        }
        Ok(Self {
            cols,
            rows,
            parts,
            q8_activations: false,
        })
    }

    /// The same matrix with decode (few-row) products computed on activations quantized to 8
    /// bits per 32-element block (integer dot products, as llama.cpp does): faster, not equal
    /// to the f32 path (activation rounding error about 0.4 % of each block's largest value).
    pub fn with_q8_activations(mut self, on: bool) -> Self {
        self.q8_activations = on;
        self
    }

    /// Whether [`with_q8_activations`](Self::with_q8_activations) is on.
    pub fn q8_activations(&self) -> bool {
        self.q8_activations
    }

    /// Columns (input features).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Rows (output features).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Elements (`rows * cols`).
    pub fn len(&self) -> usize {
        self.rows * self.cols
    }

    /// Whether the matrix has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes stored.
    pub fn stored_bytes(&self) -> usize {
        self.parts.iter().map(|p| p.data.bytes().len()).sum()
    }

    /// The parts, in row order.
    pub fn parts(&self) -> &[QuantPart] {
        &self.parts
    }

    /// Row `r` as `(type, bytes)`; `None` past the last row.
    pub fn row(&self, mut r: usize) -> Option<(GgmlType, &[u8])> {
        for p in &self.parts {
            if r < p.rows {
                let rb = row_bytes(p.ty, self.cols)?;
                return Some((p.ty, &p.data.bytes()[r * rb..(r + 1) * rb]));
            }
            r -= p.rows;
        }
        None
    }

    /// Rows `r..` as `(type, bytes)`, in order (the part and row size are found once, not per
    /// row as [`row`](Self::row) does).
    pub fn rows_from(&self, r: usize) -> impl Iterator<Item = (GgmlType, &[u8])> + '_ {
        let cols = self.cols;
        let mut skip = r;
        self.parts.iter().flat_map(move |p| {
            let start = skip.min(p.rows);
            skip -= start;
            row_bytes(p.ty, cols)
                .filter(|&rb| rb > 0)
                .map(|rb| p.data.bytes()[start * rb..].chunks_exact(rb))
                .into_iter()
                .flatten()
                .map(move |b| (p.ty, b))
        })
    }

    /// Row `r` dequantized into `out` (`cols` floats) with the scalar reference decoders.
    pub fn dequantize_row_reference(&self, r: usize, out: &mut [f32]) -> Result<(), QuantError> {
        let (ty, bytes) = self.row(r).ok_or_else(|| QuantError::BadData {
            tensor: String::new(),
            what: format!("row {r} of {}", self.rows),
        })?;
        let f = ty.block_fn().ok_or_else(|| QuantError::Unsupported {
            tensor: String::new(),
            type_name: ty.name().into(),
        })?;
        let (block, size) = ty.block_layout();
        for (d, s) in out[..self.cols]
            .chunks_exact_mut(block as usize)
            .zip(bytes.chunks_exact(size as usize))
        {
            f(s, d);
        }
        Ok(())
    }
}
