//! Tokenizers, chat templates and KVzip prompt pieces.
//!
//! - [`Tokenizer`]: a model directory's `tokenizer.json` (HF `tokenizers`), its special tokens from
//!   `tokenizer_config.json` / `config.json` / `generation_config.json`, and its chat template.
//!   Encoding never adds BOS/EOS but recognises special-token strings inside the text; decoding
//!   can skip special tokens; [`DecodeStream`] yields text deltas while ids arrive.
//! - [`ChatTemplate`]: the Jinja chat template rendered with minijinja as transformers'
//!   `apply_chat_template(tokenize=False)` renders it.
//! - [`PromptPieces`] / [`PromptIds`]: KVzip's system prompt, postfix, query and repeat prompts
//!   (KVZIP-SPEC §1.1, §5.2, §6.2), encoded piecewise (§0), and the context-reconstruction inputs.
//!
//! # Example
//!
//! ```no_run
//! use kvzip_templates::{format_query, PromptPieces, Task, Tokenizer, SCORING_CHUNK_TOKENS};
//!
//! # fn main() -> Result<(), kvzip_templates::TemplateError> {
//! let tokenizer = Tokenizer::from_dir("models/smollm2-135m-instruct")?;
//! let pieces = PromptPieces::from_chat_template(&tokenizer.chat_template()?, Task::Qa)?;
//! let ids = pieces.encode(&tokenizer)?;
//!
//! let context_ids = tokenizer.encode("This is my basic profile. My name is Kim living in Seoul.")?;
//! let prefill = ids.prefill_ids(&context_ids); // evictable range: ids.system_ids.len()..
//! let scoring = ids.reconstruction_inputs(&context_ids, SCORING_CHUNK_TOKENS)?;
//! let query = ids.query_input_ids(&tokenizer, &format_query(Task::Qa, "What is my name?"))?;
//! # let _ = (prefill, scoring, query);
//!
//! // Streaming output: feed generated ids one by one.
//! let mut stream = tokenizer.decode_stream(true);
//! for id in [42_u32, 43, 44] {
//!     if let Some(delta) = stream.step(id)? {
//!         print!("{delta}");
//!     }
//! }
//! # Ok(())
//! # }
//! ```

mod chat_template;
mod decode_stream;
mod error;
mod prompt;
mod python_compat;
mod tokenizer;

pub use chat_template::{ChatMessage, ChatTemplate};
pub use decode_stream::DecodeStream;
pub use error::{Result, TemplateError};
pub use prompt::{
    chunk_ranges, format_query, query_piece, reconstruction_inputs, ModelFamily, PromptIds,
    PromptPieces, ReconstructionChunk, Task, HINT_TOKENS, PREFILL_CHUNK_TOKENS,
    REPEAT_FIRST_PROMPT, REPEAT_NEXT_PROMPT, SCORING_CHUNK_TOKENS, SYSTEM_MESSAGE,
};
pub use tokenizer::{SpecialTokens, Tokenizer};
