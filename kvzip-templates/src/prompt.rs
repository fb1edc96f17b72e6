//! KVzip prompt pieces (KVZIP-SPEC §1.1, §5.2, §6.2): system prompt / postfix per model family or
//! derived from a chat template, query formatting, repeat prompts and reconstruction inputs.

use std::ops::Range;

use crate::chat_template::{ChatMessage, ChatTemplate};
use crate::error::{Result, TemplateError};
use crate::python_compat::python_strip;
use crate::tokenizer::Tokenizer;

/// Repeat prompt of the first scoring chunk (§1.1).
pub const REPEAT_FIRST_PROMPT: &str = "\n\nRepeat the previous context exactly.";
/// Repeat prompt of every later scoring chunk; followed by [`HINT_TOKENS`] ids of the previous
/// chunk (note the trailing space) (§1.1).
pub const REPEAT_NEXT_PROMPT: &str =
    "\n\nRepeat the part of the previous context exactly, starting with ";
/// Context tokens per scoring chunk (§1.1).
pub const SCORING_CHUNK_TOKENS: usize = 2000;
/// Trailing ids of the previous chunk repeated as a hint (`prev_postfix_size`) (§1.1).
pub const HINT_TOKENS: usize = 8;
/// Tokens per prefill forward pass over system prompt + context (§0).
pub const PREFILL_CHUNK_TOKENS: usize = 16000;
/// System message KVzip uses (§5.2).
pub const SYSTEM_MESSAGE: &str = "You are a helpful assistant.";

/// The evaluation task, which selects the task line and the query format (§5.2, §6.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Task {
    /// Question answering (default).
    Qa,
    /// Grade-school math reasoning (dataset names starting with `gsm`).
    Gsm,
}

impl Task {
    /// The task of a dataset name: `Gsm` if it starts with `gsm`, else `Qa` (KVzip's rule).
    pub fn from_dataset_name(name: &str) -> Self {
        if name.starts_with("gsm") {
            Task::Gsm
        } else {
            Task::Qa
        }
    }

    /// The line appended to the system prompt, ending in a blank line.
    pub fn task_line(self) -> &'static str {
        match self {
            Task::Qa => "Given the context, answer to the following question or request without explanation.\n\n",
            Task::Gsm => "Given the context, answer to the following reasoning question.\n\n",
        }
    }
}

/// The query text of a question (§6.2): `Q: {question}` for QA; for GSM, the reasoning
/// instruction followed by `Q: {question}`.
pub fn format_query(task: Task, question: &str) -> String {
    match task {
        Task::Qa => format!("Q: {question}"),
        Task::Gsm => format!(
            "Reason and answer the question. You must say the answer in the last sentence beginning with \
             'The answer is'. Q: {question}"
        ),
    }
}

/// The text piece of a query as the model sees it: `"\n\n" + query.strip()` (§0, `apply_template`).
pub fn query_piece(query: &str) -> String {
    format!("\n\n{}", python_strip(query))
}

/// The model families KVzip has hand-written templates for (§5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ModelFamily {
    /// Llama 3.x (name contains `llama`, or is `duo`).
    Llama,
    /// Qwen2.5 and other Qwen (name starts with `qwen`).
    Qwen,
    /// Qwen3 with thinking disabled (Qwen name containing `qwen3-`).
    Qwen3,
    /// Gemma 3 (name starts with `gemma3` or `gemma-3`).
    Gemma3,
    /// Anything else (`<|begin_of_text|>` … `\n\nAnswer: `).
    Fallback,
}

impl ModelFamily {
    /// KVzip's name matching, on the lower-cased model name (last path component of an HF id).
    pub fn from_model_name(name: &str) -> Self {
        let name = name.rsplit('/').next().unwrap_or(name).to_lowercase();
        if name.contains("llama") || name == "duo" {
            ModelFamily::Llama
        } else if name.starts_with("qwen") {
            if name.contains("qwen3-") {
                ModelFamily::Qwen3
            } else {
                ModelFamily::Qwen
            }
        } else if name.starts_with("gemma3") || name.starts_with("gemma-3") {
            ModelFamily::Gemma3
        } else {
            ModelFamily::Fallback
        }
    }

    /// (prefix without task line, postfix), exactly as KVzip writes them.
    fn raw_pieces(self) -> (&'static str, &'static str) {
        const CHATML_PREFIX: &str =
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n";
        match self {
            ModelFamily::Llama => (
                "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant\
                 <|eot_id|><|start_header_id|>user<|end_header_id|>\n\n",
                "\n\n<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
            ),
            ModelFamily::Qwen => (CHATML_PREFIX, "<|im_end|>\n<|im_start|>assistant\n"),
            ModelFamily::Qwen3 => (CHATML_PREFIX, "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"),
            ModelFamily::Gemma3 => (
                "<bos><start_of_turn>user\nYou are a helpful assistant.\n\n",
                "<end_of_turn>\n<start_of_turn>model\n",
            ),
            ModelFamily::Fallback => ("<|begin_of_text|>", "\n\nAnswer: "),
        }
    }
}

/// The text around a KVzip context: `[prefix] [context] ["\n\n" + query] [postfix] → answer`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptPieces {
    /// System prompt: template header, system message, user header, and the task line.
    pub prefix: String,
    /// End of the user turn and the assistant header.
    pub postfix: String,
}

/// Placeholder user message used to split a rendered chat template.
const USER_PLACEHOLDER: &str = "KVZIP_USER_MESSAGE_PLACEHOLDER";

impl PromptPieces {
    /// KVzip's hand-written pieces of a family, with the task line appended to the prefix.
    pub fn for_family(family: ModelFamily, task: Task) -> Self {
        let (prefix, postfix) = family.raw_pieces();
        Self {
            prefix: format!("{prefix}{}", task.task_line()),
            postfix: postfix.to_string(),
        }
    }

    /// Plain-text pieces for a base model (no chat template, never trained on one):
    /// `[bos] [task line] [context] ["\n\n" + query] ["\nAnswer:"]`. `bos` is the tokenizer's
    /// BOS token text when it adds one (Gemma's `<bos>`).
    pub fn plain(bos: Option<&str>, task: Task) -> Self {
        Self {
            prefix: format!("{}{}", bos.unwrap_or(""), task.task_line()),
            postfix: "\nAnswer:".to_string(),
        }
    }

    /// Derives the pieces from a model's own chat template: renders `[system: "You are a helpful
    /// assistant.", user: PLACEHOLDER]` with the generation prompt (and `enable_thinking=false`),
    /// and splits around the placeholder. Templates that reject or drop a system message get
    /// `"You are a helpful assistant.\n\n"` prepended to the user message instead (as KVzip's
    /// Gemma prefix does). The task line is appended to the prefix.
    pub fn from_chat_template(template: &ChatTemplate, task: Task) -> Result<Self> {
        let mut extra = serde_json::Map::new();
        extra.insert("enable_thinking".into(), serde_json::Value::Bool(false));
        let with_system = [
            ChatMessage::new("system", SYSTEM_MESSAGE),
            ChatMessage::new("user", USER_PLACEHOLDER),
        ];
        let rendered = match template.render_with(&with_system, true, &extra) {
            Ok(text) if text.contains(SYSTEM_MESSAGE) => text,
            _ => {
                let merged = [ChatMessage::new(
                    "user",
                    format!("{SYSTEM_MESSAGE}\n\n{USER_PLACEHOLDER}"),
                )];
                template.render_with(&merged, true, &extra)?
            }
        };
        let mut parts = rendered.split(USER_PLACEHOLDER);
        let (Some(prefix), Some(postfix), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(TemplateError::PromptPieces(format!(
                "the user message must appear exactly once in the rendered template, got: {rendered:?}"
            )));
        };
        Ok(Self {
            prefix: format!("{prefix}{}", task.task_line()),
            postfix: postfix.to_string(),
        })
    }

    /// Token ids of the fixed pieces, each encoded on its own (§0).
    pub fn encode(&self, tokenizer: &Tokenizer) -> Result<PromptIds> {
        Ok(PromptIds {
            system_ids: tokenizer.encode(&self.prefix)?,
            postfix_ids: tokenizer.encode(&self.postfix)?,
            repeat_first_ids: tokenizer.encode(REPEAT_FIRST_PROMPT)?,
            repeat_next_ids: tokenizer.encode(REPEAT_NEXT_PROMPT)?,
        })
    }
}

/// Token ids of the fixed KVzip pieces of one model and task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptIds {
    /// The system prompt (prefix + task line): the never-evicted "sink" of length n_sys.
    pub system_ids: Vec<u32>,
    /// The postfix (end of user turn + assistant header).
    pub postfix_ids: Vec<u32>,
    /// [`REPEAT_FIRST_PROMPT`].
    pub repeat_first_ids: Vec<u32>,
    /// [`REPEAT_NEXT_PROMPT`].
    pub repeat_next_ids: Vec<u32>,
}

impl PromptIds {
    /// Prefill ids: `system_ids ++ context_ids`; the evictable range is `system_ids.len()..` (§0).
    pub fn prefill_ids(&self, context_ids: &[u32]) -> Vec<u32> {
        [self.system_ids.as_slice(), context_ids].concat()
    }

    /// Ids fed after the (compressed) context for a query: `encode("\n\n" + query.strip()) ++
    /// postfix_ids` (§0). `query` is already formatted (see [`format_query`]).
    pub fn query_input_ids(&self, tokenizer: &Tokenizer, query: &str) -> Result<Vec<u32>> {
        let mut ids = tokenizer.encode(&query_piece(query))?;
        ids.extend_from_slice(&self.postfix_ids);
        Ok(ids)
    }

    /// Scoring inputs of a context, see [`reconstruction_inputs`].
    pub fn reconstruction_inputs(
        &self,
        context_ids: &[u32],
        chunk: usize,
    ) -> Result<Vec<ReconstructionChunk>> {
        reconstruction_inputs(
            context_ids,
            &self.postfix_ids,
            &self.repeat_first_ids,
            &self.repeat_next_ids,
            chunk,
        )
    }
}

/// One scoring forward pass of context reconstruction (§1.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReconstructionChunk {
    /// Ids fed to the model after the full cached context.
    pub input_ids: Vec<u32>,
    /// The context positions (0-based, relative to the context start) this chunk scores.
    pub ctx_range: Range<usize>,
}

/// The chunk ranges of `len` tokens: consecutive, non-overlapping, `chunk` long, the last shorter
/// (`chunk_fn`). Empty for `len == 0`.
pub fn chunk_ranges(len: usize, chunk: usize) -> Result<Vec<Range<usize>>> {
    if chunk == 0 {
        return Err(TemplateError::InvalidArgument {
            name: "chunk",
            problem: "must be at least 1".into(),
        });
    }
    Ok((0..len)
        .step_by(chunk)
        .map(|start| start..(start + chunk).min(len))
        .collect())
}

/// Context-reconstruction inputs (§1.1): chunk 0 is `repeat_first ++ postfix ++ chunk0`; chunk
/// i ≥ 1 is `repeat_next ++ last 8 ids of chunk i-1 ++ postfix ++ chunk_i`. `chunk` is the chunk
/// length in tokens ([`SCORING_CHUNK_TOKENS`] in KVzip).
pub fn reconstruction_inputs(
    context_ids: &[u32],
    postfix_ids: &[u32],
    repeat_first_ids: &[u32],
    repeat_next_ids: &[u32],
    chunk: usize,
) -> Result<Vec<ReconstructionChunk>> {
    let ranges = chunk_ranges(context_ids.len(), chunk)?;
    Ok(ranges
        .into_iter()
        .map(|range| {
            let mut input_ids = Vec::with_capacity(
                repeat_next_ids.len() + HINT_TOKENS + postfix_ids.len() + range.len(),
            );
            if range.start == 0 {
                input_ids.extend_from_slice(repeat_first_ids);
            } else {
                input_ids.extend_from_slice(repeat_next_ids);
                input_ids.extend_from_slice(
                    &context_ids[range.start.saturating_sub(HINT_TOKENS)..range.start],
                );
            }
            input_ids.extend_from_slice(postfix_ids);
            input_ids.extend_from_slice(&context_ids[range.clone()]);
            ReconstructionChunk {
                input_ids,
                ctx_range: range,
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn family_matching_follows_kvzip() {
        assert_eq!(
            ModelFamily::from_model_name("llama3.1-8b"),
            ModelFamily::Llama
        );
        assert_eq!(ModelFamily::from_model_name("duo"), ModelFamily::Llama);
        assert_eq!(
            ModelFamily::from_model_name("Qwen/Qwen2.5-7B-Instruct-1M"),
            ModelFamily::Qwen
        );
        assert_eq!(ModelFamily::from_model_name("qwen3-8b"), ModelFamily::Qwen3);
        assert_eq!(
            ModelFamily::from_model_name("google/gemma-3-12b-it"),
            ModelFamily::Gemma3
        );
        assert_eq!(
            ModelFamily::from_model_name("smollm2-135m-instruct"),
            ModelFamily::Fallback
        );
    }

    #[test]
    fn chunks_and_hints() {
        let ctx: Vec<u32> = (100..125).collect();
        let out = reconstruction_inputs(&ctx, &[7, 7], &[1], &[2, 2], 10).unwrap();
        assert_eq!(out.len(), 3);
        assert_eq!(out[0].ctx_range, 0..10);
        assert_eq!(out[0].input_ids, [&[1, 7, 7][..], &ctx[0..10]].concat());
        assert_eq!(out[2].ctx_range, 20..25);
        assert_eq!(
            out[2].input_ids,
            [&[2, 2][..], &ctx[12..20], &[7, 7], &ctx[20..25]].concat()
        );
        assert!(reconstruction_inputs(&[], &[], &[], &[], 10)
            .unwrap()
            .is_empty());
        assert!(chunk_ranges(5, 0).is_err());
    }

    #[test]
    fn queries() {
        assert_eq!(
            query_piece(&format_query(Task::Qa, " What?\n")),
            "\n\nQ:  What?"
        );
        assert!(format_query(Task::Gsm, "x").ends_with("'The answer is'. Q: x"));
        assert_eq!(Task::from_dataset_name("gsm"), Task::Gsm);
        assert_eq!(Task::from_dataset_name("squad"), Task::Qa);
    }
}
