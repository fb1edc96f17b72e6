//! GGUF files: reading, dequantization and import into an HF-style model directory.
//!
//! - [`reader`]: bounds-checked parsing of a memory-mapped GGUF v2/v3 file ([`GgufFile`]);
//!   [`value`]: its metadata values ([`GgufValue`]).
//! - [`dequantize`]: ggml block formats → `f32` ([`GgmlType`]; the formats live in
//!   [`kvzip_kernels::quant`], where the CPU kernels compute on them directly).
//! - [`names`]: llama.cpp tensor names → HF names, and the llama Q/K row permutation.
//! - [`hf_config`]: `config.json` from the GGUF metadata.
//! - [`tokenizer_json`]: `tokenizer.json` / `tokenizer_config.json` from the GGUF vocabulary.
//! - [`safetensors_out`]: a streaming `model.safetensors` writer.
//! - [`import`]: [`import_gguf`], which ties it all together and writes atomically.

pub mod hf_config;
pub mod import;
pub mod names;
pub mod reader;
pub mod safetensors_out;
pub mod tokenizer_json;
pub mod value;

pub use kvzip_kernels::quant::GgmlType;

/// Dequantizes `n_elements` values of type `ty` stored in `bytes` to `f32` (see
/// [`kvzip_kernels::quant::dequantize`]); `tensor` names the tensor in errors.
pub fn dequantize(ty: GgmlType, bytes: &[u8], n_elements: usize, tensor: &str) -> Result<Vec<f32>> {
    Ok(kvzip_kernels::quant::dequantize(
        ty, bytes, n_elements, tensor,
    )?)
}

impl From<kvzip_kernels::quant::QuantError> for GgufError {
    fn from(e: kvzip_kernels::quant::QuantError) -> Self {
        use kvzip_kernels::quant::QuantError;
        match e {
            QuantError::Unsupported { tensor, type_name } => {
                GgufError::UnsupportedTensorType { tensor, type_name }
            }
            QuantError::BadData { tensor, what } => GgufError::BadTensorData { tensor, what },
        }
    }
}
pub use import::{
    import_gguf, is_current_import, ImportOptions, ImportReport, IMPORT_MARKER, IMPORT_VERSION,
};
pub use reader::{GgufFile, TensorInfo};
pub use value::GgufValue;

use std::path::PathBuf;

/// Everything that can go wrong reading, dequantizing or importing a GGUF file.
/// Every variant names the file (or tensor / key) and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// An I/O operation on `path` failed.
    #[error("{path}: {action}: {source}")]
    Io {
        /// File or directory involved.
        path: PathBuf,
        /// What was being done ("open", "write", "rename", ...).
        action: &'static str,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file ended before a field could be read.
    #[error("{path}: truncated GGUF file: reading {what} needs {needed} bytes at offset {offset}, but the file has {file_len} bytes")]
    Truncated {
        /// The GGUF file.
        path: PathBuf,
        /// The field being read.
        what: String,
        /// Byte offset of the field.
        offset: u64,
        /// Bytes the field needs.
        needed: u64,
        /// File length in bytes.
        file_len: u64,
    },
    /// The first four bytes are not `GGUF`.
    #[error("{path}: not a GGUF file (magic bytes {found:02x?}, expected \"GGUF\")")]
    BadMagic {
        /// The file.
        path: PathBuf,
        /// The first bytes found.
        found: Vec<u8>,
    },
    /// A GGUF version other than 2 or 3.
    #[error("{path}: unsupported GGUF version {version} (supported: 2, 3)")]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// Version number in the header.
        version: u32,
    },
    /// A metadata value type id this reader does not know.
    #[error("{path}: metadata key {key:?} has unknown value type id {type_id}")]
    UnknownValueType {
        /// The file.
        path: PathBuf,
        /// The metadata key.
        key: String,
        /// The raw type id.
        type_id: u32,
    },
    /// A tensor type id that is not a ggml type.
    #[error("{path}: tensor {tensor:?} has unknown ggml type id {type_id}")]
    UnknownTensorType {
        /// The file.
        path: PathBuf,
        /// Tensor name.
        tensor: String,
        /// The raw type id.
        type_id: u32,
    },
    /// A known ggml type that this importer cannot dequantize.
    #[error("tensor {tensor:?}: ggml type {type_name} is not supported for dequantization (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K)")]
    UnsupportedTensorType {
        /// Tensor name.
        tensor: String,
        /// ggml type name, e.g. `IQ2_XXS`.
        type_name: String,
    },
    /// A tensor's data range lies (partly) beyond the end of the file.
    #[error("{path}: tensor {tensor:?} data [{start}, {end}) lies beyond the end of the file ({file_len} bytes)")]
    TensorOutOfBounds {
        /// The file.
        path: PathBuf,
        /// Tensor name.
        tensor: String,
        /// Absolute start offset.
        start: u64,
        /// Absolute end offset.
        end: u64,
        /// File length in bytes.
        file_len: u64,
    },
    /// A tensor's byte length does not match its type and element count.
    #[error("tensor {tensor:?}: {what}")]
    BadTensorData {
        /// Tensor name.
        tensor: String,
        /// What is wrong.
        what: String,
    },
    /// Structurally invalid content (bad UTF-8, bad alignment, shape overflow, ...).
    #[error("{path}: invalid GGUF: {what}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// A metadata key the importer needs is absent or has the wrong type.
    #[error("{path}: metadata key {key:?}: {problem}")]
    Metadata {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// "missing", or the type mismatch.
        problem: String,
    },
    /// The model cannot be imported (unsupported architecture, missing tensor, shape mismatch, ...).
    #[error("{path}: cannot import: {what}")]
    Import {
        /// The file.
        path: PathBuf,
        /// What is wrong and, where possible, what to do.
        what: String,
    },
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, GgufError>;
