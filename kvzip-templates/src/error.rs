//! Error type of the crate.

use std::path::PathBuf;

/// Everything that can go wrong while loading tokenizers, rendering chat templates or building
/// KVzip prompts. File-related variants name the file (and the field) so the user can fix it.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file that failed.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A JSON file is not valid JSON.
    #[error("{path} is not valid JSON: {source}")]
    Json {
        /// The file that failed.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// `tokenizer.json` could not be loaded by the `tokenizers` library.
    #[error("cannot load tokenizer {path}: {message} (is it a HF tokenizers `tokenizer.json`?)")]
    TokenizerLoad {
        /// The `tokenizer.json` path.
        path: PathBuf,
        /// The library's message.
        message: String,
    },
    /// A field of a config file has an unexpected type or value.
    #[error("{path}: field `{field}` {problem}")]
    InvalidField {
        /// The file containing the field.
        path: PathBuf,
        /// The field name (JSON key).
        field: String,
        /// What is wrong and how to fix it.
        problem: String,
    },
    /// No chat template was found for the model.
    #[error(
        "no chat template in {dir}: expected `chat_template` in tokenizer_config.json or a chat_template.jinja file"
    )]
    MissingChatTemplate {
        /// The model directory.
        dir: PathBuf,
    },
    /// Encoding or decoding failed inside the `tokenizers` library.
    #[error("tokenizer {operation} failed: {message}")]
    Tokenize {
        /// `encode` or `decode`.
        operation: &'static str,
        /// The library's message.
        message: String,
    },
    /// A chat template failed to compile or to render (including `raise_exception(...)`).
    #[error("chat template error: {0}")]
    Template(String),
    /// The chat template output cannot be split into a KVzip prefix and postfix.
    #[error("cannot derive KVzip prompt pieces from the chat template: {0}")]
    PromptPieces(String),
    /// An argument is out of range (e.g. a chunk size of 0).
    #[error("invalid argument `{name}`: {problem}")]
    InvalidArgument {
        /// The argument name.
        name: &'static str,
        /// What is wrong.
        problem: String,
    },
}

impl From<minijinja::Error> for TemplateError {
    fn from(err: minijinja::Error) -> Self {
        // `detail` carries the `raise_exception` message; the display adds the location.
        let mut message = err.to_string();
        let mut source = std::error::Error::source(&err);
        while let Some(inner) = source {
            message.push_str(&format!(": {inner}"));
            source = inner.source();
        }
        TemplateError::Template(message)
    }
}

/// Result alias of the crate.
pub type Result<T, E = TemplateError> = std::result::Result<T, E>;
